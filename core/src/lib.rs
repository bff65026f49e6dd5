//! Plain types of the Continual-NExT protocol (Continual-NExT, arXiv 2602.18055): task ids and
//! their modalities, task orders, the accuracy matrix, the per-task scorers and the pure metric
//! functions. Nothing here loads data or models.

mod exact;
pub mod fsx;
pub mod hash;
pub mod matrix;
pub mod metrics;
pub mod rng;
pub mod scoring;
mod task;
pub mod transfer;

pub use matrix::{AccuracyMatrix, MatrixError};
pub use task::{Modality, Order, ParseIdError, TaskId};
