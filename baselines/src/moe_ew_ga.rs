//! MoE-EW-GA, MAGE's second ablation (Continual-NExT, Table 4): equal-weight experts with
//! modality-based gating (only the experts of the task's modalities train), no averaging.

use crate::mage::{Averaging, Mage, MageConfig};
use cnext_harness::method::{typed, Method, MethodEntry};

pub const ENTRY: MethodEntry = MethodEntry {
    id: "moe_ew_ga",
    about: "equal-weight experts with modality gating, no EMA",
    new: || {
        Box::new(Mage::new(
            ENTRY.id,
            MageConfig {
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
