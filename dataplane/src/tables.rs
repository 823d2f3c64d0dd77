//! A shard's tables and fast-path decisions, shared by both backends.
//!
//! The backends own the I/O; this module owns what a datagram means. A backend hands every
//! received datagram to [`Core::handle_datagram`] and executes the returned [`Action`]; it hands
//! every command to [`Core::handle_command`] and executes the returned [`Effect`]. Nothing here
//! allocates per packet: lookups only, counters are plain integers.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};
use hashbrown::{HashMap, HashSet};
use uturn_proto::{
    ChannelData, ChannelNumber, Class, DATA_INDICATION_HEADER_LEN_MAX, Method, PacketKind,
    TransactionId,
};

use crate::addr::canonical;
use crate::socket;
use crate::stream::StreamKind;
use crate::{
    AllocationCounters, AllocationId, ClientTransport, Counters, DropReason, PeerGuard,
    RelaySocket, ShardCommand, ShardCounters, ShardId, ToControl,
};

/// What the backend must do with a received datagram.
#[derive(Debug)]
pub(crate) enum Action {
    /// Nothing more: the datagram was dropped (and counted) or copied to control.
    Done,
    /// Send `buf[range]` to `to` from socket `via`.
    Send {
        via: u32,
        to: SocketAddr,
        range: Range<usize>,
        relay: Relay,
    },
    /// Queue `header`, then `buf[range]`, then `padding` zero bytes on the TCP/TLS connection
    /// of stream listener `listener` from `to` (ChannelData or a Data indication).
    ToStream {
        listener: u16,
        to: SocketAddr,
        relay: Relay,
        header: [u8; DATA_INDICATION_HEADER_LEN_MAX],
        header_len: usize,
        range: Range<usize>,
        padding: usize,
    },
    /// Send a Data indication: `header`, then `buf[range]`, then `padding` zero bytes.
    SendIndication {
        via: u32,
        to: SocketAddr,
        relay: Relay,
        header: [u8; DATA_INDICATION_HEADER_LEN_MAX],
        header_len: usize,
        range: Range<usize>,
        padding: usize,
    },
}

/// A relay already counted as sent; [`Core::relay_failed`] takes it back when the backend
/// cannot queue the send, so `relayed + drops + requests = datagrams` holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Relay {
    alloc: AllocationId,
    to_peer: bool,
    bytes: u64,
}

/// What the backend must do after a command.
#[derive(Debug)]
pub(crate) enum Effect {
    None,
    /// New sockets to start receiving on.
    Opened([Option<u32>; 2]),
    /// Sockets to stop receiving on; call [`Core::release_socket`] for each once the backend
    /// holds no more operations on it.
    Closing([Option<u32>; 2]),
    /// A control-built datagram to send from socket `via`.
    Transmit {
        via: u32,
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// A control-built message for the connection from `to` on stream listener `listener`.
    StreamTransmit {
        listener: u16,
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    Shutdown,
}

#[derive(Debug)]
enum Role {
    Listener(u16),
    Relay(AllocationId),
    Closing,
}

#[derive(Debug)]
struct SocketEntry {
    socket: UdpSocket,
    role: Role,
}

#[derive(Debug)]
struct Allocation {
    listener: u16,
    client: SocketAddr,
    relay_v4: Option<u32>,
    relay_v6: Option<u32>,
    peer_ips: Vec<IpAddr>,
    channels: Vec<ChannelNumber>,
    counters: AllocationCounters,
    /// Bytes the allocation may still relay (both directions), when a cap is set.
    budget: ByteBucket,
}

/// A per-allocation token bucket in bytes (issue 8: bandwidth cap). Refilled from the shard's
/// per-turn clock ([`Core::set_now`]), so the packet path reads no clock.
#[derive(Debug, Clone, Copy)]
struct ByteBucket {
    tokens: u64,
    last: Instant,
}

impl ByteBucket {
    /// Takes `len` bytes at `rate` bytes per second (burst: one second's worth); false when
    /// the bucket is short (the packet is dropped, and takes nothing).
    fn take(&mut self, len: u64, rate: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        let refill = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .saturating_mul(rate)
            / 1_000_000;
        if refill > 0 {
            self.tokens = self.tokens.saturating_add(refill).min(rate);
            self.last = now;
        }
        if self.tokens >= len {
            self.tokens -= len;
            true
        } else {
            false
        }
    }
}

/// A shard's state apart from its I/O.
#[derive(Debug)]
pub(crate) struct Core {
    shard: ShardId,
    /// Bound address of each listener, by listener index: the UDP listeners first, then the
    /// stream (TCP) listeners.
    listener_addrs: Vec<SocketAddr>,
    /// `None` for a UDP listener, the kind for a stream listener, by listener index.
    listener_kinds: Vec<Option<StreamKind>>,
    /// Socket slot of each listener, by listener index.
    listener_slots: Vec<u32>,
    /// Every socket the shard reads, by slot (the relay token of the tables).
    sockets: Vec<Option<SocketEntry>>,
    sockets_free: Vec<u32>,
    allocations: HashMap<AllocationId, Allocation>,
    /// 5-tuple (listener index, client) → allocation.
    by_client: HashMap<(u16, SocketAddr), AllocationId>,
    /// (allocation, channel) → peer.
    channels: HashMap<(AllocationId, ChannelNumber), SocketAddr>,
    /// (allocation, peer) → channel, for peer→client.
    channel_of_peer: HashMap<(AllocationId, SocketAddr), ChannelNumber>,
    /// (allocation, peer IP) with a permission.
    permissions: HashSet<(AllocationId, IpAddr)>,
    /// uturn's own addresses: on a relay IP, peers only at live relayed addresses.
    guard: PeerGuard,
    /// The relayed addresses (bound and advertised) of the live allocations of every shard
    /// ([`ShardCommand::SetRelayed`]).
    relayed: HashSet<SocketAddr>,
    /// Bytes per second each allocation may relay, both directions together; 0: no cap.
    bandwidth_bytes_per_sec: u64,
    /// The clock of the current loop turn (one read per turn, none per packet).
    now: Instant,
    to_control: Sender<ToControl>,
    counters: ShardCounters,
    removed: Vec<(AllocationId, AllocationCounters)>,
    /// Whether `report_counters` sends reports (off: metrics cost measurements).
    publish_counters: bool,
    /// Relay sockets of an allocation replaced by `OpenAllocation` on the same 5-tuple.
    pending_close: Vec<u32>,
    /// xorshift state for Data indication transaction IDs (RFC 8489 §6: chosen by the sender;
    /// indications are never answered, so uniqueness is all that matters).
    tid_state: u64,
}

impl Core {
    pub(crate) fn new(
        shard: ShardId,
        listeners: Vec<(SocketAddr, UdpSocket)>,
        stream_listeners: &[(SocketAddr, StreamKind)],
        to_control: Sender<ToControl>,
    ) -> Self {
        let mut core = Self {
            shard,
            listener_addrs: Vec::with_capacity(listeners.len() + stream_listeners.len()),
            listener_kinds: Vec::with_capacity(listeners.len() + stream_listeners.len()),
            listener_slots: Vec::with_capacity(listeners.len()),
            sockets: Vec::new(),
            sockets_free: Vec::new(),
            allocations: HashMap::new(),
            by_client: HashMap::new(),
            channels: HashMap::new(),
            channel_of_peer: HashMap::new(),
            permissions: HashSet::new(),
            guard: PeerGuard::default(),
            relayed: HashSet::new(),
            bandwidth_bytes_per_sec: 0,
            now: Instant::now(),
            to_control,
            counters: ShardCounters::default(),
            removed: Vec::new(),
            publish_counters: true,
            pending_close: Vec::new(),
            tid_state: 0x9E37_79B9_7F4A_7C15 ^ (u64::from(shard.0) << 32) ^ 1,
        };
        for (index, (addr, socket)) in listeners.into_iter().enumerate() {
            let index = u16::try_from(index).unwrap_or(u16::MAX);
            let slot = core.insert_socket(socket, Role::Listener(index));
            core.listener_addrs.push(addr);
            core.listener_kinds.push(None);
            core.listener_slots.push(slot);
        }
        for &(addr, kind) in stream_listeners {
            core.listener_addrs.push(addr);
            core.listener_kinds.push(Some(kind));
        }
        core
    }

    /// Caps what each allocation relays, in bytes per second (both directions; 0: no cap).
    pub(crate) fn set_bandwidth_cap(&mut self, bytes_per_sec: u64) {
        self.bandwidth_bytes_per_sec = bytes_per_sec;
    }

    /// The time of this loop turn, read once per turn by the backend.
    pub(crate) fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// Sets the data path's re-check of uturn's own addresses.
    pub(crate) fn set_peer_guard(&mut self, guard: PeerGuard) {
        self.guard = guard;
    }

    /// Index of the first stream listener (the UDP listeners come first).
    pub(crate) fn stream_listener_base(&self) -> u16 {
        u16::try_from(self.listener_slots.len()).unwrap_or(u16::MAX)
    }

    /// The listener bound to `addr` that carries `transport`.
    fn find_listener(&self, transport: ClientTransport, addr: SocketAddr) -> Option<u16> {
        let index = self
            .listener_addrs
            .iter()
            .zip(&self.listener_kinds)
            .position(|(a, kind)| {
                *a == addr
                    && match kind {
                        None => transport == ClientTransport::Udp,
                        Some(kind) => kind.carries(transport),
                    }
            })?;
        u16::try_from(index).ok()
    }

    /// Whether the client `client` of listener `listener` has an allocation on this shard.
    pub(crate) fn has_allocation(&self, listener: u16, client: SocketAddr) -> bool {
        self.by_client.contains_key(&(listener, client))
    }

    /// One whole frame (STUN message or ChannelData) from a TCP/TLS client. Returns what the
    /// fast path returns for a datagram (a `Send` from a relay socket, or `Done`); `reported`
    /// becomes true when the frame went to control.
    pub(crate) fn handle_stream_frame(
        &mut self,
        listener: u16,
        transport: ClientTransport,
        client: SocketAddr,
        frame: &[u8],
        reported: &mut bool,
    ) -> Action {
        self.counters.client_datagrams += 1;
        let requests = self.counters.requests;
        let action = self.handle_from_client(listener, transport, client, frame, 0..frame.len());
        if self.counters.requests != requests {
            *reported = true;
        }
        action
    }

    /// A TCP/TLS connection closed: tell control, which removes its allocation (RFC 8656 §3.1)
    /// and sends `RemoveAllocation` back.
    pub(crate) fn stream_closed(
        &mut self,
        listener: u16,
        transport: ClientTransport,
        client: SocketAddr,
    ) {
        let Some(&server) = self.listener_addrs.get(usize::from(listener)) else {
            return;
        };
        let message = ToControl::ConnectionClosed {
            shard: self.shard,
            transport,
            server,
            client,
        };
        // A full queue leaves the allocation to expire by its lifetime.
        if let Err(TrySendError::Full(_)) = self.to_control.try_send(message) {
            self.counters.drops.add(DropReason::QueueFull);
        }
    }

    pub(crate) fn shard(&self) -> ShardId {
        self.shard
    }

    /// Socket slots of the listeners.
    pub(crate) fn listener_slots(&self) -> &[u32] {
        &self.listener_slots
    }

    /// Number of socket slots (live or free).
    pub(crate) fn socket_slots(&self) -> usize {
        self.sockets.len()
    }

    pub(crate) fn fd(&self, slot: u32) -> Option<RawFd> {
        self.sockets
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map(|entry| entry.socket.as_raw_fd())
    }

    pub(crate) fn socket(&self, slot: u32) -> Option<&UdpSocket> {
        self.sockets
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map(|entry| &entry.socket)
    }

    pub(crate) fn counters_mut(&mut self) -> &mut ShardCounters {
        &mut self.counters
    }

    pub(crate) fn count_drop(&mut self, reason: DropReason) {
        self.counters.drops.add(reason);
    }

    /// Counts a datagram received on `slot` that could not be read (truncated, no source
    /// address), so `relayed + drops + requests = datagrams` holds per direction.
    pub(crate) fn count_unreadable(&mut self, slot: u32, reason: DropReason) {
        match self
            .sockets
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map(|e| &e.role)
        {
            Some(Role::Listener(_)) => self.counters.client_datagrams += 1,
            _ => self.counters.peer_datagrams += 1,
        }
        self.counters.drops.add(reason);
    }

    /// Takes back a relay the backend could not queue and counts the drop instead.
    pub(crate) fn relay_failed(&mut self, relay: Relay, reason: DropReason) {
        self.counters.drops.add(reason);
        let shard_packets = if relay.to_peer {
            &mut self.counters.to_peer_packets
        } else {
            &mut self.counters.to_client_packets
        };
        *shard_packets = shard_packets.saturating_sub(1);
        if let Some(a) = self.allocations.get_mut(&relay.alloc) {
            let (packets, bytes) = if relay.to_peer {
                (
                    &mut a.counters.to_peer_packets,
                    &mut a.counters.to_peer_bytes,
                )
            } else {
                (
                    &mut a.counters.to_client_packets,
                    &mut a.counters.to_client_bytes,
                )
            };
            *packets = packets.saturating_sub(1);
            *bytes = bytes.saturating_sub(relay.bytes);
        }
    }

    /// Closes a socket the backend no longer uses.
    pub(crate) fn release_socket(&mut self, slot: u32) {
        if let Some(entry) = self.sockets.get_mut(slot as usize)
            && entry.take().is_some()
        {
            self.sockets_free.push(slot);
        }
    }

    fn insert_socket(&mut self, socket: UdpSocket, role: Role) -> u32 {
        let entry = SocketEntry { socket, role };
        match self.sockets_free.pop() {
            Some(slot) => {
                self.sockets[slot as usize] = Some(entry);
                slot
            }
            None => {
                self.sockets.push(Some(entry));
                u32::try_from(self.sockets.len() - 1).unwrap_or(u32::MAX)
            }
        }
    }

    /// Decides what a datagram received on socket `slot` from `from` means. `buf[range]` is the
    /// datagram; `range.start >= 4`, and the 4 bytes before it are free headroom.
    pub(crate) fn handle_datagram(
        &mut self,
        slot: u32,
        from: SocketAddr,
        buf: &mut [u8],
        range: Range<usize>,
    ) -> Action {
        let role = match self.sockets.get(slot as usize).and_then(Option::as_ref) {
            Some(entry) => match entry.role {
                Role::Listener(index) => Ok(index),
                Role::Relay(alloc) => Err(Some(alloc)),
                Role::Closing => Err(None),
            },
            None => Err(None),
        };
        match role {
            Ok(listener) => {
                self.counters.client_datagrams += 1;
                self.handle_from_client(listener, ClientTransport::Udp, from, buf, range)
            }
            Err(Some(alloc)) => {
                self.counters.peer_datagrams += 1;
                self.handle_from_peer(alloc, from, buf, range)
            }
            Err(None) => {
                self.counters.peer_datagrams += 1;
                self.count_drop(DropReason::NoAllocation);
                Action::Done
            }
        }
    }

    fn handle_from_client(
        &mut self,
        listener: u16,
        transport: ClientTransport,
        client: SocketAddr,
        buf: &[u8],
        range: Range<usize>,
    ) -> Action {
        let client = canonical(client);
        let datagram = &buf[range.clone()];
        match uturn_proto::classify(datagram) {
            PacketKind::ChannelData => {
                let (channel, payload_len) = match ChannelData::parse(datagram) {
                    Ok(cd) => (cd.channel(), cd.payload().len()),
                    Err(_) => return self.drop(DropReason::Malformed),
                };
                let Some(&alloc) = self.by_client.get(&(listener, client)) else {
                    return self.drop(DropReason::NoAllocation);
                };
                let Some(&peer) = self.channels.get(&(alloc, channel)) else {
                    return self.drop(DropReason::NoChannel);
                };
                // ChannelBind checked the peer, but a channel to another allocation outlives
                // that allocation, and its port may then be anyone's.
                if !self.admits(peer) {
                    return self.drop(DropReason::PeerDenied);
                }
                let start = range.start + uturn_proto::CHANNEL_DATA_HEADER_LEN;
                self.relay_to_peer(alloc, peer, start..start + payload_len)
            }
            PacketKind::Stun => {
                // Only Send indications are fast-path; everything else goes to control.
                let is_send = datagram.len() >= 2
                    && uturn_proto::split_message_type(u16::from_be_bytes([
                        datagram[0],
                        datagram[1],
                    ])) == (Class::Indication, Method::SEND);
                if is_send {
                    // RFC 8656 §11.2: a Send indication without an allocation is discarded.
                    return match self.by_client.get(&(listener, client)) {
                        Some(&alloc) => self.handle_send_indication(alloc, buf, range),
                        None => self.drop(DropReason::NoAllocation),
                    };
                }
                self.forward_to_control(listener, transport, client, datagram)
            }
            _ => self.drop(DropReason::Malformed),
        }
    }

    /// RFC 8656 §11.2: take the first XOR-PEER-ADDRESS and DATA; no permission, no relay.
    fn handle_send_indication(
        &mut self,
        alloc: AllocationId,
        buf: &[u8],
        range: Range<usize>,
    ) -> Action {
        let datagram = &buf[range];
        let Ok(indication) = uturn_proto::parse_send_indication(datagram) else {
            return self.drop(DropReason::Malformed);
        };
        let (peer, data) = (canonical(indication.peer), indication.data);
        if !self.permissions.contains(&(alloc, peer.ip())) {
            return self.drop(DropReason::NoPermission);
        }
        // A permission for one of uturn's relay IPs reaches its live relayed addresses only.
        if !self.admits(peer) {
            return self.drop(DropReason::PeerDenied);
        }
        // The DATA value borrows the datagram; its offset in `buf` is where the payload lives.
        let start = data.as_ptr() as usize - buf.as_ptr() as usize;
        self.relay_to_peer(alloc, peer, start..start + data.len())
    }

    fn relay_to_peer(
        &mut self,
        alloc: AllocationId,
        peer: SocketAddr,
        range: Range<usize>,
    ) -> Action {
        let Some(allocation) = self.allocations.get_mut(&alloc) else {
            self.counters.drops.add(DropReason::NoAllocation);
            return Action::Done;
        };
        let via = if peer.is_ipv4() {
            allocation.relay_v4
        } else {
            allocation.relay_v6
        };
        let Some(via) = via else {
            self.counters.drops.add(DropReason::FamilyMismatch);
            return Action::Done;
        };
        let rate = self.bandwidth_bytes_per_sec;
        if rate != 0 && !allocation.budget.take(range.len() as u64, rate, self.now) {
            self.counters.drops.add(DropReason::Bandwidth);
            return Action::Done;
        }
        allocation.counters.to_peer_packets += 1;
        allocation.counters.to_peer_bytes += range.len() as u64;
        self.counters.to_peer_packets += 1;
        let relay = Relay {
            alloc,
            to_peer: true,
            bytes: range.len() as u64,
        };
        Action::Send {
            via,
            to: peer,
            range,
            relay,
        }
    }

    /// RFC 8656 §11.3 and §12.6: a peer datagram goes to the client as ChannelData when a
    /// channel is bound to that exact peer address, else as a Data indication.
    fn handle_from_peer(
        &mut self,
        alloc: AllocationId,
        peer: SocketAddr,
        buf: &mut [u8],
        range: Range<usize>,
    ) -> Action {
        let peer = canonical(peer);
        if !self.permissions.contains(&(alloc, peer.ip())) {
            return self.drop(DropReason::NoPermission);
        }
        if !self.admits(peer) {
            return self.drop(DropReason::PeerDenied);
        }
        let Some(allocation) = self.allocations.get_mut(&alloc) else {
            self.counters.drops.add(DropReason::NoAllocation);
            return Action::Done;
        };
        let rate = self.bandwidth_bytes_per_sec;
        if rate != 0 && !allocation.budget.take(range.len() as u64, rate, self.now) {
            self.counters.drops.add(DropReason::Bandwidth);
            return Action::Done;
        }
        let to = allocation.client;
        let payload_len = range.len();
        let Some(&via) = self.listener_slots.get(usize::from(allocation.listener)) else {
            // A stream client (RFC 8656 §12.5: ChannelData over TCP/TLS is padded to 4).
            let listener = allocation.listener;
            let mut header = [0u8; DATA_INDICATION_HEADER_LEN_MAX];
            let (header_len, padding) = match self.channel_of_peer.get(&(alloc, peer)) {
                Some(&channel) => {
                    let n = uturn_proto::CHANNEL_DATA_HEADER_LEN;
                    if uturn_proto::write_channel_data_header(
                        &mut header[..n],
                        channel,
                        payload_len,
                    )
                    .is_err()
                    {
                        self.counters.drops.add(DropReason::Malformed);
                        return Action::Done;
                    }
                    (n, uturn_proto::stream_padding(payload_len))
                }
                None => {
                    let tid = next_transaction_id(&mut self.tid_state);
                    let Ok(n) = uturn_proto::write_data_indication_header(
                        &mut header,
                        tid,
                        peer,
                        payload_len,
                    ) else {
                        self.counters.drops.add(DropReason::Malformed);
                        return Action::Done;
                    };
                    (n, uturn_proto::stun_padding(payload_len))
                }
            };
            allocation.counters.to_client_packets += 1;
            allocation.counters.to_client_bytes += payload_len as u64;
            self.counters.to_client_packets += 1;
            return Action::ToStream {
                listener,
                to,
                relay: Relay {
                    alloc,
                    to_peer: false,
                    bytes: payload_len as u64,
                },
                header,
                header_len,
                range,
                padding,
            };
        };
        if let Some(&channel) = self.channel_of_peer.get(&(alloc, peer)) {
            let header_start = range.start - uturn_proto::CHANNEL_DATA_HEADER_LEN;
            if uturn_proto::write_channel_data_header(
                &mut buf[header_start..range.start],
                channel,
                payload_len,
            )
            .is_err()
            {
                self.counters.drops.add(DropReason::Malformed);
                return Action::Done;
            }
            allocation.counters.to_client_packets += 1;
            allocation.counters.to_client_bytes += payload_len as u64;
            self.counters.to_client_packets += 1;
            let relay = Relay {
                alloc,
                to_peer: false,
                bytes: payload_len as u64,
            };
            return Action::Send {
                via,
                to,
                range: header_start..range.end,
                relay,
            };
        }
        let mut header = [0u8; DATA_INDICATION_HEADER_LEN_MAX];
        let tid = next_transaction_id(&mut self.tid_state);
        let Ok(header_len) =
            uturn_proto::write_data_indication_header(&mut header, tid, peer, payload_len)
        else {
            self.counters.drops.add(DropReason::Malformed);
            return Action::Done;
        };
        allocation.counters.to_client_packets += 1;
        allocation.counters.to_client_bytes += payload_len as u64;
        self.counters.to_client_packets += 1;
        Action::SendIndication {
            via,
            to,
            relay: Relay {
                alloc,
                to_peer: false,
                bytes: payload_len as u64,
            },
            header,
            header_len,
            range,
            padding: uturn_proto::stun_padding(payload_len),
        }
    }

    fn forward_to_control(
        &mut self,
        listener: u16,
        transport: ClientTransport,
        client: SocketAddr,
        datagram: &[u8],
    ) -> Action {
        let server = self.listener_addrs[usize::from(listener)];
        let message = ToControl::Request {
            shard: self.shard,
            transport,
            server,
            client,
            bytes: datagram.to_vec(),
        };
        match self.to_control.try_send(message) {
            Ok(()) => self.counters.requests += 1,
            Err(TrySendError::Full(_)) => self.counters.drops.add(DropReason::QueueFull),
            // Control has gone away (shutdown); nothing to tell.
            Err(TrySendError::Disconnected(_)) => {}
        }
        Action::Done
    }

    /// The own-address check of [`PeerGuard`] against this shard's copy of the live relayed
    /// addresses.
    fn admits(&self, peer: SocketAddr) -> bool {
        self.guard.admits(peer, |addr| self.relayed.contains(&addr))
    }

    fn drop(&mut self, reason: DropReason) -> Action {
        self.counters.drops.add(reason);
        Action::Done
    }

    /// Applies one command from control.
    pub(crate) fn handle_command(&mut self, command: ShardCommand) -> Effect {
        match command {
            ShardCommand::Transmit {
                transport,
                server,
                to,
                bytes,
            } => {
                let index = self.find_listener(transport, server);
                match index.map(|i| (i, self.listener_slots.get(usize::from(i)))) {
                    Some((_, Some(&via))) => Effect::Transmit { via, to, bytes },
                    Some((listener, None)) => Effect::StreamTransmit {
                        listener,
                        to: canonical(to),
                        bytes,
                    },
                    None => {
                        tracing::warn!(shard = self.shard.0, %server, "Transmit for an unknown listener");
                        Effect::None
                    }
                }
            }
            ShardCommand::OpenAllocation {
                alloc,
                transport,
                client_server,
                client,
                relays,
                dont_fragment,
            } => self.open_allocation(
                alloc,
                transport,
                client_server,
                client,
                relays,
                dont_fragment,
            ),
            ShardCommand::SetPermission { alloc, peer_ip } => {
                let peer_ip = canonical(SocketAddr::new(peer_ip, 0)).ip();
                if let Some(allocation) = self.allocations.get_mut(&alloc)
                    && self.permissions.insert((alloc, peer_ip))
                {
                    allocation.peer_ips.push(peer_ip);
                }
                Effect::None
            }
            ShardCommand::RemovePermission { alloc, peer_ip } => {
                let peer_ip = canonical(SocketAddr::new(peer_ip, 0)).ip();
                self.permissions.remove(&(alloc, peer_ip));
                if let Some(allocation) = self.allocations.get_mut(&alloc) {
                    allocation.peer_ips.retain(|ip| *ip != peer_ip);
                }
                Effect::None
            }
            ShardCommand::BindChannel {
                alloc,
                channel,
                peer,
            } => {
                let peer = canonical(peer);
                let Some(allocation) = self.allocations.get_mut(&alloc) else {
                    return Effect::None;
                };
                if let Some(old) = self.channels.insert((alloc, channel), peer) {
                    self.channel_of_peer.remove(&(alloc, old));
                } else {
                    allocation.channels.push(channel);
                }
                self.channel_of_peer.insert((alloc, peer), channel);
                Effect::None
            }
            ShardCommand::UnbindChannel { alloc, channel } => {
                if let Some(peer) = self.channels.remove(&(alloc, channel)) {
                    self.channel_of_peer.remove(&(alloc, peer));
                }
                if let Some(allocation) = self.allocations.get_mut(&alloc) {
                    allocation.channels.retain(|c| *c != channel);
                }
                Effect::None
            }
            ShardCommand::RemoveAllocation { alloc } => self.remove_allocation(alloc),
            ShardCommand::SetPeerGuard(guard) => {
                self.guard = guard;
                Effect::None
            }
            ShardCommand::SetRelayed { addrs, live } => {
                for addr in addrs {
                    let addr = canonical(addr);
                    if live {
                        self.relayed.insert(addr);
                    } else {
                        self.relayed.remove(&addr);
                    }
                }
                if !live {
                    crate::sparse::shrink_set(&mut self.relayed);
                }
                Effect::None
            }
            ShardCommand::Shutdown => Effect::Shutdown,
        }
    }

    fn open_allocation(
        &mut self,
        alloc: AllocationId,
        transport: ClientTransport,
        client_server: SocketAddr,
        client: SocketAddr,
        relays: Vec<RelaySocket>,
        dont_fragment: bool,
    ) -> Effect {
        let Some(listener) = self.find_listener(transport, client_server) else {
            tracing::warn!(
                shard = self.shard.0,
                alloc = alloc.0,
                %client_server,
                "OpenAllocation for a listener this shard does not have; ignored"
            );
            return Effect::None;
        };
        let client = canonical(client);
        if let Some(&old) = self.by_client.get(&(listener, client)) {
            tracing::warn!(
                shard = self.shard.0,
                alloc = old.0,
                "5-tuple reused; old allocation removed"
            );
            // The old relay sockets are closed by the backend like any removal, through
            // `take_pending_close`.
            if let Effect::Closing(slots) = self.remove_allocation(old) {
                for slot in slots.into_iter().flatten() {
                    self.pending_close.push(slot);
                }
            }
        }
        if self.allocations.contains_key(&alloc) {
            tracing::warn!(
                shard = self.shard.0,
                alloc = alloc.0,
                "allocation id reused; ignored"
            );
            return Effect::None;
        }
        let mut opened = [None, None];
        let mut relay_v4 = None;
        let mut relay_v6 = None;
        for relay in relays {
            if let Err(error) = socket::prepare_relay(&relay.socket, relay.addr, dont_fragment) {
                tracing::warn!(shard = self.shard.0, alloc = alloc.0, %error, "relay socket setup failed");
            }
            let family_slot = if relay.addr.is_ipv4() {
                &mut relay_v4
            } else {
                &mut relay_v6
            };
            if family_slot.is_some() {
                tracing::warn!(
                    shard = self.shard.0,
                    alloc = alloc.0,
                    "second relay of one family; ignored"
                );
                continue;
            }
            let slot = self.insert_socket(relay.socket, Role::Relay(alloc));
            *family_slot = Some(slot);
            if opened[0].is_none() {
                opened[0] = Some(slot);
            } else {
                opened[1] = Some(slot);
            }
        }
        self.allocations.insert(
            alloc,
            Allocation {
                listener,
                client,
                relay_v4,
                relay_v6,
                peer_ips: Vec::new(),
                channels: Vec::new(),
                counters: AllocationCounters::default(),
                budget: ByteBucket {
                    tokens: self.bandwidth_bytes_per_sec,
                    last: self.now,
                },
            },
        );
        self.by_client.insert((listener, client), alloc);
        Effect::Opened(opened)
    }

    /// Gives back the memory of tables that emptied (see [`crate::sparse`]). Runs on commands
    /// from the control thread, never per packet.
    fn shrink_if_sparse(&mut self) {
        crate::sparse::shrink_map(&mut self.allocations);
        crate::sparse::shrink_map(&mut self.by_client);
        crate::sparse::shrink_map(&mut self.channels);
        crate::sparse::shrink_map(&mut self.channel_of_peer);
        crate::sparse::shrink_set(&mut self.permissions);
    }

    fn remove_allocation(&mut self, alloc: AllocationId) -> Effect {
        let Some(allocation) = self.allocations.remove(&alloc) else {
            return Effect::None;
        };
        self.by_client
            .remove(&(allocation.listener, allocation.client));
        for ip in &allocation.peer_ips {
            self.permissions.remove(&(alloc, *ip));
        }
        for channel in &allocation.channels {
            if let Some(peer) = self.channels.remove(&(alloc, *channel)) {
                self.channel_of_peer.remove(&(alloc, peer));
            }
        }
        self.removed.push((alloc, allocation.counters));
        self.shrink_if_sparse();
        let slots = [allocation.relay_v4, allocation.relay_v6];
        for slot in slots.into_iter().flatten() {
            if let Some(Some(entry)) = self.sockets.get_mut(slot as usize) {
                entry.role = Role::Closing;
            }
        }
        Effect::Closing(slots)
    }

    /// Sockets whose allocation was replaced inside `OpenAllocation`; the backend closes them
    /// like the slots of `Effect::Closing`.
    pub(crate) fn take_pending_close(&mut self) -> Option<u32> {
        self.pending_close.pop()
    }

    /// Whether [`Core::report_counters`] sends anything (`DataPlaneConfig::publish_counters`).
    pub(crate) fn set_counters_published(&mut self, published: bool) {
        self.publish_counters = published;
    }

    /// Sends the counters report to control (dropped, not blocking, when the queue is full).
    /// With publishing off it only forgets the final counters of removed allocations, which
    /// would otherwise pile up.
    pub(crate) fn report_counters(&mut self) {
        if !self.publish_counters {
            self.removed.clear();
            return;
        }
        let mut allocations = Vec::with_capacity(self.allocations.len() + self.removed.len());
        allocations.extend(self.allocations.iter().map(|(id, a)| (*id, a.counters)));
        allocations.append(&mut self.removed);
        let report = Counters {
            shard: self.shard,
            shard_counters: self.counters,
            allocations,
        };
        // A full queue loses this report (the next one carries the totals again; the final
        // counters of allocations removed since the last report are lost with it).
        if let Err(TrySendError::Full(_)) = self
            .to_control
            .try_send(ToControl::Counters(Box::new(report)))
        {
            self.counters.reports_dropped += 1;
        }
    }
}

fn next_transaction_id(state: &mut u64) -> TransactionId {
    let mut out = [0u8; 12];
    for chunk in out.chunks_mut(4) {
        // xorshift64: cheap, no allocation, no syscall.
        let mut x = *state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *state = x;
        chunk.copy_from_slice(&x.to_ne_bytes()[..4]);
    }
    TransactionId(out)
}

#[cfg(test)]
mod tests {
    use crossbeam_channel::Receiver;

    use super::*;
    use crate::PAYLOAD_OFFSET;

    const SERVER: &str = "127.0.0.1:3478";
    const CLIENT: &str = "192.0.2.10:50000";

    fn core() -> (Core, Receiver<ToControl>) {
        let (tx, rx) = crossbeam_channel::bounded(16);
        let listener = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let server: SocketAddr = SERVER.parse().expect("literal");
        let core = Core::new(ShardId(0), vec![(server, listener)], &[], tx);
        (core, rx)
    }

    fn open(core: &mut Core, alloc: u64, client: SocketAddr) -> u32 {
        let relay = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = relay.local_addr().expect("addr");
        let effect = core.handle_command(ShardCommand::OpenAllocation {
            alloc: AllocationId(alloc),
            transport: ClientTransport::Udp,
            client_server: SERVER.parse().expect("literal"),
            client,
            relays: vec![RelaySocket {
                socket: relay,
                addr,
            }],
            dont_fragment: false,
        });
        match effect {
            Effect::Opened([Some(slot), None]) => slot,
            other => panic!("unexpected effect {other:?}"),
        }
    }

    /// A receive buffer holding `datagram` at the payload offset, as both backends lay it out.
    fn buffer(datagram: &[u8]) -> (Vec<u8>, Range<usize>) {
        let mut buf = vec![0u8; PAYLOAD_OFFSET + datagram.len()];
        buf[PAYLOAD_OFFSET..].copy_from_slice(datagram);
        (buf, PAYLOAD_OFFSET..PAYLOAD_OFFSET + datagram.len())
    }

    fn from_peer(core: &mut Core, relay: u32, peer: SocketAddr, payload: &[u8]) -> Action {
        let (mut buf, range) = buffer(payload);
        core.handle_datagram(relay, peer, &mut buf, range)
    }

    /// UDP and TCP on the same address are two listeners: the transport picks the one a
    /// response or an allocation belongs to (RFC 8656 §3.1: over TCP the 5-tuple is the
    /// connection).
    #[test]
    fn the_transport_picks_between_udp_and_tcp_listeners_on_one_address() {
        let (tx, _rx) = crossbeam_channel::bounded(16);
        let listener = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let server: SocketAddr = SERVER.parse().expect("literal");
        let mut core = Core::new(
            ShardId(0),
            vec![(server, listener)],
            &[(server, StreamKind::Tcp)],
            tx,
        );
        let client: SocketAddr = CLIENT.parse().expect("literal");
        let transmit = |transport| ShardCommand::Transmit {
            transport,
            server,
            to: client,
            bytes: vec![1],
        };
        assert!(matches!(
            core.handle_command(transmit(ClientTransport::Udp)),
            Effect::Transmit { .. }
        ));
        assert!(matches!(
            core.handle_command(transmit(ClientTransport::Tcp)),
            Effect::StreamTransmit { listener: 1, .. }
        ));
        // No TLS listener there.
        assert!(matches!(
            core.handle_command(transmit(ClientTransport::Tls)),
            Effect::None
        ));

        // An allocation over TCP: peer data goes to the stream, ChannelData padded to 4.
        let relay = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = relay.local_addr().expect("addr");
        let relay_slot = match core.handle_command(ShardCommand::OpenAllocation {
            alloc: AllocationId(9),
            transport: ClientTransport::Tcp,
            client_server: server,
            client,
            relays: vec![RelaySocket {
                socket: relay,
                addr,
            }],
            dont_fragment: false,
        }) {
            Effect::Opened([Some(slot), None]) => slot,
            other => panic!("unexpected effect {other:?}"),
        };
        assert!(core.has_allocation(1, client));
        assert!(!core.has_allocation(0, client));
        let peer: SocketAddr = "198.51.100.1:1000".parse().expect("literal");
        core.handle_command(ShardCommand::SetPermission {
            alloc: AllocationId(9),
            peer_ip: peer.ip(),
        });
        match from_peer(&mut core, relay_slot, peer, b"abcde") {
            Action::ToStream {
                listener,
                to,
                header_len,
                padding,
                ..
            } => {
                assert_eq!((listener, to), (1, client));
                assert!(header_len > 20, "a Data indication header");
                assert_eq!(padding, 3, "DATA padded to 4");
            }
            other => panic!("expected ToStream, got {other:?}"),
        }
        core.handle_command(ShardCommand::BindChannel {
            alloc: AllocationId(9),
            channel: ChannelNumber::new(0x4000).expect("valid"),
            peer,
        });
        match from_peer(&mut core, relay_slot, peer, b"abcde") {
            Action::ToStream {
                header,
                header_len,
                padding,
                range,
                ..
            } => {
                assert_eq!(&header[..header_len], &[0x40, 0x00, 0x00, 0x05]);
                assert_eq!(range.len(), 5);
                assert_eq!(padding, 3, "RFC 8656 §12.5: ChannelData over TCP is padded");
            }
            other => panic!("expected ToStream, got {other:?}"),
        }
    }

    #[test]
    fn the_tables_give_their_memory_back_once_the_allocations_are_gone() {
        let (mut core, _rx) = core();
        let count = 300u16;
        for n in 1..=count {
            let client = SocketAddr::new("192.0.2.10".parse().expect("literal"), 10_000 + n);
            open(&mut core, u64::from(n), client);
            let alloc = AllocationId(u64::from(n));
            let peer = SocketAddr::new("198.51.100.1".parse().expect("literal"), n);
            core.handle_command(ShardCommand::SetPermission {
                alloc,
                peer_ip: peer.ip(),
            });
            core.handle_command(ShardCommand::BindChannel {
                alloc,
                channel: ChannelNumber::new(0x4000).expect("valid"),
                peer,
            });
        }
        let peak = core.allocations.capacity();
        assert!(peak >= usize::from(count));
        for n in 1..=count {
            core.handle_command(ShardCommand::RemoveAllocation {
                alloc: AllocationId(u64::from(n)),
            });
        }
        assert!(core.allocations.is_empty());
        for (table, capacity) in [
            ("allocations", core.allocations.capacity()),
            ("by_client", core.by_client.capacity()),
            ("channels", core.channels.capacity()),
            ("channel_of_peer", core.channel_of_peer.capacity()),
            ("permissions", core.permissions.capacity()),
        ] {
            assert!(
                capacity <= 64,
                "{table} kept {capacity} slots (peak {peak})"
            );
        }
    }

    #[test]
    fn rebinding_a_channel_to_another_peer_moves_the_reverse_mapping() {
        let (mut core, _rx) = core();
        let relay = open(&mut core, 1, CLIENT.parse().expect("literal"));
        let alloc = AllocationId(1);
        let channel = ChannelNumber::new(0x4000).expect("valid");
        let old: SocketAddr = "198.51.100.1:1000".parse().expect("literal");
        let new: SocketAddr = "198.51.100.1:2000".parse().expect("literal");
        core.handle_command(ShardCommand::SetPermission {
            alloc,
            peer_ip: old.ip(),
        });
        core.handle_command(ShardCommand::BindChannel {
            alloc,
            channel,
            peer: old,
        });
        core.handle_command(ShardCommand::BindChannel {
            alloc,
            channel,
            peer: new,
        });
        // The old peer (same IP, so permitted) now arrives as a Data indication...
        assert!(matches!(
            from_peer(&mut core, relay, old, b"a"),
            Action::SendIndication { .. }
        ));
        // ...and the new one as ChannelData, header in front of the payload.
        match from_peer(&mut core, relay, new, b"abc") {
            Action::Send { range, .. } => {
                assert_eq!(range, PAYLOAD_OFFSET - 4..PAYLOAD_OFFSET + 3);
            }
            other => panic!("expected ChannelData, got {other:?}"),
        }
    }

    #[test]
    fn a_send_indication_without_an_allocation_is_dropped_not_forwarded() {
        let (mut core, rx) = core();
        let (mut buf, range) = buffer(&send_indication("198.51.100.1:9"));
        let listener = core.listener_slots()[0];
        let action =
            core.handle_datagram(listener, CLIENT.parse().expect("literal"), &mut buf, range);
        assert!(matches!(action, Action::Done));
        assert_eq!(core.counters.drops.get(DropReason::NoAllocation), 1);
        assert!(rx.try_recv().is_err(), "nothing sent to control");
    }

    fn send_indication(peer: &str) -> Vec<u8> {
        let mut out = [0u8; 128];
        let mut builder = uturn_proto::MessageBuilder::new(
            &mut out,
            Class::Indication,
            Method::SEND,
            TransactionId([1; 12]),
        );
        builder
            .attribute(&uturn_proto::Attribute::XorPeerAddress(
                peer.parse().expect("literal"),
            ))
            .expect("room");
        builder
            .attribute(&uturn_proto::Attribute::Data(b"x"))
            .expect("room");
        let n = builder.finish();
        out[..n].to_vec()
    }

    /// The relay to relay rule: a permission for one of uturn's relay IPs reaches exactly the
    /// relayed addresses of live allocations, of this shard or another
    /// (`SetRelayed`); a Send indication to any other port of it (inside the relay range or
    /// not, a listener included), and a datagram from one, are dropped and counted as
    /// `peer_denied`, never relayed.
    #[test]
    fn a_permission_for_a_relay_ip_reaches_live_relayed_addresses_only_in_both_directions() {
        let (mut core, _rx) = core();
        let relay_ip: IpAddr = "127.0.0.1".parse().expect("literal");
        core.set_peer_guard(PeerGuard::new(
            &[relay_ip],
            &[SERVER.parse().expect("literal")],
            false,
        ));
        let relay = open(&mut core, 1, CLIENT.parse().expect("literal"));
        // 20000 stands for an allocation on another shard.
        core.handle_command(ShardCommand::SetRelayed {
            addrs: vec!["127.0.0.1:20000".parse().expect("literal")],
            live: true,
        });
        core.handle_command(ShardCommand::SetPermission {
            alloc: AllocationId(1),
            peer_ip: relay_ip,
        });
        let listener = core.listener_slots()[0];
        let client: SocketAddr = CLIENT.parse().expect("literal");
        let cases = [
            ("127.0.0.1:20000", true),
            ("127.0.0.1:20001", false),
            ("127.0.0.1:51820", false),
            ("127.0.0.1:22", false),
            ("127.0.0.1:3478", false),
        ];
        for (peer, relayed) in cases {
            let (mut buf, range) = buffer(&send_indication(peer));
            let action = core.handle_datagram(listener, client, &mut buf, range);
            assert_eq!(
                matches!(action, Action::Send { .. }),
                relayed,
                "send to {peer}"
            );
            let action = from_peer(&mut core, relay, peer.parse().expect("literal"), b"hello");
            assert_eq!(
                !matches!(action, Action::Done),
                relayed,
                "datagram from {peer}"
            );
        }
        assert_eq!(core.counters.drops.get(DropReason::PeerDenied), 8);
        // The other allocation ends: its address is refused from the next packet on.
        core.handle_command(ShardCommand::SetRelayed {
            addrs: vec!["127.0.0.1:20000".parse().expect("literal")],
            live: false,
        });
        let (mut buf, range) = buffer(&send_indication("127.0.0.1:20000"));
        let action = core.handle_datagram(listener, client, &mut buf, range);
        assert!(matches!(action, Action::Done));
        assert_eq!(core.counters.drops.get(DropReason::PeerDenied), 9);
    }

    /// A channel bound to another allocation outlives it in the tables (until it expires);
    /// ChannelData on it must stop at the allocation's end, because the port may then belong
    /// to any program on the host.
    #[test]
    fn channel_data_to_a_relayed_address_that_is_gone_is_dropped() {
        let (mut core, _rx) = core();
        let other: SocketAddr = "127.0.0.1:20000".parse().expect("literal");
        core.set_peer_guard(PeerGuard::new(&[other.ip()], &[], false));
        core.handle_command(ShardCommand::SetRelayed {
            addrs: vec![other],
            live: true,
        });
        let client: SocketAddr = CLIENT.parse().expect("literal");
        open(&mut core, 1, client);
        let channel = ChannelNumber::new(0x4000).expect("valid");
        core.handle_command(ShardCommand::BindChannel {
            alloc: AllocationId(1),
            channel,
            peer: other,
        });
        let listener = core.listener_slots()[0];
        let mut datagram = vec![0x40, 0x00, 0x00, 0x02, b'h', b'i'];
        let (mut buf, range) = buffer(&datagram);
        let action = core.handle_datagram(listener, client, &mut buf, range);
        assert!(matches!(action, Action::Send { to, .. } if to == other));
        core.handle_command(ShardCommand::SetRelayed {
            addrs: vec![other],
            live: false,
        });
        datagram[4] = b'H';
        let (mut buf, range) = buffer(&datagram);
        let action = core.handle_datagram(listener, client, &mut buf, range);
        assert!(matches!(action, Action::Done));
        assert_eq!(core.counters.drops.get(DropReason::PeerDenied), 1);
    }

    /// No loops, whatever the port range: a listening address is refused as a peer even with
    /// loopback open, and a wildcard listener on its port at every own IP.
    #[test]
    fn a_listening_address_is_never_a_peer() {
        let wildcard: SocketAddr = "0.0.0.0:3478".parse().expect("literal");
        let guard = PeerGuard::new(
            &["10.1.0.1".parse().expect("literal")],
            &[wildcard, "[::1]:50000".parse().expect("literal")],
            true,
        );
        let live: SocketAddr = "10.1.0.1:50000".parse().expect("literal");
        let is_live = |addr: SocketAddr| addr == live;
        for refused in ["10.1.0.1:3478", "127.0.0.1:3478", "[::1]:50000"] {
            let peer: SocketAddr = refused.parse().expect("literal");
            assert!(!guard.admits(peer, is_live), "{refused}");
        }
        for admitted in [
            "10.1.0.1:50000",
            "127.0.0.1:50000",
            "198.51.100.1:3478",
            "[2001:db8::1]:50000",
        ] {
            let peer: SocketAddr = admitted.parse().expect("literal");
            assert!(guard.admits(peer, is_live), "{admitted}");
        }
        assert!(!guard.admits("10.1.0.1:50001".parse().expect("literal"), is_live));
    }

    /// With publishing off (`--no-metrics`, for measuring what metrics cost) a report is
    /// neither built nor sent, and the counters of removed allocations do not pile up.
    #[test]
    fn with_publishing_off_no_report_is_sent_and_nothing_piles_up() {
        let (mut core, rx) = core();
        core.report_counters();
        assert!(matches!(rx.try_recv(), Ok(ToControl::Counters(_))));
        core.set_counters_published(false);
        open(&mut core, 1, CLIENT.parse().expect("literal"));
        core.handle_command(ShardCommand::RemoveAllocation {
            alloc: AllocationId(1),
        });
        assert_eq!(core.removed.len(), 1);
        core.report_counters();
        assert!(rx.try_recv().is_err(), "nothing sent");
        assert!(core.removed.is_empty());
    }

    /// A reload replaces the guard between batches (`SetPeerGuard`): closing loopback makes
    /// the relay IP's other ports unreachable from the next packet on.
    #[test]
    fn a_new_peer_guard_applies_from_the_next_packet() {
        let (mut core, _rx) = core();
        let guard = |allow_loopback| {
            PeerGuard::new(
                &["127.0.0.1".parse().expect("literal")],
                &[],
                allow_loopback,
            )
        };
        core.set_peer_guard(guard(true));
        open(&mut core, 1, CLIENT.parse().expect("literal"));
        core.handle_command(ShardCommand::SetPermission {
            alloc: AllocationId(1),
            peer_ip: "127.0.0.1".parse().expect("literal"),
        });
        let listener = core.listener_slots()[0];
        let client: SocketAddr = CLIENT.parse().expect("literal");
        let (mut buf, range) = buffer(&send_indication("127.0.0.1:22"));
        let action = core.handle_datagram(listener, client, &mut buf, range);
        assert!(matches!(action, Action::Send { .. }), "loopback open");
        assert!(matches!(
            core.handle_command(ShardCommand::SetPeerGuard(guard(false))),
            Effect::None
        ));
        let (mut buf, range) = buffer(&send_indication("127.0.0.1:22"));
        let action = core.handle_datagram(listener, client, &mut buf, range);
        assert!(matches!(action, Action::Done), "loopback closed");
        assert_eq!(core.counters.drops.get(DropReason::PeerDenied), 1);
    }

    /// Issue 8: a per-allocation bandwidth cap. One second's worth passes, the excess is
    /// dropped and counted as `bandwidth` (both directions share the bucket), and the bucket
    /// refills with the shard's clock.
    #[test]
    fn an_allocation_over_its_bandwidth_cap_has_the_excess_dropped_and_counted() {
        let (mut core, _rx) = core();
        core.set_bandwidth_cap(1000);
        let start = Instant::now();
        core.set_now(start);
        let relay = open(&mut core, 1, CLIENT.parse().expect("literal"));
        core.handle_command(ShardCommand::SetPermission {
            alloc: AllocationId(1),
            peer_ip: "198.51.100.1".parse().expect("literal"),
        });
        let peer: SocketAddr = "198.51.100.1:9".parse().expect("literal");
        let relayed = |core: &mut Core| {
            (0..20)
                .filter(|_| !matches!(from_peer(core, relay, peer, &[0u8; 100]), Action::Done))
                .count()
        };
        assert_eq!(relayed(&mut core), 10, "1000 bytes of burst");
        assert_eq!(core.counters.drops.get(DropReason::Bandwidth), 10);
        let listener = core.listener_slots()[0];
        let (mut buf, range) = buffer(&send_indication("198.51.100.1:9"));
        let client: SocketAddr = CLIENT.parse().expect("literal");
        assert!(matches!(
            core.handle_datagram(listener, client, &mut buf, range.clone()),
            Action::Done
        ));
        core.set_now(start + std::time::Duration::from_millis(500));
        // Half a second refills 500 bytes: the 1-byte Send, then four 100-byte datagrams.
        assert!(matches!(
            core.handle_datagram(listener, client, &mut buf, range),
            Action::Send { .. }
        ));
        assert_eq!(relayed(&mut core), 4);
    }

    #[test]
    fn an_ipv4_mapped_client_finds_its_allocation() {
        let (mut core, _rx) = core();
        open(&mut core, 1, CLIENT.parse().expect("literal"));
        let alloc = AllocationId(1);
        let channel = ChannelNumber::new(0x4ABC).expect("valid");
        let peer: SocketAddr = "198.51.100.7:7".parse().expect("literal");
        core.handle_command(ShardCommand::BindChannel {
            alloc,
            channel,
            peer,
        });
        let (mut buf, range) = buffer(&[0x4A, 0xBC, 0x00, 0x02, 0xAA, 0xBB]);
        let mapped: SocketAddr = "[::ffff:192.0.2.10]:50000".parse().expect("literal");
        let listener = core.listener_slots()[0];
        match core.handle_datagram(listener, mapped, &mut buf, range) {
            Action::Send { to, range, .. } => {
                assert_eq!(to, peer);
                assert_eq!(&buf[range], &[0xAA, 0xBB]);
            }
            other => panic!("expected a relay, got {other:?}"),
        }
    }

    #[test]
    fn removing_an_allocation_clears_every_table() {
        let (mut core, _rx) = core();
        open(&mut core, 5, CLIENT.parse().expect("literal"));
        let alloc = AllocationId(5);
        let peer: SocketAddr = "198.51.100.9:9".parse().expect("literal");
        let channel = ChannelNumber::new(0x4001).expect("valid");
        core.handle_command(ShardCommand::SetPermission {
            alloc,
            peer_ip: peer.ip(),
        });
        core.handle_command(ShardCommand::BindChannel {
            alloc,
            channel,
            peer,
        });
        assert!(matches!(
            core.handle_command(ShardCommand::RemoveAllocation { alloc }),
            Effect::Closing([Some(_), None])
        ));
        assert!(core.allocations.is_empty());
        assert!(core.by_client.is_empty());
        assert!(core.channels.is_empty());
        assert!(core.channel_of_peer.is_empty());
        assert!(core.permissions.is_empty());
        assert_eq!(
            core.removed.len(),
            1,
            "final counters kept for the next report"
        );
    }
}
