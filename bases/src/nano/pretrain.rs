//! The generic pretraining mix of the nano base. It teaches the skills the six tasks need
//! (naming colours, shapes, sizes and places, counting, reading glyphs, telling sprites apart,
//! locating and describing a named object, drawing and copying pictures) under OTHER instructions and answer formats
//! than the tasks use, so that zero-shot accuracy is low and each task stage mostly teaches the
//! paper's template, format and labels, as continual instruction tuning of a real MLLM does.
//! A "repeat after me" part trains the embedding and head of every vocabulary word.

use cnext_backbones::{Example, Prompt, Target};
use cnext_core::TaskId;
use cnext_datasets::classes::{render_sample, CLASS_NAMES};
use cnext_datasets::covers::Cover;
use cnext_datasets::rng::Rng;
use cnext_datasets::scene::{Object, Scene, Size};

/// Bump whenever `example` changes what it generates: the base cache key hashes it, so a base
/// pretrained on another mix is never reused.
pub const MIX_VERSION: u32 = 3;

const NUMBER_WORDS: [&str; 5] = ["zero", "one", "two", "three", "four"];

/// "small red circle top left; large blue square bottom right"
pub fn listing(scene: &Scene) -> String {
    scene
        .objects
        .iter()
        .map(entry)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One object as the listing names it: "small red circle top left".
pub fn entry(o: &Object) -> String {
    format!(
        "{} {} {} {}",
        o.size.name(),
        o.color.name(),
        o.shape.name(),
        o.position()
    )
}

/// A key that names `o` and no other object of `s`: its noun, or its shape or colour alone
/// where that is unique ("the circle", "the red thing").
fn describe_key(s: &Scene, o: &Object, rng: &mut Rng) -> String {
    let mut keys = vec![o.noun()];
    if s.objects.iter().filter(|p| p.shape == o.shape).count() == 1 {
        keys.push(o.shape.name().to_string());
    }
    if s.objects.iter().filter(|p| p.color == o.color).count() == 1 {
        keys.push(format!("{} thing", o.color.name()));
    }
    rng.pick(&keys).clone()
}

/// "row 2 column 3", or "rows 1 to 2 columns 2 to 3" for a large object (1-based).
pub fn cell_answer(o: &Object) -> String {
    match o.size {
        Size::Small => format!("row {} column {}", o.row + 1, o.col + 1),
        Size::Large => format!(
            "rows {} to {} columns {} to {}",
            o.row + 1,
            o.row + 2,
            o.col + 1,
            o.col + 2
        ),
    }
}

/// The cover's text spelled glyph by glyph, rows separated by " / ".
pub fn spelled(c: &Cover) -> String {
    let mut rows: Vec<String> = c.title.clone();
    rows.push(c.author.clone());
    rows.push(c.year.to_string());
    rows.iter()
        .map(|r| {
            r.chars()
                .map(|ch| ch.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

fn img(image: image::RgbImage, text: &str, answer: String) -> Example {
    Example {
        prompt: Prompt {
            image: Some(image),
            text: text.to_string(),
        },
        target: Target::Text(answer),
    }
}

/// One pretraining example. `words` is the tokenizer's word list (for the repeat part).
pub fn example(rng: &mut Rng, words: &[String]) -> Example {
    // 9 generic skills, then one instruction-tuning kind per task (6 of 15: 40% of the mix).
    let kind = rng.below(9 + TaskId::ALL.len());
    if let Some(&task) = kind.checked_sub(9).and_then(|i| TaskId::ALL.get(i)) {
        return super::instruct::example(rng, task);
    }
    match kind {
        0 if !words.is_empty() => {
            let n = rng.range(2, 6);
            let text: String = (0..n).map(|_| rng.pick(words).as_str()).collect();
            Example {
                prompt: Prompt {
                    image: None,
                    text: format!("Repeat after me:{text}"),
                },
                target: Target::Text(text.trim_start().to_string()),
            }
        }
        1 => {
            let s = Scene::random(rng, 1, 4);
            img(s.render(), "List the objects.", listing(&s))
        }
        2 => {
            let s = Scene::random(rng, 1, 4);
            img(
                s.render(),
                "Number of shapes?",
                NUMBER_WORDS[s.objects.len()].to_string(),
            )
        }
        3 => {
            let c = Cover::random(rng);
            img(c.render(), "Spell the cover.", spelled(&c))
        }
        4 => {
            let label = rng.below(CLASS_NAMES.len());
            img(
                render_sample(label, rng),
                "Identify the sprite.",
                format!("sprite {}", label + 1),
            )
        }
        5 => {
            let s = Scene::random(rng, 1, 4);
            let o = *rng.pick(&s.objects);
            img(
                s.render(),
                &format!("Which cell holds the {}?", o.noun()),
                cell_answer(&o),
            )
        }
        6 => {
            let s = Scene::random(rng, 1, 3);
            Example {
                prompt: Prompt {
                    image: None,
                    text: format!("Draw: {}", listing(&s)),
                },
                target: Target::Image(s.render()),
            }
        }
        8 => {
            let s = Scene::random(rng, 1, 4);
            let o = *rng.pick(&s.objects);
            img(
                s.render(),
                &format!("Describe the {}.", describe_key(&s, &o, rng)),
                entry(&o),
            )
        }
        // 7, and 0 when there are no words to repeat.
        _ => {
            let s = Scene::random(rng, 1, 3);
            Example {
                prompt: Prompt {
                    image: Some(s.render()),
                    text: "Copy the picture.".into(),
                },
                target: Target::Image(s.render()),
            }
        }
    }
}

/// `n` pretraining examples from a seed.
pub fn mix(seed: u64, n: usize, words: &[String]) -> Vec<Example> {
    let mut rng = Rng::derive(seed, "pretrain");
    (0..n).map(|_| example(&mut rng, words)).collect()
}

/// Texts of the pretraining mix (without the repeat part), for building the vocabulary.
pub fn corpus(seed: u64, n: usize) -> Vec<String> {
    mix(seed, n, &[])
        .into_iter()
        .flat_map(|e| {
            let mut v = vec![e.prompt.text];
            if let Target::Text(t) = e.target {
                v.push(t);
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnext_datasets::scene::{Color, Shape};

    /// A checksum of what the mix generates: texts and pixels of its first examples.
    fn fingerprint() -> String {
        let words = vec![" red".to_string(), " circle".to_string()];
        let pixels = |img: &image::RgbImage| -> u64 {
            let raw = img.as_raw().iter().enumerate();
            raw.map(|(i, &b)| (i as u64 + 1) * u64::from(b)).sum()
        };
        let mut all = String::new();
        for e in mix(7, 256, &words) {
            all.push_str(&e.prompt.text);
            if let Some(img) = &e.prompt.image {
                all.push_str(&format!("|{}", pixels(img)));
            }
            match &e.target {
                Target::Text(t) => all.push_str(&format!("|{t}\n")),
                Target::Image(img) => all.push_str(&format!("|{}\n", pixels(img))),
            }
        }
        cnext_core::hash::key16(&all)
    }

    #[test]
    fn a_changed_mix_must_bump_its_version() {
        // A mix that generates something else must bump MIX_VERSION (hashed into the base
        // cache key, so no base pretrained on the old mix is reused), then pin the new value.
        const PINNED: (u32, &str) = (3, "2768747063c4e51d");
        assert_eq!(
            (MIX_VERSION, fingerprint().as_str()),
            PINNED,
            "the pretraining mix changed: bump MIX_VERSION and pin its fingerprint"
        );
    }

    #[test]
    fn formats_differ_from_the_tasks() {
        let o = Object {
            shape: Shape::Circle,
            color: Color::Red,
            size: Size::Large,
            row: 1,
            col: 0,
        };
        assert_eq!(cell_answer(&o), "rows 2 to 3 columns 1 to 2");
        let s = Scene { objects: vec![o] };
        assert_eq!(listing(&s), "large red circle bottom left");
        let c = Cover {
            title: vec!["ICE".into()],
            author: "FOX".into(),
            year: 1999,
            genre: cnext_datasets::covers::Genre::Travel,
        };
        assert_eq!(spelled(&c), "I C E / F O X / 1 9 9 9");
        let words = vec![" red".to_string(), " circle".to_string()];
        let ex = mix(1, 64, &words);
        assert!(ex
            .iter()
            .any(|e| e.prompt.text.starts_with("Repeat after me:")));
        assert_eq!(mix(1, 64, &words).len(), 64);
    }
}
