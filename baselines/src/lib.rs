//! Continual-learning methods, one file per method (Mammoth-style): each file exports one
//! [`MethodEntry`] and is listed once in [`ALL`]. The harness owns the loop, the optimizer and
//! the stage cache; a method only supplies hooks (`cnext_harness::method`).

use cnext_harness::method::MethodEntry;

pub mod cia;
pub mod ewc;
pub mod lae;
pub mod lora;
pub mod mage;
pub mod mage_dema;
pub mod moe_ew;
pub mod moe_ew_ga;
pub mod moelora;
pub mod pgp;
pub mod reglora;
pub mod upper_bound;
pub mod zero_shot;

#[cfg(test)]
mod testing;

/// Every registered method, in listing order.
pub const ALL: &[MethodEntry] = &[
    zero_shot::ENTRY,
    lora::ENTRY,
    upper_bound::ENTRY,
    ewc::ENTRY,
    cia::ENTRY,
    lae::ENTRY,
    pgp::ENTRY,
    reglora::ENTRY,
    moelora::ENTRY,
    moe_ew::ENTRY,
    moe_ew_ga::ENTRY,
    mage::ENTRY,
    mage_dema::ENTRY,
];

/// The entry of a method id.
pub fn find(id: &str) -> Option<&'static MethodEntry> {
    ALL.iter().find(|e| e.id == id)
}

/// The registered ids, for error messages and `--help`.
pub fn ids() -> Vec<&'static str> {
    ALL.iter().map(|e| e.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn ids_are_unique_lowercase_match_their_method_and_every_file_is_listed() {
        let ids: BTreeSet<&str> = ALL.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), ALL.len(), "duplicate ids");
        for e in ALL {
            assert!(
                e.id.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                e.id
            );
            assert_eq!((e.new)().id(), e.id);
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let files: BTreeSet<String> = std::fs::read_dir(&src)
            .unwrap()
            .map(|f| f.unwrap().file_name().to_string_lossy().to_string())
            .filter_map(|f| f.strip_suffix(".rs").map(str::to_string))
            .filter(|f| f != "lib" && f != "testing")
            .collect();
        let listed: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
        assert_eq!(files, listed, "each method file must be listed in ALL");
        assert!(find("lora").is_some() && find("nope").is_none());
    }

    #[test]
    fn configure_round_trips_every_default_config() {
        // The same config through `configure` must give the same method (and so the same
        // stage keys) as `new`.
        for e in ALL {
            let default = (e.new)();
            let configured = (e.configure)(default.config().unwrap()).unwrap()();
            assert_eq!(configured.id(), e.id);
            assert_eq!(
                configured.config().unwrap(),
                default.config().unwrap(),
                "{}",
                e.id
            );
        }
    }

    #[test]
    fn overrides_follow_dotted_paths_and_name_what_is_wrong() {
        use std::collections::BTreeMap;
        let set = |pairs: &[(&str, serde_json::Value)]| -> BTreeMap<String, serde_json::Value> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        let mage = find("mage").unwrap();
        let f = mage
            .with_overrides(&set(&[(
                "averaging.pema.alpha_policy",
                serde_json::json!("faithful"),
            )]))
            .unwrap();
        let cfg = f().config().unwrap();
        assert_eq!(cfg["averaging"]["pema"]["alpha_policy"], "faithful");
        assert_eq!(cfg["experts"], 4, "other fields keep their defaults");
        let wanted = set(&[
            ("averaging.pema.alpha_policy", serde_json::json!("faithful")),
            ("averaging.pema.lambda", serde_json::json!(0.001)),
        ]);
        let two = mage.with_overrides(&wanted).unwrap()().config().unwrap();
        assert_eq!(
            mage.overrides_of(&two).unwrap(),
            wanted,
            "overrides_of inverts"
        );
        assert!(mage
            .overrides_of(&mage.factory()().config().unwrap())
            .unwrap()
            .is_empty());
        let e = mage
            .with_overrides(&set(&[("expert", serde_json::json!(2))]))
            .err()
            .unwrap();
        assert!(
            e.contains("unknown config key `expert`") && e.contains("experts"),
            "{e}"
        );
        let e = mage
            .with_overrides(&set(&[("experts", serde_json::json!("four"))]))
            .err()
            .unwrap();
        assert!(e.starts_with("mage: invalid type"), "{e}");
        let e = find("lora")
            .unwrap()
            .with_overrides(&set(&[("rank", serde_json::json!(4))]))
            .err()
            .unwrap();
        assert!(
            e.contains("unknown config key `rank`") && e.contains("none"),
            "{e}"
        );
        let ewc = find("ewc").unwrap();
        let f = ewc
            .with_overrides(&set(&[("lambda", serde_json::json!(500.0))]))
            .unwrap();
        assert_eq!(f().config().unwrap()["lambda"], 500.0);
    }
}
