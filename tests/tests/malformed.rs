//! Issue 8: the malformed-input table on every path of the real binary: the UDP listener, a
//! relay socket, plain TCP, TLS and the `auto` port. Each input is dropped (and counted by
//! reason) or answered 400; a stream that sends garbage is disconnected; the server never
//! panics and keeps serving on every path afterwards.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use uturn_e2e::{ANSWER_TIMEOUT, TestCertificate, TurnClient, start_with_tls_listeners};
use uturn_proto::{Class, Method};

/// Datagrams and stream prefixes that are not valid TURN.
const GARBAGE: [&[u8]; 9] = [
    b"",
    &[0x00],
    // A STUN header whose length runs past the datagram.
    &[0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42],
    // ChannelData whose length runs past the datagram.
    &[0x40, 0x00, 0xFF, 0xFF, 1, 2],
    &[0xFF; 100],
    // A success response (clients do not send those).
    &[
        0x01, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ],
    // A STUN request with the wrong magic cookie.
    &[
        0x00, 0x01, 0x00, 0x00, 0xDE, 0xAD, 0xBE, 0xEF, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ],
    // A Send indication without XOR-PEER-ADDRESS or DATA.
    &[
        0x00, 0x16, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ],
    // An attribute whose length runs past the message.
    &[
        0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        0x00, 0x06, 0x00, 0xFF, b'a', b'b', b'c', b'd',
    ],
];

/// Writes `bytes` on a new connection to `addr` and reports whether the server closed it.
fn stream_is_closed_after(addr: SocketAddr, bytes: &[u8]) -> bool {
    let mut stream = TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT).expect("connect");
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("timeout");
    // A whole bad frame, or garbage followed by enough bytes to make the framer decide.
    let _ = stream.write_all(bytes);
    let _ = stream.write_all(&[0xFF; 64]);
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // A read timeout: the server left the connection open.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
            // A TLS alert or similar: keep reading until the close.
            Ok(_) => {}
        }
    }
}

#[test]
fn malformed_input_on_every_path_is_dropped_counted_or_disconnected_and_the_server_keeps_serving() {
    let cert = TestCertificate::generate();
    let server = start_with_tls_listeners("mmsg", &cert);

    // UDP listener: without and with an allocation on the 5-tuple.
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    for g in GARBAGE {
        client.send_raw(g);
    }
    let allocation = client.allocate(&[]).expect("allocate after garbage");
    for g in GARBAGE {
        client.send_raw(g);
    }
    // Relay socket: garbage from a peer without a permission is dropped, never relayed.
    let stranger = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for g in GARBAGE {
        let _ = stranger.send_to(g, allocation.relayed[0]);
    }
    assert!(
        client.recv_relayed(Duration::from_millis(300)).is_none(),
        "nothing from a peer without permission reaches the client"
    );

    // Streams: plain TCP, TLS and auto close the connection on garbage.
    for kind in ["tcp", "tls", "auto"] {
        let addr = server.stream_listener(kind, false);
        for g in GARBAGE.iter().filter(|g| !g.is_empty()) {
            assert!(stream_is_closed_after(addr, g), "{kind}: {g:?} left open");
        }
    }

    // Still serving on every path.
    let response = client.request(Method::BINDING, &[]);
    assert_eq!(response.message().class(), Class::SuccessResponse);
    let mut tcp = TurnClient::new_tcp(server.stream_listener("tcp", false), "alice", "wonderland");
    assert_eq!(
        tcp.request(Method::BINDING, &[]).message().class(),
        Class::SuccessResponse
    );
    let mut tls = TurnClient::new_tls(
        server.stream_listener("tls", false),
        "alice",
        "wonderland",
        cert.client_config.clone(),
    );
    assert_eq!(
        tls.request(Method::BINDING, &[]).message().class(),
        Class::SuccessResponse
    );

    // Counted by reason.
    let malformed = server.wait_metric(
        "uturn_dropped_packets_total",
        &[("reason", "malformed")],
        f64::MAX,
        Duration::from_secs(1),
    );
    assert!(malformed >= 10.0, "malformed drops counted: {malformed}");
    let unpermitted = server.metric_sum(
        "uturn_dropped_packets_total",
        &[("reason", "no_permission")],
    );
    assert!(
        unpermitted >= 8.0,
        "relay-path drops counted: {unpermitted}"
    );
    assert!(
        server.terminate().is_some_and(|s| s.success()),
        "clean exit, no panic"
    );
}
