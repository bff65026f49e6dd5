//! Text cleaning and the string-matching scorers (`loose_match`, `loose_match_ocr`,
//! `exact_match`) of SCORING.md.
//!
//! All comparisons are case-insensitive through Unicode upper-casing (Python's `str.upper()`
//! and Rust's `to_uppercase` agree on it), so `"Paris"` and `"PARIS"` match.

use super::Compat;
use std::collections::HashMap;

/// Removes every `<...>` tag and trims surrounding whitespace.
///
/// Equivalent to Python's `re.sub(r"<[^>]*>", "", s).strip()`: a tag runs from a `<` to the
/// next `>` (so `"<a<b>>"` leaves `">"`), and a `<` with no later `>` is kept as text. Models
/// emit special tokens such as `<s>` or `<image>` that are not part of the answer.
pub fn clean_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('<') {
        match rest[open..].find('>') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// Whether some whitespace-separated token occurs more than twice.
///
/// Degenerate generations repeat themselves ("cat cat cat ..."); without this check such
/// an output would contain the answer and pass the containment test. Tokens are compared
/// exactly as written (case-sensitive), like Python's `pred.split()` counted in a dict.
fn has_repeated_token(pred: &str) -> bool {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    pred.split_whitespace().any(|t| {
        let n = counts.entry(t).or_insert(0);
        *n += 1;
        *n > 2
    })
}

/// The paper's `loose_match`: wrong if any token occurs more than 2 times; else correct if
/// the trimmed strings are equal or either contains the other, case-insensitively.
///
/// An empty prediction is wrong under [`Compat::Correct`]; under [`Compat::Official`] it is
/// correct, as in the official script, where `"" in gt` is always true.
pub fn loose_match(pred: &str, gt: &str, compat: Compat) -> bool {
    let pred = pred.trim();
    let gt = gt.trim();
    if has_repeated_token(pred) {
        return false;
    }
    if pred.is_empty() {
        return compat == Compat::Official;
    }
    let p = pred.to_uppercase();
    let g = gt.to_uppercase();
    p == g || p.contains(&g) || g.contains(&p)
}

/// `loose_match` for OCR-VQA: a prediction containing `unanswerable` in any case is wrong
/// (the model declining to read the text is never a hit, even if the title contains the
/// word); otherwise exactly [`loose_match`], including its empty-prediction compat rule.
pub fn loose_match_ocr(pred: &str, gt: &str, compat: Compat) -> bool {
    if pred.to_lowercase().contains("unanswerable") {
        return false;
    }
    loose_match(pred, gt, compat)
}

/// CoIN's `exact_match`: `upper(pred) == upper(gt)` after trimming both.
pub fn exact_match(pred: &str, gt: &str) -> bool {
    pred.trim().to_uppercase() == gt.trim().to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_text_removes_tags_and_trims() {
        assert_eq!(clean_text("  <s> Paris </s>\n"), "Paris");
        assert_eq!(clean_text("a<br>b"), "ab");
        assert_eq!(clean_text("<>x"), "x");
        assert_eq!(clean_text("<a<b>>c"), ">c");
        assert_eq!(clean_text("x < y"), "x < y");
        assert_eq!(clean_text("1 < 2 > 0"), "1  0");
        assert_eq!(clean_text("<img>"), "");
        assert_eq!(clean_text("<multi\nline> ok"), "ok");
        assert_eq!(clean_text(""), "");
    }

    #[test]
    fn loose_match_equality_and_case() {
        assert!(loose_match("Paris", "paris", Compat::Correct));
        assert!(loose_match("  PARIS ", "Paris", Compat::Correct));
        assert!(!loose_match("London", "Paris", Compat::Correct));
    }

    #[test]
    fn loose_match_containment_both_ways() {
        assert!(loose_match(
            "a golden retriever",
            "Golden Retriever",
            Compat::Correct
        ));
        assert!(loose_match(
            "retriever",
            "golden retriever",
            Compat::Correct
        ));
        assert!(!loose_match("golden", "retriever dog", Compat::Correct));
    }

    #[test]
    fn loose_match_rejects_tokens_repeated_more_than_twice() {
        assert!(!loose_match("cat cat cat", "cat", Compat::Correct));
        assert!(!loose_match("cat cat cat", "cat", Compat::Official));
        assert!(!loose_match(
            "a cat and a dog and a cow",
            "cat",
            Compat::Correct
        ));
        // Twice is allowed.
        assert!(loose_match("cat cat", "cat", Compat::Correct));
        // Counting is case-sensitive, as written.
        assert!(loose_match("Cat cat CAT", "cat", Compat::Correct));
    }

    #[test]
    fn loose_match_empty_prediction_depends_on_compat() {
        assert!(!loose_match("", "paris", Compat::Correct));
        assert!(!loose_match("   ", "paris", Compat::Correct));
        assert!(loose_match("", "paris", Compat::Official));
        assert!(loose_match("  ", "paris", Compat::Official));
    }

    #[test]
    fn loose_match_ocr_rejects_unanswerable_in_any_case() {
        assert!(!loose_match_ocr(
            "Unanswerable",
            "unanswerable",
            Compat::Correct
        ));
        assert!(!loose_match_ocr("UNANSWERABLE", "x", Compat::Official));
        assert!(!loose_match_ocr(
            "it is unanswerable",
            "it is",
            Compat::Correct
        ));
        assert!(loose_match_ocr(
            "Harry Potter",
            "harry potter",
            Compat::Correct
        ));
        assert!(!loose_match_ocr("", "harry potter", Compat::Correct));
        assert!(loose_match_ocr("", "harry potter", Compat::Official));
        assert!(!loose_match_ocr("no no no", "no", Compat::Correct));
    }

    #[test]
    fn exact_match_is_case_insensitive_equality_only() {
        assert!(exact_match("Yes", "yes"));
        assert!(exact_match(" yes\n", "YES"));
        assert!(!exact_match("yes!", "yes"));
        assert!(!exact_match("a dog", "dog"));
        assert!(!exact_match("", "dog"));
        assert!(exact_match("straße", "STRASSE"));
    }
}
