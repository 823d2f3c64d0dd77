//! Hostile bytes on the TLS ports, before any authentication: malformed records sent to a
//! `tls://` and an `auto://` listener cost the sender its connection and nothing else. UDP,
//! TCP and TLS allocations made before keep relaying, and a new TLS handshake completes
//! afterwards. Every scenario runs on both data-plane backends, with one shard, so the hostile
//! connections land on the shard that carries the allocations.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use uturn_e2e::{
    ANSWER_TIMEOUT, EchoPeer, Relayed, TestCertificate, TurnClient, start_with_tls_listeners,
};
use uturn_proto::{Class, Method};

/// The record that used to abort the server: a handshake record (0x16) of 16 bytes whose
/// handshake header claims a message of type 0xff and 16 MiB.
const CRASH_RECORD: [u8; 21] = [
    0x16, 0x03, 0x01, 0x00, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff,
];

/// The first flight of a real rustls client (its ClientHello record) for `localhost`.
fn client_hello(cert: &TestCertificate) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let mut client =
        rustls::ClientConnection::new(Arc::clone(&cert.client_config), name).expect("client");
    let mut out = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut out).expect("write ClientHello");
    }
    assert_eq!(out[0], 0x16, "a handshake record");
    out
}

/// Bytes that look random but are the same on every run (xorshift), starting with `first`.
fn noise(first: u8, len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = vec![first];
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The malformed inputs, named: each is sent whole and again one byte per write.
fn hostile_inputs(cert: &TestCertificate) -> Vec<(&'static str, Vec<u8>)> {
    let hello = client_hello(cert);
    let mut garbage_after_header = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    garbage_after_header.extend(noise(0xa5, 64, 7));
    let mut oversized = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    oversized.extend(noise(0x01, 200, 11));
    let mut hello_then_garbage = hello.clone();
    hello_then_garbage.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]);
    vec![
        ("the 21-byte record", CRASH_RECORD.to_vec()),
        ("a truncated record header", vec![0x16, 0x03]),
        ("a record longer than TLS allows", oversized),
        ("garbage after a valid header", garbage_after_header),
        (
            "a fatal alert record (handshake_failure)",
            vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
        ),
        (
            "a ClientHello cut in half",
            hello[..hello.len() / 2].to_vec(),
        ),
        (
            "a ClientHello followed by an application-data record",
            hello_then_garbage,
        ),
        (
            "an empty handshake record",
            vec![0x16, 0x03, 0x03, 0x00, 0x00],
        ),
        ("random bytes after 0x16", noise(0x16, 1500, 0x9e37_79b9)),
        ("random bytes", noise(0x3c, 1500, 0x1234_5678)),
    ]
}

/// Sends `bytes` on a new connection to `addr` (whole, or one byte per write), then ends its
/// side; returns what the server answered before it closed. `None` if it did not close in time.
fn send_hostile(addr: SocketAddr, bytes: &[u8], one_byte_per_write: bool) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT).expect("connect");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let chunk = if one_byte_per_write { 1 } else { bytes.len() };
    for piece in bytes.chunks(chunk.max(1)) {
        // The server may close in the middle (it refused what came so far): stop writing then.
        if stream.write_all(piece).is_err() {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("read timeout");
    let mut answer = Vec::new();
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return Some(answer),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            // A reset is a close too.
            Err(_) => return Some(answer),
        }
    }
    None
}

/// A client with an allocation and a channel to `peer`, checked to relay once.
fn relaying_client(mut client: TurnClient, peer: &EchoPeer, channel: u16) -> TurnClient {
    client.allocate(&[]).expect("allocate");
    client.create_permission(&[peer.addr]).expect("permission");
    client
        .channel_bind(channel, peer.addr)
        .expect("channel bind");
    assert_relays(&mut client, channel, b"before");
    client
}

fn assert_relays(client: &mut TurnClient, channel: u16, payload: &[u8]) {
    client.send_channel_data(channel, payload);
    assert_eq!(
        client.recv_relayed(ANSWER_TIMEOUT),
        Some(Relayed::ChannelData {
            channel,
            payload: payload.to_vec()
        }),
        "the allocation on channel {channel:#x} relays {payload:?}"
    );
}

uturn_e2e::on_both_backends!(
    malformed_tls_records_close_only_their_connection_and_every_allocation_goes_on
);

/// RFC 8446 §5.1 / §6.2: a record the server cannot parse is a fatal error of that connection
/// (the server may answer with an alert and closes). It must not cost any other connection or
/// allocation: UDP, TCP and TLS allocations made before keep relaying (RFC 8656 §3.1: over a
/// stream, the allocation lives exactly as long as its connection), and a new TLS handshake
/// (ALPN `stun.turn`, RFC 7443) completes afterwards.
fn malformed_tls_records_close_only_their_connection_and_every_allocation_goes_on(backend: &str) {
    let cert = TestCertificate::generate();
    let server = start_with_tls_listeners(backend, &cert);
    let peer = EchoPeer::start(false);
    let (user, password) = ("alice", "wonderland");
    let mut udp = relaying_client(
        TurnClient::new(server.listener(false), user, password),
        &peer,
        0x4001,
    );
    let mut tcp = relaying_client(
        TurnClient::new_tcp(server.stream_listener("tcp", false), user, password),
        &peer,
        0x4002,
    );
    let mut tls = relaying_client(
        TurnClient::new_tls(
            server.stream_listener("tls", false),
            user,
            password,
            Arc::clone(&cert.client_config),
        ),
        &peer,
        0x4003,
    );

    let inputs = hostile_inputs(&cert);
    let mut sent = 0u32;
    for kind in ["tls", "auto"] {
        let addr = server.stream_listener(kind, false);
        for (name, bytes) in &inputs {
            for one_byte_per_write in [false, true] {
                let answer = send_hostile(addr, bytes, one_byte_per_write).unwrap_or_else(|| {
                    panic!(
                        "{kind}://, {name} (bytewise: {one_byte_per_write}): the server did \
                         not close the connection; its log:\n{}",
                        server.log()
                    )
                });
                sent += 1;
                if *name == "the 21-byte record" {
                    // The answer names the error: alert (21), fatal (2), decode_error (50).
                    assert_eq!(
                        answer.get(..7),
                        Some(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50][..]),
                        "{kind}://: {answer:?}"
                    );
                }
                // After every input the allocations of the same shard still relay.
                assert_relays(&mut udp, 0x4001, name.as_bytes());
            }
        }
    }
    assert_eq!(sent, 2 * 2 * inputs.len() as u32);
    assert_relays(&mut udp, 0x4001, b"after udp");
    assert_relays(&mut tcp, 0x4002, b"after tcp");
    assert_relays(&mut tls, 0x4003, b"after tls");
    // New handshakes complete, on both TLS listeners.
    for kind in ["tls", "auto"] {
        let mut fresh = TurnClient::new_tls(
            server.stream_listener(kind, false),
            user,
            password,
            Arc::clone(&cert.client_config),
        );
        let response = fresh.request(Method::BINDING, &[]);
        assert_eq!(
            response.message().class(),
            Class::SuccessResponse,
            "{kind}://"
        );
    }
    // Nothing was caught by the panic containment: the inputs were refused, not survived.
    let metrics = server.metrics();
    assert!(
        metrics
            .iter()
            .any(|(series, _)| series.starts_with("uturn_connection_panics_total{")),
        "the panic counter is exported"
    );
    assert_eq!(
        uturn_e2e::metric_sum(&metrics, "uturn_connection_panics_total", &[]),
        0.0,
        "no connection panicked"
    );
    assert!(
        !server.log().contains("panicked"),
        "no panic in the log:\n{}",
        server.log()
    );
}
