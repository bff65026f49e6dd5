//! MoE-EW, the first ablation of MAGE (Continual-NExT, Table 4): four LoRA experts summed with
//! equal weight, all trained on every task, no weight averaging.

use crate::mage::{Averaging, Mage, MageConfig};
use cnext_harness::method::{typed, Method, MethodEntry};

pub const ENTRY: MethodEntry = MethodEntry {
    id: "moe_ew",
    about: "4 equal-weight LoRA experts, all trained",
    new: || {
        Box::new(Mage::new(
            ENTRY.id,
            MageConfig {
                modality_gating: false,
                averaging: Averaging::None,
                ..MageConfig::default()
            },
        ))
    },
    configure: |v| {
        typed(v, |c: MageConfig| {
            Box::new(Mage::new(ENTRY.id, c)) as Box<dyn Method>
        })
    },
};
