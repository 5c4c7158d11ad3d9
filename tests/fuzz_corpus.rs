//! Replays every file of every fuzz corpus (`fuzz/corpus/<target>/`) through the same function
//! the fuzz target calls, so corpus regressions are caught by `cargo test`.

use std::fs;
use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("readable corpus directory").path();
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        body(&data);
        count += 1;
    }
    assert!(count > 0, "empty corpus for {target}");
}

#[test]
fn frame_decode_corpus() {
    replay("frame_decode", roamsync::fuzzing::frame_decode);
}

#[test]
fn envelope_open_corpus() {
    replay("envelope_open", roamsync::fuzzing::envelope_open);
}

#[test]
fn device_log_verify_corpus() {
    replay("device_log_verify", roamsync::fuzzing::device_log_verify);
}

#[test]
fn pairing_handle_corpus() {
    replay("pairing_handle", roamsync::fuzzing::pairing_handle);
}

#[test]
fn batch_apply_corpus() {
    replay("batch_apply", roamsync::fuzzing::batch_apply);
}

#[test]
fn change_apply_corpus() {
    replay("change_apply", roamsync::fuzzing::change_apply);
}

#[test]
fn message_decode_corpus() {
    replay("message_decode", roamsync::fuzzing::message_decode);
}
