//! Decoding loops of Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual Encoding for
//! Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro: Unified
//! Multimodal Understanding and Generation with Data and Model Scaling"), each with a KV cache
//! created per call, for a batch left-padded so every row's next token sits in the last column:
//!
//! - text: greedy over the lm head, stopping a row at EOS (HF `generate`, `do_sample=False`);
//! - image: `num_image_tokens` codes from the generation head with classifier-free guidance as
//!   HF's Janus `generate(generation_mode="image")`: a conditional row (the prompt, ending in
//!   `<begin_of_image>`) and an unconditional row of the same length where every id other than
//!   BOS and BOI is PAD; `guided = uncond + scale * (cond - uncond)` on the raw logits; argmax
//!   (first max); the chosen code is fed to both rows through the generation aligner; or
//!   without guidance, the conditional row alone.
//!
//! Both take ensemble members (LAE): weight sets swapped into the trainable variables, one KV
//! cache per member, and at every step the argmax of the elementwise max of the members'
//! softmax distributions.

use super::llama::{KvCache, LeftPadded};
use super::model::{JanusModel, PreparedPrompt, Slot};
use crate::max_of_distributions;
use candle_core::{Result, Tensor, Var};
use cnext_adapters::Ctx;
use std::collections::BTreeMap;

/// Ensemble members: weight sets of the trainable variables (none: the current weights).
pub struct Members<'a> {
    sets: &'a [BTreeMap<String, Tensor>],
    vars: BTreeMap<String, Var>,
}

impl<'a> Members<'a> {
    /// The current weights, nothing swapped.
    pub fn current() -> Self {
        Members {
            sets: &[],
            vars: BTreeMap::new(),
        }
    }

    /// `sets[m]` holds a value for every variable of `vars` (checked when it is used).
    pub fn new(sets: &'a [BTreeMap<String, Tensor>], vars: BTreeMap<String, Var>) -> Self {
        Members { sets, vars }
    }

    fn count(&self) -> usize {
        self.sets.len().max(1)
    }

    fn select(&self, m: usize) -> Result<()> {
        if let Some(set) = self.sets.get(m) {
            for (name, v) in &self.vars {
                match set.get(name) {
                    Some(t) => v.set(t)?,
                    None => candle_core::bail!("ensemble member {m} has no `{name}`"),
                }
            }
        }
        Ok(())
    }

    /// The logits of one member, or the max of the members' distributions.
    fn combine(&self, per_member: &[Tensor]) -> Result<Tensor> {
        match per_member {
            [one] => Ok(one.clone()),
            many => max_of_distributions(many),
        }
    }
}

/// Generated text ids per prompt (EOS dropped) and, per step, what was argmaxed `[B, vocab]`
/// (the lm logits for one member, the max of distributions for an ensemble).
#[derive(Debug, Clone)]
pub struct TextGeneration {
    pub ids: Vec<Vec<u32>>,
    pub step_logits: Vec<Tensor>,
}

/// Generated codes per prompt and, per step, what was argmaxed `[B, codes]` (guided logits,
/// or the conditional ones without guidance); with guidance also the first step's
/// conditional and unconditional logits.
#[derive(Debug, Clone)]
pub struct ImageGeneration {
    pub codes: Vec<Vec<u32>>,
    pub step_logits: Vec<Tensor>,
    pub first_cond: Option<Tensor>,
    pub first_uncond: Option<Tensor>,
}

/// Token ids classifier-free guidance needs.
#[derive(Debug, Clone, Copy)]
pub struct CfgIds {
    pub bos: Option<u32>,
    pub boi: u32,
    pub pad: u32,
}

fn argmax_rows(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_vec2::<f32>()?
        .iter()
        .map(|r| super::argmax_first(r))
        .collect())
}

impl JanusModel {
    /// Left-padded slot rows of `prompts` (images numbered across the batch) and the images.
    fn padded_rows(
        &self,
        prompts: &[PreparedPrompt],
        pad: u32,
    ) -> Result<(Vec<Vec<Slot>>, Vec<Tensor>, LeftPadded)> {
        let mut rows = vec![];
        let mut images = vec![];
        for p in prompts {
            if p.ids.is_empty() {
                candle_core::bail!("generate: an empty prompt");
            }
            rows.push(self.slots(&p.ids, images.len(), p.images.len())?);
            images.extend(p.images.iter().cloned());
        }
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        let lp = LeftPadded::new(&lens);
        let t0 = lp.width();
        for r in rows.iter_mut() {
            let mut row = vec![Slot::Token(pad); t0 - r.len()];
            row.append(r);
            *r = row;
        }
        Ok((rows, images, lp))
    }

    /// Greedy text for a batch; `pad` fills the left padding (masked, never attended).
    pub fn generate_text(
        &self,
        prompts: &[PreparedPrompt],
        max_new: usize,
        eos: &[u32],
        pad: u32,
        members: &Members,
    ) -> Result<TextGeneration> {
        let b = prompts.len();
        let mut out = TextGeneration {
            ids: vec![vec![]; b],
            step_logits: vec![],
        };
        if b == 0 || max_new == 0 {
            return Ok(out);
        }
        let (rows, images, mut lp) = self.padded_rows(prompts, pad)?;
        let t0 = lp.width();
        let dev = self.device().clone();
        let ctx = Ctx::default();
        let mask = lp.mask(t0, &dev)?;
        let pos = lp.prefill_positions();
        let mut caches = vec![];
        let mut lasts = vec![];
        for m in 0..members.count() {
            members.select(m)?;
            let x = self.embed(&rows, &images)?;
            let mut cache = KvCache::new();
            let h = self.forward(&x, &pos, &mask, &mut cache, ctx)?;
            lasts.push(self.lm_logits(&h.narrow(1, t0 - 1, 1)?.squeeze(1)?)?);
            caches.push(cache);
        }
        let mut done = vec![false; b];
        for step in 0..max_new {
            let last = members.combine(&lasts)?;
            let next = argmax_rows(&last)?;
            out.step_logits.push(last);
            for (i, &id) in next.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if eos.contains(&id) {
                    done[i] = true;
                } else {
                    out.ids[i].push(id);
                }
            }
            if done.iter().all(|d| *d) || step + 1 == max_new {
                break;
            }
            let pos = lp.push();
            let mask = lp.mask(1, &dev)?;
            let tokens: Vec<Vec<Slot>> = next.iter().map(|&id| vec![Slot::Token(id)]).collect();
            for (m, cache) in caches.iter_mut().enumerate() {
                if members.count() > 1 {
                    members.select(m)?;
                }
                let x = self.embed(&tokens, &[])?;
                let h = self.forward(&x, &pos, &mask, cache, ctx)?;
                lasts[m] = self.lm_logits(&h.squeeze(1)?)?;
            }
        }
        Ok(out)
    }

    /// `num_image_tokens` codes per prompt (each prompt's ids end with BOI). `guidance`
    /// `Some(s)`: CFG with scale s; `None`: the conditional logits alone.
    pub fn generate_image(
        &self,
        prompts: &[PreparedPrompt],
        guidance: Option<f64>,
        ids: CfgIds,
        members: &Members,
    ) -> Result<ImageGeneration> {
        let b = prompts.len();
        let n = self.num_image_tokens();
        let mut out = ImageGeneration {
            codes: vec![vec![]; b],
            step_logits: vec![],
            first_cond: None,
            first_uncond: None,
        };
        if b == 0 {
            return Ok(out);
        }
        if let Some(p) = prompts.iter().find(|p| p.ids.last() != Some(&ids.boi)) {
            candle_core::bail!(
                "image generation: a prompt does not end with <begin_of_image> ({:?})",
                p.ids.last()
            );
        }
        // Rows: the conditional prompts, then (with CFG) their unconditional twins.
        let mut all: Vec<PreparedPrompt> = prompts.to_vec();
        if guidance.is_some() {
            for p in prompts {
                let masked = p
                    .ids
                    .iter()
                    .map(|&id| {
                        if Some(id) == ids.bos || id == ids.boi {
                            id
                        } else {
                            ids.pad
                        }
                    })
                    .collect();
                // Placeholders became PAD: the unconditional row sees no image.
                all.push(PreparedPrompt {
                    ids: masked,
                    images: vec![],
                });
            }
        }
        let (rows, images, mut lp) = self.padded_rows(&all, ids.pad)?;
        let t0 = lp.width();
        let dev = self.device().clone();
        let ctx = Ctx::default();
        let mask = lp.mask(t0, &dev)?;
        let pos = lp.prefill_positions();
        let guide = |logits: &Tensor| -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
            match guidance {
                None => Ok((logits.clone(), None)),
                Some(s) => {
                    let cond = logits.narrow(0, 0, b)?;
                    let uncond = logits.narrow(0, b, b)?;
                    let g = (&uncond + ((&cond - &uncond)? * s)?)?;
                    Ok((g, Some((cond, uncond))))
                }
            }
        };
        let mut caches = vec![];
        let mut lasts = vec![];
        for m in 0..members.count() {
            members.select(m)?;
            let x = self.embed(&rows, &images)?;
            let mut cache = KvCache::new();
            let h = self.forward(&x, &pos, &mask, &mut cache, ctx)?;
            let logits = self.gen_logits(&h.narrow(1, t0 - 1, 1)?.squeeze(1)?)?;
            let (g, parts) = guide(&logits)?;
            if m == 0 {
                if let Some((c, u)) = parts {
                    out.first_cond = Some(c);
                    out.first_uncond = Some(u);
                }
            }
            lasts.push(g);
            caches.push(cache);
        }
        let rows_n = all.len();
        for step in 0..n {
            let last = members.combine(&lasts)?;
            let next = argmax_rows(&last)?;
            out.step_logits.push(last);
            for (i, &c) in next.iter().enumerate() {
                out.codes[i].push(c);
            }
            if step + 1 == n {
                break;
            }
            let pos = lp.push();
            let mask = lp.mask(1, &dev)?;
            // The same code goes to a prompt's conditional and unconditional rows.
            let fed: Vec<Vec<Slot>> = (0..rows_n).map(|r| vec![Slot::Code(next[r % b])]).collect();
            for (m, cache) in caches.iter_mut().enumerate() {
                if members.count() > 1 {
                    members.select(m)?;
                }
                let x = self.embed(&fed, &[])?;
                let h = self.forward(&x, &pos, &mask, cache, ctx)?;
                lasts[m] = guide(&self.gen_logits(&h.squeeze(1)?)?)?.0;
            }
        }
        Ok(out)
    }
}
