//! Multitask upper bound: one LoRA trained jointly on the union of all tasks (as many steps as
//! the sequential stages together); one matrix row, whose Avg.ACC bounds the continual methods.

use cnext_harness::method::{no_config, Hooks, Method, MethodEntry, Schedule};

pub const ENTRY: MethodEntry = MethodEntry {
    id: "upper_bound",
    about: "one LoRA trained jointly on all tasks",
    new: || Box::new(UpperBound),
    configure: |v| no_config(v, || Box::new(UpperBound)),
};

pub struct UpperBound;

impl Hooks for UpperBound {}

impl Method for UpperBound {
    fn id(&self) -> &'static str {
        ENTRY.id
    }
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        Ok(serde_json::json!({}))
    }
    fn schedule(&self) -> Schedule {
        Schedule::Joint
    }
}
