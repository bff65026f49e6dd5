//! Task data at real scale. A train file is indexed once (byte offset, line and batch shape of
//! each example, 32 bytes) and its examples are re-read and decoded on demand, through one
//! bounded cache of decoded images that every task of a chain shares: memory stays flat as a
//! task grows, where holding VQAv2's decoded images would take tens of GB.

use cnext_backbones::{BatchShape, Example, Prompt, Target};
use cnext_core::TaskId;
use cnext_datasets::loader::{load_image, parse_train_line, DataError, TrainItem};
use image::RgbImage;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The decoded-image cache's default bound (`CNEXT_IMAGE_CACHE_MB` overrides it).
pub const DEFAULT_IMAGE_CACHE_BYTES: usize = 256 << 20;

/// A set of training examples, read one at a time.
pub trait Examples {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// What groups example `i` into batches, known without decoding it.
    fn shape(&self, i: usize) -> BatchShape;
    /// Example `i`, decoded.
    fn get(&self, i: usize) -> Result<Example, DataError>;
}

impl Examples for [Example] {
    fn len(&self) -> usize {
        <[Example]>::len(self)
    }
    fn shape(&self, i: usize) -> BatchShape {
        BatchShape::of(&self[i])
    }
    fn get(&self, i: usize) -> Result<Example, DataError> {
        Ok(self[i].clone())
    }
}

impl Examples for Vec<Example> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn shape(&self, i: usize) -> BatchShape {
        self.as_slice().shape(i)
    }
    fn get(&self, i: usize) -> Result<Example, DataError> {
        Examples::get(self.as_slice(), i)
    }
}

/// Several sets one after the other (the joint upper bound trains on every task at once).
pub struct Union<'a>(pub Vec<&'a dyn Examples>);

impl Union<'_> {
    fn locate(&self, mut i: usize) -> (&dyn Examples, usize) {
        for s in &self.0 {
            if i < s.len() {
                return (*s, i);
            }
            i -= s.len();
        }
        panic!("example index out of range")
    }
}

impl Examples for Union<'_> {
    fn len(&self) -> usize {
        self.0.iter().map(|s| s.len()).sum()
    }
    fn shape(&self, i: usize) -> BatchShape {
        let (s, j) = self.locate(i);
        s.shape(j)
    }
    fn get(&self, i: usize) -> Result<Example, DataError> {
        let (s, j) = self.locate(i);
        s.get(j)
    }
}

/// Hits, misses and size of an [`ImageCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub bytes: usize,
}

#[derive(Default)]
struct Lru {
    map: BTreeMap<PathBuf, (Arc<RgbImage>, u64)>,
    by_use: BTreeMap<u64, PathBuf>,
    tick: u64,
    stats: CacheStats,
}

/// Decoded images by path, least recently used evicted past `max_bytes`.
pub struct ImageCache {
    max_bytes: usize,
    lru: Mutex<Lru>,
}

impl ImageCache {
    pub fn new(max_bytes: usize) -> Self {
        ImageCache {
            max_bytes,
            lru: Mutex::default(),
        }
    }

    /// The default bound, or `CNEXT_IMAGE_CACHE_MB` megabytes.
    pub fn from_env() -> Self {
        let mb = std::env::var("CNEXT_IMAGE_CACHE_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        Self::new(mb.map_or(DEFAULT_IMAGE_CACHE_BYTES, |m| m << 20))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic elsewhere cannot leave the map inconsistent: every update is one insert.
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The image at `path`, decoded once while it stays in the cache.
    pub fn get(&self, path: &Path) -> Result<Arc<RgbImage>, DataError> {
        {
            let mut l = self.lock();
            l.tick += 1;
            let tick = l.tick;
            if let Some((img, used)) = l.map.get_mut(path) {
                let (img, old) = (img.clone(), std::mem::replace(used, tick));
                l.by_use.remove(&old);
                l.by_use.insert(tick, path.to_path_buf());
                l.stats.hits += 1;
                return Ok(img);
            }
        }
        // Decoded outside the lock, so threads decode in parallel.
        let img = Arc::new(load_image(path)?);
        let size = img.as_raw().len();
        let mut l = self.lock();
        l.stats.misses += 1;
        if size > self.max_bytes || l.map.contains_key(path) {
            return Ok(img);
        }
        while l.stats.bytes + size > self.max_bytes {
            let Some((_, oldest)) = l.by_use.pop_first() else {
                break;
            };
            if let Some((gone, _)) = l.map.remove(&oldest) {
                l.stats.bytes -= gone.as_raw().len();
            }
        }
        l.tick += 1;
        let tick = l.tick;
        l.map.insert(path.to_path_buf(), (img.clone(), tick));
        l.by_use.insert(tick, path.to_path_buf());
        l.stats.bytes += size;
        l.stats.entries = l.map.len();
        Ok(img)
    }

    pub fn stats(&self) -> CacheStats {
        let l = self.lock();
        CacheStats {
            entries: l.map.len(),
            ..l.stats
        }
    }
}

/// Where one example's record is in the train file.
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    len: u32,
    line: u32,
    /// The turn of a conversation record.
    turn: u16,
    shape: BatchShape,
}

/// A task's training examples, indexed and read from `train.jsonl` on demand.
pub struct TrainSet {
    task: TaskId,
    path: PathBuf,
    file: Mutex<BufReader<File>>,
    index: Vec<Entry>,
    images: Arc<ImageCache>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn line_text<'b>(bytes: &'b [u8], path: &Path, line: usize) -> Result<&'b str, DataError> {
    let bytes = if line == 1 {
        bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
    } else {
        bytes
    };
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::Invalid {
        path: path.to_path_buf(),
        line,
        msg: format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1),
    })?;
    Ok(text.trim_end_matches(['\n', '\r']))
}

/// The dimensions in an image's header (nothing decoded).
fn dims(path: &Path) -> Result<(u32, u32), DataError> {
    let corrupt = |msg: String| DataError::CorruptImage {
        path: path.to_path_buf(),
        msg,
    };
    image::ImageReader::open(path)
        .map_err(io_err(path))?
        .with_guessed_format()
        .map_err(io_err(path))?
        .into_dimensions()
        .map_err(|e| corrupt(e.to_string()))
}

impl TrainSet {
    /// Indexes `<dir>/train.jsonl` of `task`: every line parsed and validated, every image's
    /// header read, nothing kept but the index. The first problem is the error.
    pub fn open(dir: &Path, task: TaskId, images: Arc<ImageCache>) -> Result<Self, DataError> {
        let path = dir.join("train.jsonl");
        let file = File::open(&path).map_err(io_err(&path))?;
        let mut reader = BufReader::new(file);
        let (mut index, mut buf, mut offset, mut line) = (vec![], vec![], 0u64, 0usize);
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).map_err(io_err(&path))?;
            if n == 0 {
                break;
            }
            line += 1;
            let at = offset;
            offset += n as u64;
            let raw = line_text(&buf, &path, line)?;
            if raw.trim().is_empty() {
                continue;
            }
            let item = parse_train_line(raw, &path, line, task)?;
            let entry = |turn: u16, shape: BatchShape| Entry {
                offset: at,
                len: n as u32,
                line: line as u32,
                turn,
                shape,
            };
            match &item {
                TrainItem::Conversation { image, turns } => {
                    let shape = BatchShape::text(Some(dims(image)?));
                    index.extend((0..turns.len()).map(|t| entry(t as u16, shape)));
                }
                TrainItem::TextToImage { target, .. } => {
                    dims(target)?;
                    index.push(entry(0, BatchShape::image(None)));
                }
                TrainItem::Edit { source, target, .. } => {
                    dims(target)?;
                    index.push(entry(0, BatchShape::image(Some(dims(source)?))));
                }
            }
        }
        if index.is_empty() {
            return Err(DataError::Empty { path });
        }
        let file = File::open(&path).map_err(io_err(&path))?;
        Ok(TrainSet {
            task,
            path,
            file: Mutex::new(BufReader::new(file)),
            index,
            images,
        })
    }

    pub fn task(&self) -> TaskId {
        self.task
    }

    fn image(&self, path: &Path) -> Result<RgbImage, DataError> {
        Ok(self.images.get(path)?.as_ref().clone())
    }
}

impl Examples for TrainSet {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn shape(&self, i: usize) -> BatchShape {
        self.index[i].shape
    }

    fn get(&self, i: usize) -> Result<Example, DataError> {
        let e = self.index[i];
        let mut bytes = vec![0u8; e.len as usize];
        {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            f.seek(SeekFrom::Start(e.offset))
                .and_then(|_| f.read_exact(&mut bytes))
                .map_err(io_err(&self.path))?;
        }
        let line = e.line as usize;
        let raw = line_text(&bytes, &self.path, line)?;
        // The file changed under us if the record no longer parses as it did when indexed.
        let item = parse_train_line(raw, &self.path, line, self.task)?;
        Ok(match item {
            TrainItem::Conversation { image, turns } => {
                let t = turns
                    .get(e.turn as usize)
                    .ok_or_else(|| DataError::Invalid {
                        path: self.path.clone(),
                        line,
                        msg: "the record changed since it was indexed".into(),
                    })?;
                Example {
                    prompt: Prompt {
                        image: Some(self.image(&image)?),
                        text: t.prompt.clone(),
                    },
                    target: Target::Text(t.answer.clone()),
                }
            }
            TrainItem::TextToImage { prompt, target } => Example {
                prompt: Prompt {
                    image: None,
                    text: prompt,
                },
                target: Target::Image(self.image(&target)?),
            },
            TrainItem::Edit {
                source,
                target,
                instruction,
            } => Example {
                prompt: Prompt {
                    image: Some(self.image(&source)?),
                    text: instruction,
                },
                target: Target::Image(self.image(&target)?),
            },
        })
    }
}
