//! Replays the fuzzing inputs on stable, in every `cargo test`: the seeds (`fuzz/seeds/`), the
//! minimised corpus the fuzzer reached (`fuzz/corpus/`) and every input that once crashed
//! (`tests/fuzz_regressions/<target>/`), each through the same entry point as its fuzz target.
//! See docs/fuzzing.md.

use std::path::{Path, PathBuf};

/// Runs every input of `target` through `run`; fails listing each input that panicked.
fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs = [
        root.join("fuzz/seeds").join(target),
        root.join("fuzz/corpus").join(target),
        root.join("tests/fuzz_regressions").join(target),
    ];
    let mut inputs: Vec<PathBuf> = Vec::new();
    for dir in &dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_file() {
                inputs.push(path);
            }
        }
    }
    inputs.sort();
    assert!(!inputs.is_empty(), "no inputs for {target} in {dirs:?}");
    let mut failed = Vec::new();
    for path in &inputs {
        let bytes = std::fs::read(path).expect("a readable input");
        if std::panic::catch_unwind(|| run(&bytes)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs failed:\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
}

#[test]
fn client_message_inputs() {
    replay("client_message", pubgate::fuzzing::parse_request);
}

#[test]
fn connection_reader_inputs() {
    replay("connection_reader", pubgate::fuzzing::read_connection);
}
