//! Bounding boxes for the grounding task: parsing `[x1, y1, x2, y2]` in normalised
//! coordinates, IoU, and the official script's parser kept for `--compat official`.
//!
//! The official grounding script (the quirks SCORING.md lists; the same code as CoIN's
//! `ETrain/Eval/LLaVA/CoIN/eval_grounding.py`) parses a prediction as: drop one leading
//! space, delete every `[` and `]`, then `pred[1:-1].split(',')` and `float()` of each
//! field; a count other than four, or a field `float()` rejects, makes the sample count
//! wrong. [`parse_box_official`] reproduces that, including the slice that eats the first
//! and last remaining character. (The script also scales both boxes by `max(w, h)` before
//! the IoU; IoU is scale-invariant up to rounding, so that step is left out.)

/// A prediction that is not exactly four numbers, or a reference that is not a box.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoxParseError {
    #[error("empty box: expected four numbers")]
    Empty,
    #[error("empty field between commas in `{0}`")]
    EmptyField(String),
    #[error("`{0}` is not a plain decimal number")]
    NotANumber(String),
    #[error("`{0}` is not a finite number")]
    NotFinite(String),
    #[error("expected exactly four numbers, found {0}")]
    WrongCount(usize),
}

/// IoU above which a predicted box counts as correct (strictly greater).
pub const IOU_THRESHOLD: f64 = 0.5;

/// Parses exactly four numbers: `[x1, y1, x2, y2]`, `(x1 y1 x2 y2)`, `x1,y1,x2,y2`, ...
///
/// Surrounding brackets or parentheses and spaces are tolerated, separators are commas
/// and/or whitespace. Numbers are plain decimals (`0.5`, `-1`, `.25`, `+3.`); exponents,
/// `NaN`, `inf`, letters and a count other than four are format errors, so an answer like
/// "the dog on the left" is reported as instruction unfollowing rather than silently wrong.
pub fn parse_box(s: &str) -> Result<[f64; 4], BoxParseError> {
    let inner = s
        .trim()
        .trim_start_matches(['[', '('])
        .trim_end_matches([']', ')'])
        .trim();
    if inner.is_empty() {
        return Err(BoxParseError::Empty);
    }
    let mut values = Vec::with_capacity(4);
    for field in inner.split(',') {
        let mut tokens = field.split_whitespace().peekable();
        if tokens.peek().is_none() {
            return Err(BoxParseError::EmptyField(s.trim().to_string()));
        }
        for token in tokens {
            values.push(parse_plain_number(token)?);
        }
    }
    <[f64; 4]>::try_from(values).map_err(|v| BoxParseError::WrongCount(v.len()))
}

/// `[+-]? (digits [. digits?] | . digits)`, finite.
fn parse_plain_number(token: &str) -> Result<f64, BoxParseError> {
    let body = token.strip_prefix(['+', '-']).unwrap_or(token);
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits = |t: &str| t.chars().all(|c| c.is_ascii_digit());
    let plain = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    if !plain {
        return Err(BoxParseError::NotANumber(token.to_string()));
    }
    let value: f64 = token
        .parse()
        .map_err(|_| BoxParseError::NotANumber(token.to_string()))?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(BoxParseError::NotFinite(token.to_string()))
    }
}

/// The official parser, quirks included (for `--compat official` only).
///
/// Steps, exactly as the script: (1) if the text starts with a space, drop that one space;
/// (2) delete every `[` and `]`; (3) drop the first and the last character (`pred[1:-1]`,
/// by code point, *after* the brackets are gone); (4) split on `,` and parse each field with
/// Python `float()` (surrounding whitespace, `1e-3`, `nan`, `inf`, `1_0` accepted);
/// (5) require four fields. So `"[0.12,0.30,0.55,0.90]"` becomes `.12,0.30,0.55,0.9`
/// (harmless here), but `"[0.1,0.2,0.3,0.4]"` becomes `.1,0.2,0.3,0.` and the last
/// coordinate reads 0.0. Parentheses are not removed, but the slice happens to eat a
/// surrounding pair: `"(0.1,0.2,0.3,0.4)"` parses whole.
pub fn parse_box_official(s: &str) -> Result<[f64; 4], BoxParseError> {
    let s = s.strip_prefix(' ').unwrap_or(s);
    let chars: Vec<char> = s.chars().filter(|c| *c != '[' && *c != ']').collect();
    let sliced: String = if chars.len() >= 2 {
        chars[1..chars.len() - 1].iter().collect()
    } else {
        String::new()
    };
    let mut values = Vec::with_capacity(4);
    for field in sliced.split(',') {
        let value =
            python_float(field).ok_or_else(|| BoxParseError::NotANumber(field.to_string()))?;
        values.push(value);
    }
    <[f64; 4]>::try_from(values).map_err(|v| BoxParseError::WrongCount(v.len()))
}

/// Python's `float(str)` for ASCII input: whitespace trimmed, `_` allowed between digits,
/// `inf`/`infinity`/`nan` in any case, decimal exponents.
fn python_float(field: &str) -> Option<f64> {
    let t = field.trim();
    let chars: Vec<char> = t.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if *c == '_' {
            let digit_at = |j: Option<usize>| {
                j.and_then(|j| chars.get(j))
                    .is_some_and(|d| d.is_ascii_digit())
            };
            if !digit_at(i.checked_sub(1)) || !digit_at(Some(i + 1)) {
                return None;
            }
        }
    }
    t.replace('_', "").parse().ok()
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes:
/// `inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))`,
/// `union = area1 + area2 - inter`, 0 when the union is not positive (degenerate boxes
/// would otherwise divide by zero).
///
/// This is also the official `calculate_iou` on everything its `float()` parser lets
/// through: a NaN or infinite coordinate makes the union NaN or infinite, so both give no
/// hit whatever Python's argument-order `min`/`max` do with the NaN. A NaN ratio
/// (infinite over infinite) is returned as 0.
pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let inter =
        (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) * (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    let ratio = if union > 0.0 { inter / union } else { 0.0 };
    if ratio.is_nan() {
        0.0
    } else {
        ratio
    }
}

/// Whether a box is a hit: IoU strictly above [`IOU_THRESHOLD`].
pub fn box_correct(iou: f64) -> bool {
    iou > IOU_THRESHOLD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_box_accepts_brackets_parentheses_spaces_and_commas() {
        let want = [0.12, 0.3, 0.55, 0.9];
        assert_eq!(parse_box("[0.12,0.30,0.55,0.90]").unwrap(), want);
        assert_eq!(parse_box(" [0.12, 0.30, 0.55, 0.90] ").unwrap(), want);
        assert_eq!(parse_box("(0.12 0.30 0.55 0.90)").unwrap(), want);
        assert_eq!(parse_box("0.12,0.30 , 0.55,0.90").unwrap(), want);
        assert_eq!(parse_box("[[0.12, 0.3, 0.55, .9]]").unwrap(), want);
        assert_eq!(parse_box("[-1, +2., 3, 4]").unwrap(), [-1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn parse_box_rejects_wrong_counts() {
        assert_eq!(
            parse_box("[0.1,0.2,0.3]"),
            Err(BoxParseError::WrongCount(3))
        );
        assert_eq!(
            parse_box("[0.1,0.2,0.3,0.4,0.5]"),
            Err(BoxParseError::WrongCount(5))
        );
        assert_eq!(parse_box("[]"), Err(BoxParseError::Empty));
        assert_eq!(parse_box("   "), Err(BoxParseError::Empty));
        assert_eq!(
            parse_box("0.1,,0.2,0.3,0.4"),
            Err(BoxParseError::EmptyField("0.1,,0.2,0.3,0.4".into()))
        );
    }

    #[test]
    fn parse_box_rejects_letters_exponents_and_non_finite() {
        assert_eq!(
            parse_box("the dog on the left"),
            Err(BoxParseError::NotANumber("the".into()))
        );
        assert_eq!(
            parse_box("x1=0.1, 0.2, 0.3, 0.4"),
            Err(BoxParseError::NotANumber("x1=0.1".into()))
        );
        assert_eq!(
            parse_box("[NaN, 0.2, 0.3, 0.4]"),
            Err(BoxParseError::NotANumber("NaN".into()))
        );
        assert_eq!(
            parse_box("[0.1, inf, 0.3, 0.4]"),
            Err(BoxParseError::NotANumber("inf".into()))
        );
        assert_eq!(
            parse_box("[1e-3, 0.2, 0.3, 0.4]"),
            Err(BoxParseError::NotANumber("1e-3".into()))
        );
        assert_eq!(
            parse_box("[., 0.2, 0.3, 0.4]"),
            Err(BoxParseError::NotANumber(".".into()))
        );
        let huge = format!("[1{}, 0.2, 0.3, 0.4]", "0".repeat(400));
        assert!(matches!(parse_box(&huge), Err(BoxParseError::NotFinite(_))));
    }

    #[test]
    fn official_parser_drops_first_and_last_char_after_bracket_removal() {
        // "0.12,0.30,0.55,0.90" -> ".12,0.30,0.55,0.9"
        assert_eq!(
            parse_box_official("[0.12,0.30,0.55,0.90]").unwrap(),
            [0.12, 0.3, 0.55, 0.9]
        );
        // "0.1,0.2,0.3,0.4" -> ".1,0.2,0.3,0." : the last coordinate becomes 0.
        assert_eq!(
            parse_box_official("[0.1,0.2,0.3,0.4]").unwrap(),
            [0.1, 0.2, 0.3, 0.0]
        );
        // Only one leading space is dropped before the slice.
        assert_eq!(
            parse_box_official(" [0.25, 0.5, 0.75, 1.0]").unwrap(),
            [0.25, 0.5, 0.75, 1.0]
        );
        // Without brackets the slice eats real digits: "12,30,55,90" -> "2,30,55,9".
        assert_eq!(
            parse_box_official("12,30,55,90").unwrap(),
            [2.0, 30.0, 55.0, 9.0]
        );
    }

    #[test]
    fn official_parser_accepts_what_python_float_accepts() {
        let b = parse_box_official("[0.1, nan, 1e-1 , 1_0.5]").unwrap();
        assert_eq!(b[0], 0.1);
        assert!(b[1].is_nan());
        assert_eq!(b[2], 0.1);
        assert_eq!(b[3], 10.0);
        assert_eq!(
            parse_box_official("[0.1,0.2,0.3,0.4,0.5]"),
            Err(BoxParseError::WrongCount(5))
        );
        assert_eq!(
            parse_box_official("(0.1,0.2,0.3,0.4)").unwrap(),
            [0.1, 0.2, 0.3, 0.4]
        );
        assert!(parse_box_official("[0.1,INF,0.3,0.4]").unwrap()[1].is_infinite());
        assert!(parse_box_official("[0.1,-Infinity,0.3,0.4]").unwrap()[1] < 0.0);
        // The slice eats the first letter of a leading word: "INF" -> "NF".
        assert_eq!(
            parse_box_official("[INF,0.2,0.3,0.4]"),
            Err(BoxParseError::NotANumber("NF".into()))
        );
        assert_eq!(
            parse_box_official("[a,0.2,0.3,0.4]"),
            Err(BoxParseError::NotANumber("".into()))
        );
        assert_eq!(
            parse_box_official("[0.1,_2,0.3,0.4]"),
            Err(BoxParseError::NotANumber("_2".into()))
        );
        assert_eq!(
            parse_box_official("[]"),
            Err(BoxParseError::NotANumber("".into()))
        );
        assert_eq!(
            parse_box_official(""),
            Err(BoxParseError::NotANumber("".into()))
        );
    }

    #[test]
    fn iou_values() {
        let a = [0.0, 0.0, 1.0, 1.0];
        assert_eq!(iou(&a, &a), 1.0);
        assert_eq!(iou(&a, &[0.5, 0.0, 1.5, 1.0]), 0.5 / 1.5);
        assert_eq!(iou(&a, &[0.0, 0.0, 0.5, 1.0]), 0.5);
        assert_eq!(iou(&a, &[2.0, 2.0, 3.0, 3.0]), 0.0);
        // Touching edges: zero intersection.
        assert_eq!(iou(&a, &[1.0, 0.0, 2.0, 1.0]), 0.0);
        // Degenerate boxes: union 0 -> IoU 0, not NaN.
        let p = [0.3, 0.3, 0.3, 0.3];
        assert_eq!(iou(&p, &p), 0.0);
    }

    #[test]
    fn threshold_is_strict() {
        assert!(!box_correct(0.5));
        assert!(box_correct(0.5 + 1e-12));
        assert!(!box_correct(0.0));
        let gt = [0.0, 0.0, 1.0, 1.0];
        assert!(!box_correct(iou(&[0.0, 0.0, 0.5, 1.0], &gt)));
        assert!(box_correct(iou(&[0.0, 0.0, 0.6, 1.0], &gt)));
    }

    #[test]
    fn non_finite_official_boxes_never_hit() {
        let gt = [0.0, 0.0, 1.0, 1.0];
        assert_eq!(iou(&[0.0, 0.0, f64::NAN, 1.0], &gt), 0.0);
        assert_eq!(iou(&[0.0, 0.0, f64::INFINITY, 1.0], &gt), 0.0);
        let inf = [
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::INFINITY,
        ];
        assert_eq!(iou(&inf, &inf), 0.0);
    }
}
