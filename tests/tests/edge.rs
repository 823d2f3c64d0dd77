//! The operator's edge of the stream listeners, end to end with the real `uturn` binary on
//! 127.0.0.1: PROXY protocol headers from a trusted load balancer (their client address is the
//! one XOR-MAPPED-ADDRESS and the allocations API show; from anyone else a header closes the
//! connection), and one `auto://` port shared with a web service (a TLS ClientHello offering
//! ALPN h2 is passed through, bytes unchanged both ways, to a plain TCP echo backend the test
//! runs, while TURN/TLS clients allocate through the same port). Both data-plane backends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use uturn_e2e::{ANSWER_TIMEOUT, TestCertificate, TurnClient, Uturn, standard_args};

const BACKENDS: [&str; 2] = ["mmsg", "uring"];

fn start(backend: &str, extra: &[&str]) -> Uturn {
    let mut args = standard_args(backend, 1);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Uturn::start(&refs)
}

/// A PROXY protocol v2 header (PROXY command, TCP over IPv4) naming `client` → `server`.
fn proxy_v2(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(s)) = (client, server) else {
        panic!("IPv4 only in this helper");
    };
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x11, 0, 12]);
    out.extend_from_slice(&c.ip().octets());
    out.extend_from_slice(&s.ip().octets());
    out.extend_from_slice(&c.port().to_be_bytes());
    out.extend_from_slice(&s.port().to_be_bytes());
    out
}

/// haproxy's proxy-protocol.txt §2.2: "the receiver must [use] the source address … as the
/// client's". A trusted balancer's header makes 192.0.2.7:40000 the client: XOR-MAPPED-ADDRESS
/// (RFC 8489 §14.2) and the allocations API carry it, not the balancer's 127.0.0.1.
#[test]
fn a_proxy_v2_header_from_a_trusted_source_becomes_the_client_address() {
    for backend in BACKENDS {
        let server = start(
            backend,
            &[
                "--listen",
                "tcp://127.0.0.1:0",
                "--proxy-protocol-from",
                "127.0.0.1/32",
            ],
        );
        let listener = server.stream_listener("tcp", false);
        let mut client = TurnClient::new_tcp(listener, "alice", "wonderland");
        let claimed: SocketAddr = "192.0.2.7:40000".parse().expect("literal");
        client.send_in_pieces(&proxy_v2(claimed, listener), 5);
        let allocation = client.allocate(&[]).expect("allocate behind the balancer");
        assert_eq!(allocation.mapped, claimed, "{backend}: XOR-MAPPED-ADDRESS");
        let (status, body) = server.http("GET", "/api/v1/allocations", None);
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("192.0.2.7:40000"),
            "{backend}: the API shows the carried client address: {body}"
        );
        assert_eq!(
            server.wait_metric(
                "uturn_proxy_headers_total",
                &[("outcome", "accepted")],
                1.0,
                ANSWER_TIMEOUT
            ),
            1.0,
            "{backend}"
        );
        // The balancer itself must send a header: a connection without one is closed.
        let bare = TurnClient::new_tcp(listener, "alice", "wonderland");
        bare.send_in_pieces(b"\x00\x01\x00\x00\x21\x12\xa4\x42abcdefghijkl", 64);
        assert!(
            bare.wait_closed(ANSWER_TIMEOUT),
            "{backend}: a trusted peer's connection without a PROXY header is closed"
        );
        drop(bare);
        client
            .refresh(0)
            .expect("the allocation behind the balancer is released");
    }
}

/// A PROXY header lets its sender claim any address, so only configured peers may send one:
/// from 127.0.0.1 when only 10.0.0.0/8 is trusted (and when nothing is), v1 and v2 headers
/// close the connection, and the refusal is counted.
#[test]
fn a_proxy_header_from_an_untrusted_source_closes_the_connection() {
    for backend in BACKENDS {
        for trusted in [&["--proxy-protocol-from", "10.0.0.0/8"][..], &[]] {
            let mut extra = vec!["--listen", "tcp://127.0.0.1:0"];
            extra.extend_from_slice(trusted);
            let server = start(backend, &extra);
            let listener = server.stream_listener("tcp", false);
            let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 3478\r\n".to_vec();
            let v2 = proxy_v2("192.0.2.7:40000".parse().expect("literal"), listener);
            for header in [v1, v2] {
                let client = TurnClient::new_tcp(listener, "alice", "wonderland");
                client.send_in_pieces(&header, 64);
                assert!(
                    client.wait_closed(ANSWER_TIMEOUT),
                    "{backend} {trusted:?}: closed on an untrusted PROXY header"
                );
            }
            let refused = server.wait_metric(
                "uturn_proxy_headers_total",
                &[("outcome", "refused")],
                2.0,
                ANSWER_TIMEOUT,
            );
            assert_eq!(refused, 2.0, "{backend} {trusted:?}");
            // An ordinary TURN client on the same listener is served.
            let mut turn = TurnClient::new_tcp(listener, "alice", "wonderland");
            turn.allocate(&[]).expect("plain TURN still works");
        }
    }
}

/// The raw ClientHello rustls sends with `alpn` (the first flight), for a server name.
fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("meet.example.com").expect("name");
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// A TCP echo server standing in for the web service; ends after `connections` connections.
fn echo_backend(connections: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo backend");
    let addr = listener.local_addr().expect("echo address");
    let thread = std::thread::spawn(move || {
        for _ in 0..connections {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
            let mut buf = [0u8; 4096];
            // Bounded: the test sends a few kilobytes and then closes its side.
            for _ in 0..1000 {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    });
    (addr, thread)
}

/// Reads exactly `len` bytes or fails the test.
fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    stream
        .read_exact(&mut got)
        .expect("the echoed bytes come back");
    got
}

/// One public 443: a browser's ClientHello (ALPN h2, http/1.1) on the `auto://` port goes to
/// the web service unchanged, after a PROXY v2 header naming the browser's address, and the
/// web service's bytes come back unchanged; through the same port a TURN/TLS client offering
/// ALPN `stun.turn` (RFC 7443) and one offering no ALPN (libwebrtc's TURN/TLS) allocate.
#[test]
fn a_tls_client_hello_with_alpn_h2_is_passed_through_to_the_web_service() {
    let cert = TestCertificate::generate();
    for backend in BACKENDS {
        let (web, echo) = echo_backend(1);
        let web_text = web.to_string();
        let server = start(
            backend,
            &[
                "--listen",
                "auto://127.0.0.1:0",
                "--tls-cert",
                cert.cert_path.to_str().expect("UTF-8 path"),
                "--tls-key",
                cert.key_path.to_str().expect("UTF-8 path"),
                "--forward-other-to",
                &web_text,
                "--forward-proxy-protocol",
            ],
        );
        let port = server.stream_listener("auto", false);

        let mut browser = TcpStream::connect_timeout(&port, ANSWER_TIMEOUT).expect("connect");
        browser
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .expect("timeout");
        browser.set_nodelay(true).expect("TCP_NODELAY");
        let hello = client_hello(&[b"h2", b"http/1.1"]);
        // The hello in two segments: uturn waits for the whole record before it decides.
        let (head, tail) = hello.split_at(hello.len() / 2);
        browser.write_all(head).expect("send");
        browser.write_all(tail).expect("send");
        let after: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        browser
            .write_all(&after)
            .expect("send what follows the hello");
        let header = proxy_v2(browser.local_addr().expect("address"), port);
        let echoed = read_exactly(&mut browser, header.len() + hello.len() + after.len());
        assert_eq!(
            &echoed[..header.len()],
            &header[..],
            "{backend}: PROXY v2 first"
        );
        assert_eq!(
            &echoed[header.len()..header.len() + hello.len()],
            &hello[..],
            "{backend}: the ClientHello unchanged"
        );
        assert_eq!(
            &echoed[header.len() + hello.len()..],
            &after[..],
            "{backend}: then every byte after it"
        );

        // TURN on the same port, with ALPN stun.turn and with none at all.
        let mut turn =
            TurnClient::new_tls(port, "alice", "wonderland", Arc::clone(&cert.client_config));
        turn.allocate(&[]).expect("TURN/TLS with ALPN stun.turn");
        let mut no_alpn = (*cert.client_config).clone();
        no_alpn.alpn_protocols.clear();
        let mut webrtc = TurnClient::new_tls(port, "alice", "wonderland", Arc::new(no_alpn));
        webrtc.allocate(&[]).expect("TURN/TLS without ALPN");

        drop(browser);
        echo.join().expect("echo backend");
        assert_eq!(
            server.wait_metric(
                "uturn_forwarded_connections_total",
                &[],
                1.0,
                ANSWER_TIMEOUT
            ),
            1.0,
            "{backend}"
        );
        let to_backend = server.metric_sum(
            "uturn_forwarded_bytes_total",
            &[("direction", "to_backend")],
        );
        assert!(
            to_backend >= (header.len() + hello.len()) as f64,
            "{backend}: counted bytes to the web service: {to_backend}"
        );
    }
}

/// The shared port waits for a whole first TLS record before it decides, but not for ever: a
/// connection that sends half a ClientHello and stops is closed after the hello timeout (5 s,
/// checked on the counters tick), so peeking cannot be used to hold connections open.
#[test]
fn a_client_hello_that_never_completes_is_closed_after_the_hello_timeout() {
    let cert = TestCertificate::generate();
    let server = start(
        "mmsg",
        &[
            "--listen",
            "auto://127.0.0.1:0",
            "--tls-cert",
            cert.cert_path.to_str().expect("UTF-8 path"),
            "--tls-key",
            cert.key_path.to_str().expect("UTF-8 path"),
            "--forward-other-to",
            "127.0.0.1:9",
        ],
    );
    let port = server.stream_listener("auto", false);
    let mut stalled = TcpStream::connect_timeout(&port, ANSWER_TIMEOUT).expect("connect");
    let hello = client_hello(&[b"h2"]);
    stalled
        .write_all(&hello[..hello.len() / 2])
        .expect("half a hello");
    // Bounded: the timeout is 5 s and the sweep runs every second; 20 s is far beyond both.
    stalled
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let sent_at = std::time::Instant::now();
    let read = stalled.read(&mut byte);
    eprintln!("closed {:?} after half a hello", sent_at.elapsed());
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "closed by uturn, not by the read timeout: {read:?}"
    );
    assert_eq!(
        server.metric_sum("uturn_forwarded_connections_total", &[]),
        0.0,
        "nothing was passed through"
    );
}
