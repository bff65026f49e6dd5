//! An optional LLM judge for the error types of wrong answers (`cnext_datasets::errors`): a
//! [`Judge`] that asks an OpenAI-compatible chat-completions endpoint for IUF, HAL or OTH.
//!
//! The API key is read from an environment variable only (never from the URL or the command
//! line) and appears in no name, error message or `Debug` output. Failed calls are retried with
//! exponential backoff (429, 5xx, timeouts, transport errors); the harness falls back to the
//! rules for whatever still fails.

use cnext_datasets::errors::{ErrorType, Judge, JudgeCase, JudgeError};
use cnext_datasets::spec::AnswerForm;
use cnext_datasets::TaskSpec;
use reqwest::blocking::Client;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Url;
use std::error::Error as _;
use std::fmt;
use std::time::Duration;

/// The environment variable the API key is read from unless configured otherwise.
pub const DEFAULT_API_KEY_ENV: &str = "CNEXT_JUDGE_API_KEY";

/// The system prompt: the three error types, and the one-word answer format.
pub const PROMPT: &str = "\
You classify the errors of a multimodal model on visual question answering, image \
classification, OCR question answering and visual grounding tasks. The model's answer has \
already been scored wrong against the reference answer(s); you only decide the type of error. \
You do not see the image.

Error types:
IUF (instruction unfollowing): the answer is not of the form the instruction asks for. For \
example: a sentence, an explanation or several lines where a single word or short phrase is \
asked; a bounding box where a word is asked; a word or a malformed box where a box \
[x1,y1,x2,y2] of four numbers between 0 and 1 is asked; an empty answer; the same words \
repeated over and over; \"Unanswerable\" where the instruction does not allow it; an image \
(written <image>) where text is asked; a number where a class name is asked.
HAL (hallucination): the answer has exactly the form the instruction asks for, but its content \
is wrong: a plausible but incorrect word, phrase, class name, title or box.
OTH (other): neither of the above, for example unreadable or garbled output, or the refusal \
\"Unanswerable\" where the instruction explicitly allows it.
If both IUF and HAL apply, answer IUF.

Reply with exactly one word: IUF, HAL or OTH. Write nothing else.";

/// Longest prediction sent to the judge, in characters (degenerate loops can be very long).
const MAX_PREDICTION_CHARS: usize = 2000;
/// Most references listed (VQA has ten, often repeated).
const MAX_REFERENCES: usize = 10;
/// Length of the answer excerpts in [`JudgeError::Format`].
const EXCERPT_CHARS: usize = 60;

/// Where and how to reach the judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgeConfig {
    /// Base URL (`http://127.0.0.1:8000/v1`); `/chat/completions` is appended unless the path
    /// already ends with it. Credentials in the URL are refused: use `api_key_env`.
    pub url: String,
    pub model: String,
    /// Name of the environment variable holding the API key; unset means no `Authorization`.
    pub api_key_env: String,
    /// Per attempt, connection to end of body.
    pub timeout: Duration,
    /// Extra attempts after a 429, 5xx, timeout or transport failure.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff: Duration,
}

impl JudgeConfig {
    /// Defaults: key from `CNEXT_JUDGE_API_KEY`, 30 s timeout, 2 retries, 200 ms backoff.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> JudgeConfig {
        JudgeConfig {
            url: url.into(),
            model: model.into(),
            api_key_env: DEFAULT_API_KEY_ENV.to_string(),
            timeout: Duration::from_secs(30),
            retries: 2,
            backoff: Duration::from_millis(200),
        }
    }
}

/// A judge configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JudgeConfigError {
    Url(String),
    Model,
    Timeout,
    /// The variable's value is not a valid header value (the value itself is not kept).
    ApiKey {
        env: String,
    },
    Client(String),
}

impl fmt::Display for JudgeConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JudgeConfigError::Url(m) => write!(f, "judge URL: {m}"),
            JudgeConfigError::Model => f.write_str("judge model name is empty"),
            JudgeConfigError::Timeout => f.write_str("judge timeout must be positive"),
            JudgeConfigError::ApiKey { env } => {
                write!(f, "the API key in ${env} is not a valid HTTP header value")
            }
            JudgeConfigError::Client(m) => write!(f, "judge HTTP client: {m}"),
        }
    }
}

impl std::error::Error for JudgeConfigError {}

/// An LLM judge behind an OpenAI-compatible chat-completions endpoint.
pub struct ChatJudge {
    endpoint: Url,
    model: String,
    api_key_env: String,
    api_key: Option<HeaderValue>,
    client: Client,
    retries: u32,
    backoff: Duration,
}

impl fmt::Debug for ChatJudge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatJudge")
            .field("endpoint", &self.endpoint.as_str())
            .field("model", &self.model)
            .field("api_key_env", &self.api_key_env)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl ChatJudge {
    /// Checks the configuration, reads the API key from the environment and builds the client.
    pub fn new(config: JudgeConfig) -> Result<ChatJudge, JudgeConfigError> {
        let endpoint = endpoint(&config.url)?;
        if config.model.trim().is_empty() {
            return Err(JudgeConfigError::Model);
        }
        if config.timeout.is_zero() {
            return Err(JudgeConfigError::Timeout);
        }
        let api_key = match std::env::var(&config.api_key_env) {
            Ok(key) if !key.trim().is_empty() => {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {}", key.trim())).map_err(|_| {
                        JudgeConfigError::ApiKey {
                            env: config.api_key_env.clone(),
                        }
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            _ => None,
        };
        let mut builder = Client::builder()
            .timeout(config.timeout)
            .user_agent(concat!("cnext/", env!("CARGO_PKG_VERSION")));
        // A judge served on this machine is never reached through a proxy.
        let host = endpoint.host_str().unwrap_or_default();
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback());
        if loopback {
            builder = builder.no_proxy();
        }
        let client = builder
            .build()
            .map_err(|e| JudgeConfigError::Client(error_chain(e)))?;
        Ok(ChatJudge {
            endpoint,
            model: config.model,
            api_key_env: config.api_key_env,
            api_key,
            client,
            retries: config.retries,
            backoff: config.backoff,
        })
    }

    /// The URL requests go to.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// The JSON request for one case.
    pub fn request_body(&self, case: &JudgeCase<'_>) -> serde_json::Value {
        serde_json::json!({
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": PROMPT},
                {"role": "user", "content": user_message(case)},
            ],
        })
    }

    fn attempt(&self, body: &serde_json::Value) -> Result<ErrorType, JudgeError> {
        let mut req = self.client.post(self.endpoint.clone()).json(body);
        if let Some(key) = &self.api_key {
            req = req.header(AUTHORIZATION, key.clone());
        }
        let resp = req.send().map_err(request_error)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(JudgeError::Status(status.as_u16()));
        }
        let text = resp.text().map_err(request_error)?;
        parse_response(&text)
    }
}

impl Judge for ChatJudge {
    fn name(&self) -> String {
        let host = self.endpoint.host_str().unwrap_or("?");
        match self.endpoint.port_or_known_default() {
            Some(port) => format!("{} @ {host}:{port}", self.model),
            None => format!("{} @ {host}", self.model),
        }
    }

    fn judge(&self, case: &JudgeCase<'_>) -> Result<ErrorType, JudgeError> {
        let body = self.request_body(case);
        let mut attempt = 0u32;
        loop {
            match self.attempt(&body) {
                Err(e) if attempt < self.retries && retryable(&e) => {
                    std::thread::sleep(self.backoff.saturating_mul(1 << attempt.min(10)));
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

/// Whether another attempt may succeed.
fn retryable(e: &JudgeError) -> bool {
    match e {
        JudgeError::Transport(_) | JudgeError::Timeout => true,
        JudgeError::Status(s) => *s == 429 || (500..600).contains(s),
        JudgeError::Format(_) => false,
    }
}

/// The chat-completions URL for a base URL.
fn endpoint(url: &str) -> Result<Url, JudgeConfigError> {
    let mut u = Url::parse(url.trim()).map_err(|e| JudgeConfigError::Url(e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(JudgeConfigError::Url(format!(
            "scheme `{}` is not http or https",
            u.scheme()
        )));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(JudgeConfigError::Url("no host".into()));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(JudgeConfigError::Url(
            "credentials in the URL are not accepted; put the API key in the environment".into(),
        ));
    }
    let path = u.path().trim_end_matches('/').to_string();
    if !path.ends_with("/chat/completions") {
        u.set_path(&format!("{path}/chat/completions"));
    }
    Ok(u)
}

/// The case as the judge reads it.
fn user_message(case: &JudgeCase<'_>) -> String {
    let spec = TaskSpec::of(case.task);
    let form = match spec.answer_form {
        AnswerForm::ShortPhrase => "a single word or short phrase",
        AnswerForm::ClassName => "one class name",
        AnswerForm::Box => "a bounding box [x1,y1,x2,y2] of four numbers between 0 and 1",
        AnswerForm::Image => "an image",
    };
    let unanswerable = if spec.allows_unanswerable {
        "allowed"
    } else {
        "not allowed"
    };
    let mut prediction: String = case.prediction.chars().take(MAX_PREDICTION_CHARS).collect();
    if prediction.len() < case.prediction.len() {
        prediction.push_str(" [...truncated]");
    }
    let mut refs = String::new();
    for r in case.references.iter().take(MAX_REFERENCES) {
        refs.push_str("- ");
        refs.push_str(r);
        refs.push('\n');
    }
    format!(
        "Task: {task}\nExpected answer form: {form}\n\"Unanswerable\" is {unanswerable}.\n\n\
         Instruction:\n<<<\n{instruction}\n>>>\n\nModel answer:\n<<<\n{prediction}\n>>>\n\n\
         Reference answer(s):\n{refs}\nError type (IUF, HAL or OTH):",
        task = case.task,
        instruction = case.instruction.trim(),
    )
}

/// Reads the verdict out of a chat-completions response body.
pub fn parse_response(body: &str) -> Result<ErrorType, JudgeError> {
    let v: serde_json::Value = serde_json::from_str(body)
        .map_err(|_| JudgeError::Format(format!("not JSON: {}", excerpt(body))))?;
    let content = v
        .pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        .ok_or_else(|| {
            JudgeError::Format(format!("no choices[0].message.content: {}", excerpt(body)))
        })?;
    parse_verdict(content)
}

/// One of `IUF`, `HAL`, `OTH` (any case), possibly quoted or with a trailing period.
pub fn parse_verdict(content: &str) -> Result<ErrorType, JudgeError> {
    let word = content.trim().trim_matches(|c: char| !c.is_alphanumeric());
    match word.to_ascii_uppercase().as_str() {
        "IUF" => Ok(ErrorType::Iuf),
        "HAL" => Ok(ErrorType::Hal),
        "OTH" => Ok(ErrorType::Oth),
        _ => Err(JudgeError::Format(excerpt(content))),
    }
}

fn excerpt(s: &str) -> String {
    let s = s.trim();
    let mut e: String = s.chars().take(EXCERPT_CHARS).collect();
    if e.len() < s.len() {
        e.push_str("...");
    }
    format!("{e:?}")
}

fn request_error(e: reqwest::Error) -> JudgeError {
    if e.is_timeout() {
        JudgeError::Timeout
    } else {
        JudgeError::Transport(error_chain(e))
    }
}

/// The error and its sources, without the URL.
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
