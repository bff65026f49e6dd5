//! Backbones: the [`Backbone`] trait the harness calls, and the nano Dual-to-Dual model of the
//! mini profile (our own code, built for training). A real backbone implements the same trait.

pub mod imageproc;
pub mod janus;
pub mod nano;
pub mod peft;

use candle_core::{Result, Tensor, Var};
use cnext_adapters::Ctx;
use image::RgbImage;
use std::collections::BTreeMap;

/// What a task asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Text,
    Image,
}

/// A model input: an optional image and the prompt text (instruction included).
#[derive(Debug, Clone)]
pub struct Prompt {
    pub image: Option<RgbImage>,
    pub text: String,
}

/// The supervised answer of a training example.
#[derive(Debug, Clone)]
pub enum Target {
    Text(String),
    Image(RgbImage),
}

#[derive(Debug, Clone)]
pub struct Example {
    pub prompt: Prompt,
    pub target: Target,
}

/// A generated answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Text(String),
    Image(RgbImage),
}

/// The narrow interface between the harness and a model.
pub trait Backbone {
    /// Mean cross-entropy over the answer tokens of a batch (loss mask on answers only).
    fn loss(&self, batch: &[Example], ctx: Ctx) -> Result<Tensor>;
    /// Greedy generation for a batch of prompts of one output kind.
    fn generate(
        &self,
        prompts: &[Prompt],
        kind: OutputKind,
        max_new_tokens: usize,
    ) -> Result<Vec<Output>>;
    /// Greedy generation from an ensemble of weight sets of the trainable variables (LAE): at
    /// every step, the argmax of the elementwise max of the members' next-token
    /// distributions. The current weights are unchanged afterwards.
    fn generate_ensemble(
        &self,
        prompts: &[Prompt],
        kind: OutputKind,
        max_new_tokens: usize,
        sets: &[BTreeMap<String, Tensor>],
    ) -> Result<Vec<Output>> {
        if sets.is_empty() {
            return self.generate(prompts, kind, max_new_tokens);
        }
        candle_core::bail!("this backbone has no ensemble decoding")
    }
    /// The variables the optimizer may update (adapters and projector), by name.
    fn trainable(&self) -> BTreeMap<String, Var>;
}
