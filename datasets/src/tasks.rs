//! Sample makers for the six Continual-NExT-mini tasks. Each returns the record(s) in the
//! official layout plus the images it references; answers come from the scene description.

use crate::classes::{render_sample, CLASS_NAMES};
use crate::covers::Cover;
use crate::formats::{
    BoxField, CaptionRecord, ConversationRecord, EditRecord, EditTestRecord, GroundingRecord,
    QuestionId, QuestionRecord,
};
use crate::rng::Rng;
use crate::scene::{small_positions, Object, Scene, SCENE_PX};
use crate::spec::{TaskSpec, T2I_TURN};
use cnext_core::TaskId;
use image::RgbImage;
use serde::Serialize;

/// A train record in whichever official layout the task uses.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TrainRecord {
    Conversation(ConversationRecord),
    Edit(EditRecord),
}

/// A test record in whichever official layout the task uses.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TestRecord {
    Question(QuestionRecord),
    Grounding(GroundingRecord),
    Caption(CaptionRecord),
    Edit(EditTestRecord),
}

/// Images a record references, by their path relative to the task folder.
pub type Images = Vec<(String, RgbImage)>;

/// A question about a scene and its exact answer (VQAv2 style: lower case, digits for counts).
pub fn scene_question(scene: &Scene, rng: &mut Rng) -> (String, String) {
    let objs = &scene.objects;
    loop {
        let o = *rng.pick(objs);
        let unique_shape = objs.iter().filter(|p| p.shape == o.shape).count() == 1;
        let unique_color = objs.iter().filter(|p| p.color == o.color).count() == 1;
        let qa = match rng.below(8) {
            0 if unique_shape => (
                format!("What color is the {}?", o.shape.name()),
                o.color.name().to_string(),
            ),
            1 if unique_color => (
                format!("What shape is the {} object?", o.color.name()),
                o.shape.name().to_string(),
            ),
            2 => ("How many objects are there?".into(), objs.len().to_string()),
            3 => {
                let c = *rng.pick(&crate::scene::Color::ALL);
                let n = objs.iter().filter(|p| p.color == c).count();
                (
                    format!("How many {} objects are there?", c.name()),
                    n.to_string(),
                )
            }
            4 => {
                // Half the time ask about an object that is absent.
                let probe = if rng.chance(0.5) {
                    o
                } else {
                    Object {
                        shape: *rng.pick(&crate::scene::Shape::ALL),
                        color: *rng.pick(&crate::scene::Color::ALL),
                        ..o
                    }
                };
                let present = objs
                    .iter()
                    .any(|p| p.shape == probe.shape && p.color == probe.color);
                let ans = if present { "yes" } else { "no" };
                (format!("Is there a {}?", probe.noun()), ans.into())
            }
            5 => (format!("Where is the {}?", o.noun()), o.position()),
            6 => (
                format!("What shape is at the {}?", o.position()),
                o.shape.name().to_string(),
            ),
            7 => (
                format!("What size is the {}?", o.noun()),
                o.size.name().to_string(),
            ),
            _ => continue,
        };
        return qa;
    }
}

/// A referring expression that picks out `target` and no other object.
pub fn referring_expression(scene: &Scene, target: &Object, rng: &mut Rng) -> String {
    let objs = &scene.objects;
    let mut options = vec![format!("the {}", target.noun())];
    if objs.iter().filter(|p| p.shape == target.shape).count() == 1 {
        options.push(format!("the {}", target.shape.name()));
    }
    if objs.iter().filter(|p| p.color == target.color).count() == 1 {
        options.push(format!("the {} object", target.color.name()));
    }
    options.push(format!(
        "the {} at the {}",
        target.shape.name(),
        target.position()
    ));
    options.push(format!("the {} {}", target.size.name(), target.noun()));
    rng.pick(&options).clone()
}

/// The normalised box string `"[x1,y1,x2,y2]"` (two decimals) and the pixel box.
pub fn box_answer(o: &Object) -> (String, [f64; 4]) {
    let [x, y, w, h] = o.pixel_box();
    let s = f64::from(SCENE_PX);
    // Half away from zero, as everywhere in the project (0.625 -> 0.63, not 0.62).
    let n = |v: u32| cnext_core::metrics::fmt2(f64::from(v) / s);
    (
        format!("[{},{},{},{}]", n(x), n(y), n(x + w), n(y + h)),
        [x, y, w, h].map(f64::from),
    )
}

/// An edit of `src` and the exact resulting scene.
pub fn random_edit(src: &Scene, rng: &mut Rng) -> (String, Scene) {
    loop {
        let o = *rng.pick(&src.objects);
        let idx = src.objects.iter().position(|p| *p == o).unwrap_or(0);
        let mut rest = src.clone();
        rest.objects.remove(idx);
        let edit = match rng.below(4) {
            0 => {
                let c = *rng.pick(&crate::scene::Color::ALL);
                let moved = Object { color: c, ..o };
                (c != o.color && rest.can_place(&moved)).then(|| {
                    rest.objects.push(moved);
                    format!("Change the color of the {} to {}.", o.noun(), c.name())
                })
            }
            1 if src.objects.len() >= 2 => Some(format!("Remove the {}.", o.noun())),
            2 => src.random_object(rng, 0.2).map(|n| {
                rest = src.clone();
                rest.objects.push(n);
                format!(
                    "Add {} {} at the {}.",
                    article(n.size.name()),
                    n_desc(&n),
                    n.position()
                )
            }),
            3 => {
                let span = 4 - o.size.cells() as usize;
                let (r, c) = (rng.below(span) as u32, rng.below(span) as u32);
                let moved = Object {
                    row: r,
                    col: c,
                    ..o
                };
                ((r, c) != (o.row, o.col) && rest.can_place(&moved)).then(|| {
                    rest.objects.push(moved);
                    format!("Move the {} to the {}.", o.noun(), moved.position())
                })
            }
            _ => None,
        };
        if let Some(instr) = edit {
            rest.sort();
            return (instr, rest);
        }
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn n_desc(o: &Object) -> String {
    format!("{} {}", o.size.name(), o.noun())
}

/// A cover question and its answer (OCR-VQA style).
pub fn cover_question(c: &Cover, rng: &mut Rng) -> (String, String) {
    let other = *rng.pick(&crate::covers::Genre::ALL);
    let yes_no = |b: bool| if b { "Yes" } else { "No" }.to_string();
    match rng.below(6) {
        0 => ("What is the title of this book?".into(), c.title_answer()),
        1 => ("Who wrote this book?".into(), c.author_answer()),
        2 => (
            "What is the genre of this book?".into(),
            c.genre.name().into(),
        ),
        3 => (
            "What year was this book published?".into(),
            c.year.to_string(),
        ),
        4 => (
            format!("Is this a {} book?", other.name()),
            yes_no(other == c.genre),
        ),
        _ => (
            format!("Is this book related to {}?", other.name()),
            yes_no(other == c.genre),
        ),
    }
}

fn image_name(split: &str, i: usize, suffix: &str) -> String {
    format!("images/{split}_{i:06}{suffix}.png")
}

/// One train sample of `task`.
pub fn train_sample(task: TaskId, i: usize, rng: &mut Rng) -> (TrainRecord, Images) {
    let spec = TaskSpec::of(task);
    let img = image_name("train", i, "");
    let conv = |image: &str, q: String, a: String| {
        TrainRecord::Conversation(ConversationRecord {
            image: Some(image.to_string()),
            data: vec![q, a],
        })
    };
    match task {
        TaskId::Vqav2 => {
            let s = Scene::random(rng, 1, 4);
            let (q, a) = scene_question(&s, rng);
            (
                conv(&img, spec.question_text(&q), a),
                vec![(img, s.render())],
            )
        }
        TaskId::Imagenet => {
            let label = rng.below(CLASS_NAMES.len());
            let pic = render_sample(label, rng);
            let a = CLASS_NAMES[label].to_string();
            (conv(&img, spec.question_text(""), a), vec![(img, pic)])
        }
        TaskId::Flickr30k => {
            let s = Scene::random(rng, 1, 3);
            let rec = conv(&img, T2I_TURN.to_string(), s.caption());
            (rec, vec![(img, s.render())])
        }
        TaskId::Ocrvqa => {
            let c = Cover::random(rng);
            let (q, a) = cover_question(&c, rng);
            (
                conv(&img, spec.question_text(&q), a),
                vec![(img, c.render())],
            )
        }
        TaskId::Refcoco => {
            let s = Scene::random(rng, 2, 4);
            let t = *rng.pick(&s.objects);
            let e = referring_expression(&s, &t, rng);
            let (b, _) = box_answer(&t);
            (
                conv(&img, spec.question_text(&e), b),
                vec![(img, s.render())],
            )
        }
        TaskId::Hqedit => {
            let s = Scene::random(rng, 1, 3);
            let (instr, t) = random_edit(&s, rng);
            let (src, tgt) = (
                image_name("train", i, "_src"),
                image_name("train", i, "_tgt"),
            );
            let rec = TrainRecord::Edit(EditRecord {
                source_image: src.clone(),
                target_image: tgt.clone(),
                instruction: instr,
            });
            (rec, vec![(src, s.render()), (tgt, t.render())])
        }
    }
}

/// One test sample of `task`, with question id `qid`.
pub fn test_sample(task: TaskId, i: usize, qid: u64, rng: &mut Rng) -> (TestRecord, Images) {
    let spec = TaskSpec::of(task);
    let img = image_name("test", i, "");
    let question_id = QuestionId::Int(qid);
    let q = |image: &str, text: String, answer: String| {
        TestRecord::Question(QuestionRecord {
            question_id: question_id.clone(),
            image: image.to_string(),
            text,
            answer,
            answers: None,
        })
    };
    match task {
        TaskId::Vqav2 | TaskId::Imagenet | TaskId::Ocrvqa => {
            let (TrainRecord::Conversation(c), imgs) = train_sample(task, i, rng) else {
                unreachable!("understanding tasks use conversation records")
            };
            let mut it = c.data.into_iter();
            let (text, ans) = (it.next().unwrap_or_default(), it.next().unwrap_or_default());
            let pic = imgs.into_iter().map(|(_, p)| (img.clone(), p)).collect();
            (q(&img, text, ans), pic)
        }
        TaskId::Refcoco => {
            let s = Scene::random(rng, 2, 4);
            let t = *rng.pick(&s.objects);
            let e = referring_expression(&s, &t, rng);
            let (b, pixel) = box_answer(&t);
            let rec = TestRecord::Grounding(GroundingRecord {
                question_id,
                image: img.clone(),
                text: spec.question_text(&e),
                answer: b.clone(),
                size: [SCENE_PX, SCENE_PX],
                origin_answer_bbox: BoxField::Numbers(pixel.to_vec()),
                answer_bbox: BoxField::Text(b),
            });
            (rec, vec![(img, s.render())])
        }
        TaskId::Flickr30k => {
            let s = Scene::random(rng, 1, 3);
            let rec = TestRecord::Caption(CaptionRecord {
                question_id,
                text: s.caption(),
            });
            (rec, vec![])
        }
        TaskId::Hqedit => {
            let s = Scene::random(rng, 1, 3);
            let (instr, t) = random_edit(&s, rng);
            let (src, tgt) = (image_name("test", i, "_src"), image_name("test", i, "_tgt"));
            let rec = TestRecord::Edit(EditTestRecord {
                question_id,
                source_image: src.clone(),
                target_image: tgt.clone(),
                instruction: instr,
            });
            (rec, vec![(src, s.render()), (tgt, t.render())])
        }
    }
}

/// The nine position names a small object can have.
pub fn position_names() -> Vec<String> {
    small_positions()
        .into_iter()
        .map(|(r, c)| crate::scene::cell_name(r, c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::{Color, Shape, Size};

    fn obj(shape: Shape, color: Color, size: Size, row: u32, col: u32) -> Object {
        Object {
            shape,
            color,
            size,
            row,
            col,
        }
    }

    #[test]
    fn box_answers_are_normalised_pixel_boxes() {
        let o = obj(Shape::Circle, Color::Red, Size::Small, 1, 2);
        let (s, px) = box_answer(&o);
        assert_eq!(px, [17.0, 9.0, 6.0, 6.0]);
        assert_eq!(s, "[0.71,0.38,0.96,0.63]");
    }

    #[test]
    fn expressions_refer_to_exactly_one_object() {
        let mut rng = Rng::new(5);
        for _ in 0..300 {
            let s = Scene::random(&mut rng, 2, 4);
            let t = *rng.pick(&s.objects);
            let e = referring_expression(&s, &t, &mut rng);
            let matches = s
                .objects
                .iter()
                .filter(|o| {
                    let noun = format!("the {}", o.noun());
                    e == noun
                        || e == format!("the {}", o.shape.name()) && o.shape == t.shape
                        || e == format!("the {} object", o.color.name()) && o.color == t.color
                        || e == format!("the {} at the {}", o.shape.name(), o.position())
                        || e == format!("the {} {}", o.size.name(), o.noun())
                })
                .count();
            assert_eq!(matches, 1, "{e} in {s:?}");
        }
    }

    #[test]
    fn edits_change_the_scene_as_instructed() {
        let mut rng = Rng::new(9);
        for _ in 0..300 {
            let s = Scene::random(&mut rng, 1, 3);
            let (instr, t) = random_edit(&s, &mut rng);
            assert_ne!(s, t, "{instr}");
            let diff = s.objects.len() as i64 - t.objects.len() as i64;
            match instr.split(' ').next() {
                Some("Remove") => assert_eq!(diff, 1),
                Some("Add") => assert_eq!(diff, -1),
                Some("Change") | Some("Move") => assert_eq!(diff, 0),
                other => panic!("unexpected edit {other:?}"),
            }
        }
    }

    #[test]
    fn questions_have_exact_answers() {
        let s = Scene {
            objects: vec![
                obj(Shape::Circle, Color::Red, Size::Small, 0, 0),
                obj(Shape::Square, Color::Red, Size::Small, 2, 2),
            ],
        };
        let mut rng = Rng::new(1);
        for _ in 0..200 {
            let (q, a) = scene_question(&s, &mut rng);
            match q.as_str() {
                "How many objects are there?" => assert_eq!(a, "2"),
                "How many red objects are there?" => assert_eq!(a, "2"),
                "What color is the circle?" | "What color is the square?" => assert_eq!(a, "red"),
                "Where is the red circle?" => assert_eq!(a, "top left"),
                "What shape is at the bottom right?" => assert_eq!(a, "square"),
                "What shape is the red object?" => panic!("red is not unique"),
                _ => {}
            }
        }
        assert_eq!(position_names().len(), 9);
    }
}
