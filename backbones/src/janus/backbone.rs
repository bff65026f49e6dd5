//! [`JanusBackbone`]: Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual Encoding for
//! Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro: Unified
//! Multimodal Understanding and Generation with Data and Model Scaling") behind the harness's
//! [`Backbone`] trait.
//!
//! Prompt layout ([`PromptLayout`]): the harness's `Prompt { image, text }` becomes
//! `<image_placeholder>\n{text}` when an image is present, else `{text}` (plain layout, used
//! when the model directory has no chat template); with a chat template it is wrapped in
//! Janus-Pro's conversation format, `<|User|>: {content}\n\n<|Assistant|>:` (DeepSeek's
//! `deepseek` template: roles `<|User|>` / `<|Assistant|>`, separator `\n\n`, the answer after
//! one space and closed by EOS). JanusProcessor then expands each placeholder and, for image
//! outputs, appends `<begin_of_image>`; the tokenizer prepends BOS.
//!
//! Training targets: text answers are the answer's tokens (one leading space in the Janus-Pro
//! format) + EOS through the lm head; image answers are the VQ codes of the target image
//! (processed at the VQ model's resolution, then encoded) through the generation head, fed
//! back as aligned code embeddings. Mixed batches run in one forward; the loss is the mean
//! cross-entropy over every supervised token and code of the batch.

use super::config::GenerationConfig;
use super::decode::{CfgIds, Members};
use super::llama::attention_mask;
use super::model::{
    JanusModel, PreparedPrompt, Slot, TrainableParts, CONNECTOR_PREFIXES, GENERATION_HEAD_PREFIX,
};
use super::processor::JanusProcessor;
use super::tokenizer::JanusTokenizer;
use super::{JanusError, KvCache};
use crate::{Backbone, BatchShape, Example, Output, OutputKind, Prompt, Target};
use candle_core::{DType, Device, Tensor, Var};
use cnext_adapters::{AdapterPlan, Ctx};
use image::RgbImage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

/// How prompts are laid out (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptLayout {
    /// Janus-Pro's chat format when the directory has a chat template, else plain.
    #[default]
    Auto,
    Plain,
    JanusPro,
}

/// Classifier-free guidance of image generation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Guidance {
    /// `guidance_scale` of `generation_config.json`, else 5 (what transformers substitutes).
    #[default]
    FromConfig,
    Scale(f64),
    /// The conditional logits alone.
    Off,
}

/// Settings of a [`JanusBackbone`] beyond the model directory.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct JanusSettings {
    pub layout: PromptLayout,
    pub guidance: Guidance,
    pub trainable: TrainableParts,
}

pub struct JanusBackbone {
    pub model: JanusModel,
    pub tokenizer: JanusTokenizer,
    pub processor: JanusProcessor,
    pub generation: GenerationConfig,
    pub plan: AdapterPlan,
    settings: JanusSettings,
    chat: bool,
    dir: PathBuf,
}

impl JanusBackbone {
    /// Loads a Janus directory with default [`JanusSettings`]: frozen weights in `dtype` (f32
    /// on the CPU), `plan`'s adapters in the LLM, aligner and generation aligner trainable.
    pub fn load(
        dir: &Path,
        plan: AdapterPlan,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Self, JanusError> {
        Self::load_with(dir, plan, device, dtype, JanusSettings::default())
    }

    pub fn load_with(
        dir: &Path,
        plan: AdapterPlan,
        device: &Device,
        dtype: DType,
        settings: JanusSettings,
    ) -> std::result::Result<Self, JanusError> {
        plan.validate()?;
        let model = JanusModel::load(dir, &plan, device, dtype, settings.trainable)?;
        let generation = GenerationConfig::from_dir(dir)?;
        let tokenizer = JanusTokenizer::load(dir, &generation)?;
        if tokenizer.image.id != model.config().image_token_id {
            return Err(JanusError::Invalid {
                path: dir.join("config.json"),
                msg: format!(
                    "image_token_id {} but the tokenizer's {:?} is {}",
                    model.config().image_token_id,
                    tokenizer.image.text,
                    tokenizer.image.id
                ),
            });
        }
        let processor = JanusProcessor::from_dir(dir, model.num_image_tokens())?;
        let chat = match settings.layout {
            PromptLayout::Auto => tokenizer.has_chat_template,
            PromptLayout::Plain => false,
            PromptLayout::JanusPro => true,
        };
        Ok(JanusBackbone {
            model,
            tokenizer,
            processor,
            generation,
            plan,
            settings,
            chat,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether prompts use the Janus-Pro chat format.
    pub fn uses_chat_format(&self) -> bool {
        self.chat
    }

    /// Weight-name prefixes of the trainable non-adapter parts (the connectors, and the
    /// generation head if asked for), e.g. for a learning rate of their own.
    pub fn connector_prefixes(&self) -> Vec<&'static str> {
        let mut p: Vec<&'static str> = vec![];
        if self.settings.trainable.connectors {
            p.extend(CONNECTOR_PREFIXES);
        }
        if self.settings.trainable.generation_head {
            p.push(GENERATION_HEAD_PREFIX);
        }
        p
    }

    /// The guidance scale image generation uses (`None`: no CFG).
    pub fn guidance_scale(&self) -> Option<f64> {
        match self.settings.guidance {
            Guidance::FromConfig => Some(self.generation.guidance_scale.unwrap_or(5.0)),
            Guidance::Scale(s) => Some(s),
            Guidance::Off => None,
        }
    }

    /// The prompt string before placeholder expansion.
    pub fn prompt_text(&self, p: &Prompt) -> String {
        let content = if p.image.is_some() {
            format!("{}\n{}", self.tokenizer.image.text, p.text)
        } else {
            p.text.clone()
        };
        if self.chat {
            format!("<|User|>: {content}\n\n<|Assistant|>:")
        } else {
            content
        }
    }

    /// Token ids and pixel values of a prompt; `image_mode` ends it with `<begin_of_image>`.
    pub fn prepare(&self, p: &Prompt, image_mode: bool) -> Result<PreparedPrompt> {
        self.prepare_raw(&self.prompt_text(p), p.image.as_slice(), image_mode)
    }

    /// Like [`Self::prepare`] for text exactly as HF `JanusProcessor` takes it (no layout
    /// added; each placeholder expanded), with `images` in placeholder order.
    pub fn prepare_raw(
        &self,
        text: &str,
        images: &[RgbImage],
        image_mode: bool,
    ) -> Result<PreparedPrompt> {
        let ids = self.processor.encode(text, &self.tokenizer, image_mode)?;
        let images = images
            .iter()
            .map(|img| self.processor.image.preprocess(img, self.model.device()))
            .collect::<Result<Vec<_>, JanusError>>()?;
        Ok(PreparedPrompt { ids, images })
    }

    /// The supervised ids of a text answer (EOS last).
    pub fn answer_ids(&self, answer: &str) -> Result<Vec<u32>> {
        let text = if self.chat {
            format!(" {answer}")
        } else {
            answer.to_string()
        };
        let mut ids = self.tokenizer.encode(&text, false)?;
        ids.push(self.tokenizer.eos[0]);
        Ok(ids)
    }

    /// The VQ codes of a target image (processed at the VQ model's resolution).
    pub fn image_codes(&self, img: &RgbImage) -> Result<Vec<u32>> {
        let vq = self.model.vq();
        let px =
            self.processor
                .image
                .preprocess_at(img, vq.image_size() as u32, self.model.device())?;
        let (mut codes, _) = vq.encode(&px.unsqueeze(0)?)?;
        codes
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("vq encode returned nothing".into()))
    }

    fn cfg_ids(&self) -> Result<CfgIds> {
        let boi = self
            .generation
            .generation_kwargs
            .boi_token_id
            .unwrap_or(self.tokenizer.boi.id);
        Ok(CfgIds {
            bos: self.tokenizer.bos.or(self.generation.bos_token_id),
            boi,
            pad: self.tokenizer.pad,
        })
    }

    /// Greedy text ids per prompt (EOS dropped), with ensemble `members`.
    pub fn text_ids(
        &self,
        prompts: &[Prompt],
        max_new: usize,
        members: &Members,
    ) -> Result<Vec<Vec<u32>>> {
        let prepared = prompts
            .iter()
            .map(|p| self.prepare(p, false))
            .collect::<Result<Vec<_>>>()?;
        self.text_ids_prepared(&prepared, max_new, members)
    }

    /// Greedy text ids of prepared prompts (EOS dropped).
    pub fn text_ids_prepared(
        &self,
        prepared: &[PreparedPrompt],
        max_new: usize,
        members: &Members,
    ) -> Result<Vec<Vec<u32>>> {
        let g = self.model.generate_text(
            prepared,
            max_new,
            &self.tokenizer.eos,
            self.tokenizer.pad,
            members,
        )?;
        Ok(g.ids)
    }

    /// Image codes per prompt (CFG as the settings say), with ensemble `members`.
    pub fn image_code_ids(&self, prompts: &[Prompt], members: &Members) -> Result<Vec<Vec<u32>>> {
        let prepared = prompts
            .iter()
            .map(|p| self.prepare(p, true))
            .collect::<Result<Vec<_>>>()?;
        self.image_code_ids_prepared(&prepared, members)
    }

    /// Image codes of prepared prompts (each ending with `<begin_of_image>`).
    pub fn image_code_ids_prepared(
        &self,
        prepared: &[PreparedPrompt],
        members: &Members,
    ) -> Result<Vec<Vec<u32>>> {
        let g =
            self.model
                .generate_image(prepared, self.guidance_scale(), self.cfg_ids()?, members)?;
        Ok(g.codes)
    }

    /// Decoded and postprocessed images of code lists.
    pub fn decode_images(&self, codes: &[Vec<u32>]) -> Result<Vec<RgbImage>> {
        if codes.is_empty() {
            return Ok(vec![]);
        }
        super::vq::postprocess(&self.model.vq().decode(codes)?)
    }

    fn generate_with(
        &self,
        prompts: &[Prompt],
        kind: OutputKind,
        max_new: usize,
        members: &Members,
    ) -> Result<Vec<Output>> {
        match kind {
            OutputKind::Text => self
                .text_ids(prompts, max_new, members)?
                .iter()
                .map(|ids| Ok(Output::Text(self.tokenizer.decode(ids)?)))
                .collect(),
            OutputKind::Image => {
                let codes = self.image_code_ids(prompts, members)?;
                Ok(self
                    .decode_images(&codes)?
                    .into_iter()
                    .map(Output::Image)
                    .collect())
            }
        }
    }
}

/// Cross-entropy summed over rows `sel` of `h` through `head`, and how many.
fn ce_sum(
    h: &Tensor,
    sel: &[u32],
    labels: Vec<u32>,
    head: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Option<(Tensor, usize)>> {
    if sel.is_empty() {
        return Ok(None);
    }
    let dev = h.device();
    let rows = h.index_select(&Tensor::new(sel, dev)?, 0)?;
    let logits = head(&rows)?;
    let n = labels.len();
    let ce = candle_nn::loss::cross_entropy(&logits, &Tensor::new(labels, dev)?)?;
    Ok(Some(((ce * n as f64)?, n)))
}

impl Backbone for JanusBackbone {
    fn loss(&self, batch: &[Example], ctx: Ctx) -> Result<Tensor> {
        let mut rows: Vec<Vec<Slot>> = vec![];
        let mut images = vec![];
        // (row, position) -> target, per head.
        let (mut text_at, mut text_ids) = (vec![], vec![]);
        let (mut code_at, mut code_ids) = (vec![], vec![]);
        for ex in batch {
            let image_mode = matches!(ex.target, Target::Image(_));
            let p = self.prepare(&ex.prompt, image_mode)?;
            let mut slots = self.model.slots(&p.ids, images.len(), p.images.len())?;
            images.extend(p.images);
            // The last prompt position predicts the first answer element.
            let start = slots.len() - 1;
            let r = rows.len();
            match &ex.target {
                Target::Text(answer) => {
                    let ans = self.answer_ids(answer)?;
                    for (k, &id) in ans.iter().enumerate() {
                        text_at.push((r, start + k));
                        text_ids.push(id);
                    }
                    slots.extend(ans[..ans.len() - 1].iter().map(|&id| Slot::Token(id)));
                }
                Target::Image(img) => {
                    let codes = self.image_codes(img)?;
                    for (k, &c) in codes.iter().enumerate() {
                        code_at.push((r, start + k));
                        code_ids.push(c);
                    }
                    slots.extend(
                        codes[..codes.len().saturating_sub(1)]
                            .iter()
                            .map(|&c| Slot::Code(c)),
                    );
                }
            }
            rows.push(slots);
        }
        if rows.is_empty() {
            candle_core::bail!("loss of an empty batch");
        }
        // Right padding: under the causal mask no real position sees a pad.
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        for r in rows.iter_mut() {
            r.resize(t, Slot::Token(self.tokenizer.pad));
        }
        let b = rows.len();
        let dev = self.model.device();
        let x = self.model.embed(&rows, &images)?;
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        let mask = attention_mask(&vec![vec![true; t]; b], t, dev)?;
        let h = self
            .model
            .forward(&x, &positions, &mask, &mut KvCache::new(), ctx)?;
        let h = h.reshape((b * t, h.dim(2)?))?;
        let flat = |at: &[(usize, usize)]| -> Vec<u32> {
            at.iter().map(|&(r, p)| (r * t + p) as u32).collect()
        };
        let parts = [
            ce_sum(&h, &flat(&text_at), text_ids, |x| self.model.lm_logits(x))?,
            ce_sum(&h, &flat(&code_at), code_ids, |x| self.model.gen_logits(x))?,
        ];
        let mut total: Option<Tensor> = None;
        let mut count = 0;
        for (s, n) in parts.into_iter().flatten() {
            count += n;
            total = Some(match total {
                Some(t) => (t + s)?,
                None => s,
            });
        }
        match total {
            Some(t) => t / count as f64,
            None => candle_core::bail!("the batch has no supervised tokens"),
        }
    }

    fn batch_shape(&self, shape: BatchShape) -> BatchShape {
        // Every input image becomes the vision tower's image_size square: one shape (0, 0).
        BatchShape {
            image: shape.image.map(|_| (0, 0)),
            ..shape
        }
    }

    fn generate(
        &self,
        prompts: &[Prompt],
        kind: OutputKind,
        max_new_tokens: usize,
    ) -> Result<Vec<Output>> {
        self.generate_with(prompts, kind, max_new_tokens, &Members::current())
    }

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
        // Members swap their weights into the variables; put the current ones back after,
        // whatever the outcome.
        let vars = self.trainable();
        let saved: BTreeMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        let members = Members::new(sets, vars.clone());
        let out = self.generate_with(prompts, kind, max_new_tokens, &members);
        for (k, v) in &vars {
            if let Some(t) = saved.get(k) {
                v.set(t)?;
            }
        }
        out
    }

    /// The plan's adapter variables plus the trainable connectors (`model.aligner.*`,
    /// `model.generation_aligner.*` by default; see [`JanusBackbone::connector_prefixes`]).
    fn trainable(&self) -> BTreeMap<String, Var> {
        let mut m = self.model.trainable().clone();
        m.extend(self.plan.vars());
        m
    }
}
