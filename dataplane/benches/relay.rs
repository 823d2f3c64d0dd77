//! Relay throughput through one shard on loopback: ChannelData client→peer, in windows of 64
//! datagrams (send a window, receive it), for both backends. Measures the whole path, kernel
//! included, so compare backends with each other rather than with in-memory benchmarks.

use std::hint::black_box;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use uturn_dataplane::{
    AllocationId, BackendChoice, ChannelNumber, ClientTransport, DataPlane, DataPlaneConfig,
    RelaySocket, ShardCommand, ToControl,
};
use uturn_proto::{Class, MessageBuilder, Method, TransactionId};

const WINDOW: usize = 64;

struct Setup {
    plane: DataPlane,
    client: UdpSocket,
    peer: UdpSocket,
    server: SocketAddr,
}

fn setup(backend: BackendChoice) -> Setup {
    let config = DataPlaneConfig {
        listen: vec!["127.0.0.1:0".parse().expect("literal")],
        threads: Some(1),
        backend,
        ..DataPlaneConfig::default()
    };
    let (plane, rx) = DataPlane::start(config).expect("start");
    let server = plane.listener_addrs()[0];
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let peer = UdpSocket::bind("127.0.0.1:0").expect("bind");
    peer.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let n = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::BINDING,
        TransactionId([1; 12]),
    )
    .finish();
    client.send_to(&buf[..n], server).expect("send");
    let (shard, client_addr) = loop {
        if let ToControl::Request { shard, client, .. } =
            rx.recv_timeout(Duration::from_secs(5)).expect("request")
        {
            break (shard, client);
        }
    };
    let relay = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let relay_addr = relay.local_addr().expect("addr");
    let alloc = AllocationId(1);
    let peer_addr = peer.local_addr().expect("addr");
    let commands = [
        ShardCommand::OpenAllocation {
            transport: ClientTransport::Udp,
            alloc,
            client_server: server,
            client: client_addr,
            relays: vec![RelaySocket {
                socket: relay,
                addr: relay_addr,
            }],
            dont_fragment: false,
        },
        ShardCommand::SetPermission {
            alloc,
            peer_ip: peer_addr.ip(),
        },
        ShardCommand::BindChannel {
            alloc,
            channel: ChannelNumber::new(0x4000).expect("valid"),
            peer: peer_addr,
        },
        ShardCommand::Transmit {
            transport: ClientTransport::Udp,
            server,
            to: client_addr,
            bytes: vec![1],
        },
    ];
    for command in commands {
        plane.send(shard, command).expect("send");
    }
    let mut ack = [0u8; 8];
    client.recv_from(&mut ack).expect("barrier");
    Setup {
        plane,
        client,
        peer,
        server,
    }
}

fn relay(c: &mut Criterion) {
    let mut group = c.benchmark_group("channel_data_client_to_peer");
    group.throughput(Throughput::Elements(WINDOW as u64));
    for (name, backend) in [
        ("io_uring", BackendChoice::Uring),
        ("mmsg", BackendChoice::Mmsg),
    ] {
        let s = setup(backend);
        let mut frame = vec![0x40, 0x00, 0x00, 200];
        frame.extend_from_slice(&[0x5A; 200]);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut buf = [0u8; 2048];
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..WINDOW {
                        s.client.send_to(&frame, s.server).expect("send");
                    }
                    for _ in 0..WINDOW {
                        // A lost datagram only costs the read timeout once.
                        if s.peer.recv_from(&mut buf).is_err() {
                            break;
                        }
                    }
                }
                black_box(&buf);
                start.elapsed()
            });
        });
        s.plane.shutdown();
    }
    group.finish();
}

criterion_group!(benches, relay);
criterion_main!(benches);
