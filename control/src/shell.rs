//! The control thread: the I/O shell around the sans-IO [`Engine`].
//!
//! It owns the engine and the handle to the data plane, and runs one loop:
//!
//! ```text
//! wait (bounded by engine.poll_timeout()) for: a shard message | a stop/reload signal
//!   shard Request  ──► engine.handle_message(now, wall clock, shard, 5-tuple, bytes)
//!   timer due      ──► engine.handle_timeout(now)
//! drain engine.poll_output():
//!   BindRelay  ──► bind the relay sockets here ──► engine.handle_relay_bound(...)
//!   Table      ──► ShardCommand to the owning shard (OpenAllocation carries the sockets)
//!   Transmit   ──► ShardCommand::Transmit to the shard that owns the 5-tuple
//!   Event      ──► metrics and a log line (see `ops`)
//! admin call (HTTP thread) ──► answered from the engine between two inputs
//! ```
//!
//! Shards never call the engine: they send it bytes and apply what it decides. Commands to one
//! shard travel in one FIFO channel, so `OpenAllocation` always reaches the shard before the
//! Allocate success response that the shard then sends.

mod ops;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, select};
use hashbrown::HashMap;
use rand::RngCore;
use tracing::{debug, error, info, warn};
use uturn_dataplane::{Counters, DataPlane, PeerGuard, RelaySocket, ShardCommand, ToControl};
use uturn_proto::ChannelNumber;

use crate::engine::{BindFailed, Engine, Event, Output, TableChange};
use crate::{AllocationId, BindToken, Config, FiveTuple, PeerPolicy, ShardId, UserTable};

pub use ops::{LogLevelSetter, OpsHooks, RELOADED_TLS_CERTIFICATE, ReloadHook, Reloader};

/// The longest the loop sleeps without looking at the engine's timers again; a bound, so a
/// clock that jumps or a lost wake-up costs at most this much lateness.
const IDLE_WAKEUP_MAX: Duration = Duration::from_millis(250);

/// Outputs executed per loop turn before the loop looks at its inputs again. A bound on the
/// work per wake-up; the engine keeps the rest queued.
const OUTPUTS_PER_TURN_MAX: usize = 4096;

/// The part of `policy` the shards re-check on every relayed packet (see [`PeerGuard`]): on
/// uturn's relay IPs only live relayed addresses are peers (unless loopback is allowed), and
/// the listening addresses never are. The live relayed addresses themselves reach the shards
/// as [`ShardCommand::SetRelayed`]. The rest of the policy reaches the data path as
/// permissions and channels, which the engine grants only to admitted peers and revokes
/// when a reload refuses them.
pub fn data_path_guard(policy: &PeerPolicy) -> PeerGuard {
    PeerGuard::new(
        &policy.own.relay_ips,
        &policy.own.listeners,
        policy.allow_loopback,
    )
}

/// What the outside world asks of the control thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Stop: close the shards and return.
    Stop,
    /// Reload what can change while running (users, REST secrets, peer policy, log level).
    Reload,
    /// Start draining: refuse new allocations, let existing ones run on.
    Drain,
}

/// The control thread's state: the engine plus what the shell must remember for it.
pub struct ControlThread<R: RngCore> {
    engine: Engine<R>,
    dataplane: DataPlane,
    from_shards: Receiver<ToControl>,
    signals: Receiver<Signal>,
    /// Relay sockets bound for an `Output::BindRelay`, until `OpenAllocation` takes them.
    bound: HashMap<BindToken, Vec<RelaySocket>>,
    /// Sockets holding the ports of EVEN-PORT reservations (RFC 8656 §7.2), by address, until
    /// the Allocate with the token takes one or the reservation expires.
    held: HashMap<SocketAddr, UdpSocket>,
    /// Which shard owns each allocation, for log lines.
    owners: HashMap<AllocationId, ShardId>,
    /// Each allocation's relayed addresses (bound and advertised), to tell every shard when
    /// they stop being live.
    relayed: HashMap<AllocationId, Vec<SocketAddr>>,
    /// The latest counters of each shard (cumulative).
    counters: Vec<Option<Counters>>,
    config: Config,
    ops: ops::OpsState,
    /// The XDP program's maps, following the same table changes as the shards.
    xdp: crate::xdp::XdpMirror,
}

impl<R: RngCore> ControlThread<R> {
    /// Builds the engine for `dataplane`'s shard count.
    pub fn new(
        config: Config,
        users: UserTable,
        dataplane: DataPlane,
        from_shards: Receiver<ToControl>,
        signals: Receiver<Signal>,
        rng: R,
    ) -> Result<Self, crate::EngineError> {
        let shard_count = u16::try_from(dataplane.shard_count()).unwrap_or(u16::MAX);
        let mut engine = Engine::new(
            &config.engine_config(),
            users,
            shard_count,
            Instant::now(),
            rng,
        )?;
        let listeners: Vec<SocketAddr> = dataplane
            .listener_addrs()
            .iter()
            .copied()
            .chain(dataplane.stream_listeners().iter().map(|l| l.addr))
            .collect();
        // A wildcard listener answers on every address of the host (a dual-NIC host has a
        // private and a public one): each is named, so no peer loops into it.
        let interfaces: Vec<IpAddr> = if_addrs::get_if_addrs()
            .map(|list| list.into_iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        let listeners = listening_addresses(&listeners, &interfaces);
        engine.set_listener_addrs(&listeners);
        // The shards started knowing the relay IPs only; the listeners' bound addresses (port
        // 0 resolved) are known now. Sent before any allocation can exist.
        let guard = data_path_guard(engine.peer_policy());
        for shard in 0..dataplane.shard_count() {
            let shard = ShardId(u16::try_from(shard).unwrap_or(u16::MAX));
            if let Err(e) = dataplane.send(shard, ShardCommand::SetPeerGuard(guard.clone())) {
                warn!(shard = shard.0, error = %e, "command to shard lost");
            }
        }
        let counters: Vec<Option<Counters>> = (0..dataplane.shard_count()).map(|_| None).collect();
        Ok(Self {
            engine,
            dataplane,
            from_shards,
            signals,
            bound: HashMap::new(),
            held: HashMap::new(),
            owners: HashMap::new(),
            relayed: HashMap::new(),
            ops: ops::OpsState::new(counters.len(), Instant::now()),
            counters,
            config,
            xdp: crate::xdp::XdpMirror::default(),
        })
    }

    /// Mirrors channel changes into an attached XDP program from now on (`relay.xdp`).
    pub fn with_xdp(mut self, xdp: crate::xdp::XdpMirror) -> Self {
        self.xdp = xdp;
        self
    }

    /// Runs until [`Signal::Stop`] (or until every shard is gone), then shuts the data plane
    /// down.
    pub fn run(mut self) {
        let admin = self.ops.admin();
        loop {
            let now = Instant::now();
            let wait = self
                .engine
                .poll_timeout()
                .map_or(IDLE_WAKEUP_MAX, |t| t.saturating_duration_since(now))
                .min(IDLE_WAKEUP_MAX);
            let mut stop = false;
            select! {
                recv(self.from_shards) -> message => match message {
                    Ok(message) => self.handle_shard_message(message),
                    Err(_) => {
                        error!("every shard has stopped; the control thread stops too");
                        stop = true;
                    }
                },
                recv(self.signals) -> signal => match signal {
                    Ok(Signal::Reload) => self.reload(),
                    Ok(Signal::Drain) => self.set_draining(true),
                    Ok(Signal::Stop) | Err(_) => stop = true,
                },
                recv(admin) -> call => if let Ok(call) = call {
                    self.handle_admin(call);
                },
                default(wait) => {}
            }
            if stop {
                break;
            }
            // Timers are checked after every input, not only on idle wake-ups, so a busy
            // server still expires things on time.
            let now = Instant::now();
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
            }
            self.drain_outputs();
            self.ops_tick();
        }
        info!("stopping: closing listeners and relay sockets");
        self.dataplane.shutdown();
    }

    fn handle_shard_message(&mut self, message: ToControl) {
        match message {
            ToControl::Request {
                shard,
                transport,
                server,
                client,
                bytes,
            } => {
                let five_tuple = FiveTuple {
                    transport,
                    client,
                    server,
                };
                self.engine.handle_message(
                    Instant::now(),
                    SystemTime::now(),
                    shard,
                    five_tuple,
                    &bytes,
                );
            }
            ToControl::ConnectionClosed {
                transport,
                server,
                client,
                ..
            } => {
                let five_tuple = FiveTuple {
                    transport,
                    client,
                    server,
                };
                self.engine
                    .handle_connection_closed(Instant::now(), five_tuple);
            }
            ToControl::Counters(counters) => {
                self.ops.telemetry.on_counters(&counters);
                // The program's counters are read at the pace of shard 0's reports.
                if counters.shard.0 == 0 && self.xdp.is_active() {
                    self.ops
                        .telemetry
                        .on_xdp_counters(&self.xdp.poll_counters());
                    if let Some(reasons) = self.xdp.reasons() {
                        let failures = self.xdp.map_failures();
                        self.ops.telemetry.set_xdp_reasons(&reasons, failures);
                    }
                }
                let index = usize::from(counters.shard.0);
                self.ops.telemetry.set_connections(
                    index,
                    crate::Transport::Tcp,
                    counters.shard_counters.stream_open_tcp,
                );
                self.ops.telemetry.set_connections(
                    index,
                    crate::Transport::Tls,
                    counters.shard_counters.stream_open_tls,
                );
                if let Some(slot) = self.counters.get_mut(index) {
                    *slot = Some(*counters);
                }
            }
            other => debug!(?other, "unhandled message from a shard"),
        }
    }

    fn drain_outputs(&mut self) {
        for _ in 0..OUTPUTS_PER_TURN_MAX {
            let Some(output) = self.engine.poll_output() else {
                return;
            };
            match output {
                Output::Transmit { shard, to, bytes } => self.send(
                    shard,
                    ShardCommand::Transmit {
                        transport: to.transport,
                        server: to.server,
                        to: to.client,
                        bytes,
                    },
                ),
                Output::BindRelay {
                    token,
                    shard: _,
                    addrs,
                    hold,
                } => {
                    let result = self.bind_relay(token, &addrs, hold);
                    self.engine
                        .handle_relay_bound(Instant::now(), token, result);
                }
                Output::ReleaseHeld { addr } => {
                    self.held.remove(&addr);
                    uturn_dataplane::sparse::shrink_map(&mut self.held);
                }
                Output::Table { shard, change } => self.apply_table_change(shard, change),
                Output::Event(event) => {
                    self.observe(&event);
                    self.log_event(event);
                }
            }
        }
    }

    /// Binds one UDP socket per address (or takes the one held for it) and the socket to hold
    /// on `hold`; all or nothing (on failure every socket of this bind is closed, a held one
    /// taken included: its reservation was spent by this Allocate).
    fn bind_relay(
        &mut self,
        token: BindToken,
        addrs: &[SocketAddr],
        hold: Option<SocketAddr>,
    ) -> Result<(), BindFailed> {
        let bind = |addr: &SocketAddr| {
            UdpSocket::bind(addr).map_err(|e| {
                debug!(%addr, error = %e, "relay port unavailable");
                BindFailed
            })
        };
        let mut sockets = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let socket = match self.held.remove(addr) {
                Some(socket) => socket,
                None => bind(addr)?,
            };
            sockets.push(RelaySocket {
                socket,
                addr: *addr,
            });
        }
        if let Some(addr) = hold {
            let socket = bind(&addr)?;
            self.held.insert(addr, socket);
        }
        self.bound.insert(token, sockets);
        Ok(())
    }

    fn apply_table_change(&mut self, shard: ShardId, change: TableChange) {
        self.xdp.on_table_change(&change);
        let command = match change {
            TableChange::OpenAllocation {
                alloc,
                token,
                client,
                relays,
                dont_fragment,
            } => {
                let Some(sockets) = self.bound.remove(&token) else {
                    error!(?token, "OpenAllocation without bound sockets (engine bug)");
                    return;
                };
                uturn_dataplane::sparse::shrink_map(&mut self.bound);
                debug_assert_eq!(sockets.len(), relays.len());
                self.owners.insert(alloc, shard);
                let mut addrs: Vec<SocketAddr> = relays
                    .iter()
                    .flat_map(|relay| [relay.bound, relay.advertised])
                    .collect();
                // Without `relay.external_ips` the two are one address.
                addrs.dedup();
                self.broadcast_relayed(&addrs, true);
                self.relayed.insert(alloc, addrs);
                ShardCommand::OpenAllocation {
                    alloc,
                    transport: client.transport,
                    client_server: client.server,
                    client: client.client,
                    relays: sockets,
                    dont_fragment,
                }
            }
            TableChange::SetPermission { alloc, peer_ip } => {
                ShardCommand::SetPermission { alloc, peer_ip }
            }
            TableChange::RemovePermission { alloc, peer_ip } => {
                ShardCommand::RemovePermission { alloc, peer_ip }
            }
            TableChange::BindChannel {
                alloc,
                channel,
                peer,
            } => {
                let Some(channel) = ChannelNumber::new_rfc5766(channel) else {
                    error!(
                        channel,
                        "engine bound an invalid channel number (engine bug)"
                    );
                    return;
                };
                ShardCommand::BindChannel {
                    alloc,
                    channel,
                    peer,
                }
            }
            TableChange::UnbindChannel { alloc, channel } => {
                let Some(channel) = ChannelNumber::new_rfc5766(channel) else {
                    return;
                };
                ShardCommand::UnbindChannel { alloc, channel }
            }
            TableChange::RemoveAllocation { alloc } => {
                self.owners.remove(&alloc);
                uturn_dataplane::sparse::shrink_map(&mut self.owners);
                if let Some(addrs) = self.relayed.remove(&alloc) {
                    uturn_dataplane::sparse::shrink_map(&mut self.relayed);
                    self.broadcast_relayed(&addrs, false);
                }
                ShardCommand::RemoveAllocation { alloc }
            }
        };
        self.send(shard, command);
    }

    /// Tells every shard that `addrs` are (or no longer are) live relayed addresses: a shard
    /// checks peers on the relay IPs against the allocations of all shards (relay to relay
    /// crosses shards), and only the control thread sees them all.
    fn broadcast_relayed(&self, addrs: &[SocketAddr], live: bool) {
        for shard in 0..self.dataplane.shard_count() {
            let shard = ShardId(u16::try_from(shard).unwrap_or(u16::MAX));
            let addrs = addrs.to_vec();
            self.send(shard, ShardCommand::SetRelayed { addrs, live });
        }
    }

    fn send(&self, shard: ShardId, command: ShardCommand) {
        if let Err(e) = self.dataplane.send(shard, command) {
            warn!(shard = shard.0, error = %e, "command to shard lost");
        }
    }

    fn log_event(&mut self, event: Event) {
        match event {
            // Allocation lifecycle and authentication failures are logged by `ops::observe`
            // (with user, client and relayed address, rate-limited).
            Event::AllocationCreated { .. }
            | Event::AllocationDeleted { .. }
            | Event::AllocationExpired { .. }
            | Event::AllocationRevoked { .. }
            | Event::AuthFailed { .. }
            | Event::PeerDenied { .. } => {}
            Event::RelayBindFailed { token, retrying } => {
                log_relay_bind_failed(&mut self.ops.limiter, Instant::now(), token, retrying);
            }
            other => debug!(event = ?other),
        }
    }

    fn reload(&mut self) {
        // The outcome is logged (and counted) by `reload_all`.
        let _ = self.reload_all();
    }
}

/// The warning for a relay port that could not be bound, through the log limiter: when other
/// sockets hold much of the relay range (the kernel's ephemeral ports overlap RFC 8656's
/// default range), every Allocate fails binds in a row, and a flood of Allocates must not turn
/// into a flood of lines. Returns whether the line was written.
fn log_relay_bind_failed(
    limiter: &mut ops::LogLimiter,
    now: Instant,
    token: BindToken,
    retrying: bool,
) -> bool {
    let allowed = limiter.allow("relay_bind_failed", now);
    if allowed {
        warn!(token = token.0, retrying, "could not bind a relay port");
    }
    allowed
}

/// The relay IPs to use when none are configured: the listeners' own IPs when they are
/// specific, else the host's first global IPv4 and IPv6 interface addresses (loopback as the
/// last resort, with a warning).
pub fn default_relay_ips(listen: &[SocketAddr], interfaces: &[IpAddr]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for addr in listen {
        let ip = addr.ip();
        if !ip.is_unspecified() && !ips.iter().any(|i| i.is_ipv4() == ip.is_ipv4()) {
            ips.push(ip);
        }
    }
    let wildcard_v4 = listen
        .iter()
        .any(|a| a.is_ipv4() && a.ip().is_unspecified());
    let wildcard_v6 = listen
        .iter()
        .any(|a| a.is_ipv6() && a.ip().is_unspecified());
    let usable = |ip: &&IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    };
    if wildcard_v4 && !ips.iter().any(IpAddr::is_ipv4) {
        if let Some(ip) = interfaces.iter().filter(|i| i.is_ipv4()).find(usable) {
            ips.push(*ip);
        }
    }
    if wildcard_v6 && !ips.iter().any(IpAddr::is_ipv6) {
        if let Some(ip) = interfaces.iter().filter(|i| i.is_ipv6()).find(usable) {
            ips.push(*ip);
        }
    }
    ips
}

/// The listeners as the peer policy sees them: each one, plus, for a wildcard one, its port on
/// every interface address of its family (loopback and link-local need no entry: the wildcard
/// itself stands for them, and tier 2 refuses link-local anyway).
fn listening_addresses(listeners: &[SocketAddr], interfaces: &[IpAddr]) -> Vec<SocketAddr> {
    let mut all: Vec<SocketAddr> = Vec::with_capacity(listeners.len());
    let named = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    };
    for listener in listeners {
        let expanded = interfaces
            .iter()
            .filter(|ip| listener.ip().is_unspecified() && ip.is_ipv4() == listener.is_ipv4())
            .filter(|ip| named(ip))
            .map(|ip| SocketAddr::new(*ip, listener.port()));
        for addr in std::iter::once(*listener).chain(expanded) {
            if !all.contains(&addr) {
                all.push(addr);
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No loops on a multi-homed host: a wildcard listener is refused as a peer on each of
    /// the host's addresses, not only on the relay IP.
    #[test]
    fn a_wildcard_listener_is_named_on_every_interface_address_of_its_family() {
        let listeners: Vec<SocketAddr> = ["0.0.0.0:3478", "192.0.2.1:443", "[::]:3478"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let interfaces: Vec<IpAddr> = [
            "127.0.0.1",
            "169.254.3.3",
            "10.0.0.5",
            "203.0.113.9",
            "::1",
            "fe80::1",
            "2001:db8::9",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let expected: Vec<SocketAddr> = [
            "0.0.0.0:3478",
            "10.0.0.5:3478",
            "203.0.113.9:3478",
            "192.0.2.1:443",
            "[::]:3478",
            "[2001:db8::9]:3478",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(listening_addresses(&listeners, &interfaces), expected);
    }

    /// Counts the lines a `tracing` subscriber writes.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_burst_of_relay_bind_failures_writes_a_bounded_number_of_lines() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let start = Instant::now();
        let mut limiter = ops::LogLimiter::new(start);
        let written = tracing::subscriber::with_default(subscriber, || {
            (0..1000u64)
                .filter(|n| log_relay_bind_failed(&mut limiter, start, BindToken(*n), true))
                .count()
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let logged = text.matches("could not bind a relay port").count();
        assert_eq!(logged, written);
        assert!(
            (1..=20).contains(&logged),
            "1000 failures in one instant wrote {logged} lines"
        );
        // The rest is summarised, not lost.
        assert_eq!(
            limiter.summarise(start + Duration::from_secs(10)),
            1000 - logged as u64
        );
    }

    #[test]
    fn specific_listen_addresses_become_the_relay_ips() {
        let listen = [
            "127.0.0.1:3478".parse().unwrap(),
            "[::1]:3478".parse().unwrap(),
        ];
        let ips = default_relay_ips(&listen, &[]);
        assert_eq!(
            ips,
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_wildcard_listener_relays_on_the_first_global_interface_address() {
        let listen = ["0.0.0.0:3478".parse().unwrap()];
        let interfaces: Vec<IpAddr> = ["127.0.0.1", "169.254.3.3", "192.0.2.7", "192.0.2.8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(default_relay_ips(&listen, &interfaces), vec![interfaces[2]]);
    }

    #[test]
    fn a_wildcard_listener_with_no_usable_interface_gets_no_relay_ip() {
        let listen = ["[::]:3478".parse().unwrap()];
        let interfaces: Vec<IpAddr> = vec!["::1".parse().unwrap(), "fe80::1".parse().unwrap()];
        assert!(default_relay_ips(&listen, &interfaces).is_empty());
    }
}
