//! MAGE with DEMA (CIA, ICML'25) in place of PEMA (Continual-NExT, Table 4): equal-weight
//! experts, modality gating, and DEMA's gradient-derived rate for the trainable experts.

use crate::mage::{Averaging, Mage, MageConfig};
use cnext_harness::method::{typed, Method, MethodEntry};

pub const ENTRY: MethodEntry = MethodEntry {
    id: "mage_dema",
    about: "MAGE with DEMA instead of PEMA",
    new: || {
        Box::new(Mage::new(
            ENTRY.id,
            MageConfig {
                averaging: Averaging::Dema { fallback: 0.01 },
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
