//! Shared helpers of the fixture tests: where the fixtures are, and reading reference.json.
#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;

/// `<workspace root>/../shared/fixtures`, or `CNEXT_FIXTURES`. Panics with a clear message when
/// missing: a fixture test must never pass by skipping.
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("CNEXT_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    };
    assert!(
        dir.is_dir(),
        "reference fixtures not found at {} (set CNEXT_FIXTURES to the shared/fixtures folder)",
        dir.display()
    );
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    let d = fixtures().join(name);
    assert!(d.is_dir(), "fixture {} is missing", d.display());
    d
}

pub fn reference(name: &str) -> Value {
    let p = fixture(name).join("reference.json");
    let body = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A stored tensor `{"shape", "dtype", "data"}`: (shape, data as f32; floats parsed as f64 then
/// cast, which gives back torch's float32 exactly).
pub fn tensor(v: &Value, key: &str) -> (Vec<usize>, Vec<f32>) {
    let t = &v[key];
    let shape = t["shape"]
        .as_array()
        .unwrap_or_else(|| panic!("reference {key} has no shape"))
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let data = t["data"]
        .as_array()
        .unwrap_or_else(|| panic!("reference {key} has no data"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (shape, data)
}

pub fn ids(v: &Value, key: &str) -> Vec<u32> {
    let a = if v[key].is_array() {
        &v[key]
    } else {
        &v[key]["data"]
    };
    a.as_array()
        .unwrap_or_else(|| panic!("reference {key} is not a list"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}
