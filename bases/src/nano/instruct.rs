//! The instruction-tuning part of the nano base's pretraining: the six tasks' own instruction
//! templates and answer formats, over a pretraining world that leaves part of each task's
//! content out. A real Dual-to-Dual MLLM reaches the continual stages already able to answer,
//! name, read, box, draw and edit (SEED-X's zero-shot Avg.ACC on Continual-NExT is 28.81);
//! the stages then specialise it. Here the base learns every format on the seen part of the
//! world, so its zero-shot cells sit well above 0, and each stage mostly teaches the held-out
//! part: what a later stage can erase without erasing how the base follows the instruction.
//!
//! The held-out part of each task (never in pretraining, always in the task's own data):
//! - vqav2: "How many <colour> objects", "What size is the <noun>?" and "Where is the <noun>?"
//!   questions (3 of the 8 templates);
//! - imagenet: the 12 classes whose label is 1 or 3 modulo 5 (of 30);
//! - flickr30k: captions of scenes with a large object;
//! - ocrvqa: covers of the History and Science Fiction genres (2 of 6);
//! - refcoco: expressions "the <shape> at the <place>" and "the <size> <noun>" (2 of 5 kinds);
//! - hqedit: "Move the ..." edits (1 of 4 kinds).

use cnext_backbones::{Example, Prompt, Target};
use cnext_core::TaskId;
use cnext_datasets::classes::{render_sample, CLASS_NAMES};
use cnext_datasets::covers::{Cover, Genre};
use cnext_datasets::rng::Rng;
use cnext_datasets::scene::{Scene, Size};
use cnext_datasets::spec::T2I_PREFIX;
use cnext_datasets::tasks::{box_answer, cover_question, random_edit, referring_expression};
use cnext_datasets::TaskSpec;

/// Whether a VQA question belongs to the pretraining world.
pub fn seen_question(q: &str) -> bool {
    let colour_count = q.starts_with("How many ") && q != "How many objects are there?";
    !(colour_count || q.starts_with("What size is") || q.starts_with("Where is"))
}

/// Whether an ImageNet class belongs to the pretraining world.
pub fn seen_class(label: usize) -> bool {
    !matches!(label % 5, 1 | 3)
}

/// Whether a caption's scene belongs to the pretraining world.
pub fn seen_caption_scene(s: &Scene) -> bool {
    s.objects.iter().all(|o| o.size == Size::Small)
}

/// Whether a cover belongs to the pretraining world.
pub fn seen_genre(g: Genre) -> bool {
    !matches!(g, Genre::History | Genre::ScienceFiction)
}

/// Whether a referring expression belongs to the pretraining world.
pub fn seen_expression(e: &str) -> bool {
    !(e.contains(" at the ") || e.starts_with("the small ") || e.starts_with("the large "))
}

/// Whether an edit instruction belongs to the pretraining world.
pub fn seen_edit(instruction: &str) -> bool {
    !instruction.starts_with("Move ")
}

fn with_image(image: image::RgbImage, text: String, answer: String) -> Example {
    Example {
        prompt: Prompt {
            image: Some(image),
            text,
        },
        target: Target::Text(answer),
    }
}

/// One example of `task` in the task's own format, drawn from the pretraining world
/// (rejection sampling over the task's generator).
pub fn example(rng: &mut Rng, task: TaskId) -> Example {
    let spec = TaskSpec::of(task);
    loop {
        match task {
            TaskId::Vqav2 => {
                let s = Scene::random(rng, 1, 4);
                let (q, a) = cnext_datasets::tasks::scene_question(&s, rng);
                if seen_question(&q) {
                    return with_image(s.render(), spec.question_text(&q), a);
                }
            }
            TaskId::Imagenet => {
                let label = rng.below(CLASS_NAMES.len());
                if seen_class(label) {
                    return with_image(
                        render_sample(label, rng),
                        spec.question_text(""),
                        CLASS_NAMES[label].to_string(),
                    );
                }
            }
            TaskId::Flickr30k => {
                let s = Scene::random(rng, 1, 3);
                if seen_caption_scene(&s) {
                    return Example {
                        prompt: Prompt {
                            image: None,
                            text: format!("{T2I_PREFIX}{}", s.caption()),
                        },
                        target: Target::Image(s.render()),
                    };
                }
            }
            TaskId::Ocrvqa => {
                let c = Cover::random(rng);
                if seen_genre(c.genre) {
                    let (q, a) = cover_question(&c, rng);
                    return with_image(c.render(), spec.question_text(&q), a);
                }
            }
            TaskId::Refcoco => {
                let s = Scene::random(rng, 2, 4);
                let t = *rng.pick(&s.objects);
                let e = referring_expression(&s, &t, rng);
                if seen_expression(&e) {
                    return with_image(s.render(), spec.question_text(&e), box_answer(&t).0);
                }
            }
            TaskId::Hqedit => {
                let s = Scene::random(rng, 1, 3);
                let (instruction, t) = random_edit(&s, rng);
                if seen_edit(&instruction) {
                    return Example {
                        prompt: Prompt {
                            image: Some(s.render()),
                            text: instruction,
                        },
                        target: Target::Image(t.render()),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_holds_out_part_of_every_task() {
        assert!(seen_question("How many objects are there?"));
        assert!(!seen_question("How many red objects are there?"));
        assert!(!seen_question("What size is the red circle?"));
        assert!(seen_question("What color is the circle?"));
        assert_eq!((0..30).filter(|&l| seen_class(l)).count(), 18);
        assert!(!seen_expression("the circle at the top left"));
        assert!(!seen_expression("the large red circle"));
        assert!(seen_expression("the red object"));
        assert!(!seen_edit("Move the red circle to the center."));
        let mut rng = Rng::new(3);
        for task in TaskId::ALL {
            for _ in 0..50 {
                let e = example(&mut rng, task);
                let text = &e.prompt.text;
                match task {
                    TaskId::Vqav2 => assert!(seen_question(text.lines().next().unwrap())),
                    TaskId::Refcoco => {
                        let e = text.strip_prefix(cnext_datasets::spec::GROUNDING_PREFIX);
                        assert!(seen_expression(e.unwrap()), "{text}");
                    }
                    TaskId::Hqedit => assert!(seen_edit(text)),
                    TaskId::Imagenet => {
                        let Target::Text(a) = &e.target else { panic!() };
                        let label = CLASS_NAMES.iter().position(|n| n == a).unwrap();
                        assert!(seen_class(label));
                    }
                    _ => {}
                }
            }
        }
    }
}
