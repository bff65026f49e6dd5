//! The harness: the training loop, optimizer and schedule that every method shares, and
//! evaluation. Methods supply hooks; the harness owns the loop and its counters.

pub mod optim;
pub mod train;
