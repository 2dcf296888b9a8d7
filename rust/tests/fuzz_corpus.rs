//! Replays every committed fuzz input (`fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/`) through the fuzz targets' own checks, so `cargo test`
//! catches a regression on them without cargo-fuzz, libFuzzer or a nightly compiler.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::fs;
use std::path::PathBuf;

// The allocation bound of `decode_frames` is checked here too.
#[global_allocator]
static ALLOC: checks::Tracking = checks::Tracking;

/// Runs `check` on every file of the target's corpus and regressions; returns how many.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            files.push(entry.expect("readable directory").path());
        }
    }
    files.sort();
    let count = files.len();
    // Unoptimised builds use far bigger stack frames than the fuzzer's release build, and
    // inputs may nest up to MAX_DEPTH_LIMIT: hence the roomy thread.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            for path in files {
                let data = fs::read(&path).expect("readable input");
                eprintln!("{}", path.display());
                check(&data);
            }
        })
        .expect("thread starts")
        .join()
        .expect("every input passes");
    count
}

#[test]
fn decode_frames() {
    assert!(replay("decode_frames", checks::decode_frames) > 0);
}

#[test]
fn roundtrip() {
    assert!(replay("roundtrip", checks::roundtrip) > 0);
}

#[test]
fn dedup_ring() {
    assert!(replay("dedup_ring", checks::dedup_ring) > 0);
}

#[test]
fn tls_session() {
    assert!(replay("tls_session", checks::tls_session) > 0);
}

#[test]
fn jws() {
    assert!(replay("jws", checks::jws) > 0);
}
