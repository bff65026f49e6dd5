//! The benchmark as a test suite: `cargo test --release -- lora::default_order` trains, scores
//! and checks every cell of LoRA in the default order against its snapshot. See
//! `cnext_suite::plan` for the names, profiles and scope.

use cnext_suite::plan::{trials, Scope};

// As the `cnext` binary: fresh tensor buffers every step (DESIGN.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    cnext_suite::runtime::init_threads();
    let args = libtest_mimic::Arguments::from_args();
    let scope = match Scope::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    libtest_mimic::run(&args, trials(scope, cnext_baselines::ALL)).exit();
}
