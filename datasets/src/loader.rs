//! Loaders for the official train JSONL and test JSON of the six tasks. The same code reads
//! real downloads and generated data. Every error names the file and, where there is one, the
//! 1-based line. Image paths are resolved under the task folder only.

use crate::formats::{
    array_element_offsets, line_of, CaptionRecord, ConversationRecord, EditRecord, EditTestRecord,
    GroundingRecord, QuestionId, QuestionRecord,
};
use crate::spec::{TaskSpec, TestLayout, TrainLayout, T2I_PREFIX};
use cnext_core::TaskId;
use image::RgbImage;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: malformed JSON: {msg}")]
    Json {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{path}:{line}: {msg}")]
    Invalid {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{path}:{line}: image path `{image}` escapes the data root {root}")]
    UnsafePath {
        path: PathBuf,
        line: usize,
        image: String,
        root: PathBuf,
    },
    #[error("{path}:{line}: image `{image}` not found at {resolved}")]
    MissingImage {
        path: PathBuf,
        line: usize,
        image: String,
        resolved: PathBuf,
    },
    #[error("{path}: cannot decode image: {msg}")]
    CorruptImage { path: PathBuf, msg: String },
    #[error("{path}: no samples")]
    Empty { path: PathBuf },
    #[error("{path}: image is {width}x{height} pixels, over the limit of {limit} (refused before decoding)")]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        limit: u64,
    },
}

impl DataError {
    /// The file the error is about (the data file, or the image for image errors).
    pub fn file(&self) -> &Path {
        match self {
            DataError::Io { path, .. }
            | DataError::Json { path, .. }
            | DataError::Invalid { path, .. }
            | DataError::UnsafePath { path, .. }
            | DataError::MissingImage { path, .. }
            | DataError::CorruptImage { path, .. }
            | DataError::Empty { path }
            | DataError::TooLarge { path, .. } => path,
        }
    }
}

/// The most pixels an image may have before it is decoded (a 12k x 12k PNG of a few KB would
/// otherwise ask for 432 MB). Real Continual-NExT images are at most a few megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// One (prompt, answer) turn; the prompt already carries the task's instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub prompt: String,
    pub answer: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TrainItem {
    /// Image + text in, text out.
    Conversation { image: PathBuf, turns: Vec<Turn> },
    /// Text in, image out.
    TextToImage { prompt: String, target: PathBuf },
    /// Image + text in, image out.
    Edit {
        source: PathBuf,
        target: PathBuf,
        instruction: String,
    },
}

impl TrainItem {
    /// The image files the item reads (inputs and targets).
    pub fn images(&self) -> Vec<&Path> {
        match self {
            TrainItem::Conversation { image, .. } => vec![image],
            TrainItem::TextToImage { target, .. } => vec![target],
            TrainItem::Edit { source, target, .. } => vec![source, target],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSample {
    /// 1-based line in the train file, for error messages.
    pub line: usize,
    pub item: TrainItem,
}

impl TestItem {
    /// The image files the item reads (inputs and references).
    pub fn images(&self) -> Vec<&Path> {
        match self {
            TestItem::Question { image, .. } | TestItem::Grounding { image, .. } => vec![image],
            TestItem::TextToImage { .. } => vec![],
            TestItem::Edit { source, target, .. } => vec![source, target],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TestItem {
    Question {
        image: PathBuf,
        text: String,
        answer: String,
        answers: Option<Vec<String>>,
    },
    Grounding {
        image: PathBuf,
        text: String,
        answer: String,
        size: [u32; 2],
        bbox: [f64; 4],
    },
    TextToImage {
        prompt: String,
        caption: String,
    },
    Edit {
        source: PathBuf,
        target: PathBuf,
        instruction: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TestSample {
    pub question_id: QuestionId,
    pub line: usize,
    pub item: TestItem,
}

/// A task's data, loaded and validated.
#[derive(Debug, Clone)]
pub struct TaskData {
    pub task: TaskId,
    pub dir: PathBuf,
    pub train: Vec<TrainSample>,
    pub test: Vec<TestSample>,
}

/// Resolves `rel` under `root`: relative, no `..`, existing, and (after symlinks) still inside.
pub fn resolve_image(
    root: &Path,
    rel: &str,
    file: &Path,
    line: usize,
) -> Result<PathBuf, DataError> {
    let unsafe_path = || DataError::UnsafePath {
        path: file.to_path_buf(),
        line,
        image: rel.to_string(),
        root: root.to_path_buf(),
    };
    let full = safe_join(root, rel, file, line)?;
    if !full.is_file() {
        return Err(DataError::MissingImage {
            path: file.to_path_buf(),
            line,
            image: rel.to_string(),
            resolved: full,
        });
    }
    let (Ok(canon_root), Ok(canon)) = (root.canonicalize(), full.canonicalize()) else {
        return Err(unsafe_path());
    };
    if !canon.starts_with(&canon_root) {
        return Err(unsafe_path());
    }
    Ok(full)
}

/// Joins `rel` to `root` if it is relative and has no `..` (a lexical check only).
pub fn safe_join(root: &Path, rel: &str, file: &Path, line: usize) -> Result<PathBuf, DataError> {
    let p = Path::new(rel);
    let ok = !rel.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !ok {
        return Err(DataError::UnsafePath {
            path: file.to_path_buf(),
            line,
            image: rel.to_string(),
            root: root.to_path_buf(),
        });
    }
    Ok(root.join(p))
}

/// Decodes an image to RGB with an error naming the file, refusing one over
/// [`DEFAULT_MAX_PIXELS`].
pub fn load_image(path: &Path) -> Result<RgbImage, DataError> {
    load_image_limited(path, DEFAULT_MAX_PIXELS)
}

/// [`load_image`] with a pixel limit: the header is read first and an image with more than
/// `max_pixels` pixels is refused without decoding it.
pub fn load_image_limited(path: &Path, max_pixels: u64) -> Result<RgbImage, DataError> {
    let bytes = fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |e: image::ImageError| DataError::CorruptImage {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .map_err(|e| corrupt(image::ImageError::IoError(e)))
    };
    let (width, height) = reader()?.into_dimensions().map_err(corrupt)?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            limit: max_pixels,
        });
    }
    reader()?.decode().map(|i| i.to_rgb8()).map_err(corrupt)
}

fn read(path: &Path) -> Result<String, DataError> {
    let bytes = fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_text(bytes).map_err(|(line, msg)| invalid(path, line, msg))
}

/// A text file's contents: UTF-8, a leading byte-order mark dropped (Windows tools write one).
/// Invalid UTF-8 is `(line, message)`, the line of the first bad byte.
pub fn decode_text(mut bytes: Vec<u8>) -> Result<String, (usize, String)> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes.drain(..3);
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = 1 + bytes[..at].iter().filter(|b| **b == b'\n').count();
        let col = at
            - bytes[..at]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1);
        (
            line,
            format!("invalid UTF-8 at byte {} of the line", col + 1),
        )
    })
}

fn invalid(path: &Path, line: usize, msg: impl Into<String>) -> DataError {
    DataError::Invalid {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

fn non_empty(s: &str, what: &str, path: &Path, line: usize) -> Result<(), DataError> {
    if s.trim().is_empty() {
        return Err(invalid(path, line, format!("`{what}` is empty")));
    }
    Ok(())
}

/// Loads `<dir>/train.jsonl` of `task`.
pub fn load_train(dir: &Path, task: TaskId) -> Result<Vec<TrainSample>, DataError> {
    let path = dir.join("train.jsonl");
    parse_train(&read(&path)?, &path, task)
}

/// Parses the text of train file `path` (images relative to its folder, which must exist).
pub fn parse_train(text: &str, path: &Path, task: TaskId) -> Result<Vec<TrainSample>, DataError> {
    let (out, mut errors) = parse_train_all(text, path, task);
    if !errors.is_empty() {
        return Err(errors.swap_remove(0));
    }
    Ok(out)
}

/// [`parse_train`] that goes on past bad lines: every good sample and every problem (in line
/// order), for `cnext data check`.
pub fn parse_train_all(
    text: &str,
    path: &Path,
    task: TaskId,
) -> (Vec<TrainSample>, Vec<DataError>) {
    let dir = path.parent().unwrap_or(Path::new("."));
    let layout = TaskSpec::of(task).train_layout;
    let (mut out, mut errors) = (vec![], vec![]);
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        match train_item(layout, raw, dir, path, line) {
            Ok(item) => out.push(TrainSample { line, item }),
            Err(e) => errors.push(e),
        }
    }
    if out.is_empty() && errors.is_empty() {
        errors.push(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    (out, errors)
}

/// Parses one non-blank line `raw` (1-based `line`) of train file `path` of `task`, images
/// resolved under the file's folder: the record a streaming reader re-reads on demand.
pub fn parse_train_line(
    raw: &str,
    path: &Path,
    line: usize,
    task: TaskId,
) -> Result<TrainItem, DataError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    train_item(TaskSpec::of(task).train_layout, raw, dir, path, line)
}

fn train_item(
    layout: TrainLayout,
    raw: &str,
    dir: &Path,
    path: &Path,
    line: usize,
) -> Result<TrainItem, DataError> {
    let json_err = |e: serde_json::Error| DataError::Json {
        path: path.to_path_buf(),
        line,
        msg: e.to_string(),
    };
    Ok(match layout {
        TrainLayout::Edit => {
            let r: EditRecord = serde_json::from_str(raw).map_err(json_err)?;
            non_empty(&r.instruction, "instruction", path, line)?;
            TrainItem::Edit {
                source: resolve_image(dir, &r.source_image, path, line)?,
                target: resolve_image(dir, &r.target_image, path, line)?,
                instruction: r.instruction,
            }
        }
        TrainLayout::Conversation | TrainLayout::TextToImage => {
            let r: ConversationRecord = serde_json::from_str(raw).map_err(json_err)?;
            let Some(image) = r.image.as_deref() else {
                return Err(invalid(path, line, "missing `image`"));
            };
            let image = resolve_image(dir, image, path, line)?;
            conversation_item(layout, image, r.data, path, line)?
        }
    })
}

fn conversation_item(
    layout: TrainLayout,
    image: PathBuf,
    data: Vec<String>,
    path: &Path,
    line: usize,
) -> Result<TrainItem, DataError> {
    if data.is_empty() || !data.len().is_multiple_of(2) {
        return Err(invalid(
            path,
            line,
            format!(
                "`data` must alternate question and answer; it has {} entries",
                data.len()
            ),
        ));
    }
    for (k, d) in data.iter().enumerate() {
        non_empty(d, &format!("data[{k}]"), path, line)?;
    }
    if layout == TrainLayout::TextToImage {
        if data.len() != 2 {
            return Err(invalid(
                path,
                line,
                "text-to-image `data` must be [prompt, caption]",
            ));
        }
        return Ok(TrainItem::TextToImage {
            prompt: format!("{T2I_PREFIX}{}", data[1]),
            target: image,
        });
    }
    let turns = data
        .chunks(2)
        .map(|c| Turn {
            prompt: c[0].clone(),
            answer: c[1].clone(),
        })
        .collect();
    Ok(TrainItem::Conversation { image, turns })
}

/// Parses the normalised box string `"[x1,y1,x2,y2]"` of a grounding record.
fn check_corners(b: [f64; 4]) -> Result<[f64; 4], String> {
    if !b.iter().all(|x| (0.0..=1.0).contains(x)) {
        return Err(format!("{b:?} is not inside [0, 1]"));
    }
    if !(b[0] < b[2] && b[1] < b[3]) {
        return Err(format!("{b:?} does not have x1 < x2 and y1 < y2"));
    }
    Ok(b)
}

/// Whether loading a test file checks that its images exist (scoring text predictions needs
/// no image, so `cnext score` can read annotations without the image folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageCheck {
    Resolve,
    PathsOnly,
}

/// Loads `<dir>/test.json` of `task`, resolving its images.
pub fn load_test(dir: &Path, task: TaskId) -> Result<Vec<TestSample>, DataError> {
    load_test_file(&dir.join("test.json"), task, ImageCheck::Resolve)
}

/// Loads a test JSON file of `task`; image paths are relative to the file's folder.
pub fn load_test_file(
    file: &Path,
    task: TaskId,
    check: ImageCheck,
) -> Result<Vec<TestSample>, DataError> {
    parse_test(&read(file)?, file, task, check)
}

/// Parses the text of test file `file` (image paths relative to its folder).
pub fn parse_test(
    text: &str,
    file: &Path,
    task: TaskId,
    check: ImageCheck,
) -> Result<Vec<TestSample>, DataError> {
    let (out, mut errors) = parse_test_all(text, file, task, check);
    if !errors.is_empty() {
        return Err(errors.swap_remove(0));
    }
    Ok(out)
}

/// [`parse_test`] that goes on past bad records (a file that is not a JSON array is one
/// problem): every good sample and every problem, in line order.
pub fn parse_test_all(
    text: &str,
    file: &Path,
    task: TaskId,
    check: ImageCheck,
) -> (Vec<TestSample>, Vec<DataError>) {
    let path = file.to_path_buf();
    let dir = &file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let values: Vec<serde_json::Value> = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let e = DataError::Json {
                path,
                line: e.line(),
                msg: e.to_string(),
            };
            return (vec![], vec![e]);
        }
    };
    let offsets = array_element_offsets(text);
    let layout = TaskSpec::of(task).test_layout;
    let mut seen: BTreeMap<QuestionId, usize> = BTreeMap::new();
    let (mut out, mut errors) = (Vec::with_capacity(values.len()), vec![]);
    for (k, v) in values.into_iter().enumerate() {
        let line = offsets.get(k).map_or(1, |&o| line_of(text, o));
        let s = match test_item(layout, v, dir, check, &path, line) {
            Ok(s) => s,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if let Some(first) = seen.insert(s.question_id.clone(), line) {
            errors.push(invalid(
                &path,
                line,
                format!(
                    "duplicate question_id {} (first on line {first})",
                    s.question_id
                ),
            ));
            continue;
        }
        out.push(s);
    }
    if out.is_empty() && errors.is_empty() {
        errors.push(DataError::Empty { path });
    }
    (out, errors)
}

fn parse<T: DeserializeOwned>(
    v: serde_json::Value,
    path: &Path,
    line: usize,
) -> Result<T, DataError> {
    serde_json::from_value(v).map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        line,
        msg: e.to_string(),
    })
}

fn test_item(
    layout: TestLayout,
    v: serde_json::Value,
    dir: &Path,
    check: ImageCheck,
    path: &Path,
    line: usize,
) -> Result<TestSample, DataError> {
    let resolve_image = |rel: &str, path: &Path, line: usize| match check {
        ImageCheck::Resolve => resolve_image(dir, rel, path, line),
        ImageCheck::PathsOnly => safe_join(dir, rel, path, line),
    };
    let (question_id, item) = match layout {
        TestLayout::Question => {
            let r: QuestionRecord = parse(v, path, line)?;
            non_empty(&r.text, "text", path, line)?;
            non_empty(&r.answer, "answer", path, line)?;
            if r.answers.as_ref().is_some_and(|a| a.is_empty()) {
                return Err(invalid(path, line, "`answers` is an empty list"));
            }
            let image = resolve_image(&r.image, path, line)?;
            let item = TestItem::Question {
                image,
                text: r.text,
                answer: r.answer,
                answers: r.answers,
            };
            (r.question_id, item)
        }
        TestLayout::Grounding => {
            let r: GroundingRecord = parse(v, path, line)?;
            non_empty(&r.text, "text", path, line)?;
            let bbox = r
                .answer_bbox
                .values()
                .and_then(check_corners)
                .map_err(|e| {
                    invalid(
                        path,
                        line,
                        format!("`answer_bbox` must be normalised corners [x1,y1,x2,y2]: {e}"),
                    )
                })?;
            if r.size.contains(&0) {
                return Err(invalid(path, line, "`size` must be positive [w, h]"));
            }
            let pixel = r.origin_answer_bbox.values().map_err(|e| {
                invalid(
                    path,
                    line,
                    format!("`origin_answer_bbox` [x, y, w, h]: {e}"),
                )
            })?;
            if pixel.iter().any(|x| *x < 0.0) {
                return Err(invalid(
                    path,
                    line,
                    format!("`origin_answer_bbox` {pixel:?} must be [x, y, w, h] >= 0"),
                ));
            }
            let image = resolve_image(&r.image, path, line)?;
            let item = TestItem::Grounding {
                image,
                text: r.text,
                answer: r.answer_bbox.answer_text(),
                size: r.size,
                bbox,
            };
            (r.question_id, item)
        }
        TestLayout::Caption => {
            let r: CaptionRecord = parse(v, path, line)?;
            non_empty(&r.text, "text", path, line)?;
            let item = TestItem::TextToImage {
                prompt: format!("{T2I_PREFIX}{}", r.text),
                caption: r.text,
            };
            (r.question_id, item)
        }
        TestLayout::Edit => {
            let r: EditTestRecord = parse(v, path, line)?;
            non_empty(&r.instruction, "instruction", path, line)?;
            let item = TestItem::Edit {
                source: resolve_image(&r.source_image, path, line)?,
                target: resolve_image(&r.target_image, path, line)?,
                instruction: r.instruction,
            };
            (r.question_id, item)
        }
    };
    Ok(TestSample {
        question_id,
        line,
        item,
    })
}

/// Loads both splits of `task` from `<root>/<task>/`.
pub fn load_task(root: &Path, task: TaskId) -> Result<TaskData, DataError> {
    let dir = root.join(task.as_str());
    Ok(TaskData {
        task,
        train: load_train(&dir, task)?,
        test: load_test(&dir, task)?,
        dir,
    })
}
