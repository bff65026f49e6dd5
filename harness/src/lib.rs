//! The harness: the training loop, optimizer and schedule that every method shares, and
//! evaluation. Methods supply hooks; the harness owns the loop and its counters.

pub mod cache_io;
pub mod checkpoint;
pub mod clip;
pub mod data;
pub mod device;
pub mod errors;
pub mod eval;
pub mod method;
pub mod optim;
pub mod run;
pub mod stages;
pub mod tasks;
pub mod train;
