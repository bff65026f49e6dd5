//! Zero-shot: the pretrained base with no adapter and no training (the paper's Zero-shot row).
//! Every stage evaluates the same model, so its matrix rows are identical; the suite checks it.

use cnext_adapters::{AdapterPlan, LoraConfig};
use cnext_harness::method::{no_config, Hooks, Method, MethodEntry, Schedule};

pub const ENTRY: MethodEntry = MethodEntry {
    id: "zero_shot",
    about: "the base model, untrained",
    new: || Box::new(ZeroShot),
    configure: |v| no_config(v, || Box::new(ZeroShot)),
};

pub struct ZeroShot;

impl Hooks for ZeroShot {}

impl Method for ZeroShot {
    fn id(&self) -> &'static str {
        ENTRY.id
    }
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        Ok(serde_json::json!({}))
    }
    fn schedule(&self) -> Schedule {
        Schedule::Frozen
    }
    fn adapters(&mut self, _lora: &LoraConfig, _seed: u64) -> AdapterPlan {
        AdapterPlan::none()
    }
}
