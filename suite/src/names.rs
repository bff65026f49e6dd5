//! Test names: `<profile>::<method>::<order>::stage<k>::<task>` for a cell,
//! `<profile>::<method>::<order>::joint::<task>` for a joint method's cell,
//! `<profile>::<method>::<order>::matrix` for the whole matrix, and relational checks
//! (`rows_identical`, `at_least_lora`). Names parse back into their coordinates.

use crate::profile::Profile;
use cnext_core::{Order, TaskId};
use std::fmt;

/// Which row a cell is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// 1-based stage of a sequential chain.
    K(usize),
    /// The single row of a joint method.
    Joint,
}

impl Stage {
    /// 1-based stage number in the stage cache.
    pub fn number(self) -> usize {
        match self {
            Stage::K(k) => k,
            Stage::Joint => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    Cell {
        stage: Stage,
        task: TaskId,
    },
    Matrix,
    /// zero_shot: every row of the matrix is the same.
    RowsIdentical,
    /// upper_bound: its Avg.ACC is at least lora's.
    AtLeastLora,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TestName {
    pub profile: Profile,
    pub method: String,
    pub order: Order,
    pub check: Check,
}

impl fmt::Display for TestName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}::{}::{}::",
            self.profile.as_str(),
            self.method,
            self.order
        )?;
        match self.check {
            Check::Cell {
                stage: Stage::K(k),
                task,
            } => write!(f, "stage{k}::{task}"),
            Check::Cell {
                stage: Stage::Joint,
                task,
            } => write!(f, "joint::{task}"),
            Check::Matrix => f.write_str("matrix"),
            Check::RowsIdentical => f.write_str("rows_identical"),
            Check::AtLeastLora => f.write_str("at_least_lora"),
        }
    }
}

impl std::str::FromStr for TestName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a suite test name");
        let parts: Vec<&str> = s.split("::").collect();
        if parts.len() < 4 {
            return Err(bad());
        }
        let profile: Profile = parts[0].parse().map_err(|_| bad())?;
        let method = parts[1].to_string();
        let order: Order = parts[2].parse().map_err(|_| bad())?;
        let check = match &parts[3..] {
            ["matrix"] => Check::Matrix,
            ["rows_identical"] => Check::RowsIdentical,
            ["at_least_lora"] => Check::AtLeastLora,
            [stage, task] => {
                let task: TaskId = task.parse().map_err(|_| bad())?;
                let stage = match *stage {
                    "joint" => Stage::Joint,
                    st => Stage::K(
                        st.strip_prefix("stage")
                            .and_then(|k| k.parse().ok())
                            .filter(|k| (1..=6).contains(k))
                            .ok_or_else(bad)?,
                    ),
                };
                Check::Cell { stage, task }
            }
            _ => return Err(bad()),
        };
        if method.is_empty() {
            return Err(bad());
        }
        Ok(TestName {
            profile,
            method,
            order,
            check,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let mut names = vec![];
        for profile in Profile::ALL {
            for order in Order::ALL {
                for check in [
                    Check::Matrix,
                    Check::RowsIdentical,
                    Check::AtLeastLora,
                    Check::Cell {
                        stage: Stage::K(6),
                        task: TaskId::Hqedit,
                    },
                    Check::Cell {
                        stage: Stage::Joint,
                        task: TaskId::Vqav2,
                    },
                ] {
                    names.push(TestName {
                        profile,
                        method: "mage_dema".into(),
                        order,
                        check,
                    });
                }
            }
        }
        for n in names {
            let s = n.to_string();
            assert_eq!(s.parse::<TestName>().unwrap(), n, "{s}");
        }
        assert_eq!(
            "smoke::lora::default_order::stage3::flickr30k"
                .parse::<TestName>()
                .unwrap()
                .check,
            Check::Cell {
                stage: Stage::K(3),
                task: TaskId::Flickr30k
            }
        );
        for bad in [
            "lora::default_order::matrix",
            "smoke::lora::default_order::stage7::vqav2",
            "smoke::lora::sideways::matrix",
            "smoke::lora::default_order::stage1::nope",
            "smoke::::default_order::matrix",
        ] {
            assert!(bad.parse::<TestName>().is_err(), "{bad}");
        }
    }
}
