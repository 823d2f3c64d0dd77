//! The XDP fast path seen from the control thread (`relay.xdp`): attach the program at start,
//! mirror the engine's table changes into its maps, and read its counters back.
//!
//! The program relays a UDP client's ChannelData in the driver once its channel is in the
//! maps (see `uturn_xdp`). A channel is there exactly while the engine has it bound *and*
//! a permission for its peer's IP stands, the same two facts the shards check; every
//! `TableChange` that ends either (unbind, expiry, permission removal, a reload that revokes
//! the peer, deletion, drain's end) takes it out before the next packet. Everything runs on
//! the control thread, between two engine inputs, never on the packet path.
//!
//! Channels the program cannot serve stay on the shards' path only: TCP/TLS clients, a
//! wildcard listener (the program needs the concrete address the client sends to), a peer
//! of a family the allocation has no relayed address of, or full maps.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use hashbrown::HashMap;
use tracing::{info, warn};
use uturn_dataplane::AllocationCounters;
use uturn_xdp::{AttachMode, Channel, ChannelCounters, Limits, ReasonCounters, Router, XdpError};

use crate::config::XdpMode;
use crate::engine::TableChange;
use crate::{AllocationId, Transport};

/// What the mirror needs of the program's maps: [`Router`] in uturn, a recording fake in the
/// tests below.
pub trait ChannelMaps {
    /// See [`Router::insert_channel`].
    fn insert_channel(&mut self, channel: &Channel) -> Result<(), XdpError>;
    /// See [`Router::remove_channel`].
    fn remove_channel(&mut self, channel: &Channel) -> Result<(), XdpError>;
    /// See [`Router::channel_counters`].
    fn channel_counters(&self, slot: u32) -> Result<ChannelCounters, XdpError>;
    /// See [`Router::reason_counters`].
    fn reason_counters(&self) -> Result<ReasonCounters, XdpError>;
}

impl ChannelMaps for Router {
    fn insert_channel(&mut self, channel: &Channel) -> Result<(), XdpError> {
        Self::insert_channel(self, channel)
    }
    fn remove_channel(&mut self, channel: &Channel) -> Result<(), XdpError> {
        Self::remove_channel(self, channel)
    }
    fn channel_counters(&self, slot: u32) -> Result<ChannelCounters, XdpError> {
        Self::channel_counters(self, slot)
    }
    fn reason_counters(&self) -> Result<ReasonCounters, XdpError> {
        Self::reason_counters(self)
    }
}

/// The program and the shell's copy of what it was told, per allocation.
#[derive(Debug)]
pub struct XdpMirror<M = Router> {
    router: Option<M>,
    allocations: HashMap<AllocationId, Tracked>,
    /// Allocations removed since the last counter poll, with their final XDP counters.
    ended: Vec<(AllocationId, AllocationCounters)>,
    free_slots: Vec<u32>,
    next_slot: u32,
    slots_max: u32,
    /// Channels left on the slow path because a map or the slot space was full.
    map_failures: u64,
}

#[derive(Debug)]
struct Tracked {
    client: SocketAddr,
    listener: SocketAddr,
    relays: Vec<SocketAddr>,
    permissions: HashSet<IpAddr>,
    channels: Vec<Bound>,
    /// Counters of this allocation's channels that have left the maps.
    retired: AllocationCounters,
}

#[derive(Debug)]
struct Bound {
    channel: u16,
    peer: SocketAddr,
    /// Some while the channel is in the program's maps.
    entry: Option<Channel>,
}

/// One allocation's XDP counters (cumulative) for telemetry; `ended` on its last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpReport {
    /// The allocation.
    pub alloc: AllocationId,
    /// Packets and bytes the program relayed for it since it was opened.
    pub counters: AllocationCounters,
    /// The allocation is gone: this is its final report.
    pub ended: bool,
}

impl<M> Default for XdpMirror<M> {
    fn default() -> Self {
        Self {
            router: None,
            allocations: HashMap::new(),
            ended: Vec::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            slots_max: 0,
            map_failures: 0,
        }
    }
}

impl XdpMirror {
    /// Attaches the program as `mode` says to `interfaces` (or, when empty, to the interfaces
    /// that hold the listeners' IPs) and serves `listeners` (UDP). `Auto` never fails: without
    /// XDP it logs one line saying why and returns a mirror that does nothing. `Native` and
    /// `Generic` fail when they cannot attach.
    /// `bandwidth_cap` is `limits.allocation_bytes_per_sec`: the program does not enforce it,
    /// so with a cap XDP stays off rather than relay past it.
    pub fn start(
        mode: XdpMode,
        interfaces: &[String],
        listeners: &[SocketAddr],
        bandwidth_cap: u32,
    ) -> Result<Self, String> {
        let attach = match mode {
            XdpMode::Off => return Ok(Self::default()),
            XdpMode::Auto | XdpMode::Native => AttachMode::Native,
            XdpMode::Generic => AttachMode::Generic,
        };
        let attached = if bandwidth_cap > 0 {
            Err(
                "limits.allocation_bytes_per_sec is set, and the program does not enforce the \
                 per-allocation bandwidth cap"
                    .to_owned(),
            )
        } else {
            Self::attach(attach, interfaces, listeners)
        };
        match attached {
            Ok((mirror, names, warning)) => {
                info!(
                    interfaces = %names.join(","),
                    mode = ?attach,
                    "XDP fast path attached: UDP ChannelData is relayed in the driver"
                );
                if let Some(warning) = warning {
                    warn!("{warning}");
                }
                Ok(mirror)
            }
            Err(why) if mode == XdpMode::Auto => {
                info!("XDP fast path off (relay.xdp = \"auto\"): {why}");
                Ok(Self::default())
            }
            Err(why) => Err(why),
        }
    }

    fn attach(
        mode: AttachMode,
        interfaces: &[String],
        listeners: &[SocketAddr],
    ) -> Result<(Self, Vec<String>, Option<String>), String> {
        let concrete: Vec<SocketAddr> = listeners
            .iter()
            .copied()
            .filter(|a| !a.ip().is_unspecified())
            .collect();
        if concrete.is_empty() {
            return Err(
                "every UDP listener is a wildcard address; the program needs the \
                        address clients send to (listen on specific addresses)"
                    .into(),
            );
        }
        let names = if interfaces.is_empty() {
            interfaces_of(&concrete)?
        } else {
            interfaces.to_vec()
        };
        let limits = Limits::default();
        let mut router = Router::load(limits).map_err(|e| {
            format!(
                "cannot load the program ({}): {e}",
                capability_hint(&e.to_string())
            )
        })?;
        for name in &names {
            router.attach(name, mode).map_err(|e| {
                format!(
                    "cannot attach to {name} in {mode:?} mode ({}): {e}",
                    capability_hint(&format!("{e:?}"))
                )
            })?;
        }
        router
            .set_listeners(&concrete)
            .map_err(|e| format!("listener map: {e}"))?;
        let off: Vec<&String> = names.iter().filter(|n| !forwarding_on(n)).collect();
        let warning = (!off.is_empty()).then(|| {
            format!(
                "XDP: forwarding is off on {}; the kernel's route lookup from XDP answers only \
                 for forwarding interfaces, so every packet takes the socket path until \
                 net.ipv4.conf.IF.forwarding (and net.ipv6.conf.IF.forwarding) is 1",
                off.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
            )
        });
        let mirror = Self {
            router: Some(router),
            slots_max: limits.slots_max,
            ..Self::default()
        };
        Ok((mirror, names, warning))
    }
}

impl<M: ChannelMaps> XdpMirror<M> {
    /// A mirror over `maps` with `slots_max` counter slots (tests; uturn uses [`Self::start`]).
    pub fn with_maps(maps: M, slots_max: u32) -> Self {
        Self {
            router: Some(maps),
            slots_max,
            ..Self::default()
        }
    }

    /// Whether the program is attached.
    pub fn is_active(&self) -> bool {
        self.router.is_some()
    }

    /// Mirrors one table change the engine sent to a shard.
    pub fn on_table_change(&mut self, change: &TableChange) {
        if self.router.is_none() {
            return;
        }
        match change {
            TableChange::OpenAllocation {
                alloc,
                client,
                relays,
                ..
            } => {
                if client.transport != Transport::Udp || client.server.ip().is_unspecified() {
                    return;
                }
                self.allocations.insert(
                    *alloc,
                    Tracked {
                        client: client.client,
                        listener: client.server,
                        relays: relays.iter().map(|r| r.bound).collect(),
                        permissions: HashSet::new(),
                        channels: Vec::new(),
                        retired: AllocationCounters::default(),
                    },
                );
            }
            TableChange::SetPermission { alloc, peer_ip } => {
                if let Some(t) = self.allocations.get_mut(alloc) {
                    t.permissions.insert(peer_ip.to_canonical());
                    self.sync(*alloc);
                }
            }
            TableChange::RemovePermission { alloc, peer_ip } => {
                if let Some(t) = self.allocations.get_mut(alloc) {
                    t.permissions.remove(&peer_ip.to_canonical());
                    self.sync(*alloc);
                }
            }
            TableChange::BindChannel {
                alloc,
                channel,
                peer,
            } => {
                if let Some(t) = self.allocations.get_mut(alloc) {
                    if !t.channels.iter().any(|b| b.channel == *channel) {
                        t.channels.push(Bound {
                            channel: *channel,
                            peer: *peer,
                            entry: None,
                        });
                    }
                    self.sync(*alloc);
                }
            }
            TableChange::UnbindChannel { alloc, channel } => {
                let Some(mut t) = self.allocations.remove(alloc) else {
                    return;
                };
                if let Some(i) = t.channels.iter().position(|b| b.channel == *channel) {
                    let mut bound = t.channels.swap_remove(i);
                    self.take_out(&mut t.retired, &mut bound);
                }
                self.allocations.insert(*alloc, t);
                // A channel of this allocation left out for want of a slot may fit now.
                self.sync(*alloc);
            }
            TableChange::RemoveAllocation { alloc } => {
                let Some(mut t) = self.allocations.remove(alloc) else {
                    return;
                };
                for bound in &mut t.channels {
                    self.take_out(&mut t.retired, bound);
                }
                self.ended.push((*alloc, t.retired));
                uturn_dataplane::sparse::shrink_map(&mut self.allocations);
            }
        }
    }

    /// Every tracked allocation's cumulative XDP counters, and the final ones of those that
    /// ended since the last call. One map read per channel in the maps.
    pub fn poll_counters(&mut self) -> Vec<XdpReport> {
        let Some(router) = &self.router else {
            return Vec::new();
        };
        let mut out: Vec<XdpReport> = self
            .ended
            .drain(..)
            .map(|(alloc, counters)| XdpReport {
                alloc,
                counters,
                ended: true,
            })
            .collect();
        for (alloc, t) in &self.allocations {
            let mut sum = t.retired;
            for entry in t.channels.iter().filter_map(|b| b.entry.as_ref()) {
                if let Ok(c) = router.channel_counters(entry.slot) {
                    add(&mut sum, c);
                }
            }
            if sum != AllocationCounters::default() {
                out.push(XdpReport {
                    alloc: *alloc,
                    counters: sum,
                    ended: false,
                });
            }
        }
        out
    }

    /// Channels that could not be put in the maps (full maps or no free slot) since start.
    pub fn map_failures(&self) -> u64 {
        self.map_failures
    }

    /// The program's per-reason counters (cumulative), when it is attached.
    pub fn reasons(&self) -> Option<ReasonCounters> {
        self.router.as_ref()?.reason_counters().ok()
    }

    fn count_map_failure(&mut self) {
        self.map_failures += 1;
        // A full map fails every bind after it: log the 1st, 2nd, 4th, 8th... only.
        if self.map_failures.is_power_of_two() {
            warn!(
                failures = self.map_failures,
                "XDP: a channel stays on the socket path (the program's maps or counter slots \
                 are full)"
            );
        }
    }

    /// Puts in or takes out each channel of `alloc` so that the maps hold exactly the channels
    /// that are bound and whose peer IP has a permission.
    fn sync(&mut self, alloc: AllocationId) {
        let Some(mut t) = self.allocations.remove(&alloc) else {
            return;
        };
        for i in 0..t.channels.len() {
            let peer = t.channels[i].peer;
            let wanted = t.permissions.contains(&peer.ip().to_canonical());
            let relayed =
                t.relays.iter().copied().find(|r| {
                    r.ip().to_canonical().is_ipv4() == peer.ip().to_canonical().is_ipv4()
                });
            match (wanted, relayed, t.channels[i].entry.is_some()) {
                (true, Some(relayed), false) => {
                    let Some(slot) = self.slot() else {
                        self.count_map_failure();
                        continue;
                    };
                    let entry = Channel {
                        client: t.client,
                        listener: t.listener,
                        channel: t.channels[i].channel,
                        relayed,
                        peer,
                        slot,
                    };
                    let inserted = self
                        .router
                        .as_mut()
                        .is_some_and(|r| r.insert_channel(&entry).is_ok());
                    if inserted {
                        t.channels[i].entry = Some(entry);
                    } else {
                        // Half inserted at worst: take out whatever went in.
                        if let Some(r) = self.router.as_mut() {
                            let _ = r.remove_channel(&entry);
                        }
                        self.free_slots.push(slot);
                        self.count_map_failure();
                    }
                }
                (false, _, true) => {
                    let mut bound = Bound {
                        channel: t.channels[i].channel,
                        peer,
                        entry: t.channels[i].entry.take(),
                    };
                    self.take_out(&mut t.retired, &mut bound);
                }
                _ => {}
            }
        }
        self.allocations.insert(alloc, t);
    }

    /// Removes a channel from the maps, keeping its final counters and freeing its slot.
    fn take_out(&mut self, retired: &mut AllocationCounters, bound: &mut Bound) {
        let (Some(entry), Some(router)) = (bound.entry.take(), self.router.as_mut()) else {
            return;
        };
        if let Err(e) = router.remove_channel(&entry) {
            // The slot stays taken: the entry may still be there and counting into it.
            warn!(error = %e, channel = entry.channel, "XDP: could not remove a channel");
            return;
        }
        if let Ok(c) = router.channel_counters(entry.slot) {
            add(retired, c);
        }
        self.free_slots.push(entry.slot);
    }

    fn slot(&mut self) -> Option<u32> {
        if let Some(slot) = self.free_slots.pop() {
            return Some(slot);
        }
        if self.next_slot < self.slots_max {
            self.next_slot += 1;
            return Some(self.next_slot - 1);
        }
        None
    }
}

fn add(sum: &mut AllocationCounters, c: ChannelCounters) {
    sum.to_peer_packets += c.to_peer_packets;
    sum.to_peer_bytes += c.to_peer_bytes;
    sum.to_client_packets += c.to_client_packets;
    sum.to_client_bytes += c.to_client_bytes;
}

/// The interfaces that hold the listeners' IPs.
fn interfaces_of(listeners: &[SocketAddr]) -> Result<Vec<String>, String> {
    let all = if_addrs::get_if_addrs().map_err(|e| format!("listing interfaces: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    for listener in listeners {
        let ip = listener.ip().to_canonical();
        if let Some(interface) = all.iter().find(|i| i.ip() == ip) {
            if !names.contains(&interface.name) {
                names.push(interface.name.clone());
            }
        }
    }
    names.retain(|n| n != "lo");
    if names.is_empty() {
        return Err("no non-loopback interface holds a listener address \
                    (set relay.xdp_interfaces)"
            .into());
    }
    Ok(names)
}

fn forwarding_on(interface: &str) -> bool {
    ["ipv4", "ipv6"].iter().all(|family| {
        std::fs::read_to_string(format!(
            "/proc/sys/net/{family}/conf/{interface}/forwarding"
        ))
        .is_ok_and(|v| v.trim() == "1")
    })
}

/// A word on the usual cause, from the error text (aya reports errno in its messages).
fn capability_hint(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("operation not permitted") || e.contains("permission denied") {
        "no CAP_BPF/CAP_NET_ADMIN (or CAP_SYS_ADMIN)"
    } else if e.contains("not supported") || e.contains("invalid argument") {
        "the driver or kernel lacks this XDP mode"
    } else if e.contains("busy") || e.contains("exists") {
        "another XDP program is attached to the interface"
    } else if e.contains("unknown") || e.contains("no such device") {
        "no such interface"
    } else {
        "kernel"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BindToken, FiveTuple, RelayAddress};

    /// Records what the mirror put in the "maps"; counters per slot are set by the test.
    #[derive(Debug, Default)]
    struct FakeMaps {
        channels: HashMap<u32, Channel>,
        counters: HashMap<u32, ChannelCounters>,
    }

    impl ChannelMaps for FakeMaps {
        fn insert_channel(&mut self, channel: &Channel) -> Result<(), XdpError> {
            self.counters
                .insert(channel.slot, ChannelCounters::default());
            self.channels.insert(channel.slot, *channel);
            Ok(())
        }
        fn remove_channel(&mut self, channel: &Channel) -> Result<(), XdpError> {
            self.channels.remove(&channel.slot);
            Ok(())
        }
        fn channel_counters(&self, slot: u32) -> Result<ChannelCounters, XdpError> {
            Ok(self.counters.get(&slot).copied().unwrap_or_default())
        }
        fn reason_counters(&self) -> Result<ReasonCounters, XdpError> {
            Ok(ReasonCounters::default())
        }
    }

    const ALLOC: AllocationId = AllocationId(7);

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn mirror_with_allocation(transport: Transport, listener: &str) -> XdpMirror<FakeMaps> {
        let mut mirror = XdpMirror::with_maps(FakeMaps::default(), 2);
        mirror.on_table_change(&TableChange::OpenAllocation {
            alloc: ALLOC,
            token: BindToken(1),
            client: FiveTuple {
                transport,
                client: addr("192.0.2.10:5000"),
                server: addr(listener),
            },
            relays: vec![
                RelayAddress {
                    bound: addr("198.51.100.1:50000"),
                    advertised: addr("198.51.100.1:50000"),
                },
                RelayAddress {
                    bound: addr("[2001:db8::1]:50002"),
                    advertised: addr("[2001:db8::1]:50002"),
                },
            ],
            dont_fragment: false,
        });
        mirror
    }

    fn in_maps(mirror: &XdpMirror<FakeMaps>) -> Vec<Channel> {
        let mut v: Vec<Channel> = mirror
            .router
            .as_ref()
            .map(|m| m.channels.values().copied().collect())
            .unwrap_or_default();
        v.sort_by_key(|c| c.channel);
        v
    }

    /// RFC 8656 §12 and §9: the program relays a channel only while it is bound and its peer's
    /// IP has a permission, the same two facts the shards check.
    #[test]
    fn a_channel_is_in_the_maps_exactly_while_bound_and_permitted() {
        let mut m = mirror_with_allocation(Transport::Udp, "192.0.2.1:3478");
        let peer = addr("203.0.113.5:6000");
        m.on_table_change(&TableChange::BindChannel {
            alloc: ALLOC,
            channel: 0x4000,
            peer,
        });
        assert!(in_maps(&m).is_empty(), "no permission yet");
        m.on_table_change(&TableChange::SetPermission {
            alloc: ALLOC,
            peer_ip: peer.ip(),
        });
        let entries = in_maps(&m);
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].relayed,
            addr("198.51.100.1:50000"),
            "the relayed address of the peer's family"
        );
        assert_eq!(entries[0].listener, addr("192.0.2.1:3478"));
        assert_eq!(entries[0].client, addr("192.0.2.10:5000"));
        // A reload that revokes the peer removes its permission: out at once, back when allowed.
        m.on_table_change(&TableChange::RemovePermission {
            alloc: ALLOC,
            peer_ip: peer.ip(),
        });
        assert!(in_maps(&m).is_empty());
        m.on_table_change(&TableChange::SetPermission {
            alloc: ALLOC,
            peer_ip: peer.ip(),
        });
        assert_eq!(in_maps(&m).len(), 1);
        m.on_table_change(&TableChange::UnbindChannel {
            alloc: ALLOC,
            channel: 0x4000,
        });
        assert!(in_maps(&m).is_empty(), "expiry/unbind");
    }

    #[test]
    fn an_ipv6_peer_uses_the_ipv6_relayed_address() {
        let mut m = mirror_with_allocation(Transport::Udp, "192.0.2.1:3478");
        let peer = addr("[2001:db8:5::9]:6000");
        m.on_table_change(&TableChange::SetPermission {
            alloc: ALLOC,
            peer_ip: peer.ip(),
        });
        m.on_table_change(&TableChange::BindChannel {
            alloc: ALLOC,
            channel: 0x4001,
            peer,
        });
        assert_eq!(in_maps(&m)[0].relayed, addr("[2001:db8::1]:50002"));
    }

    #[test]
    fn stream_clients_and_wildcard_listeners_stay_on_the_socket_path() {
        for (transport, listener) in [
            (Transport::Tcp, "192.0.2.1:3478"),
            (Transport::Udp, "0.0.0.0:3478"),
        ] {
            let mut m = mirror_with_allocation(transport, listener);
            let peer = addr("203.0.113.5:6000");
            m.on_table_change(&TableChange::SetPermission {
                alloc: ALLOC,
                peer_ip: peer.ip(),
            });
            m.on_table_change(&TableChange::BindChannel {
                alloc: ALLOC,
                channel: 0x4000,
                peer,
            });
            assert!(in_maps(&m).is_empty(), "{transport:?} {listener}");
        }
    }

    /// The allocation's XDP counters add up over its channels, keep what removed channels
    /// relayed, and come once more, marked ended, after the allocation goes; its slots are
    /// then free for the next channels.
    #[test]
    fn counters_survive_their_channels_and_slots_are_reused() {
        let mut m = mirror_with_allocation(Transport::Udp, "192.0.2.1:3478");
        let peers = [addr("203.0.113.5:6000"), addr("203.0.113.6:6000")];
        for (i, peer) in peers.iter().enumerate() {
            m.on_table_change(&TableChange::SetPermission {
                alloc: ALLOC,
                peer_ip: peer.ip(),
            });
            let channel = 0x4000 + u16::try_from(i).expect("small");
            m.on_table_change(&TableChange::BindChannel {
                alloc: ALLOC,
                channel,
                peer: *peer,
            });
        }
        let slots: Vec<u32> = in_maps(&m).iter().map(|c| c.slot).collect();
        assert_eq!(slots.len(), 2);
        let maps = m.router.as_mut().expect("maps");
        for slot in &slots {
            maps.counters.insert(
                *slot,
                ChannelCounters {
                    to_peer_packets: 3,
                    to_peer_bytes: 30,
                    to_client_packets: 2,
                    to_client_bytes: 20,
                },
            );
        }
        // No slot left for a third channel: it stays on the socket path, counted.
        let third = addr("203.0.113.7:6000");
        m.on_table_change(&TableChange::SetPermission {
            alloc: ALLOC,
            peer_ip: third.ip(),
        });
        m.on_table_change(&TableChange::BindChannel {
            alloc: ALLOC,
            channel: 0x4002,
            peer: third,
        });
        assert_eq!(in_maps(&m).len(), 2);
        assert_eq!(m.map_failures(), 1);

        m.on_table_change(&TableChange::UnbindChannel {
            alloc: ALLOC,
            channel: 0x4000,
        });
        let channels: Vec<u16> = in_maps(&m).iter().map(|c| c.channel).collect();
        assert_eq!(channels, [0x4001, 0x4002], "the third takes the freed slot");
        let reports = m.poll_counters();
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0].counters.to_peer_packets, 6,
            "the unbound channel's packets stay"
        );
        assert!(!reports[0].ended);

        m.on_table_change(&TableChange::RemoveAllocation { alloc: ALLOC });
        assert!(in_maps(&m).is_empty());
        let reports = m.poll_counters();
        assert_eq!(reports.len(), 1);
        assert!(reports[0].ended);
        assert_eq!(reports[0].counters.to_client_bytes, 40);
        assert!(m.poll_counters().is_empty(), "the final report comes once");
        assert_eq!(m.free_slots.len(), 2);
    }

    #[test]
    fn off_attaches_nothing_and_mirrors_nothing() {
        let mut mirror = XdpMirror::start(XdpMode::Off, &[], &[], 0).expect("off never fails");
        assert!(!mirror.is_active());
        mirror.on_table_change(&TableChange::RemoveAllocation {
            alloc: AllocationId(1),
        });
        assert!(mirror.poll_counters().is_empty());
    }

    #[test]
    fn auto_with_only_wildcard_listeners_runs_without_xdp() {
        let listeners = ["0.0.0.0:3478".parse().unwrap()];
        let mirror = XdpMirror::start(XdpMode::Auto, &[], &listeners, 0).expect("auto never fails");
        assert!(!mirror.is_active());
    }

    #[test]
    fn native_refuses_to_start_without_an_address_to_serve() {
        let listeners = ["[::]:3478".parse().unwrap()];
        let err = XdpMirror::start(XdpMode::Native, &[], &listeners, 0).unwrap_err();
        assert!(err.contains("wildcard"), "{err}");
    }

    #[test]
    fn a_bandwidth_cap_keeps_xdp_off_because_the_program_cannot_enforce_it() {
        let listeners = ["192.0.2.1:3478".parse().unwrap()];
        let mirror = XdpMirror::start(XdpMode::Auto, &[], &listeners, 125_000).expect("auto");
        assert!(!mirror.is_active());
        let err = XdpMirror::start(XdpMode::Generic, &[], &listeners, 125_000).unwrap_err();
        assert!(err.contains("allocation_bytes_per_sec"), "{err}");
    }

    #[test]
    fn the_usual_causes_are_named() {
        assert!(capability_hint("Operation not permitted (os error 1)").contains("CAP_BPF"));
        assert!(capability_hint("Operation not supported (os error 95)").contains("driver"));
    }
}
