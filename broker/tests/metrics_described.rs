//! Every metric the broker emits has help text (Prometheus' `# HELP`), so `promtool check
//! metrics` stays clean as metrics are added: a source check, like `layers.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The string literal after each `marker` (`metrics::gauge!(` ...), across line breaks.
fn names_after(text: &str, marker: &str) -> BTreeSet<String> {
    text.match_indices(marker)
        .filter_map(|(i, _)| {
            let rest = text[i + marker.len()..].trim_start();
            let rest = rest.strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_owned())
        })
        .collect()
}

#[test]
fn every_emitted_metric_is_described() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for d in [
        "src",
        "store/core/src",
        "store/redb/src",
        "store/postgres/src",
    ] {
        rust_files(&root.join(d), &mut files);
    }
    let mut emitted = BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for m in [
            "metrics::counter!(",
            "metrics::gauge!(",
            "metrics::histogram!(",
        ] {
            emitted.extend(names_after(&text, m));
        }
    }
    let telemetry = std::fs::read_to_string(root.join("src/telemetry.rs")).unwrap();
    let mut described = BTreeSet::new();
    for m in [
        "describe_counter!(",
        "describe_gauge!(",
        "describe_histogram!(",
    ] {
        described.extend(names_after(&telemetry, m));
    }
    assert!(emitted.len() > 20, "found the metrics: {emitted:?}");
    let missing: Vec<_> = emitted.difference(&described).collect();
    assert!(
        missing.is_empty(),
        "metrics without help text (describe them in telemetry::describe): {missing:?}"
    );
}
