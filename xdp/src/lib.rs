//! uturn's XDP fast path for UDP ChannelData: the compiled eBPF program (`bpf/turn_router.c`,
//! embedded as [`OBJECT`]) and its loader.
//!
//! The program relays bound channels in the driver, both ways, and passes everything else to
//! the kernel untouched (see the C file's header for the exact rules). This crate loads it,
//! attaches it to interfaces, writes its maps and reads its counters; it keeps no state of
//! its own about channels. The control thread calls it from the same table changes it sends
//! to the shards, never from the packet path.
//!
//! ```text
//! let mut router = Router::load(Limits::default())?;
//! router.attach("eth0", AttachMode::Native)?;
//! router.set_listeners(&[listener])?;
//! router.insert_channel(&Channel { client, listener, channel, relayed, peer, slot })?;
//! let counters = router.channel_counters(slot)?;
//! router.remove_channel(&channel)?;
//! // dropping the router detaches the program from every interface
//! ```
//!
//! The object is committed (built by `scripts/build-xdp.sh`, checked byte for byte by CI), so
//! that building and testing the workspace needs no clang.
//!
//! Attachment uses a BPF link (kernel ≥ 5.9): the kernel detaches the program when the link's
//! file descriptor closes, also when the process is killed, so a crashed uturn leaves no
//! program behind and a restarted one attaches afresh rather than on top of it.
#![forbid(unsafe_code)]

mod maps;

use std::collections::HashSet;
use std::net::SocketAddr;

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues};
use aya::programs::{ProgramError, Xdp, XdpFlags};
use aya::{Ebpf, EbpfError, EbpfLoader};

pub use maps::Reason;
use maps::{
    CHANNEL_KEY_LEN, CHANNEL_STATS_WORDS, CHANNEL_VALUE_LEN, NEXTHOP_WORDS, RELAY_KEY_LEN,
    RELAY_VALUE_LEN,
};

/// The compiled program (`clang -O2 -g -target bpf`, see `scripts/build-xdp.sh`), aligned
/// because the ELF parser reads its headers in place.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/turn_router.o");

const PROGRAM_ROUTER: &str = "uturn_router";
/// `PORTS` bits (`UTURN_PORT_*` in `bpf/turn_router.h`).
const PORT_LISTENER: u8 = 1;
const PORT_RELAY: u8 = 2;
/// The most counter slots [`Limits::slots_max`] may ask for.
pub const SLOTS_MAX: u32 = 1 << 24;
const PROGRAM_PASS: &str = "uturn_pass";

/// Errors of loading, attaching and map updates.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The kernel refused the object (no CAP_BPF, verifier, map creation...).
    #[error("loading the XDP object: {0}")]
    Load(#[from] EbpfError),
    /// Loading or attaching a program failed.
    #[error("XDP program {program} on {interface}: {source}")]
    Program {
        /// The program's name in the object.
        program: &'static str,
        /// The interface it was to attach to ("-" when loading).
        interface: String,
        /// What aya or the kernel said.
        #[source]
        source: ProgramError,
    },
    /// A map read or write failed (full map, missing key is not an error).
    #[error("XDP map {map}: {source}")]
    Map {
        /// The map's name in the object.
        map: &'static str,
        /// What aya or the kernel said.
        #[source]
        source: MapError,
    },
    /// The object lacks a map or program this loader expects (a stale object).
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    /// A counter slot beyond the `CHAN_STATS` array.
    #[error("counter slot {slot} is beyond the {max} slots loaded")]
    SlotOutOfRange {
        /// The slot asked for.
        slot: u32,
        /// The number of slots.
        max: u32,
    },
    /// The number of possible CPUs could not be read.
    #[error("reading the possible CPUs: {0}")]
    Cpus(std::io::Error),
}

/// How to attach: in the driver (`native`) or after the kernel built an skb (`generic`, any
/// interface, slower).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// XDP_FLAGS_DRV_MODE: fails where the driver has no XDP support.
    Native,
    /// XDP_FLAGS_SKB_MODE.
    Generic,
}

impl AttachMode {
    fn flags(self) -> XdpFlags {
        match self {
            Self::Native => XdpFlags::DRV_MODE,
            Self::Generic => XdpFlags::SKB_MODE,
        }
    }
}

/// Map sizes, applied before the object is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Channels (each takes one entry in each direction's hash map).
    pub channels_max: u32,
    /// Per-channel counter slots; slots run from 0 to `slots_max - 1`.
    pub slots_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            channels_max: 65_536,
            slots_max: 65_536,
        }
    }
}

/// One bound channel as the program needs it: the client's 5-tuple (UDP, client, listener),
/// the channel number, the relayed address and the peer, and the counter slot it counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Channel {
    /// The client's address as the listener sees it.
    pub client: SocketAddr,
    /// The TURN listener address the client sends to.
    pub listener: SocketAddr,
    /// The channel number (0x4000-0x4FFF, or up to 0x7FFF when the engine admits RFC 5766's).
    pub channel: u16,
    /// The allocation's relayed transport address (as bound on this host).
    pub relayed: SocketAddr,
    /// The peer the channel is bound to.
    pub peer: SocketAddr,
    /// The index of the channel's counters in `CHAN_STATS`.
    pub slot: u32,
}

/// One channel's counters, summed over CPUs. Bytes are payload bytes (the ChannelData
/// header and any padding excluded), as the shards count them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelCounters {
    /// Datagrams relayed client → peer.
    pub to_peer_packets: u64,
    /// Payload bytes relayed client → peer.
    pub to_peer_bytes: u64,
    /// Datagrams relayed peer → client.
    pub to_client_packets: u64,
    /// Payload bytes relayed peer → client.
    pub to_client_bytes: u64,
}

/// The per-reason counters, summed over CPUs, indexed by [`Reason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReasonCounters([u64; Reason::ALL.len()]);

impl ReasonCounters {
    /// The count for one reason.
    pub fn get(&self, reason: Reason) -> u64 {
        self.0[reason.index()]
    }

    /// Datagrams the program relayed itself (both directions, TX and redirect).
    pub fn forwarded(&self) -> u64 {
        Reason::ALL
            .iter()
            .filter(|r| r.is_forwarded())
            .map(|r| self.get(*r))
            .sum()
    }

    /// Every reason with its count.
    pub fn iter(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL.iter().map(|r| (*r, self.get(*r)))
    }
}

/// The kernel's view of the router program (`bpftool prog show id ID` prints the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    /// The program's id.
    pub id: u32,
    /// Runs counted while `kernel.bpf_stats_enabled` was 1.
    pub run_count: u64,
    /// Their total run time.
    pub run_time: std::time::Duration,
}

/// The loaded program, its maps, and the interfaces it is attached to. Dropping it detaches
/// the program everywhere (aya detaches every link of a program when the program is dropped).
pub struct Router {
    ebpf: Ebpf,
    ports: Array<MapData, u8>,
    channels: HashMap<MapData, [u8; CHANNEL_KEY_LEN], [u8; CHANNEL_VALUE_LEN]>,
    relays: HashMap<MapData, [u8; RELAY_KEY_LEN], [u8; RELAY_VALUE_LEN]>,
    stats: PerCpuArray<MapData, [u64; CHANNEL_STATS_WORDS]>,
    nexthops: PerCpuArray<MapData, [u64; NEXTHOP_WORDS]>,
    reasons: PerCpuArray<MapData, u64>,
    listener_ports: HashSet<u16>,
    attached: Vec<(String, AttachMode)>,
    cpus: usize,
    slots_max: u32,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("attached", &self.attached)
            .field("listener_ports", &self.listener_ports)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Loads the embedded object with the given map sizes and verifies the router program.
    /// Needs CAP_BPF (or CAP_SYS_ADMIN); attaching needs CAP_NET_ADMIN.
    pub fn load(limits: Limits) -> Result<Self, XdpError> {
        // Two next-hop entries per slot are indexed as 2 * slot + direction in a u32.
        if limits.slots_max > SLOTS_MAX {
            return Err(XdpError::SlotOutOfRange {
                slot: limits.slots_max,
                max: SLOTS_MAX,
            });
        }
        let mut ebpf = EbpfLoader::new()
            .set_max_entries("CHANNELS", limits.channels_max)
            .set_max_entries("RELAYS", limits.channels_max)
            .set_max_entries("CHAN_STATS", limits.slots_max)
            .set_max_entries("NEXTHOPS", limits.slots_max.saturating_mul(2))
            .load(OBJECT)?;
        let router = xdp_program(&mut ebpf, PROGRAM_ROUTER)?;
        router.load().map_err(|source| XdpError::Program {
            program: PROGRAM_ROUTER,
            interface: "-".into(),
            source,
        })?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| XdpError::Cpus(e))?;
        Ok(Self {
            ports: take_map(&mut ebpf, "PORTS", Array::try_from)?,
            channels: take_map(&mut ebpf, "CHANNELS", HashMap::try_from)?,
            relays: take_map(&mut ebpf, "RELAYS", HashMap::try_from)?,
            stats: take_map(&mut ebpf, "CHAN_STATS", PerCpuArray::try_from)?,
            nexthops: take_map(&mut ebpf, "NEXTHOPS", PerCpuArray::try_from)?,
            reasons: take_map(&mut ebpf, "REASONS", PerCpuArray::try_from)?,
            ebpf,
            listener_ports: HashSet::new(),
            attached: Vec::new(),
            cpus,
            slots_max: limits.slots_max,
        })
    }

    /// Attaches the router to `interface`. Attaching to an interface twice is refused by the
    /// kernel (EBUSY), never stacked.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<(), XdpError> {
        let program = xdp_program(&mut self.ebpf, PROGRAM_ROUTER)?;
        program
            .attach(interface, mode.flags())
            .map_err(|source| XdpError::Program {
                program: PROGRAM_ROUTER,
                interface: interface.into(),
                source,
            })?;
        self.attached.push((interface.into(), mode));
        Ok(())
    }

    /// The interfaces the router is attached to, with their mode.
    pub fn attached(&self) -> &[(String, AttachMode)] {
        &self.attached
    }

    /// Makes `addrs` the set of TURN UDP listener addresses: their ports are the ones the
    /// program looks at for ChannelData (the channel key then matches the whole address).
    pub fn set_listeners(&mut self, addrs: &[SocketAddr]) -> Result<(), XdpError> {
        let wanted: HashSet<u16> = addrs.iter().map(SocketAddr::port).collect();
        let old: Vec<u16> = self.listener_ports.difference(&wanted).copied().collect();
        for port in old {
            self.set_port_flags(port, PORT_LISTENER, false)?;
        }
        let new: Vec<u16> = wanted.difference(&self.listener_ports).copied().collect();
        for port in new {
            self.set_port_flags(port, PORT_LISTENER, true)?;
        }
        self.listener_ports = wanted;
        Ok(())
    }

    fn set_port_flags(&mut self, port: u16, flag: u8, on: bool) -> Result<(), XdpError> {
        let error = |source| XdpError::Map {
            map: "PORTS",
            source,
        };
        let index = u32::from(port);
        let flags = self.ports.get(&index, 0).map_err(error)?;
        let flags = if on { flags | flag } else { flags & !flag };
        self.ports.set(index, flags, 0).map_err(error)
    }

    /// Puts a bound channel in both directions' maps and zeroes its counter slot. The
    /// peer → client entry goes in last, so a half-written channel only ever relays client →
    /// peer (which the engine allowed when it bound the channel).
    pub fn insert_channel(&mut self, channel: &Channel) -> Result<(), XdpError> {
        self.check_slot(channel.slot)?;
        let zero = PerCpuValues::try_from(vec![[0u64; CHANNEL_STATS_WORDS]; self.cpus])
            .map_err(XdpError::Cpus)?;
        self.stats
            .set(channel.slot, zero, 0)
            .map_err(|source| XdpError::Map {
                map: "CHAN_STATS",
                source,
            })?;
        // The slot's cached next hops belonged to its previous channel.
        for direction in 0..2 {
            let empty = PerCpuValues::try_from(vec![[0u64; NEXTHOP_WORDS]; self.cpus])
                .map_err(XdpError::Cpus)?;
            self.nexthops
                .set(channel.slot * 2 + direction, empty, 0)
                .map_err(|source| XdpError::Map {
                    map: "NEXTHOPS",
                    source,
                })?;
        }
        self.channels
            .insert(
                maps::channel_key(channel.client, channel.listener, channel.channel),
                maps::channel_value(channel.relayed, channel.peer, channel.slot),
                0,
            )
            .map_err(|source| XdpError::Map {
                map: "CHANNELS",
                source,
            })?;
        // Never cleared: a port flagged for nothing costs one hash miss per datagram to it.
        self.set_port_flags(channel.relayed.port(), PORT_RELAY, true)?;
        self.relays
            .insert(
                maps::relay_key(channel.relayed, channel.peer),
                maps::relay_value(
                    channel.listener,
                    channel.client,
                    channel.channel,
                    channel.slot,
                ),
                0,
            )
            .map_err(|source| XdpError::Map {
                map: "RELAYS",
                source,
            })
    }

    /// Takes a channel out of both maps; from the next packet on, both directions go to the
    /// kernel and the shards. A channel that is not there is not an error. The counter slot
    /// keeps its last values until it is reused, so a final read still sees them.
    pub fn remove_channel(&mut self, channel: &Channel) -> Result<(), XdpError> {
        let relay = self
            .relays
            .remove(&maps::relay_key(channel.relayed, channel.peer));
        let forward = self.channels.remove(&maps::channel_key(
            channel.client,
            channel.listener,
            channel.channel,
        ));
        for (map, result) in [("RELAYS", relay), ("CHANNELS", forward)] {
            match result {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(XdpError::Map { map, source }),
            }
        }
        Ok(())
    }

    /// One slot's counters, summed over CPUs.
    pub fn channel_counters(&self, slot: u32) -> Result<ChannelCounters, XdpError> {
        self.check_slot(slot)?;
        let values = self.stats.get(&slot, 0).map_err(|source| XdpError::Map {
            map: "CHAN_STATS",
            source,
        })?;
        let mut sum = ChannelCounters::default();
        for cpu in values.iter() {
            sum.to_peer_packets += cpu[0];
            sum.to_peer_bytes += cpu[1];
            sum.to_client_packets += cpu[2];
            sum.to_client_bytes += cpu[3];
        }
        Ok(sum)
    }

    /// The per-reason counters, summed over CPUs.
    pub fn reason_counters(&self) -> Result<ReasonCounters, XdpError> {
        let mut out = ReasonCounters::default();
        for reason in Reason::ALL {
            let values = self
                .reasons
                .get(&(reason.index() as u32), 0)
                .map_err(|source| XdpError::Map {
                    map: "REASONS",
                    source,
                })?;
            out.0[reason.index()] = values.iter().sum();
        }
        Ok(out)
    }

    /// The kernel's statistics of the router program: its id, and the run count and total run
    /// time, which the kernel keeps only while `kernel.bpf_stats_enabled` is 1.
    pub fn program_stats(&self) -> Result<ProgramStats, XdpError> {
        program_stats(&self.ebpf, PROGRAM_ROUTER)
    }

    fn check_slot(&self, slot: u32) -> Result<(), XdpError> {
        if slot >= self.slots_max {
            return Err(XdpError::SlotOutOfRange {
                slot,
                max: self.slots_max,
            });
        }
        Ok(())
    }
}

/// A program that passes every packet, for the far end of a veth pair: veth hands frames
/// that arrive by XDP_TX or redirect only to a peer that runs XDP itself (or has GRO on), so
/// tests and benchmarks attach this one there. Detached on drop.
pub struct PassThrough {
    ebpf: Ebpf,
}

impl PassThrough {
    /// Loads the pass-through program and attaches it to `interface`.
    pub fn attach(interface: &str, mode: AttachMode) -> Result<Self, XdpError> {
        // Only the program is wanted; the router's maps are created small and unused.
        let mut ebpf = EbpfLoader::new()
            .set_max_entries("CHANNELS", 1)
            .set_max_entries("RELAYS", 1)
            .set_max_entries("CHAN_STATS", 1)
            .set_max_entries("NEXTHOPS", 1)
            .load(OBJECT)?;
        let program = xdp_program(&mut ebpf, PROGRAM_PASS)?;
        let error = |source| XdpError::Program {
            program: PROGRAM_PASS,
            interface: interface.into(),
            source,
        };
        program.load().map_err(error)?;
        program.attach(interface, mode.flags()).map_err(error)?;
        Ok(Self { ebpf })
    }

    /// The kernel's statistics of the pass-through program (see [`Router::program_stats`]):
    /// the cost of an XDP program that does nothing, for comparison.
    pub fn program_stats(&self) -> Result<ProgramStats, XdpError> {
        program_stats(&self.ebpf, PROGRAM_PASS)
    }
}

fn program_stats(ebpf: &Ebpf, name: &'static str) -> Result<ProgramStats, XdpError> {
    let program = ebpf.program(name).ok_or(XdpError::Missing(name))?;
    let info = program.info().map_err(|source| XdpError::Program {
        program: name,
        interface: "-".into(),
        source,
    })?;
    Ok(ProgramStats {
        id: info.id(),
        run_count: info.run_count(),
        run_time: info.run_time(),
    })
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, XdpError> {
    ebpf.program_mut(name)
        .ok_or(XdpError::Missing(name))?
        .try_into()
        .map_err(|source| XdpError::Program {
            program: name,
            interface: "-".into(),
            source,
        })
}

fn take_map<M>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<M, MapError>,
) -> Result<M, XdpError> {
    let map = ebpf.take_map(name).ok_or(XdpError::Missing(name))?;
    convert(map).map_err(|source| XdpError::Map { map: name, source })
}
