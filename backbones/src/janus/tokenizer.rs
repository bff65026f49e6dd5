//! The tokenizer of Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual Encoding for
//! Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro: Unified
//! Multimodal Understanding and Generation with Data and Model Scaling"): a Hugging Face
//! `tokenizer.json` run by the `tokenizers` crate, with the special tokens Janus needs.
//!
//! BOS is whatever the file's post-processor prepends (encoding with special tokens adds it,
//! as transformers does); the image tokens (`<image_placeholder>`, `<begin_of_image>`,
//! `<end_of_image>`) and EOS/PAD are named by `tokenizer_config.json` and must exist in the
//! vocabulary. Ids missing there fall back to `generation_config.json`.

use super::config::GenerationConfig;
use super::{read_json, JanusError, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The special-token names of `tokenizer_config.json` (HF writes them as strings or as
/// `{"content": ...}` objects).
#[derive(Debug, Clone, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    eos_token: Option<TokenName>,
    #[serde(default)]
    pad_token: Option<TokenName>,
    #[serde(default)]
    image_token: Option<TokenName>,
    #[serde(default)]
    boi_token: Option<TokenName>,
    #[serde(default)]
    eoi_token: Option<TokenName>,
    #[serde(default)]
    chat_template: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenName {
    Plain(String),
    Added { content: String },
}

impl TokenName {
    fn text(&self) -> &str {
        match self {
            TokenName::Plain(s) => s,
            TokenName::Added { content } => content,
        }
    }
}

/// A special token: its text (for building prompt strings) and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    pub text: String,
    pub id: u32,
}

#[derive(Clone)]
pub struct JanusTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// BOS as the post-processor prepends it (None if it prepends nothing).
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub pad: u32,
    pub image: Special,
    pub boi: Special,
    pub eoi: Special,
    /// Whether `tokenizer_config.json` carries a chat template.
    pub has_chat_template: bool,
}

impl std::fmt::Debug for JanusTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JanusTokenizer")
            .field("path", &self.path)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

impl JanusTokenizer {
    /// `dir/tokenizer.json` with `dir/tokenizer_config.json` (optional) and the generation
    /// config for ids the tokenizer config does not name.
    pub fn load(dir: &Path, gen: &GenerationConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(JanusError::Io {
                path,
                src: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| JanusError::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: TokenizerConfig = if cfg_path.is_file() {
            read_json(&cfg_path)?
        } else {
            TokenizerConfig::default()
        };
        let has_chat_template = cfg.chat_template.is_some()
            || dir.join("chat_template.jinja").is_file()
            || dir.join("chat_template.json").is_file();
        let err = |msg: String| JanusError::Tokenizer {
            path: path.clone(),
            msg,
        };
        let special = |name: &Option<TokenName>, default: &str| -> Result<Special> {
            let text = name.as_ref().map_or(default, TokenName::text).to_string();
            let id = inner
                .token_to_id(&text)
                .ok_or_else(|| err(format!("special token {text:?} is not in the vocabulary")))?;
            Ok(Special { text, id })
        };
        let image = special(&cfg.image_token, "<image_placeholder>")?;
        let boi = special(&cfg.boi_token, "<begin_of_image>")?;
        let eoi = special(&cfg.eoi_token, "<end_of_image>")?;
        let id_of =
            |name: &Option<TokenName>| name.as_ref().and_then(|n| inner.token_to_id(n.text()));
        let eos = match id_of(&cfg.eos_token) {
            Some(id) => vec![id],
            None => gen
                .eos_token_id
                .as_ref()
                .map(|e| e.ids())
                .unwrap_or_default(),
        };
        if eos.is_empty() {
            return Err(err(
                "no EOS token (neither tokenizer_config.json nor generation_config.json name one)"
                    .into(),
            ));
        }
        let pad = id_of(&cfg.pad_token)
            .or(gen.pad_token_id)
            .ok_or_else(|| err("no PAD token (needed for batching and CFG)".into()))?;
        // The id the post-processor prepends to an empty input, if any.
        let empty = inner
            .encode("", true)
            .map_err(|e| err(format!("cannot encode: {e}")))?;
        let bos = empty.get_ids().first().copied();
        Ok(JanusTokenizer {
            inner,
            path,
            bos,
            eos,
            pad,
            image,
            boi,
            eoi,
            has_chat_template,
        })
    }

    /// Ids of `text`; `special` runs the post-processor (prepends BOS).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| JanusError::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| JanusError::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot decode: {e}"),
            })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// A plain `tokenizer.json` (e.g. of a `LlamaForCausalLM` directory): ids with the file's
/// post-processor, text with special tokens skipped.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .finish()
    }
}

impl TextTokenizer {
    /// `dir/tokenizer.json`; an error naming the file if it is missing or unreadable.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(JanusError::Io {
                path,
                src: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| JanusError::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(TextTokenizer { inner, path })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| JanusError::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| JanusError::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot decode: {e}"),
            })
    }
}
