//! Process-wide settings the training processes (`cnext`, `tests/suite.rs`) make before any
//! candle call.

/// Fixes the thread counts through the environment, where they are not set already:
///
/// - `RAYON_NUM_THREADS` to candle's default (the physical cores). Unset, candle's
///   `get_num_threads` re-reads `/proc/cpuinfo` on every matmul: measured, a tenth of a
///   mini training step spent in the kernel formatting that file.
/// - `CANDLE_NUM_THREADS` to 1: candle's elementwise ops then run on the calling thread. At
///   the nano sizes the hand-off to its spinning worker pool costs more than the op, and the
///   spinning workers compete with the matmul threads for the same cores (`cnext bench step`
///   on 2 cores: 88.6 -> 62.4 ms a vqav2 step). Matmuls and the fused kernels still use
///   `RAYON_NUM_THREADS` threads.
///
/// Call it at the start of `main`, while the process has one thread.
pub fn init_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
