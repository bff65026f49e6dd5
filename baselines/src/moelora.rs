//! MoELoRA as used in CoIN (Chen et al., "CoIN: A Benchmark of Continual Instruction tuNing for
//! Multimodal Large Language Models", NeurIPS 2024): `experts` LoRA experts of rank r/E (same
//! total rank as LoRA) and a router per adapted layer, token-level softmax, dense sum:
//! `y = W x + s * sum_i softmax(R x)_i * B_i A_i x`. No continual-learning mechanism beyond the
//! architecture; trained on each task in turn.

use cnext_adapters::{AdapterPlan, LoraConfig};
use cnext_harness::method::{typed, Hooks, Method, MethodEntry};
use serde::{Deserialize, Serialize};

pub const ENTRY: MethodEntry = MethodEntry {
    id: "moelora",
    about: "4 LoRA experts of rank r/4 with a token-level softmax router",
    new: || Box::new(MoeLora::new(MoeLoraConfig::default())),
    configure: |v| {
        typed(v, |c: MoeLoraConfig| {
            Box::new(MoeLora::new(c)) as Box<dyn Method>
        })
    },
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeLoraConfig {
    pub experts: usize,
}

impl Default for MoeLoraConfig {
    fn default() -> Self {
        MoeLoraConfig { experts: 4 }
    }
}

pub struct MoeLora {
    pub cfg: MoeLoraConfig,
}

impl MoeLora {
    pub fn new(cfg: MoeLoraConfig) -> Self {
        MoeLora { cfg }
    }
}

impl Hooks for MoeLora {}

impl Method for MoeLora {
    fn id(&self) -> &'static str {
        ENTRY.id
    }
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(&self.cfg)
    }
    fn adapters(&mut self, lora: &LoraConfig, seed: u64) -> AdapterPlan {
        AdapterPlan::moelora(lora.clone(), self.cfg.experts, seed)
    }
    fn shares_first_stage(&self) -> bool {
        true
    }
    fn architecture(&self) -> String {
        format!("moelora{}", self.cfg.experts)
    }
}
