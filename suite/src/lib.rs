//! The suite side of continual-next: profile setup (data, base, scorer), test names, matrix
//! snapshots and the libtest-mimic trials of `tests/suite.rs`; the `cnext` binary shares the
//! setup.

pub mod judge;
pub mod names;
pub mod plan;
pub mod profile;
pub mod report;
pub mod runtime;
pub mod seeds;
pub mod setup;
pub mod snapshot;
