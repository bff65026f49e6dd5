//! The official VQA accuracy (GT-Vision-Lab/VQA, `vqaEval.py`), ported by hand.
//!
//! Score of a prediction against `n` human answers (10 in VQAv2): for each answer `i`, count
//! the *other* answers equal to the prediction, `acc_i = min(1, matches / 3)`; the score is
//! the mean of the `acc_i` (the "all 10 choose 9 subsets" average of the VQA paper).
//!
//! Normalisation (`normalize_answer`) is `processPunctuation` then `processDigitArticle`:
//! punctuation from [`PUNCT`] is deleted when it touches a space in the input or when the
//! input holds a digit-comma-digit (`"1,000"` -> `"1000"`), else replaced by a space; then a
//! `.` not followed by a digit is deleted (`"3.5"` keeps its point); then the text is
//! lower-cased and split on whitespace, number words `none`/`zero`..`ten` become digits,
//! articles `a`/`an`/`the` are dropped and the contractions table restores apostrophes
//! (`"dont"` -> `"don't"`).
//!
//! The official copies disagree on *when* normalisation applies; [`VqaNormalization`] names
//! them:
//! - [`VqaNormalization::WhenAnswersDiffer`] (default): the current GT-Vision-Lab/VQA master,
//!   `PythonEvaluationTools/vqaEvaluation/vqaEval.py` at commit `a013f004` (the revision
//!   lmms-eval PR #760 links as the original, 2025; GT-Vision-Lab/VQA issue #14 quotes the
//!   same code and its author confirms it; vendored in mlfoundations/open_flamingo
//!   `open_flamingo/eval/vqa_metric.py`). Prediction and answers get `\n`/`\t` -> space and
//!   are stripped; both are normalised only when the answers are not all identical (the
//!   author's rationale: unanimous answers may be OCR text that must match verbatim).
//! - [`VqaNormalization::PredictionAlways`]: another revision of the same file (commit
//!   `c4e6a0e4`, a Python 3 port), still copied in salesforce/LAVIS
//!   `lavis/common/vqa_tools/vqa_eval.py`: the prediction is always normalised; the answers
//!   are never stripped and get only `processPunctuation`, and only when they differ.
//! - [`VqaNormalization::Always`]: both always normalised, as lmms-eval does since
//!   EvolvingLMMs-Lab/lmms-eval PR #794 ("Fix accuracy computation for VQAv2").
//!
//! All three share the tables and `processPunctuation`/`processDigitArticle` ported here.
//!
//! Quirks kept on purpose, since they change scores:
//! - `periodStrip` is `(?!<=\d)(\.)(?!\d)`: the first group is a negative *lookahead* for the
//!   literal `<=` plus a digit, which a `.` never starts, so only "not followed by a digit"
//!   matters; and the call `periodStrip.sub("", text, re.UNICODE)` passes `re.UNICODE` (32)
//!   as the `count` argument, so at most [`PERIOD_STRIP_COUNT`] periods are removed.
//! - The punctuation decision looks at the *input* text (`p + ' ' in inText`), not the text
//!   as already rewritten.
//! - Contraction keys with capitals (`"Im"`, `"Ive"`, ...) can never match after
//!   lower-casing; they are kept for completeness. `"somebody'd" -> "somebodyd"` is the
//!   official table's (reversed) entry.
//!
//! Deliberate differences: Python's `\d` matches any Unicode decimal digit, here only ASCII
//! digits; answers are compared by position (Python compares answer dicts, which differ by
//! `answer_id`, so the effect is the same: exactly one answer is left out per subset); an
//! empty answer list scores 0 where Python divides by zero.

use serde::{Deserialize, Serialize};

/// Which official copy decides when answers are normalised (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VqaNormalization {
    /// Current GT-Vision-Lab/VQA master: normalise both only when the answers differ.
    #[default]
    WhenAnswersDiffer,
    /// GT-Vision-Lab revision `c4e6a0e4` and LAVIS: always normalise the prediction;
    /// punctuation only, and only when they differ, for the answers.
    PredictionAlways,
    /// lmms-eval after PR #794: always normalise both.
    Always,
}

/// Punctuation handled by `processPunctuation` (the current official list).
pub const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// `re.UNICODE` passed as `count` to `periodStrip.sub`: at most this many periods go.
pub const PERIOD_STRIP_COUNT: usize = 32;

/// `manualMap`: number words to digits.
const NUMBER_WORDS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// The official `contractions` table, complete and in its order (120 entries).
#[rustfmt::skip]
const CONTRACTIONS: [(&str, &str); 120] = [
    ("aint", "ain't"), ("arent", "aren't"), ("cant", "can't"), ("couldve", "could've"),
    ("couldnt", "couldn't"), ("couldn'tve", "couldn't've"), ("couldnt've", "couldn't've"),
    ("didnt", "didn't"), ("doesnt", "doesn't"), ("dont", "don't"), ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"), ("hadn'tve", "hadn't've"), ("hasnt", "hasn't"),
    ("havent", "haven't"), ("hed", "he'd"), ("hed've", "he'd've"), ("he'dve", "he'd've"),
    ("hes", "he's"), ("howd", "how'd"), ("howll", "how'll"), ("hows", "how's"),
    ("Id've", "I'd've"), ("I'dve", "I'd've"), ("Im", "I'm"), ("Ive", "I've"), ("isnt", "isn't"),
    ("itd", "it'd"), ("itd've", "it'd've"), ("it'dve", "it'd've"), ("itll", "it'll"),
    ("let's", "let's"), ("maam", "ma'am"), ("mightnt", "mightn't"), ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"), ("mightve", "might've"), ("mustnt", "mustn't"),
    ("mustve", "must've"), ("neednt", "needn't"), ("notve", "not've"), ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"), ("ow's'at", "'ow's'at"), ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"), ("shant", "shan't"), ("shed've", "she'd've"), ("she'dve", "she'd've"),
    ("she's", "she's"), ("shouldve", "should've"), ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"), ("shouldn'tve", "shouldn't've"), ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"), ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"), ("somebodys", "somebody's"), ("someoned", "someone'd"),
    ("someoned've", "someone'd've"), ("someone'dve", "someone'd've"), ("someonell", "someone'll"),
    ("someones", "someone's"), ("somethingd", "something'd"), ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"), ("somethingll", "something'll"), ("thats", "that's"),
    ("thered", "there'd"), ("thered've", "there'd've"), ("there'dve", "there'd've"),
    ("therere", "there're"), ("theres", "there's"), ("theyd", "they'd"), ("theyd've", "they'd've"),
    ("they'dve", "they'd've"), ("theyll", "they'll"), ("theyre", "they're"), ("theyve", "they've"),
    ("twas", "'twas"), ("wasnt", "wasn't"), ("wed've", "we'd've"), ("we'dve", "we'd've"),
    ("weve", "we've"), ("werent", "weren't"), ("whatll", "what'll"), ("whatre", "what're"),
    ("whats", "what's"), ("whatve", "what've"), ("whens", "when's"), ("whered", "where'd"),
    ("wheres", "where's"), ("whereve", "where've"), ("whod", "who'd"), ("whod've", "who'd've"),
    ("who'dve", "who'd've"), ("wholl", "who'll"), ("whos", "who's"), ("whove", "who've"),
    ("whyll", "why'll"), ("whyre", "why're"), ("whys", "why's"), ("wont", "won't"),
    ("wouldve", "would've"), ("wouldnt", "wouldn't"), ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"), ("yall", "y'all"), ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"), ("yall'd've", "y'all'd've"), ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"), ("youd", "you'd"), ("youd've", "you'd've"),
    ("you'dve", "you'd've"), ("youll", "you'll"), ("youre", "you're"), ("youve", "you've"),
];

fn lookup(table: &[(&'static str, &'static str)], key: &str) -> Option<&'static str> {
    table.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// Official `processPunctuation` (see the module docs for its rules and quirks).
pub fn process_punctuation(in_text: &str) -> String {
    let chars: Vec<char> = in_text.chars().collect();
    let digit_comma_digit = chars
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == ',' && w[2].is_ascii_digit());
    let delete: Vec<bool> = PUNCT
        .iter()
        .map(|p| {
            digit_comma_digit
                || in_text.contains(&format!("{p} "))
                || in_text.contains(&format!(" {p}"))
        })
        .collect();
    let mut out = String::with_capacity(in_text.len());
    for &c in &chars {
        match PUNCT.iter().position(|p| *p == c) {
            Some(i) if delete[i] => {}
            Some(_) => out.push(' '),
            None => out.push(c),
        }
    }
    strip_periods(&out)
}

/// `periodStrip.sub("", text, 32)`: drop a `.` not followed by a digit, at most 32 times.
fn strip_periods(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut removed = 0;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let before_digit = chars.peek().is_some_and(|n| n.is_ascii_digit());
        if c == '.' && !before_digit && removed < PERIOD_STRIP_COUNT {
            removed += 1;
        } else {
            out.push(c);
        }
    }
    out
}

/// Official `processDigitArticle`: lower-case, number words to digits, drop articles,
/// restore contractions, re-join with single spaces.
pub fn process_digit_article(in_text: &str) -> String {
    let lowered = in_text.to_lowercase();
    lowered
        .split_whitespace()
        .map(|w| lookup(&NUMBER_WORDS, w).unwrap_or(w))
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| lookup(&CONTRACTIONS, w).unwrap_or(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The full official normalisation: `process_digit_article(process_punctuation(s))`.
pub fn normalize_answer(s: &str) -> String {
    process_digit_article(&process_punctuation(s))
}

/// `s.replace('\n', ' ').replace('\t', ' ').strip()`, done to every prediction.
fn flatten(s: &str) -> String {
    s.replace(['\n', '\t'], " ").trim().to_string()
}

fn all_identical(answers: &[String]) -> bool {
    answers.windows(2).all(|w| w[0] == w[1])
}

/// Mean over `i` of `min(1, #{j != i : answers[j] == pred} / 3)`; 0 for no answers.
fn leave_one_out(pred: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let total = answers.iter().filter(|a| a.as_str() == pred).count();
    let mut sum = 0.0;
    for a in answers {
        let others = total - usize::from(a.as_str() == pred);
        sum += (others as f64 / 3.0).min(1.0);
    }
    sum / answers.len() as f64
}

/// VQA accuracy in `[0, 1]` under the current official rule
/// ([`VqaNormalization::WhenAnswersDiffer`]).
pub fn vqa_accuracy(pred: &str, answers: &[String]) -> f64 {
    vqa_accuracy_with(pred, answers, VqaNormalization::default())
}

/// VQA accuracy in `[0, 1]` under the chosen official variant.
pub fn vqa_accuracy_with(pred: &str, answers: &[String], norm: VqaNormalization) -> f64 {
    match norm {
        VqaNormalization::WhenAnswersDiffer => {
            let answers: Vec<String> = answers.iter().map(|a| flatten(a)).collect();
            let pred = flatten(pred);
            if all_identical(&answers) {
                leave_one_out(&pred, &answers)
            } else {
                let answers: Vec<String> = answers.iter().map(|a| normalize_answer(a)).collect();
                leave_one_out(&normalize_answer(&pred), &answers)
            }
        }
        VqaNormalization::PredictionAlways => {
            let pred = normalize_answer(&flatten(pred));
            if all_identical(answers) {
                leave_one_out(&pred, answers)
            } else {
                let answers: Vec<String> = answers.iter().map(|a| process_punctuation(a)).collect();
                leave_one_out(&pred, &answers)
            }
        }
        VqaNormalization::Always => {
            let answers: Vec<String> = answers
                .iter()
                .map(|a| normalize_answer(&flatten(a)))
                .collect();
            leave_one_out(&normalize_answer(&flatten(pred)), &answers)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VqaNormalization::*;

    fn answers(groups: &[(&str, usize)]) -> Vec<String> {
        groups
            .iter()
            .flat_map(|(a, n)| std::iter::repeat_n(a.to_string(), *n))
            .collect()
    }

    /// Expected values below were produced by the official Python code.
    fn all_variants(pred: &str, gts: &[String]) -> [f64; 3] {
        [WhenAnswersDiffer, PredictionAlways, Always].map(|n| vqa_accuracy_with(pred, gts, n))
    }

    #[test]
    fn punctuation_spaced_or_digit_comma_digit_is_deleted_else_spaced() {
        assert_eq!(process_punctuation("yes!"), "yes ");
        assert_eq!(process_punctuation("a,b"), "a b");
        assert_eq!(process_punctuation("a/b"), "a b");
        assert_eq!(process_punctuation("left-hand"), "left hand");
        assert_eq!(process_punctuation("hello, world"), "hello world");
        assert_eq!(process_punctuation("left - hand"), "left  hand");
        assert_eq!(process_punctuation("x ; y;z"), "x  yz");
        assert_eq!(process_punctuation("what?!"), "what  ");
        assert_eq!(process_punctuation("(?)"), "   ");
        assert_eq!(process_punctuation("x<y>"), "x y ");
        assert_eq!(process_punctuation("it's"), "it's");
        // Digit-comma-digit anywhere deletes every punctuation mark.
        assert_eq!(process_punctuation("1,000"), "1000");
        assert_eq!(process_punctuation("1,5 (x)"), "15 x");
    }

    #[test]
    fn periods_go_unless_before_a_digit_at_most_32() {
        assert_eq!(process_punctuation("3.5"), "3.5");
        assert_eq!(process_punctuation(".5"), ".5");
        assert_eq!(process_punctuation("end."), "end");
        assert_eq!(process_punctuation("a.b"), "ab");
        assert_eq!(process_punctuation("2."), "2");
        assert_eq!(process_punctuation("5.0."), "5.0");
        assert_eq!(process_punctuation("e.g."), "eg");
        let many = format!("a{}", ".".repeat(33));
        assert_eq!(process_punctuation(&many), "a.");
    }

    #[test]
    fn digits_articles_contractions() {
        assert_eq!(process_digit_article("Two Dogs"), "2 dogs");
        assert_eq!(
            process_digit_article("zero one two three four five six seven eight nine ten"),
            "0 1 2 3 4 5 6 7 8 9 10"
        );
        assert_eq!(process_digit_article("none"), "0");
        assert_eq!(process_digit_article("eleven"), "eleven");
        assert_eq!(process_digit_article("the cat"), "cat");
        assert_eq!(process_digit_article("an apple a day"), "apple day");
        assert_eq!(process_digit_article("The"), "");
        assert_eq!(process_digit_article("  a   b  "), "b");
        assert_eq!(process_digit_article("dont"), "don't");
        assert_eq!(process_digit_article("youre wont"), "you're won't");
        // Capitalised keys are dead after lower-casing; the reversed entry is kept.
        assert_eq!(process_digit_article("Im"), "im");
        assert_eq!(process_digit_article("somebody'd"), "somebodyd");
        assert_eq!(normalize_answer("Two dogs!"), "2 dogs");
        assert_eq!(normalize_answer("The Cat's toy."), "cat's toy");
        assert_eq!(normalize_answer("It's 1,000 feet"), "it's 1000 feet");
    }

    #[test]
    fn contractions_table_is_complete() {
        assert_eq!(CONTRACTIONS.len(), 120);
        assert_eq!(CONTRACTIONS[0], ("aint", "ain't"));
        assert_eq!(CONTRACTIONS[119], ("youve", "you've"));
        let mut keys: Vec<&str> = CONTRACTIONS.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 120);
    }

    #[test]
    fn leave_one_out_with_0_to_5_matches_of_10() {
        let expected = [0.0, 0.3, 0.6, 0.9, 1.0, 1.0];
        for (k, want) in expected.into_iter().enumerate() {
            let gts = answers(&[("yes", k), ("no", 10 - k)]);
            assert_eq!(all_variants("yes", &gts), [want; 3], "{k} matches");
        }
    }

    #[test]
    fn fewer_than_ten_answers() {
        assert_eq!(
            vqa_accuracy("yes", &answers(&[("yes", 3)])),
            0.6666666666666666
        );
        assert_eq!(vqa_accuracy("yes", &answers(&[("yes", 1)])), 0.0);
        let gts = answers(&[("yes", 2), ("no", 3)]);
        assert_eq!(vqa_accuracy("yes", &gts), 0.5333333333333333);
        assert_eq!(vqa_accuracy("yes", &[]), 0.0);
    }

    #[test]
    fn identical_answers_branch() {
        // Unanimous answers: the current rule normalises nothing.
        assert_eq!(
            all_variants("Yes.", &answers(&[("yes", 10)])),
            [0.0, 1.0, 1.0]
        );
        assert_eq!(
            all_variants("the cat", &answers(&[("the cat", 10)])),
            [1.0, 0.0, 1.0]
        );
        // But it does flatten tabs and newlines, which the older rule never does for answers.
        assert_eq!(
            all_variants("yes", &answers(&[("\tyes", 10)])),
            [1.0, 0.0, 1.0]
        );
    }

    #[test]
    fn differing_answers_branch() {
        let gts = answers(&[("the cat", 3), ("dog", 7)]);
        assert_eq!(all_variants("the cat", &gts), [0.9, 0.0, 0.9]);
        assert_eq!(
            all_variants("Two", &answers(&[("2", 9), ("two", 1)])),
            [1.0; 3]
        );
        let gts = answers(&[("yes\t", 2), ("yes", 2), ("no", 6)]);
        assert_eq!(all_variants(" yes\n", &gts), [1.0, 0.6, 1.0]);
        assert_eq!(
            all_variants("yes", &answers(&[("\tyes", 9), ("no", 1)])),
            [1.0, 0.0, 1.0]
        );
    }

    #[test]
    fn default_is_the_current_official_rule() {
        assert_eq!(VqaNormalization::default(), WhenAnswersDiffer);
        let gts = answers(&[("the cat", 3), ("dog", 7)]);
        assert_eq!(vqa_accuracy("the cat", &gts), 0.9);
        let json = serde_json::to_string(&PredictionAlways).unwrap();
        assert_eq!(json, "\"prediction_always\"");
    }
}
