//! Mid-stage checkpoints: a paper stage trains for hours, so [`crate::train::fit`] writes
//! everything the rest of the stage depends on every `every` steps (trainable weights, AdamW
//! moments, the method's step state, the data stream's position and the losses so far) into
//! one safetensors file, atomically, and a rerun of the killed stage continues from it to the
//! result an uninterrupted run gives, bit for bit on CPU.

use crate::method::{prefixed, take_prefixed, Hooks, Vars};
use crate::optim::AdamW;
use crate::train::Objective;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where and how often a stage checkpoints.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    /// The checkpoint file (one per stage entry).
    pub path: PathBuf,
    /// Steps between checkpoints; 0 writes none (a present file is still resumed from).
    pub every: usize,
    /// Fault injection for the resume test: abort (as SIGKILL would) once this many steps
    /// are done.
    pub abort_after: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: checkpoint: {msg} (delete the file to train the stage from its start)")]
pub struct CheckpointError {
    pub path: PathBuf,
    pub msg: String,
}

/// The state a checkpoint restores; the caller continues at step `step`.
pub struct Resumed {
    pub step: usize,
    pub losses: Vec<f64>,
}

const VARS: &str = "vars/";
const OPTIM: &str = "optim/";
const DATA: &str = "data/";
const HOOKS: &str = "hooks/";
const LOSSES: &str = "meta/losses";
const STEPS: &str = "meta/steps";

impl Checkpointing {
    fn err(&self, msg: impl std::fmt::Display) -> CheckpointError {
        CheckpointError {
            path: self.path.clone(),
            msg: msg.to_string(),
        }
    }

    /// Writes the state after `done` of `steps` steps.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &self,
        done: usize,
        steps: usize,
        losses: &[f64],
        vars: &Vars,
        opt: &AdamW,
        objective: &dyn Objective,
        hooks: &dyn Hooks,
    ) -> Result<(), CheckpointError> {
        let e = |e: candle_core::Error| self.err(e);
        let weights: BTreeMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let mut all: HashMap<String, Tensor> = HashMap::new();
        for (prefix, part) in [
            (VARS, weights),
            (OPTIM, opt.state().map_err(e)?),
            (DATA, objective.position().map_err(e)?),
            (HOOKS, hooks.step_state().map_err(e)?),
        ] {
            all.extend(prefixed(prefix, &part));
        }
        let cpu = Device::Cpu;
        all.insert(
            LOSSES.into(),
            Tensor::from_vec(losses.to_vec(), losses.len(), &cpu).map_err(e)?,
        );
        all.insert(
            STEPS.into(),
            Tensor::new(&[done as i64, steps as i64], &cpu).map_err(e)?,
        );
        cnext_core::fsx::write_atomic_with(&self.path, |tmp: &Path| {
            candle_core::safetensors::save(&all, tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| self.err(e))
    }

    /// Restores the state of the checkpoint file, if there is one, for a stage of `steps`
    /// steps. A file from a stage of another length is an error (entry names are content
    /// keys, so it was not written by this stage).
    pub fn resume(
        &self,
        steps: usize,
        vars: &Vars,
        opt: &mut AdamW,
        objective: &mut dyn Objective,
        hooks: &mut dyn Hooks,
    ) -> Result<Option<Resumed>, CheckpointError> {
        if !self.path.exists() {
            return Ok(None);
        }
        let e = |e: candle_core::Error| self.err(e);
        let device = vars
            .values()
            .next()
            .map_or(Device::Cpu, |v| v.device().clone());
        let mut all: BTreeMap<String, Tensor> = candle_core::safetensors::load(&self.path, &device)
            .map_err(e)?
            .into_iter()
            .collect();
        let meta = all
            .remove(STEPS)
            .ok_or_else(|| self.err("no step counter"))?
            .to_dtype(DType::I64)
            .and_then(|t| t.to_vec1::<i64>())
            .map_err(e)?;
        let [done, total] = meta[..] else {
            return Err(self.err("malformed step counter"));
        };
        if total as usize != steps || done < 0 || done as usize > steps {
            return Err(self.err(format!(
                "written at step {done} of {total}, this stage has {steps} steps"
            )));
        }
        let losses = all
            .remove(LOSSES)
            .ok_or_else(|| self.err("no losses"))?
            .to_vec1::<f64>()
            .map_err(e)?;
        let weights = take_prefixed(VARS, &mut all);
        for (name, var) in vars {
            let t = weights
                .get(name)
                .ok_or_else(|| self.err(format!("no weights for `{name}`")))?;
            var.set(t).map_err(e)?;
        }
        opt.load_state(take_prefixed(OPTIM, &mut all)).map_err(e)?;
        objective.seek(take_prefixed(DATA, &mut all)).map_err(e)?;
        hooks
            .load_step_state(take_prefixed(HOOKS, &mut all))
            .map_err(e)?;
        Ok(Some(Resumed {
            step: done as usize,
            losses,
        }))
    }

    /// Deletes the checkpoint (the stage's entry is written).
    pub fn remove(&self) -> Result<(), CheckpointError> {
        match std::fs::remove_file(&self.path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(self.err(err)),
            _ => Ok(()),
        }
    }
}
