//! Suite profiles: which generated data, which base and which run settings a suite chain
//! uses. `smoke` and `mini` run on the built-in nano base; `janus_smoke` runs every method on
//! the tiny random Janus fixture (`shared/fixtures/tiny_janus`, a Hugging Face
//! `JanusForConditionalGeneration` directory) with smoke data, so the real-model path goes
//! through the whole harness in every `cargo test --release`.

use cnext_bases::BaseSpec;
use cnext_datasets::DataProfile;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    Smoke,
    Mini,
    JanusSmoke,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Smoke, Profile::Mini, Profile::JanusSmoke];

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Smoke => "smoke",
            Profile::Mini => "mini",
            Profile::JanusSmoke => "janus_smoke",
        }
    }

    /// The generated data the profile trains and scores on.
    pub fn data(self) -> DataProfile {
        match self {
            Profile::Smoke | Profile::JanusSmoke => DataProfile::Smoke,
            Profile::Mini => DataProfile::Mini,
        }
    }

    /// The base of the profile (the data seed sizes and seeds a built-in base).
    pub fn base(self, seed: u64) -> Result<BaseSpec, String> {
        match self {
            Profile::Smoke | Profile::Mini => Ok(BaseSpec::builtin(self.data(), seed)),
            Profile::JanusSmoke => Ok(BaseSpec::janus(fixture("tiny_janus")?)),
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Profile::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown profile `{s}` (expected smoke, mini or janus_smoke)"))
    }
}

/// A reference fixture: `CNEXT_FIXTURES/<name>`, else `<workspace>/../shared/fixtures/<name>`.
pub fn fixture(name: &str) -> Result<PathBuf, String> {
    let root = match std::env::var_os("CNEXT_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => crate::snapshot::workspace().join("../shared/fixtures"),
    };
    let dir = root.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(format!(
            "fixture {} not found (set CNEXT_FIXTURES to the shared/fixtures folder)",
            dir.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for p in Profile::ALL {
            assert_eq!(p.as_str().parse::<Profile>(), Ok(p));
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
        }
        assert!("paper".parse::<Profile>().is_err());
    }
}
