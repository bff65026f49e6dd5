//! Reports over synthetic runs (`fixtures`): every file is written, PNG/SVG look like images,
//! tables carry the input's values with two decimals and `-` for missing ones, bad inputs are
//! errors naming the file.

mod fixtures;

use super::*;
use cnext_core::metrics::fmt2;
use cnext_core::TaskId;
use fixtures::*;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[track_caller]
fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.len() > 1000, "{} is too small", path.display());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
}

#[track_caller]
fn assert_svg(path: &Path, words: &[&str]) {
    let s = read(path);
    assert!(s.contains("<svg"), "{} is not an SVG", path.display());
    for w in words {
        assert!(s.contains(w), "{} lacks {w}", path.display());
    }
}

#[test]
fn two_runs_write_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_run(&tmp.path().join("lora"), &lora(0));
    let b = write_run(&tmp.path().join("ub"), &joint());
    let out = tmp.path().join("report");
    let files = report(&[a, b], &out).unwrap();
    for name in [
        "heatmap-lora.png",
        "heatmap-upper_bound.png",
        "curves.png",
        "decomposition.png",
    ] {
        assert_png(&out.join(name));
    }
    let names: Vec<&str> = TaskId::ALL.iter().map(|t| t.as_str()).collect();
    let mut heat = names.clone();
    heat.extend([
        "CLIP score",
        "46.50",
        "74.43",
        "27.22",
        "lora / default_order / seed 0",
    ]);
    assert_svg(&out.join("heatmap-lora.svg"), &heat);
    assert_svg(
        &out.join("heatmap-upper_bound.svg"),
        &["joint (all tasks)", "56.00"],
    );
    assert_svg(
        &out.join("curves.svg"),
        &["vqav2", "hqedit", "lora", "upper_bound (joint)"],
    );
    assert_svg(
        &out.join("decomposition.svg"),
        &["lora", "Avg.IUF", "text forgetting"],
    );
    assert_eq!(files.files.len(), 15);
    assert!(files.files.iter().all(|f| f.is_file()));
    // No temp files left behind.
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let csv = read(&out.join("comparison.csv"));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "method,order,seeds,Avg.ACC,Forgetting,New.ACC,MAA,text avg,image avg,Avg.IUF,Avg.HAL,Avg.OTH"
    );
    let r = lora(0);
    let e = r.errors.as_ref().unwrap();
    let want: Vec<String> = [
        r.metrics.avg_acc,
        r.metrics.forgetting,
        r.metrics.new_acc,
        r.metrics.maa,
        r.metrics.text_avg,
        r.metrics.image_avg,
        e.avg_iuf,
        e.avg_hal,
        e.avg_oth,
    ]
    .iter()
    .map(|v| fmt2(v.unwrap()))
    .collect();
    assert_eq!(lines[1], format!("lora,default_order,0,{}", want.join(",")));
    assert!(lines[1].starts_with("lora,default_order,0,14.36,37.54,"));
    // The joint run: no diagonal metrics, no error types: `-`, never 0.
    assert_eq!(
        lines[2],
        "upper_bound,default_order,0,50.83,-,-,-,43.75,65.00,-,-,-"
    );
    let md = read(&out.join("comparison.md"));
    assert!(
        md.starts_with("| method | order | seeds | Avg.ACC |"),
        "{md}"
    );
    assert!(
        md.contains("| upper_bound | default_order | 0 | 50.83 | - |"),
        "{md}"
    );
    assert_eq!(files.comparison.rows.len(), 2);
    assert!(files.comparison.table().to_string().contains("14.36"));

    let dec = read(&out.join("decomposition.csv"));
    let dl: Vec<&str> = dec.lines().collect();
    assert_eq!(
        dl[0],
        "method,order,seeds,Avg.IUF,Avg.HAL,Avg.OTH,IUF+HAL+OTH,text forgetting"
    );
    // Text forgetting of LoRA: (46 + 46.5 + 36.5 + 11.5) / 5 = 28.10.
    assert!(dl[1].ends_with(",28.10,28.10"), "{}", dl[1]);
    assert_eq!(dl[2], "upper_bound,default_order,0,-,-,-,-,-");

    let tr = read(&out.join("transfer.csv"));
    let tl: Vec<&str> = tr.lines().collect();
    assert_eq!(
        tl[0],
        "method,order,seeds,train,eval,stage,kind,before,after,delta"
    );
    assert_eq!(
        tl[1],
        "lora,default_order,0,imagenet,vqav2,2,text->text,46.50,13.50,-33.00"
    );
    assert!(tl.contains(&"lora,default_order,0,ocrvqa,flickr30k,4,text->image,74.43,47.56,-26.87"));
    assert_eq!(
        tl.len(),
        1 + 15,
        "a 6-stage run has 15 pairs; a joint run none"
    );
    let md = read(&out.join("transfer.md"));
    assert!(md.contains("| imagenet | vqav2 | 2 | text->text | 46.50 | 13.50 | -33.00 |"));
    assert!(md.contains("a joint run has no stages"));
}

#[test]
fn multi_seed_folder_reports_mean_and_std() {
    let tmp = tempfile::tempdir().unwrap();
    let seeds = write_seeds(&tmp.path().join("mage"));
    let a = write_run(&tmp.path().join("lora"), &lora(0));
    let out = tmp.path().join("report");
    let files = report(&[a, seeds.clone()], &out).unwrap();
    let inputs = load_inputs(&[seeds]).unwrap();
    let s = inputs[0].summary.as_ref().unwrap();
    let row = &files.comparison.rows[1];
    assert_eq!(row[..3], ["mage", "default_order", "0,1,2"]);
    assert_eq!(row[3], fmt_stat_of(s, "avg_acc"));
    assert!(row[3].contains(" ± "), "{row:?}");
    assert!(row.iter().skip(3).all(|c| c.contains(" ± ")), "{row:?}");
    let csv = read(&out.join("comparison.csv"));
    assert!(csv.contains("mage,default_order,\"0,1,2\","), "{csv}");
    // The decomposition is the mean of the per-seed values (also in the summary).
    let d = bars::Decomposition::of(&inputs[0]);
    let want = s.metrics["avg_iuf"].as_ref().unwrap().mean;
    assert!((d.avg_iuf.unwrap() - want).abs() < 1e-9);
    assert_svg(
        &out.join("heatmap-mage.svg"),
        &["mage / default_order / mean of seeds 0,1,2"],
    );
    // Diagnostics: mean ± std over seeds per stage, four decimals; none for lora.
    let md = read(&out.join("diagnostics.md"));
    assert!(
        md.contains("| stage | task | pema_alpha_fallback | pema_star_non_finite |"),
        "{md}"
    );
    assert!(
        md.contains("| 1 | vqav2 | 0.9990 ± 0.0010 | 0.0000 ± 0.0000 |"),
        "{md}"
    );
    assert!(md.contains("| 6 | hqedit | 0.9990 ± 0.0010 |"), "{md}");
    assert!(
        md.contains("No diagnostics: the method reports none."),
        "{md}"
    );
    let csv = read(&out.join("diagnostics.csv"));
    assert!(
        csv.contains(
            "mage,default_order,\"0,1,2\",3,flickr30k,pema_alpha_fallback,0.9990,0.0010\n"
        ),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 1 + 6 * 2, "{csv}");
    assert_eq!(default_name(&inputs), "mage");
    assert_eq!(
        super::default_name(
            &load_inputs(&[tmp.path().join("lora"), tmp.path().join("mage")]).unwrap()
        ),
        "lora+mage"
    );
}

fn fmt_stat_of(s: &Summary, k: &str) -> String {
    crate::seeds::fmt_stat(s.metrics[k].as_ref())
}

#[test]
fn inputs_sharing_a_method_get_distinct_names() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_run(&tmp.path().join("a"), &lora(0));
    let b = write_run(&tmp.path().join("b"), &lora(1));
    let c = write_run(&tmp.path().join("c"), &joint());
    let inputs = load_inputs(&[a, b, c]).unwrap();
    let labels: Vec<&str> = inputs.iter().map(|i| i.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "lora-default_order-seed0",
            "lora-default_order-seed1",
            "upper_bound"
        ]
    );
    assert_eq!(default_name(&inputs), "lora+upper_bound");
    let out = tmp.path().join("report");
    write_report(&inputs, &out).unwrap();
    assert_png(&out.join("heatmap-lora-default_order-seed1.png"));
}

#[test]
fn runs_with_set_overrides_are_named_by_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mage = cnext_baselines::find("mage").unwrap();
    let mut default = run_result("mage", 0, sequential(&LORA, 0.0), true);
    default.method_config = mage.factory()().config().unwrap();
    let mut faithful = default.clone();
    let set = [(
        "averaging.pema.alpha_policy".to_string(),
        serde_json::json!("faithful"),
    )];
    faithful.method_config = mage.with_overrides(&set.into_iter().collect()).unwrap()()
        .config()
        .unwrap();
    let a = write_run(&tmp.path().join("a"), &default);
    let b = write_run(&tmp.path().join("b"), &faithful);
    let inputs = load_inputs(&[a, b]).unwrap();
    let labels: Vec<&str> = inputs.iter().map(|i| i.label.as_str()).collect();
    assert_eq!(labels, ["mage", "mage[alpha_policy=faithful]"]);
    let out = tmp.path().join("report");
    write_report(&inputs, &out).unwrap();
    assert_png(&out.join("heatmap-mage_alpha_policy_faithful_.png"));
    assert!(read(&out.join("comparison.md")).contains("mage[alpha_policy=faithful]"));
}

#[test]
fn bad_inputs_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report");
    let missing = tmp.path().join("nope");
    let e = format!(
        "{:#}",
        report(std::slice::from_ref(&missing), &out).unwrap_err()
    );
    assert!(e.contains(&missing.display().to_string()), "{e}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = format!(
        "{:#}",
        report(std::slice::from_ref(&empty), &out).unwrap_err()
    );
    assert!(
        e.contains("results.json") && e.contains(&empty.display().to_string()),
        "{e}"
    );

    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("results.json"), "{\"method\": \"lora\",").unwrap();
    let e = format!(
        "{:#}",
        report(std::slice::from_ref(&bad), &out).unwrap_err()
    );
    let path = bad.join("results.json").display().to_string();
    assert!(e.contains(&path) && e.contains("malformed JSON"), "{e}");

    // A summary whose seed folder is gone.
    let seeds = write_seeds(&tmp.path().join("mage"));
    std::fs::remove_file(seeds.join("seed1/results.json")).unwrap();
    let e = format!(
        "{:#}",
        report(std::slice::from_ref(&seeds), &out).unwrap_err()
    );
    let path = seeds
        .join("seed1")
        .join("results.json")
        .display()
        .to_string();
    assert!(e.contains(&path), "{e}");
    assert!(!out.exists(), "nothing is written when an input fails");
    assert!(report(&[], &out).is_err());
}

#[test]
fn forgetting_per_stage_uses_the_partial_matrix() {
    let f = curves::stage_forgetting(&sequential(&LORA, 0.0));
    assert_eq!(f.len(), 6);
    assert_eq!(f[0], None);
    assert_eq!(f[1].map(fmt2).as_deref(), Some("33.00"));
    // After stage 3: ((46.5 - 1) + (46.5 - 0)) / 2.
    assert_eq!(f[2].map(fmt2).as_deref(), Some("46.00"));
    assert_eq!(f[5].map(fmt2).as_deref(), Some("37.54"));
    assert!(curves::stage_forgetting(&joint().matrix).is_empty());
}

#[test]
fn csv_cells_are_quoted_when_needed() {
    assert_eq!(
        tables::csv_line(&["a", "b,c", "d\"e"]),
        "a,\"b,c\",\"d\"\"e\"\n"
    );
}
