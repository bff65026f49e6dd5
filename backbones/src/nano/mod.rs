//! The nano backbone of the mini profile.

pub mod backbone;
pub mod build;
pub mod config;
pub mod model;
pub mod tokenizer;
pub mod vq;
