//! The generator is deterministic (same seed -> byte-identical files) and its output loads.

use cnext_core::TaskId;
use cnext_datasets::{generate, load_task, DataProfile, GenConfig, TestItem, TrainItem};
use sha2::{Digest, Sha256};
use std::path::Path;

fn tree_hash(root: &Path) -> String {
    let mut files = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(f.strip_prefix(root).unwrap().to_string_lossy().as_bytes());
        h.update(std::fs::read(&f).unwrap());
    }
    format!("{:x}", h.finalize())
}

#[test]
fn same_seed_gives_byte_identical_files_and_another_seed_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = GenConfig::new(DataProfile::Smoke, 11);
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    generate(&a, &cfg, false).unwrap();
    generate(&b, &cfg, false).unwrap();
    generate(&c, &GenConfig::new(DataProfile::Smoke, 12), false).unwrap();
    assert_eq!(tree_hash(&a), tree_hash(&b));
    assert_ne!(tree_hash(&a), tree_hash(&c));
}

#[test]
fn existing_output_is_kept_unless_forced_and_no_partial_folder_remains() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d");
    let cfg = GenConfig::new(DataProfile::Smoke, 0);
    generate(&out, &cfg, false).unwrap();
    let err = generate(&out, &cfg, false).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    generate(&out, &cfg, true).unwrap();
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["d".to_string()]);
}

#[test]
fn generated_tasks_load_with_the_official_loaders() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = GenConfig::new(DataProfile::Smoke, 3);
    let m = generate(tmp.path().join("x").as_path(), &cfg, false).unwrap();
    for task in TaskId::ALL {
        let d = load_task(&tmp.path().join("x"), task).unwrap();
        assert_eq!(d.train.len(), cfg.train, "{task}");
        assert_eq!(d.test.len(), cfg.test, "{task}");
        assert_eq!(m.tasks[&task].train, cfg.train);
        let t = &d.train[0].item;
        let ok = match task {
            TaskId::Flickr30k => {
                matches!(t, TrainItem::TextToImage { prompt, .. } if prompt.starts_with("Please generate the image: a "))
            }
            TaskId::Hqedit => matches!(t, TrainItem::Edit { .. }),
            _ => matches!(t, TrainItem::Conversation { turns, .. } if turns.len() == 1),
        };
        assert!(ok, "{task}: {t:?}");
        if task == TaskId::Refcoco {
            let TestItem::Grounding { bbox, size, .. } = &d.test[0].item else {
                panic!("refcoco test is not grounding")
            };
            assert_eq!(*size, [24, 24]);
            assert!(bbox[0] < bbox[2] && bbox[1] < bbox[3]);
        }
        if let TrainItem::Conversation { image, .. } = t {
            let img = cnext_datasets::load_image(image).unwrap();
            assert!(img.width() == 24 || img.width() == 48);
        }
    }
}
