//! The nano model behind the [`Backbone`] trait: tokenizer + VQ codebook + model, sequence
//! layout `<bos> [patches] prompt <sep> answer <eos>` (image answers: `<boi>` then one code per
//! patch), and batched greedy decoding with left padding and a per-call KV cache.

use super::model::{KvCache, NanoModel, Slot};
use super::tokenizer::{Tokenizer, BOI, BOS, EOS, SEP};
use super::vq::Codebook;
use crate::{max_of_distributions, Backbone, Example, Output, OutputKind, Prompt, Target};
use candle_core::{Result, Tensor, Var, D};
use cnext_adapters::{AdapterPlan, Ctx};
use std::collections::BTreeMap;

/// Grid of generated images in patches (24 x 24 pixel scenes).
pub const GEN_GRID: u32 = 3;

pub struct NanoBackbone {
    pub model: NanoModel,
    pub tokenizer: Tokenizer,
    pub codebook: Codebook,
    pub plan: AdapterPlan,
    /// Trainable non-adapter variables (the projector; everything when pretraining).
    pub extra_trainable: BTreeMap<String, Var>,
}

impl NanoBackbone {
    fn prompt_slots(&self, p: &Prompt) -> Vec<Slot> {
        let mut s = vec![Slot::Token(BOS)];
        if let Some(img) = &p.image {
            let ps = self.model.config().patch_size as u32;
            let n = (img.width() / ps) * (img.height() / ps);
            s.extend((0..n as usize).map(Slot::Patch));
        }
        s.extend(self.tokenizer.encode(&p.text).into_iter().map(Slot::Token));
        s.push(Slot::Token(SEP));
        s
    }

    /// Greedy decoding with one KV cache per ensemble member; `sets` are weight sets of the
    /// trainable variables (empty: the current weights, no swapping).
    fn generate_members(
        &self,
        prompts: &[Prompt],
        kind: OutputKind,
        max_new: usize,
        sets: &[BTreeMap<String, Tensor>],
    ) -> Result<Vec<Output>> {
        if prompts.is_empty() {
            return Ok(vec![]);
        }
        let seqs: Vec<Vec<Slot>> = prompts.iter().map(|p| self.prompt_slots(p)).collect();
        let t0 = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let b = seqs.len();
        // Left padding so every row's next token sits at the same column.
        let mut padded = vec![];
        let mut valid = vec![];
        let mut positions = vec![];
        let mut lens = vec![];
        for s in &seqs {
            let pad = t0 - s.len();
            let mut row = vec![Slot::Token(super::tokenizer::PAD); pad];
            row.extend(s.iter().copied());
            padded.push(row);
            valid.push((0..t0).map(|j| j >= pad).collect::<Vec<_>>());
            positions.extend((0..t0).map(|j| j.saturating_sub(pad) as u32));
            lens.push(s.len() as u32);
        }
        let images: Vec<_> = prompts.iter().map(|p| p.image.as_ref()).collect();
        let vars = self.trainable();
        let use_member = |m: usize| -> Result<()> {
            if let Some(set) = sets.get(m) {
                for (name, v) in &vars {
                    match set.get(name) {
                        Some(t) => v.set(t)?,
                        None => candle_core::bail!("ensemble member {m} has no `{name}`"),
                    }
                }
            }
            Ok(())
        };
        let members = sets.len().max(1);
        let ctx = Ctx::default();
        let mask = self.model.mask(&valid, t0)?;
        let mut caches = vec![];
        let mut lasts = vec![];
        for m in 0..members {
            use_member(m)?;
            let x = self.model.embed(&padded, &images)?;
            let mut cache = KvCache::new();
            let h = self.model.decode(&x, &positions, &mask, &mut cache, ctx)?;
            lasts.push(self.model.logits(&h.narrow(1, t0 - 1, 1)?.squeeze(1)?)?);
            caches.push(cache);
        }
        let (steps, range) = match kind {
            OutputKind::Text => (max_new, None),
            OutputKind::Image => {
                let n = (GEN_GRID * GEN_GRID) as usize;
                (n + 1, Some(self.tokenizer.image_code_range()))
            }
        };
        let mut out: Vec<Vec<u32>> = vec![vec![]; b];
        let mut done = vec![false; b];
        for step in 0..steps {
            let last = match lasts.as_slice() {
                [one] => one.clone(),
                many => max_of_distributions(many)?,
            };
            let next: Vec<u32> = match (&range, step) {
                (Some(_), 0) => vec![BOI; b],
                (Some(r), _) => {
                    let sub =
                        last.narrow(D::Minus1, r.start as usize, (r.end - r.start) as usize)?;
                    sub.argmax(D::Minus1)?
                        .to_vec1::<u32>()?
                        .into_iter()
                        .map(|i| i + r.start)
                        .collect()
                }
                (None, _) => last.argmax(D::Minus1)?.to_vec1::<u32>()?,
            };
            for (bi, &id) in next.iter().enumerate() {
                if done[bi] {
                    continue;
                }
                if range.is_none() && id == EOS {
                    done[bi] = true;
                } else {
                    out[bi].push(id);
                }
            }
            if done.iter().all(|d| *d) || step + 1 == steps {
                break;
            }
            for v in valid.iter_mut() {
                v.push(true);
            }
            let pos: Vec<u32> = lens.iter().map(|l| l + step as u32).collect();
            let mask = self.model.mask(&valid, 1)?;
            let tokens: Vec<Vec<Slot>> = next.iter().map(|&id| vec![Slot::Token(id)]).collect();
            for (m, cache) in caches.iter_mut().enumerate() {
                if members > 1 {
                    use_member(m)?;
                }
                let xs = self.model.embed(&tokens, &vec![None; b])?;
                let h = self.model.decode(&xs, &pos, &mask, cache, ctx)?;
                lasts[m] = self.model.logits(&h.squeeze(1)?)?;
            }
        }
        Ok(out
            .into_iter()
            .map(|ids| match kind {
                OutputKind::Text => Output::Text(self.tokenizer.decode(&ids)),
                OutputKind::Image => {
                    let start = self.tokenizer.image_code_id(0);
                    let codes: Vec<u32> = ids
                        .iter()
                        .filter(|&&i| i >= start)
                        .map(|i| i - start)
                        .collect();
                    Output::Image(self.codebook.decode(&codes, GEN_GRID, GEN_GRID))
                }
            })
            .collect())
    }

    /// The relevance logit of every patch of each prompt's image to its text: [sum of patches].
    pub fn relevance_logits(&self, prompts: &[Prompt]) -> Result<Tensor> {
        let mut seqs: Vec<Vec<Slot>> = prompts.iter().map(|p| self.prompt_slots(p)).collect();
        pad_right(&mut seqs);
        let images: Vec<_> = prompts.iter().map(|p| p.image.as_ref()).collect();
        self.model.patch_relevance(&seqs, &images)
    }

    fn answer_ids(&self, t: &Target) -> Vec<u32> {
        match t {
            Target::Text(s) => {
                let mut v = self.tokenizer.encode(s);
                v.push(EOS);
                v
            }
            Target::Image(img) => {
                let mut v = vec![BOI];
                v.extend(
                    self.codebook
                        .encode(img)
                        .into_iter()
                        .map(|c| self.tokenizer.image_code_id(c)),
                );
                v
            }
        }
    }
}

/// Pads every sequence on the right to the longest; returns that length.
fn pad_right(seqs: &mut [Vec<Slot>]) -> usize {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    for s in seqs.iter_mut() {
        s.resize(t, Slot::Token(super::tokenizer::PAD));
    }
    t
}

/// One training batch as the model sees it: padded slot sequences, and which hidden row
/// predicts which label.
struct LossBatch {
    seqs: Vec<Vec<Slot>>,
    /// Flat position (b * T + t) of each predicted token.
    select: Vec<u32>,
    labels: Vec<u32>,
    t: usize,
}

impl NanoBackbone {
    fn loss_batch(&self, batch: &[Example]) -> LossBatch {
        let mut seqs = vec![];
        let mut rows = vec![]; // (sequence, position)
        let mut labels = vec![];
        for ex in batch {
            let mut s = self.prompt_slots(&ex.prompt);
            let ans = self.answer_ids(&ex.target);
            let start = s.len() - 1; // position of <sep> predicts the first answer token
            for (k, &id) in ans.iter().enumerate() {
                rows.push((seqs.len(), start + k));
                labels.push(id);
            }
            s.extend(ans[..ans.len() - 1].iter().map(|&id| Slot::Token(id)));
            seqs.push(s);
        }
        let t = pad_right(&mut seqs);
        let select = rows.iter().map(|&(bi, ti)| (bi * t + ti) as u32).collect();
        LossBatch {
            seqs,
            select,
            labels,
            t,
        }
    }

    /// Everything [`Backbone::loss`] computes `batch`'s loss from, by name: the embedding's
    /// inputs ([`NanoModel::embed_inputs`]), `mask` [B, 1, T, T], `positions` [B * T],
    /// `select` (the hidden rows that predict) and `labels`. For replicas of the
    /// computation (`cnext bench step --dump`).
    pub fn loss_inputs(&self, batch: &[Example]) -> Result<BTreeMap<String, Tensor>> {
        let lb = self.loss_batch(batch);
        let images: Vec<_> = batch.iter().map(|e| e.prompt.image.as_ref()).collect();
        let mut out = self.model.embed_inputs(&lb.seqs, &images)?;
        let (b, t, dev) = (lb.seqs.len(), lb.t, self.model.device());
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        out.insert("mask".into(), self.model.mask(&vec![vec![true; t]; b], t)?);
        out.insert("positions".into(), Tensor::new(positions, dev)?);
        out.insert("select".into(), Tensor::new(lb.select, dev)?);
        out.insert("labels".into(), Tensor::new(lb.labels, dev)?);
        Ok(out)
    }
}

impl Backbone for NanoBackbone {
    fn loss(&self, batch: &[Example], ctx: Ctx) -> Result<Tensor> {
        let LossBatch {
            seqs,
            select,
            labels,
            t,
        } = self.loss_batch(batch);
        let images: Vec<_> = batch.iter().map(|e| e.prompt.image.as_ref()).collect();
        let x = self.model.embed(&seqs, &images)?;
        let b = seqs.len();
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        // Right padding: the causal mask alone keeps real tokens from seeing pads.
        let mask = self.model.mask(&vec![vec![true; t]; b], t)?;
        let h = self
            .model
            .decode(&x, &positions, &mask, &mut KvCache::new(), ctx)?;
        let d = self.model.config().hidden_size;
        let dev = self.model.device();
        let hs = h
            .reshape((b * t, d))?
            .index_select(&Tensor::new(select, dev)?, 0)?;
        let logits = self.model.logits(&hs)?;
        let target = Tensor::new(labels, dev)?;
        cnext_kernels::fused::xent::cross_entropy(&logits, &target)
    }

    fn generate(
        &self,
        prompts: &[Prompt],
        kind: OutputKind,
        max_new: usize,
    ) -> Result<Vec<Output>> {
        self.generate_members(prompts, kind, max_new, &[])
    }

    fn generate_ensemble(
        &self,
        prompts: &[Prompt],
        kind: OutputKind,
        max_new: usize,
        sets: &[BTreeMap<String, Tensor>],
    ) -> Result<Vec<Output>> {
        // Members swap their weights into the variables; put the current ones back after.
        let saved: BTreeMap<String, Tensor> = self
            .trainable()
            .into_iter()
            .map(|(k, v)| Ok((k, v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        let out = self.generate_members(prompts, kind, max_new, sets);
        for (k, v) in self.trainable() {
            if let Some(t) = saved.get(&k) {
                v.set(t)?;
            }
        }
        out
    }

    fn trainable(&self) -> BTreeMap<String, Var> {
        let mut m = self.extra_trainable.clone();
        m.extend(self.plan.vars());
        m
    }
}
