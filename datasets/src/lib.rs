//! Continual-NExT data: task specs with the paper's instruction templates, strict loaders for
//! the official train JSONL / test JSON formats, and the generator of Continual-NExT-mini
//! (scenes of shapes, object classes, book covers and edits rendered with our own code).

pub mod check;
pub mod classes;
pub mod covers;
pub mod errors;
pub mod evaluate;
pub mod font;
pub mod formats;
pub mod generate;
pub mod loader;
/// The seeded generator, re-exported where the generator's users have always found it.
pub use cnext_core::rng;
pub mod scene;
pub mod spec;
pub mod tasks;

pub use generate::{generate, DataProfile, GenConfig, Manifest};
pub use loader::{
    load_image, load_task, DataError, TaskData, TestItem, TestSample, TrainItem, TrainSample,
};
pub use spec::TaskSpec;
