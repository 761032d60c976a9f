//! What the trainer's end-to-end test binaries share: running the binary
//! and finding the data slice.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cartscore-trainer"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run cartscore-trainer")
}

/// Runs the trainer, requires success, returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let output = trainer(args);
    assert!(
        output.status.success(),
        "cartscore-trainer {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real data slice (`CARTSCORE_DATASET` overrides).
pub fn dataset() -> PathBuf {
    std::env::var("CARTSCORE_DATASET")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("../shared/data/2019-Oct-head.csv"))
}
