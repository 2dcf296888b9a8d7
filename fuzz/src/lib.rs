//! The fuzz targets' checks, shared with the root crate's `rust/tests/fuzz_corpus.rs`
//! (which includes `checks.rs` by path), so `cargo test` replays the committed corpus and
//! regressions with exactly the assertions the fuzzer runs.

pub mod checks;
