//! Replays every committed fuzz corpus file through the same checks the fuzz targets run, so
//! CI keeps every finding fixed without libFuzzer.

use std::path::PathBuf;

#[allow(unreachable_pub, dead_code, missing_docs)]
#[path = "../../../fuzz/src/lib.rs"]
mod checks;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("readable corpus directory").path();
        let data = std::fs::read(&path).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "corpus file {} fails its check",
            path.display()
        );
        files += 1;
    }
    assert!(files >= 5, "corpus of `{target}` has only {files} files");
}

#[test]
fn envelope_corpus_replays_clean() {
    replay("envelope", checks::envelope);
}

#[test]
fn retry_after_corpus_replays_clean() {
    replay("retry_after", checks::retry_after);
}

#[test]
fn webhook_corpus_replays_clean() {
    replay("webhook", checks::webhook);
}

#[test]
fn config_corpus_replays_clean() {
    replay("config", checks::config);
}

#[test]
fn the_fixed_findings_are_in_the_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for finding in [
        "envelope/regress-unknown-code-under-200",
        "webhook/regress-non-ascii-id",
    ] {
        assert!(root.join(finding).is_file(), "{finding} is missing");
    }
}

#[test]
fn jsonl_corpus_replays_clean() {
    replay("jsonl", checks::jsonl);
}
