//! Writes the seed corpora of the fuzz targets: valid inputs from `roamsync::fuzzing` plus a few
//! garbage files, under `fuzz/corpus/<target>/`, named by their blake3 hash.
//!
//! Run from the crate root: `cargo run --example fuzz_seeds`.

use std::fs;
use std::path::Path;

fn write(target: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = Path::new("fuzz/corpus").join(target);
    fs::create_dir_all(&dir)?;
    let name = blake3::hash(bytes).to_hex();
    fs::write(dir.join(format!("seed-{}", &name[..16])), bytes)
}

fn main() -> std::io::Result<()> {
    let seeds = roamsync::fuzzing::seed_inputs();
    for (target, bytes) in &seeds {
        write(target, bytes)?;
    }
    let garbage: [&[u8]; 4] = [b"", &[0xff; 7], &[1, 1, 0x7f, 0xff, 0xff, 0xff], &[0; 300]];
    for target in [
        "frame_decode",
        "envelope_open",
        "device_log_verify",
        "pairing_handle",
        "batch_apply",
        "change_apply",
        "message_decode",
    ] {
        for g in garbage {
            write(target, g)?;
        }
        // A valid input with its last byte cut off.
        if let Some((_, bytes)) = seeds.iter().find(|(t, _)| *t == target) {
            write(target, &bytes[..bytes.len() - 1])?;
        }
    }
    Ok(())
}
