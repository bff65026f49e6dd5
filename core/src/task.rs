//! Task ids, modalities and task orders.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An input or output modality of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Text,
    Image,
}

/// The six Continual-NExT tasks, under the paper's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskId {
    Vqav2,
    Imagenet,
    Flickr30k,
    Ocrvqa,
    Refcoco,
    Hqedit,
}

/// An id that names no known task, order or other closed set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{given}` (expected one of: {expected})")]
pub struct ParseIdError {
    pub kind: &'static str,
    pub given: String,
    pub expected: String,
}

impl TaskId {
    /// All tasks in the paper's default order.
    pub const ALL: [TaskId; 6] = [
        TaskId::Vqav2,
        TaskId::Imagenet,
        TaskId::Flickr30k,
        TaskId::Ocrvqa,
        TaskId::Refcoco,
        TaskId::Hqedit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskId::Vqav2 => "vqav2",
            TaskId::Imagenet => "imagenet",
            TaskId::Flickr30k => "flickr30k",
            TaskId::Ocrvqa => "ocrvqa",
            TaskId::Refcoco => "refcoco",
            TaskId::Hqedit => "hqedit",
        }
    }

    /// The modalities the task reads, in a fixed order (text before image).
    pub fn inputs(self) -> &'static [Modality] {
        match self {
            TaskId::Flickr30k => &[Modality::Text],
            _ => &[Modality::Text, Modality::Image],
        }
    }

    /// The modality the task answers with.
    pub fn output(self) -> Modality {
        match self {
            TaskId::Flickr30k | TaskId::Hqedit => Modality::Image,
            _ => Modality::Text,
        }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskId::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ParseIdError {
                kind: "task id",
                given: s.to_string(),
                expected: TaskId::ALL.map(|t| t.as_str()).join(", "),
            })
    }
}

/// A task order of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    DefaultOrder,
    ReverseOrder,
    AlphabetOrder,
}

impl Order {
    pub const ALL: [Order; 3] = [
        Order::DefaultOrder,
        Order::ReverseOrder,
        Order::AlphabetOrder,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Order::DefaultOrder => "default_order",
            Order::ReverseOrder => "reverse_order",
            Order::AlphabetOrder => "alphabet_order",
        }
    }

    /// The tasks in training order.
    pub fn tasks(self) -> [TaskId; 6] {
        use TaskId::*;
        match self {
            Order::DefaultOrder => TaskId::ALL,
            Order::ReverseOrder => [Hqedit, Refcoco, Ocrvqa, Flickr30k, Imagenet, Vqav2],
            Order::AlphabetOrder => [Flickr30k, Hqedit, Imagenet, Ocrvqa, Refcoco, Vqav2],
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Order {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Order::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| ParseIdError {
                kind: "order",
                given: s.to_string(),
                expected: Order::ALL.map(|o| o.as_str()).join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_errors() {
        for t in TaskId::ALL {
            assert_eq!(t.as_str().parse::<TaskId>().unwrap(), t);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
        }
        for o in Order::ALL {
            assert_eq!(o.as_str().parse::<Order>().unwrap(), o);
        }
        let e = "coco".parse::<TaskId>().unwrap_err();
        assert!(e.to_string().contains("unknown task id `coco`"), "{e}");
    }

    #[test]
    fn orders_are_permutations_and_alphabet_is_sorted() {
        for o in Order::ALL {
            let mut t = o.tasks().to_vec();
            t.sort();
            assert_eq!(t, TaskId::ALL.to_vec());
        }
        let names: Vec<_> = Order::AlphabetOrder.tasks().map(|t| t.as_str()).to_vec();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        let mut rev = Order::DefaultOrder.tasks();
        rev.reverse();
        assert_eq!(rev, Order::ReverseOrder.tasks());
    }

    #[test]
    fn modalities_match_the_paper() {
        assert_eq!(TaskId::Flickr30k.inputs(), &[Modality::Text]);
        assert_eq!(TaskId::Hqedit.output(), Modality::Image);
        assert_eq!(TaskId::Refcoco.output(), Modality::Text);
    }
}
