//! Replays the cargo-fuzz seed corpus (`proto/fuzz/corpus/*/`) through the shared harness on
//! the stable toolchain, so CI covers it without nightly. Files named `*.invalid.bin` must be
//! refused; every other file must parse.

use std::fs;
use std::path::{Path, PathBuf};

use uturn_proto::{ChannelData, Message, PacketKind, classify, fuzzing};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_parse_message_seed_survives_the_harness_and_the_valid_ones_parse() {
    for (name, bytes) in corpus("parse_message") {
        let is_stun = fuzzing::parse_message(&bytes);
        let _ = fuzzing::stream_framer(&bytes);
        let valid = !name.contains(".invalid.");
        match classify(&bytes) {
            PacketKind::Stun => {
                assert_eq!(is_stun, valid, "{name}");
                assert_eq!(Message::parse(&bytes).is_ok(), valid, "{name}");
            }
            PacketKind::ChannelData => {
                assert!(!is_stun, "{name}");
                assert_eq!(ChannelData::parse(&bytes).is_ok(), valid, "{name}");
            }
            PacketKind::Unknown => panic!("seed {name} is neither STUN nor ChannelData"),
        }
    }
}

#[test]
fn every_stream_framer_seed_survives_the_harness_and_the_valid_ones_frame_completely() {
    for (name, bytes) in corpus("stream_framer") {
        let frames = fuzzing::stream_framer(&bytes);
        let _ = fuzzing::parse_message(&bytes);
        assert!(frames > 0, "{name} yielded no frame");
        // A valid stream is cut into frames that tile it exactly.
        let stream = &bytes[1..];
        let mut offset = 0;
        while offset < stream.len() {
            match uturn_proto::frame_len(&stream[offset..]) {
                Ok(Some(n)) if offset + n <= stream.len() => offset += n,
                _ => break,
            }
        }
        assert_eq!(
            offset == stream.len(),
            !name.contains(".invalid."),
            "{name}"
        );
    }
}
