//! Backbones: the [`Backbone`] trait the harness trains and scores, the [`BaseModel`] factory
//! it builds them with, and two implementations: the nano Dual-to-Dual model of the mini
//! profile (our own code, built for training) and Janus / Janus-Pro (Hugging Face weights).

pub mod imageproc;
pub mod janus;
pub mod nano;
pub mod peft;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use cnext_adapters::{AdapterPlan, Ctx};
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

/// What a training batch is grouped by, known from an example's record and image headers:
/// its input image's size and whether it answers with an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchShape {
    pub image: Option<(u32, u32)>,
    pub image_out: bool,
}

impl BatchShape {
    pub fn text(image: Option<(u32, u32)>) -> Self {
        BatchShape {
            image,
            image_out: false,
        }
    }
    pub fn image(image: Option<(u32, u32)>) -> Self {
        BatchShape {
            image,
            image_out: true,
        }
    }
    pub fn of(e: &Example) -> Self {
        BatchShape {
            image: e.prompt.image.as_ref().map(|i| (i.width(), i.height())),
            image_out: matches!(e.target, Target::Image(_)),
        }
    }
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
    /// The variables the optimizer may update (adapters and connectors), by name.
    fn trainable(&self) -> BTreeMap<String, Var>;
    /// The shape examples of `shape` have once processed: examples of one processed shape
    /// batch together without padding. A backbone that resizes every image to one size
    /// (Janus) maps all image sizes to one, so real data of varied sizes still fills batches.
    fn batch_shape(&self, shape: BatchShape) -> BatchShape {
        shape
    }
    /// The current values of the trainable variables (what a stage checkpoint stores).
    fn trainable_tensors(&self) -> BTreeMap<String, Tensor> {
        self.trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }
}

/// A loaded base model: the one factory the harness builds backbones with. The harness,
/// the methods and the suite see a base only through this trait, so nano and Janus are two
/// implementations of it and none of them names the other's types or weights.
pub trait BaseModel: Send + Sync {
    /// Names the base in stage keys and provenance; two bases with one name have the same
    /// weights and settings (a content key, or a directory plus the settings that shape it).
    fn name(&self) -> String;
    /// Where the weights live and where runs on this base train.
    fn device(&self) -> &Device;
    /// The dtype of the frozen weights (adapters train in f32).
    fn dtype(&self) -> DType;
    /// A backbone on the frozen base weights with `plan`'s adapters.
    fn build(&self, plan: AdapterPlan) -> Result<Box<dyn Backbone>>;
    /// Parameter groups: learning-rate scales by weight-name prefix (the connector at a tenth
    /// of the adapters' rate, as in LLaVA-1.5's LoRA recipe).
    fn lr_scale(&self) -> BTreeMap<String, f64>;
    /// The longest text answer evaluation generates, in tokens.
    fn max_new_tokens(&self) -> usize;
}

/// The elementwise max of the members' next-token distributions (LAE's ensemble decoding).
pub fn max_of_distributions(logits: &[Tensor]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for l in logits {
        let p = candle_nn::ops::softmax(l, D::Minus1)?;
        acc = Some(match acc {
            Some(a) => a.maximum(&p)?,
            None => p,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("an ensemble needs at least one member".into()))
}
