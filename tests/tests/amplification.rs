//! Issue 8: a reflected flood against the real binary. Unauthenticated requests from one
//! source beyond its budget get nothing back; bytes out ÷ bytes in is measured (SECURITY.md
//! quotes it).

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use uturn_e2e::{Uturn, standard_args};
use uturn_proto::{Class, MessageBuilder, Method, TransactionId};

fn request(method: Method, n: u32, extra: &[uturn_proto::Attribute<'_>]) -> Vec<u8> {
    let mut tid = [0u8; 12];
    tid[..4].copy_from_slice(&n.to_be_bytes());
    let mut buf = vec![0u8; 128];
    let mut b = MessageBuilder::new(&mut buf, Class::Request, method, TransactionId(tid));
    for attr in extra {
        b.attribute(attr).expect("room");
    }
    let len = b.finish();
    buf.truncate(len);
    buf
}

/// 400 requests in a burst from one source, against a budget of 10 a second (burst 20): at
/// most the burst plus what one second refills comes back, and the metric counts the rest.
#[test]
fn beyond_the_per_source_budget_nothing_goes_out() {
    let mut args: Vec<String> = standard_args("mmsg", 1);
    if let Some(at) = args.iter().position(|a| a == "--unauthenticated-rate") {
        args.drain(at..at + 2);
    }
    let args: Vec<String> = args
        .into_iter()
        .chain(
            [
                "--unauthenticated-rate",
                "10",
                "--counters-interval-ms",
                "50",
            ]
            .map(String::from),
        )
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Uturn::start(&refs);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let transport = uturn_proto::Attribute::RequestedTransport(uturn_proto::Protocol::UDP);
    let (mut bytes_in, mut sent) = (0usize, 0u32);
    let start = Instant::now();
    for n in 0..400u32 {
        // Alternate plain Binding and an Allocate without credentials (answered 401).
        let bytes = if n % 2 == 0 {
            request(Method::BINDING, n, &[])
        } else {
            request(Method::ALLOCATE, n, &[transport])
        };
        socket
            .send_to(&bytes, server.listener(false))
            .expect("send");
        bytes_in += bytes.len();
        sent += 1;
    }
    let (mut answers, mut bytes_out) = (0usize, 0usize);
    let mut buf = [0u8; 2048];
    let quiet_until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < quiet_until {
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            answers += 1;
            bytes_out += n;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let ratio = bytes_out as f64 / bytes_in as f64;
    println!(
        "{sent} requests, {bytes_in} bytes in; {answers} answers, {bytes_out} bytes out; \
         ratio {ratio:.3} over {elapsed:.2} s"
    );
    // Burst 20, plus 10 a second for the time the test took.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let budget = 20 + (10.0 * elapsed).ceil() as usize;
    assert!(
        answers <= budget,
        "{answers} answers for a budget of {budget}"
    );
    assert!(answers >= 20, "the burst is answered");
    let dropped = server.wait_metric(
        "uturn_dropped_packets_total",
        &[("reason", "rate_limited")],
        f64::from(sent) - answers as f64,
        Duration::from_secs(5),
    );
    #[allow(clippy::cast_precision_loss)]
    let expected = f64::from(sent) - answers as f64;
    assert!(
        (dropped - expected).abs() < 0.5,
        "dropped {dropped}, expected {expected}"
    );
}
