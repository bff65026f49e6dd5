//! Knowledge transfer between tasks (the paper's Table 3): how learning one task moves the
//! accuracy on a task learned earlier, labelled by the modalities the two tasks answer with.
//!
//! For a sequential matrix, training task `A` at stage `k` and an earlier task `B` (column
//! `i < k`): `before = a[k-1][i]`, `after = a[k][i]`. Both are cells of the matrix, so the table
//! is a pure function of `results.json`.

use crate::matrix::AccuracyMatrix;
use crate::task::{Modality, TaskId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The output modalities of the trained task and of the evaluated task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TransferKind {
    pub from: Modality,
    pub to: Modality,
}

impl fmt::Display for TransferKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |m: Modality| match m {
            Modality::Text => "text",
            Modality::Image => "image",
        };
        write!(f, "{}->{}", name(self.from), name(self.to))
    }
}

/// One row of the transfer table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    /// The task learned at `stage`.
    pub train: TaskId,
    /// The earlier task whose accuracy moved.
    pub eval: TaskId,
    /// 1-based stage at which `train` was learned.
    pub stage: usize,
    pub kind: TransferKind,
    pub before: f64,
    pub after: f64,
}

impl Transfer {
    pub fn delta(&self) -> f64 {
        self.after - self.before
    }
}

/// The transfer from learning `train` onto the earlier task `eval`. `None` when the matrix is
/// joint, `eval` is not learned before `train`, or a needed cell is missing.
pub fn transfer(m: &AccuracyMatrix, train: TaskId, eval: TaskId) -> Option<Transfer> {
    if m.is_joint() {
        return None;
    }
    let k = m.column_of(train)?;
    let i = m.column_of(eval)?;
    if i >= k {
        return None;
    }
    Some(Transfer {
        train,
        eval,
        stage: k + 1,
        kind: TransferKind {
            from: train.output(),
            to: eval.output(),
        },
        before: m.get(k - 1, i)?,
        after: m.get(k, i)?,
    })
}

/// Every (train, earlier task) pair the matrix has, in stage order then column order.
pub fn all_transfers(m: &AccuracyMatrix) -> Vec<Transfer> {
    let tasks = m.tasks();
    let mut out = vec![];
    for (k, &train) in tasks.iter().enumerate().take(m.num_stages()) {
        for &eval in tasks.iter().take(k) {
            out.extend(transfer(m, train, eval));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskId::*;

    fn m3() -> AccuracyMatrix {
        let mut m = AccuracyMatrix::sequential(vec![Vqav2, Flickr30k, Imagenet]).unwrap();
        m.push_row(vec![Some(80.0), None, None]).unwrap();
        m.push_row(vec![Some(60.0), Some(30.0), None]).unwrap();
        m.push_row(vec![Some(70.0), Some(25.0), Some(90.0)])
            .unwrap();
        m
    }

    #[test]
    fn before_and_after_are_the_two_cells_around_the_stage() {
        let m = m3();
        let t = transfer(&m, Flickr30k, Vqav2).unwrap();
        assert_eq!((t.before, t.after, t.stage), (80.0, 60.0, 2));
        assert_eq!(t.kind.to_string(), "image->text");
        assert_eq!(t.delta(), -20.0);
        let t = transfer(&m, Imagenet, Flickr30k).unwrap();
        assert_eq!((t.before, t.after), (30.0, 25.0));
        assert_eq!(t.kind.to_string(), "text->image");
        // Not learned earlier, or the same task: no transfer.
        assert!(transfer(&m, Vqav2, Imagenet).is_none());
        assert!(transfer(&m, Vqav2, Vqav2).is_none());
        assert!(transfer(&m, Refcoco, Vqav2).is_none());
    }

    #[test]
    fn all_pairs_in_stage_order() {
        let pairs: Vec<_> = all_transfers(&m3())
            .into_iter()
            .map(|t| (t.train, t.eval))
            .collect();
        assert_eq!(
            pairs,
            vec![(Flickr30k, Vqav2), (Imagenet, Vqav2), (Imagenet, Flickr30k)]
        );
        let joint = AccuracyMatrix::joint(vec![Vqav2, Imagenet], vec![Some(1.0), Some(2.0)]);
        assert!(all_transfers(&joint.unwrap()).is_empty());
    }
}
