//! Experiment probe: train LoRA on one task from the cached mini base, print accuracy and samples.
//! usage: probe <cache> <task> <steps> <lr> [rank|full] [batch]
//!        probe <cache> pre [pretrain_steps pretrain_lr]   (base skills; other values build a new base)
//!        probe <cache> bind   (does the base's "Which cell holds the <noun>?" depend on the noun?
//!                              also prints patch feature norms and where the relevance gate opens)
//! `full` fine-tunes every base weight instead of a LoRA (a ceiling, not a method);
//! PROBE_ONLY=a,b (with `full`) trains only weights whose names contain a or b, and
//! PROBE_FREEZE=a,b keeps those out of the optimizer. PROBE_INIT=<stage>/weights.safetensors
//! starts from a stage cache's adapter and projector (PROBE_INIT_SKIP=a,b keeps those at base).
//! Prints the score per question template.
//! With `pre`, PROBE_SUBST=a=b and PROBE_SUFFIX=text rephrase every prompt (do the base's
//! skills survive another wording?).
use candle_core::Device;
use cnext_adapters::{AdapterPlan, LoraConfig};
use cnext_backbones::nano::backbone::NanoBackbone;
use cnext_bases::nano::{ensure_base, BaseConfig};
use cnext_core::TaskId;
use cnext_datasets::loader::load_task;
use cnext_datasets::TaskSpec;
use cnext_harness::clip::TinyClip;
use cnext_harness::eval::evaluate;
use cnext_harness::optim::AdamWConfig;
use cnext_harness::tasks::{eval_items, train_examples};
use cnext_harness::train::{train, TrainConfig};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let cache = PathBuf::from(&a[1]);
    if a[2] == "bind" {
        return bind(&cache);
    }
    if a[2] == "pre" {
        let mut cfg = BaseConfig::mini(0);
        if let (Some(steps), Some(lr)) = (a.get(3), a.get(4)) {
            cfg.pretrain.steps = steps.parse()?;
            cfg.pretrain.optim.lr = lr.parse()?;
            cfg.examples = cfg.examples.max(cfg.pretrain.steps * 16);
        }
        return pre(&cache, &cfg);
    }
    let task: TaskId = a[2].parse().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let steps: usize = a[3].parse()?;
    let lr: f64 = a[4].parse()?;
    // "full" instead of a rank: every base weight trains (a diagnostic, not a method).
    let full = a.get(5).is_some_and(|s| s == "full");
    let rank: usize = if full {
        8
    } else {
        a.get(5).map(|s| s.parse()).transpose()?.unwrap_or(8)
    };
    let batch: usize = a.get(6).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let root = cache.join("data/mini-seed0");
    let base = ensure_base(&cache, &root, &BaseConfig::mini(0), &Device::Cpu, true)?;
    let clipdir = std::fs::read_dir(cache.join("clip"))?
        .next()
        .unwrap()?
        .path();
    let clip = TinyClip::load(&clipdir)?;
    let d = load_task(&root, task)?;
    let tr = train_examples(&d)?;
    let ev = eval_items(&d.test);
    let images = cnext_harness::data::ImageCache::new(256 << 20);
    let lora = LoraConfig {
        r: rank,
        alpha: rank as f64,
        ..LoraConfig::default()
    };
    let plan = if steps == 0 {
        AdapterPlan::none()
    } else {
        AdapterPlan::lora(lora, 0)
    };
    let model = if full {
        let m = NanoBackbone::init_pretrain(
            &base.cfg,
            base.tokenizer.clone(),
            base.codebook.clone(),
            0,
            &Device::Cpu,
        )?;
        for (k, v) in &m.extra_trainable {
            let w = base.weights.get(k);
            v.set(w.ok_or_else(|| anyhow::anyhow!("base has no {k}"))?)?;
        }
        m
    } else {
        NanoBackbone::from_base(
            &base.cfg,
            &base.weights,
            base.tokenizer.clone(),
            base.codebook.clone(),
            plan,
            &Device::Cpu,
        )?
    };
    let mut vars = cnext_backbones::Backbone::trainable(&model);
    // PROBE_INIT=<weights.safetensors>: start from a stage cache's adapter and projector.
    if let Ok(init) = std::env::var("PROBE_INIT") {
        let w = candle_core::safetensors::load(&init, &Device::Cpu)?;
        // PROBE_INIT_SKIP=a,b: those keep their base values.
        let skip = std::env::var("PROBE_INIT_SKIP").unwrap_or_default();
        for (k, v) in &vars {
            if !skip.is_empty() && skip.split(',').any(|p| k.contains(p)) {
                continue;
            }
            v.set(
                w.get(k)
                    .ok_or_else(|| anyhow::anyhow!("{init} has no {k}"))?,
            )?;
        }
        println!("started from {init}");
    }
    // PROBE_ONLY=a,b: in "full" mode, train only the weights whose names contain a or b.
    if let (true, Ok(only)) = (full, std::env::var("PROBE_ONLY")) {
        vars.retain(|k, _| only.split(',').any(|p| k.contains(p)));
        println!("training {} tensors", vars.len());
    }
    // PROBE_FREEZE=a,b: keep the weights whose names contain a or b out of the optimizer.
    if let Ok(freeze) = std::env::var("PROBE_FREEZE") {
        vars.retain(|k, _| !freeze.split(',').any(|p| k.contains(p)));
        println!("training {} tensors", vars.len());
    }
    if steps > 0 {
        let tc = TrainConfig {
            steps,
            batch_size: batch,
            optim: AdamWConfig {
                lr,
                ..Default::default()
            },
            seed: 0,
            epochs: None,
        };
        let s = train(&model, &vars, &tr, &tc, "probe", true, None, &mut ())?;
        println!(
            "train {:.1}s loss {:.3}->{:.3}",
            s.seconds, s.first_loss, s.last_loss
        );
    }
    if task == TaskId::Hqedit {
        let (mut a, mut b, mut n) = (0.0, 0.0, 0.0);
        for it in &ev {
            if let cnext_harness::tasks::Reference::Image(t) = &it.reference {
                let t = &*images.get(t)?;
                let src = &*images.get(it.image.as_ref().unwrap())?;
                let vq = base.codebook.decode(&base.codebook.encode(t), 3, 3);
                a += cnext_core::scoring::clip::clip_i(&clip, Some(&vq), t)?;
                b += cnext_core::scoring::clip::clip_i(&clip, Some(src), t)?;
                n += 1.0;
            }
        }
        println!(
            "ceiling: clip_i(vq(target), target) {:.2}; clip_i(source, target) {:.2}",
            a / n,
            b / n
        );
    }
    let t0 = std::time::Instant::now();
    let e = evaluate(
        &model,
        &TaskSpec::of(task),
        &ev,
        &images,
        Some(&clip),
        cnext_harness::eval::Generation {
            batch: 64,
            max_new_tokens: 32,
        },
        "probe",
        &|q: &str| format!("{q}.png"),
    )?;
    println!(
        "{task} acc {:.2} (eval {:.1}s)",
        e.accuracy,
        t0.elapsed().as_secs_f64()
    );
    // Mean score per question template (its first three words).
    let mut by: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    for (it, sc) in ev.iter().zip(&e.scores) {
        let key: Vec<&str> = it.text.split_whitespace().take(3).collect();
        let ent = by.entry(key.join(" ")).or_default();
        ent.0 += sc;
        ent.1 += 1;
    }
    for (k, (sum, n)) in &by {
        println!("  {:6.1}  n={n:3}  {k}", 100.0 * sum / *n as f64);
    }
    for (p, (it, sc)) in e.predictions.iter().zip(ev.iter().zip(&e.scores)).take(12) {
        let r = match &it.reference {
            cnext_harness::tasks::Reference::Text(v) => v[0].clone(),
            _ => String::new(),
        };
        println!("  {:?} -> {:?} (ref {:?}) {:.2}", it.text, p.text, r, sc);
    }
    Ok(())
}

/// The base of `cfg` (built first if the cache lacks it) with no adapter, as `pre` and `bind` ask it.
fn base_model(cache: &std::path::Path, cfg: &BaseConfig) -> anyhow::Result<NanoBackbone> {
    let root = cache.join("data/mini-seed0");
    let base = ensure_base(cache, &root, cfg, &Device::Cpu, true)?;
    Ok(NanoBackbone::from_base(
        &base.cfg,
        &base.weights,
        base.tokenizer.clone(),
        base.codebook.clone(),
        AdapterPlan::none(),
        &Device::Cpu,
    )?)
}

fn pre(cache: &std::path::Path, cfg: &BaseConfig) -> anyhow::Result<()> {
    use cnext_backbones::{Backbone, Output, OutputKind, Target};
    let model = base_model(cache, cfg)?;
    let ex = cnext_bases::nano::pretrain::mix(12345, 800, &[]);
    let mut by: std::collections::BTreeMap<String, (usize, usize, Vec<String>)> =
        Default::default();
    let text: Vec<_> = ex
        .iter()
        .filter(|e| matches!(e.target, Target::Text(_)))
        .collect();
    let mut glyphs: Option<(usize, usize)> = None;
    for chunk in text.chunks(64) {
        // PROBE_SUFFIX: appended to every prompt (does a skill survive a longer instruction?).
        let suffix = std::env::var("PROBE_SUFFIX")
            .unwrap_or_default()
            .replace("\\n", "\n");
        let prompts: Vec<_> = chunk
            .iter()
            .map(|e| {
                let mut p = e.prompt.clone();
                p.text.push_str(&suffix);
                if let Ok(sub) = std::env::var("PROBE_SUBST") {
                    if let Some((a, b)) = sub.split_once('=') {
                        p.text = p.text.replace(a, b);
                    }
                }
                p
            })
            .collect();
        let out = model.generate(&prompts, OutputKind::Text, 40)?;
        for (e, o) in chunk.iter().zip(out) {
            let key: String = e
                .prompt
                .text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            let key = if key.starts_with("Which cell") {
                "Which cell".into()
            } else {
                key
            };
            let (Target::Text(t), Output::Text(o)) = (&e.target, o) else {
                continue;
            };
            if key.starts_with("Spell") {
                // Per-glyph reading: position-wise matches of the spelled letters.
                let (w, g): (Vec<char>, Vec<char>) = (
                    t.chars().filter(|c| c.is_alphanumeric()).collect(),
                    o.chars().filter(|c| c.is_alphanumeric()).collect(),
                );
                let hit = w.iter().zip(&g).filter(|(a, b)| a == b).count();
                let ent = glyphs.get_or_insert((0, 0));
                ent.0 += hit;
                ent.1 += w.len();
            }
            // PROBE_DUMP: every output of the base, not just three misses per skill.
            if std::env::var("PROBE_DUMP").is_ok() {
                println!("DUMP {key} | {o} | {t}");
            }
            let ent = by.entry(key).or_default();
            ent.1 += 1;
            if o.trim() == t.trim() {
                ent.0 += 1
            } else if ent.2.len() < 3 {
                ent.2.push(format!("{:?} want {:?}", o, t));
            }
        }
    }
    if let Some((hit, n)) = glyphs {
        println!("glyphs read in place: {hit}/{n}");
    }
    for (k, (ok, n, bad)) in by {
        println!("{k}: {ok}/{n}");
        for b in bad {
            println!("    {b}");
        }
    }
    Ok(())
}

/// Two-object scenes, the base asked "Which cell holds the <noun>?" for each object: a base that
/// binds the noun to its patch answers the two differently; one that ignores the noun does not.
fn bind(cache: &std::path::Path) -> anyhow::Result<()> {
    use cnext_backbones::{Backbone, Output, OutputKind, Prompt};
    use cnext_bases::nano::pretrain::cell_answer;
    use cnext_datasets::{rng::Rng, scene::Scene};
    let model = base_model(cache, &BaseConfig::mini(0))?;
    let mut rng = Rng::new(99);
    {
        let s = Scene::random(&mut rng, 3, 3);
        let img = s.render();
        let f = model.model.patch_features(&[&img])?;
        let n = f.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        println!("patch feature norms {n:?}");
    }
    let (mut scenes, mut same, mut right) = (0, 0, 0);
    let (mut gate_hits, mut gate_n, mut gate_false, mut gate_m) = (0, 0, 0, 0);
    while scenes < 100 {
        let s = Scene::random(&mut rng, 2, 2);
        if s.objects.len() != 2 {
            continue;
        }
        let prompts: Vec<Prompt> = s
            .objects
            .iter()
            .map(|o| Prompt {
                image: Some(s.render()),
                text: format!("Which cell holds the {}?", o.noun()),
            })
            .collect();
        let logits = model.relevance_logits(&prompts)?.to_vec1::<f32>()?;
        for (k, o) in s.objects.iter().enumerate() {
            for (r, c) in o.cells() {
                let l = logits[k * 9 + (r * 3 + c) as usize];
                gate_hits += usize::from(l > 0.0);
                gate_n += 1;
            }
            for p in s.objects.iter().filter(|p| *p != o) {
                for (r, c) in p.cells() {
                    let l = logits[k * 9 + (r * 3 + c) as usize];
                    gate_false += usize::from(l > 0.0);
                    gate_m += 1;
                }
            }
        }
        let out = model.generate(&prompts, OutputKind::Text, 12)?;
        let said: Vec<String> = out
            .into_iter()
            .map(|o| match o {
                Output::Text(t) => t,
                Output::Image(_) => String::new(),
            })
            .collect();
        scenes += 1;
        same += usize::from(said[0] == said[1]);
        right += s
            .objects
            .iter()
            .zip(&said)
            .filter(|(o, t)| cell_answer(o) == **t)
            .count();
    }
    println!(
        "{scenes} two-object scenes: the same cell for both nouns {same} times, right {right}/{}",
        2 * scenes
    );
    println!(
        "relevance gate open on the named object's cells {gate_hits}/{gate_n}, on the other's {gate_false}/{gate_m}"
    );
    Ok(())
}
