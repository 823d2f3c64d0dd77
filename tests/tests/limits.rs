//! Issue 8: the per-allocation bandwidth cap on the real binary. Both directions share one
//! token bucket in the shard; the excess is dropped and counted as `bandwidth`.

use std::time::Duration;

use uturn_e2e::{EchoPeer, Relayed, TempConfig, TurnClient, Uturn, standard_args};

#[test]
fn an_allocation_over_its_bandwidth_cap_loses_the_excess_and_it_is_counted() {
    // 2000 bytes a second, 2000 of burst: twenty 100-byte payloads, counting both directions.
    let config = TempConfig::new("bandwidth", "[limits]\nallocation_bytes_per_sec = 2000\n");
    let mut args = standard_args("mmsg", 1);
    args.extend(["--config", config.path(), "--counters-interval-ms", "50"].map(str::to_owned));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Uturn::start(&refs);
    let peer = EchoPeer::start(false);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).expect("allocate");
    client.channel_bind(0x4000, peer.addr).expect("channel");
    for _ in 0..100 {
        client.send_channel_data(0x4000, &[0xAB; 100]);
    }
    let mut echoed = 0;
    while let Some(Relayed::ChannelData { .. }) = client.recv_relayed(Duration::from_millis(300)) {
        echoed += 1;
    }
    let reached_peer = peer.seen().len();
    // The burst plus what refills while the test runs (well under a second): about twenty
    // 100-byte payloads in total over both directions, never the 100 sent. The sends come
    // first, so they take most of the bucket and few echoes make it back.
    assert!(
        (10..40).contains(&reached_peer),
        "{reached_peer} of 100 reached the peer"
    );
    assert!(
        reached_peer + echoed < 50,
        "{reached_peer} out and {echoed} back exceed the cap"
    );
    let dropped = server.wait_metric(
        "uturn_dropped_packets_total",
        &[("reason", "bandwidth")],
        f64::MAX,
        Duration::from_millis(500),
    );
    assert!(dropped >= 60.0, "bandwidth drops counted: {dropped}");
}
