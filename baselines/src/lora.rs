//! LoRA fine-tuning (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR
//! 2022): one adapter of rank r on q,k,v,o,gate,up,down plus the projector, trained on each
//! task in turn with no continual-learning mechanism. The sequential lower reference.

use cnext_harness::method::{no_config, Hooks, Method, MethodEntry};

pub const ENTRY: MethodEntry = MethodEntry {
    id: "lora",
    about: "one LoRA trained on each task in turn",
    new: || Box::new(Lora),
    configure: |v| no_config(v, || Box::new(Lora)),
};

/// No knobs beyond the shared LoRA settings.
pub struct Lora;

impl Hooks for Lora {}

impl Method for Lora {
    fn id(&self) -> &'static str {
        ENTRY.id
    }
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        Ok(serde_json::json!({}))
    }
    fn shares_first_stage(&self) -> bool {
        true
    }
}
