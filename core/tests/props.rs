//! Property tests over the pure parsers and scorers: valid values round-trip, arbitrary input
//! never panics, every failure is an error that names its source. 10,000 cases per property.

use cnext_core::scoring::{
    clean_text, iou, normalize_answer, parse_box, parse_box_official, Compat, Scorer,
};
use cnext_core::{metrics, AccuracyMatrix, TaskId};
use proptest::prelude::*;

const CASES: u32 = 10_000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A cell as the files write it: a two-decimal accuracy, or not evaluated.
fn cell() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        1 => Just(None),
        6 => (0u32..=10_000).prop_map(|h| Some(f64::from(h) / 100.0)),
    ]
}

/// A sequential matrix of two or more stages over the first `n` default-order tasks (one full
/// row reads back as joint, as `from_csv_reader` documents).
fn matrix() -> impl Strategy<Value = AccuracyMatrix> {
    (2usize..=6).prop_flat_map(|n| {
        proptest::collection::vec(proptest::collection::vec(cell(), n), 2..=n).prop_map(
            move |rows| {
                let tasks = TaskId::ALL[..n].to_vec();
                let mut m = AccuracyMatrix::sequential(tasks).unwrap();
                for (j, mut r) in rows.into_iter().enumerate() {
                    // The cells a run always has: everything learned so far.
                    for (i, c) in r.iter_mut().enumerate().take(j + 1) {
                        c.get_or_insert(50.0 + i as f64);
                    }
                    m.push_row(r).unwrap();
                }
                m
            },
        )
    })
}

/// Mutates bytes of `text`: flips, deletions, insertions of structural characters.
fn mutate(text: String) -> impl Strategy<Value = Vec<u8>> {
    let len = text.len().max(1);
    let edit = (0..len, 0u8..4, any::<u8>(), 0usize..8);
    proptest::collection::vec(edit, 1..6).prop_map(move |edits| {
        let mut b = text.clone().into_bytes();
        for (at, kind, byte, pick) in edits {
            let at = at.min(b.len());
            let special = [b',', b'\n', b'"', b'-', b'[', 0xff, b'.', b'e'][pick];
            match kind {
                0 if at < b.len() => b[at] = byte,
                1 if at < b.len() => {
                    b.remove(at);
                }
                2 => b.insert(at, special),
                _ => b.truncate(at),
            }
        }
        b
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn matrices_round_trip_through_csv(m in matrix()) {
        let csv = m.to_csv_string();
        let back = AccuracyMatrix::from_csv_reader(csv.as_bytes(), "m.csv").unwrap();
        prop_assert_eq!(back.rows(), m.rows());
        prop_assert_eq!(metrics::Metrics::of(&back), metrics::Metrics::of(&m));
    }

    #[test]
    fn mutated_matrices_parse_or_name_the_file(
        bytes in matrix().prop_flat_map(|m| mutate(m.to_csv_string()))
    ) {
        if let Err(e) = AccuracyMatrix::from_csv_reader(bytes.as_slice(), "m.csv") {
            prop_assert!(e.to_string().contains("m.csv"), "{}", e);
        }
    }

    #[test]
    fn metrics_of_two_decimal_cells_round_like_their_exact_mean(
        cells in proptest::collection::vec(0u32..=10_000, 1..=6)
    ) {
        let m = AccuracyMatrix::joint(
            TaskId::ALL[..cells.len().max(2)].to_vec(),
            cells.iter().map(|h| Some(f64::from(*h) / 100.0))
                .chain(std::iter::repeat(Some(0.0)))
                .take(cells.len().max(2))
                .collect(),
        ).unwrap();
        let n = cells.len().max(2) as u64;
        let sum: u64 = cells.iter().map(|h| u64::from(*h)).sum();
        // Exact: mean in hundredths is sum / n; half away from zero.
        let want = (2 * sum + n) / (2 * n);
        let got = metrics::round2(metrics::avg_acc(&m).unwrap());
        prop_assert_eq!(got, want as f64 / 100.0);
    }

    #[test]
    fn valid_boxes_round_trip(b in proptest::array::uniform4(0u32..=100)) {
        let v = b.map(|x| f64::from(x) / 100.0);
        let text = format!("[{},{},{},{}]", v[0], v[1], v[2], v[3]);
        prop_assert_eq!(parse_box(&text).unwrap(), v);
        // The official parser's `pred[1:-1]` quirk changes values by design; it must not panic.
        let _ = parse_box_official(&text);
        let i = iou(&v, &v);
        prop_assert!(i.is_finite() && (0.0..=1.0).contains(&i));
    }

    #[test]
    fn box_parsers_never_panic(s in any::<String>()) {
        if let Ok(b) = parse_box(&s) {
            prop_assert!(b.iter().all(|x| x.is_finite()));
        }
        let _ = parse_box_official(&s);
    }

    #[test]
    fn text_scorers_never_panic_and_stay_in_range(
        pred in any::<String>(),
        refs in proptest::collection::vec(any::<String>(), 0..4),
    ) {
        let _ = clean_text(&pred);
        let _ = normalize_answer(&pred);
        for scorer in Scorer::ALL {
            for compat in Compat::ALL {
                if let Ok(s) = scorer.score_text(&pred, &refs, compat) {
                    prop_assert!((0.0..=1.0).contains(&s.score), "{:?}: {}", scorer, s.score);
                }
            }
        }
    }

    #[test]
    fn box_scoring_of_any_prediction_never_panics(
        pred in "[\\[\\]\\(\\)0-9., eE+-]{0,40}",
    ) {
        let r = vec!["[0.1,0.2,0.6,0.7]".to_string()];
        for compat in Compat::ALL {
            let s = Scorer::BoxIou.score_text(&pred, &r, compat).unwrap();
            prop_assert!((0.0..=1.0).contains(&s.score));
        }
    }
}
