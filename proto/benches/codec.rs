//! Packet-path costs of the codec. Run: `cargo bench -p uturn-proto` (figures in README.md).

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use uturn_proto::credentials::long_term_key_md5;
use uturn_proto::{
    Attribute, ChannelData, ChannelNumber, Class, DATA_INDICATION_HEADER_LEN_MAX, Message,
    MessageBuilder, Method, PacketKind, Protocol, TransactionId, classify, parse_send_indication,
    write_channel_data, write_data_indication_header,
};

fn channel_data(c: &mut Criterion) {
    let mut frame = [0u8; 4 + 160];
    write_channel_data(&mut frame, ChannelNumber::MIN, &[0x55; 160], false).unwrap();
    c.bench_function("channel_data/classify+parse (160 B payload)", |b| {
        b.iter(|| {
            let bytes = black_box(&frame[..]);
            match classify(bytes) {
                PacketKind::ChannelData => match ChannelData::parse(bytes) {
                    Ok(cd) => (cd.channel().get(), cd.payload().len()),
                    Err(_) => (0, 0),
                },
                _ => (0, 0),
            }
        })
    });
}

fn authenticated_allocate(c: &mut Criterion) {
    let key = long_term_key_md5("alice", "TANDBERG", "secret").unwrap();
    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::ALLOCATE,
        TransactionId([9; 12]),
    );
    b.attribute(&Attribute::RequestedTransport(Protocol::UDP))
        .unwrap();
    b.attribute(&Attribute::Lifetime(600)).unwrap();
    b.attribute(&Attribute::Username("alice")).unwrap();
    b.attribute(&Attribute::Realm("TANDBERG")).unwrap();
    b.attribute(&Attribute::Nonce("9d1f0c2b8e7a6d5c4b3a2918"))
        .unwrap();
    b.message_integrity(&key).unwrap();
    b.fingerprint().unwrap();
    let len = b.finish();
    let msg = &buf[..len];
    c.bench_function(
        "allocate/parse+fingerprint+verify_integrity (precomputed key)",
        |b| {
            b.iter(|| {
                let m = Message::parse(black_box(msg)).unwrap();
                let user = m.username().unwrap();
                (
                    m.verify_integrity(black_box(&key)).is_ok(),
                    user.map(str::len),
                )
            })
        },
    );
    c.bench_function("allocate/parse only (fingerprint checked)", |b| {
        b.iter(|| Message::parse(black_box(msg)).is_ok())
    });
}

fn data_indication(c: &mut Criterion) {
    let peer: SocketAddr = "198.51.100.20:50000".parse().unwrap();
    let mut out = [0u8; DATA_INDICATION_HEADER_LEN_MAX];
    c.bench_function("data_indication/write header (IPv4 peer)", |b| {
        b.iter(|| {
            write_data_indication_header(
                black_box(&mut out),
                black_box(TransactionId([1; 12])),
                black_box(peer),
                black_box(1200),
            )
        })
    });

    let mut send = [0u8; 256];
    let mut bld = MessageBuilder::new(
        &mut send,
        Class::Indication,
        Method::SEND,
        TransactionId([2; 12]),
    );
    bld.attribute(&Attribute::XorPeerAddress(peer)).unwrap();
    bld.attribute(&Attribute::Data(&[0x55; 160])).unwrap();
    let len = bld.finish();
    c.bench_function("send_indication/parse (160 B payload)", |b| {
        b.iter(|| parse_send_indication(black_box(&send[..len])).map(|s| s.data.len()))
    });
}

criterion_group!(
    benches,
    channel_data,
    authenticated_allocate,
    data_indication
);
criterion_main!(benches);
