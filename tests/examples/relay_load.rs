//! Relayed packets per second, client→peer, over UDP, TCP and TLS, through one uturn shard.
//!
//! ```sh
//! cargo build --release -p uturn-control --bin uturn
//! UTURN_BIN=target/release/uturn cargo run --release -p uturn-e2e --example relay_load -- \
//!     [SECONDS] [CLIENTS] [PAYLOAD_BYTES] [uring|mmsg]
//! ```
//!
//! For each transport, CLIENTS clients allocate, bind a channel to one UDP sink peer and send
//! ChannelData (one frame per `send`/`write` call) as fast as they can for SECONDS; the sink
//! counts what arrives. The figure is datagrams received by the sink per second, i.e. packets
//! the server relayed (UDP clients may lose some in socket buffers; stream clients are paced by
//! TCP flow control). Everything runs on loopback, server and load on the same machine.
#![allow(clippy::print_stdout, unreachable_pub)]

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uturn_e2e::{TestCertificate, TurnClient, Uturn, standard_args};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let clients: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let payload_len: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
    let backend = args.get(4).cloned().unwrap_or_else(|| "uring".to_owned());
    let cert = TestCertificate::generate();
    let mut server_args = standard_args(&backend, 1);
    for extra in [
        "--listen",
        "tls://127.0.0.1:0",
        "--tls-cert",
        cert.cert_path.to_str().expect("UTF-8 path"),
        "--tls-key",
        cert.key_path.to_str().expect("UTF-8 path"),
    ] {
        server_args.push(extra.to_owned());
    }
    let refs: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let server = Uturn::start(&refs);
    println!(
        "backend={backend} shards=1 clients={clients} payload={payload_len} B seconds={seconds}"
    );
    for transport in ["udp", "tcp", "tls"] {
        let sink = UdpSocket::bind("127.0.0.1:0").expect("bind sink");
        sink.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let sink_addr = sink.local_addr().expect("sink address");
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let counter = {
            let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if sink.recv_from(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let mut senders = Vec::new();
        for _ in 0..clients {
            let mut client = match transport {
                "udp" => TurnClient::new(server.listener(false), "alice", "wonderland"),
                "tcp" => {
                    TurnClient::new_tcp(server.stream_listener("tcp", false), "alice", "wonderland")
                }
                _ => TurnClient::new_tls(
                    server.stream_listener("tls", false),
                    "alice",
                    "wonderland",
                    Arc::clone(&cert.client_config),
                ),
            };
            client.allocate(&[]).expect("allocate");
            client.create_permission(&[sink_addr]).expect("permission");
            client
                .channel_bind(0x4000, sink_addr)
                .expect("channel bind");
            let stop = Arc::clone(&stop);
            senders.push(std::thread::spawn(move || {
                let frame = client.channel_data(0x4000, &vec![0x5A; payload_len]);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        client.send_raw(&frame);
                    }
                    sent += 64;
                }
                sent
            }));
        }
        let start = Instant::now();
        let before = received.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(seconds));
        let relayed = received.load(Ordering::Relaxed) - before;
        let elapsed = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let sent: u64 = senders
            .into_iter()
            .map(|s| s.join().expect("sender thread"))
            .sum();
        let _ = counter.join();
        println!(
            "{transport:<3} relayed {:>10.0} packets/s (sent {sent} frames in total)",
            relayed as f64 / elapsed
        );
    }
}
