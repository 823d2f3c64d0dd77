//! Harness logic for the `tls` cargo-fuzz target (`dataplane/fuzz/`), shared with the corpus
//! replay test below, so `cargo test -p uturn-dataplane` runs the seed corpus on stable.
//!
//! One input drives two connections through the very `Connection` code a shard runs (TLS
//! state, rustls's unbuffered API, the plaintext framer, the send queue): a `tls://` one and an
//! `auto://` one (whose first byte decides TLS or plain TCP). The stream is cut into reads at
//! points drawn from the input's first two bytes, so the fuzzer explores every split; between
//! reads the harness sometimes drains the send queue (a socket that writes) and sometimes
//! queues a relayed frame (the peer → client path, encryption included).
//!
//! Compiled for tests and with the `fuzzing` feature only; it is no part of the server.

use std::sync::{Arc, OnceLock};

use uturn_proto::frame_len;

use crate::ClientTransport;
use crate::stream::conn::ProxyEvent;
use crate::stream::{Close, Connection, Start, StreamEdge};

/// Largest frame, as the default [`StreamLimits`](crate::StreamLimits).
const FRAME_LEN_MAX: usize = 4096;
/// A small send queue, so that the fuzzer reaches "full" and the wrap.
const SEND_QUEUE_BYTES: usize = 16 * 1024;

/// What one connection did with the input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Whole frames delivered to the fast path.
    pub frames: usize,
    /// How the connection ended, if it did (`true`: an error; `false`: the client closed).
    pub closed: Option<bool>,
    /// Whether it ran as TLS.
    pub tls: bool,
    /// The first bytes the server wrote back (a handshake record, an alert), up to 16.
    pub answer: Vec<u8>,
    /// A shared-port connection whose ClientHello went to the web service.
    pub forwarded: bool,
}

/// Feeds `data` to a `tls://`, an `auto://` and a shared-port `auto://` connection from a
/// trusted balancer (PROXY header expected, ClientHello routing on); returns what each did. Panics only
/// when an invariant breaks (a delivered frame that is not whole, a queue over its bound),
/// which is what the fuzzer looks for; malformed input must end in `closed`, never a panic.
pub fn tls(data: &[u8]) -> (Outcome, Outcome, Outcome) {
    let (seed, stream) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => (0, data),
    };
    let config = server_config();
    let tls = drive(
        Start::Tls(Arc::clone(&config)),
        seed,
        stream,
        &config,
        false,
    );
    let auto = drive(Start::Sniff, seed, stream, &config, false);
    // The same bytes on a shared-port `auto` connection from a trusted balancer: a PROXY header
    // first, then the ClientHello routing (edge.rs); it must end cleanly or go on, never panic.
    let edge = drive(Start::Sniff, seed, stream, &config, true);
    if edge.forwarded {
        assert_eq!(
            edge.frames, 0,
            "a passed-through connection delivers nothing to TURN"
        );
        assert!(edge.answer.is_empty(), "and uturn writes nothing to it");
    }
    assert!(tls.tls, "a tls:// connection is TLS from the start");
    if let Some(&first) = stream.first() {
        assert_eq!(
            auto.tls,
            first == 0x16,
            "auto:// is TLS exactly when it starts with 0x16"
        );
    }
    (tls, auto, edge)
}

fn drive(
    start: Start,
    seed: u16,
    stream: &[u8],
    config: &Arc<rustls::ServerConfig>,
    edge: bool,
) -> Outcome {
    let mut conn = Connection::new(start, FRAME_LEN_MAX, SEND_QUEUE_BYTES)
        .expect("the fuzzing server configuration is valid");
    if edge {
        let rules = StreamEdge {
            turn_server_names: vec!["turn.example.com".to_owned()],
            ..StreamEdge::default()
        };
        conn = conn.with_edge(true, Some(Arc::new(rules)));
    }
    let mut scratch = vec![0; crate::stream::conn::TLS_PLAINTEXT_LEN_MAX];
    let mut out = Outcome::default();
    // xorshift over the seed: chunk sizes 1..=2^k with k from the seed, so both byte-by-byte
    // and whole-buffer reads happen.
    let mut state = u32::from(seed) | 0x9e37_0000;
    let shift = 1 + u32::from(seed & 0x0f);
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let mut rest = stream;
    while !rest.is_empty() {
        let bits = next();
        let want = 1 + (bits as usize & ((1 << shift) - 1));
        let buf = conn.read_buf();
        if buf.is_empty() {
            // The edges close such a connection (a frame larger than the buffer is pending).
            out.closed = Some(true);
            break;
        }
        let n = want.min(buf.len()).min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        let mut frames = 0;
        let mut result = Ok(());
        let mut fresh = n;
        // Twice at most: after an accepted PROXY header the shard calls again for the rest.
        for _ in 0..2 {
            result = conn.received(
                fresh,
                || Some(Arc::clone(config)),
                &mut scratch,
                &mut |transport, frame| {
                    assert_eq!(
                        frame_len(frame),
                        Ok(Some(frame.len())),
                        "a delivered frame is exactly one whole frame"
                    );
                    assert!(frame.len() <= FRAME_LEN_MAX, "no frame over the limit");
                    let expected = if matches!(transport, ClientTransport::Tls) {
                        ClientTransport::Tls
                    } else {
                        ClientTransport::Tcp
                    };
                    assert_eq!(transport, expected);
                    frames += 1;
                },
            );
            fresh = 0;
            if !(result.is_ok() && matches!(conn.take_proxy_event(), Some(ProxyEvent::Accepted(_))))
            {
                break;
            }
        }
        out.frames += frames;
        out.tls = conn.is_tls();
        if bits & 0x100 != 0 {
            // The peer → client path; refused while the handshake runs, never a panic.
            let _ = conn.queue_frame([&[0x40, 0x00, 0x00, 0x05], b"hello"], 3, &mut scratch);
        }
        assert!(
            conn.send_queue().len() <= SEND_QUEUE_BYTES,
            "the send queue is bounded"
        );
        if bits & 0x200 == 0 {
            drain(&mut conn, &mut out);
        }
        if let Err(close) = result {
            out.forwarded = close == Close::Forward;
            out.closed = Some(close == Close::Error);
            drain(&mut conn, &mut out);
            break;
        }
    }
    out.tls = conn.is_tls();
    out
}

/// Writes everything queued, keeping the first bytes.
fn drain(conn: &mut Connection, out: &mut Outcome) {
    // Bounded: each turn consumes the head, and the queue holds at most SEND_QUEUE_BYTES.
    for _ in 0..SEND_QUEUE_BYTES {
        let head = conn.pending();
        if head.is_empty() {
            break;
        }
        let keep = 16usize.saturating_sub(out.answer.len()).min(head.len());
        out.answer.extend_from_slice(&head[..keep]);
        let n = head.len();
        conn.sent(n);
    }
}

/// One self-signed certificate for the whole fuzzing process (generating one per input would
/// be most of the run time); TLS 1.2 and 1.3, ALPN `stun.turn`, as the server offers.
fn server_config() -> Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("certificate for the fuzzing server");
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("server configuration");
        config.alpn_protocols = vec![b"stun.turn".to_vec()];
        Arc::new(config)
    }))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn corpus_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/tls")
    }

    fn corpus() -> Vec<(String, Vec<u8>)> {
        let dir = corpus_dir();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|path| {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let bytes = std::fs::read(&path).expect("seed");
                (name, bytes)
            })
            .collect()
    }

    /// Every seed (and every crash a fuzzing run found, once fixed) goes through both
    /// connections without a panic; the named ones do what their name says.
    #[test]
    fn every_tls_corpus_seed_survives_both_connections() {
        let seeds = corpus();
        assert!(
            seeds.len() >= 8,
            "seed corpus in {}",
            corpus_dir().display()
        );
        for (name, bytes) in seeds {
            let (tls, auto, edge) = tls(&bytes);
            if name.starts_with("proxy-v2-then-binding") {
                // The header is taken, the Binding request after it is one whole frame.
                assert_eq!((edge.frames, edge.closed), (1, None), "{name}: {edge:?}");
            }
            if name.starts_with("proxy-v1-then-h2-hello") {
                assert!(
                    edge.forwarded,
                    "{name}: a browser's hello is passed through"
                );
            }
            if name.starts_with("client-hello") {
                // A real ClientHello is answered with a handshake record (ServerHello).
                for out in [&tls, &auto] {
                    assert_eq!(out.answer.first(), Some(&0x16), "{name}: {out:?}");
                }
            }
            if name.starts_with("crash-") || name.contains(".error.") {
                // Refused with a fatal alert (RFC 8446 §6.2) and closed: on tls://, and on
                // auto:// when the stream starts as TLS (else it is plain TCP there).
                let auto_tls = bytes.get(2) == Some(&0x16);
                for out in std::iter::once(&tls).chain(auto_tls.then_some(&auto)) {
                    assert_eq!(out.closed, Some(true), "{name}: {out:?}");
                    assert_eq!(
                        (out.answer.first(), out.answer.get(5)),
                        (Some(&21), Some(&2)),
                        "{name}: {out:?}"
                    );
                }
            }
        }
    }

    /// Random streams (and random splits) never break an invariant; a bounded number of cases
    /// with a fixed generator, so the test is the same on every run.
    #[test]
    fn random_streams_never_panic_the_connection_code() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for case in 0..300 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 600) as usize;
            let mut bytes: Vec<u8> = (0..len)
                .map(|i| (state.rotate_left(i as u32 % 64) >> 7) as u8)
                .collect();
            if case % 3 == 0 && bytes.len() > 2 {
                bytes[2] = 0x16; // TLS on the auto connection too
            }
            let _ = tls(&bytes);
        }
    }

    /// Writes the seed corpus: `cargo test -p uturn-dataplane --lib -- --ignored
    /// write_the_tls_seed_corpus`. The ClientHello comes from rustls's own client, so it is a
    /// real one; rerunning changes its random fields, nothing else.
    #[test]
    #[ignore = "regenerates the committed seed corpus"]
    fn write_the_tls_seed_corpus() {
        let dir = corpus_dir();
        std::fs::create_dir_all(&dir).expect("corpus directory");
        let hello = client_hello();
        // Every seed starts with two split-seed bytes: 0x0f 0x00 reads up to 32 KiB at once,
        // 0x00 0x00 one or two bytes at a time.
        let whole = [0x0f, 0x00];
        let bytewise = [0x00, 0x00];
        let mut crash = vec![0x16, 0x03, 0x01, 0x00, 0x10];
        crash.extend_from_slice(&[0xff; 16]);
        let mut oversized = vec![0x16, 0x03, 0x01, 0xff, 0xff];
        oversized.extend_from_slice(&[0x01; 64]);
        let mut hello_then_data = hello.clone();
        hello_then_data.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x04, 1, 2, 3, 4]);
        let mut hello_then_alert = hello.clone();
        hello_then_alert.extend_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00]);
        let mut two_hellos = hello.clone();
        two_hellos.extend_from_slice(&hello);
        let seeds: Vec<(&str, &[u8], Vec<u8>)> = vec![
            ("crash-21-byte-record.bin", &whole, crash.clone()),
            ("crash-21-byte-record-bytewise.bin", &bytewise, crash),
            ("client-hello.bin", &whole, hello.clone()),
            ("client-hello-bytewise.bin", &bytewise, hello.clone()),
            (
                "half-client-hello.bin",
                &whole,
                hello[..hello.len() / 2].to_vec(),
            ),
            ("client-hello-then-app-data.bin", &whole, hello_then_data),
            (
                "client-hello-then-close-notify.bin",
                &whole,
                hello_then_alert,
            ),
            ("client-hello-twice.bin", &whole, two_hellos),
            ("record-truncated-header.bin", &whole, vec![0x16, 0x03]),
            ("record-oversized.error.bin", &whole, oversized),
            (
                "record-app-data-before-handshake.error.bin",
                &whole,
                vec![0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5],
            ),
            (
                "alert-fatal-handshake-failure.bin",
                &whole,
                vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
            ),
            (
                "alert-close-notify.bin",
                &whole,
                vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00],
            ),
            (
                "record-empty-handshake.bin",
                &whole,
                vec![0x16, 0x03, 0x03, 0x00, 0x00],
            ),
            (
                "plain-binding-request.bin",
                &whole,
                vec![
                    0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                    11, 12,
                ],
            ),
        ];
        for (name, split, body) in seeds {
            let mut bytes = split.to_vec();
            bytes.extend_from_slice(&body);
            std::fs::write(dir.join(name), bytes).expect("write seed");
        }
    }

    /// The first flight of rustls's client: one ClientHello record offering TLS 1.2 and 1.3
    /// and ALPN `stun.turn`.
    fn client_hello() -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"stun.turn".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut out).expect("ClientHello");
        }
        out
    }
}
