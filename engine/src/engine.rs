//! The sans-IO TURN engine: every protocol decision of the control plane.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use hashbrown::HashMap;
use rand::RngCore;
use uturn_proto::{
    AddressErrorCode, AddressFamily, Attribute, AttributeType, ChannelNumber, Class, ErrorCode,
    ErrorCodeAttribute, Message, MessageBuilder, Method, PasswordAlgorithm, PasswordAlgorithms,
    Protocol, ReservationToken, TransactionId,
};

use crate::allocation::{Allocation, Expiry, RelayAddress, Reservation};
use crate::auth::credentials::UserTable;
use crate::auth::{AuthFailure, AuthRejection, Authenticated, Authenticator, IntegrityKind};
use crate::config::{ConfigError, EngineConfig};
use crate::map::ShrinkingMap;
use crate::policy::{PeerDenied, PeerPolicy};
use crate::ports::{Family, PortAllocator, PortRangeTooSmall, PortShape};
use crate::ratelimit::{RateTable, source_key, user_key};
use crate::timers::Timers;
use crate::{AllocationId, BindToken, FiveTuple, ShardId};

/// How many times the engine picks new ports after the shell fails to bind them, before it
/// answers 508 (Insufficient Capacity). Each try starts at a new random offset, so a port taken
/// by another program costs one bind; eight tries keep a failure unlikely even when a tenth of
/// the range is held by other sockets (the kernel's ephemeral ports overlap RFC 8656's default
/// range unless the host reserves it), and each try is one bind(2) on the control thread.
pub const RELAY_BIND_ATTEMPTS_MAX: u8 = 8;

/// Largest response the engine writes; every response it builds is far smaller.
const RESPONSE_LEN_MAX: usize = 1024;

/// The shell's report that a relay socket could not be bound (the port is taken by another
/// process, or the address is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("relay socket bind failed")]
pub struct BindFailed;

/// Something the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `bytes` to the client on `to`, through `shard`.
    Transmit {
        /// The shard that received the request (and owns the 5-tuple).
        shard: ShardId,
        /// The client's 5-tuple; `to.server` is the listener to send from.
        to: FiveTuple,
        /// A whole STUN message.
        bytes: Vec<u8>,
    },
    /// Bind one UDP socket per address, keep them under `token`, then call
    /// [`Engine::handle_relay_bound`] with the result (all bound, or the first failure after
    /// closing the others).
    BindRelay {
        /// Names the sockets until `OpenAllocation` hands them to the shard.
        token: BindToken,
        /// The shard that will own the allocation.
        shard: ShardId,
        /// Relay IP and port for each socket. An address held for a reservation
        /// ([`Output::BindRelay::hold`]) is that held socket, not a new bind: the engine names it
        /// only for the Allocate that presents the reservation's token.
        addrs: Vec<SocketAddr>,
        /// EVEN-PORT with R (RFC 8656 §7.2): also bind this address, the next port up, and hold
        /// the socket for the reservation, so that nothing else on the host takes the port,
        /// until a later `BindRelay` names it or [`Output::ReleaseHeld`] closes it. A failure to
        /// bind it fails the whole bind (the engine then tries another pair).
        hold: Option<SocketAddr>,
    },
    /// Close the socket held for a reservation that expired unused.
    ReleaseHeld {
        /// The address it holds.
        addr: SocketAddr,
    },
    /// Apply a change to `shard`'s tables.
    Table {
        /// The shard that owns the allocation.
        shard: ShardId,
        /// The change.
        change: TableChange,
    },
    /// For logs and metrics.
    Event(Event),
}

/// A change to a shard's forwarding tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableChange {
    /// A new allocation: the shard takes the sockets bound under `token` and routes the client
    /// 5-tuple to them. Always emitted before the Allocate success response.
    OpenAllocation {
        /// The allocation.
        alloc: AllocationId,
        /// The sockets the shell bound for [`Output::BindRelay`].
        token: BindToken,
        /// The client 5-tuple.
        client: FiveTuple,
        /// The relayed transport addresses (one, or two for a dual-stack allocation).
        relays: Vec<RelayAddress>,
        /// RFC 8656 §7.2 item 4: send relayed datagrams with DF set.
        dont_fragment: bool,
    },
    /// Install a permission for `peer_ip` (RFC 8656 §9: IP only, any port).
    SetPermission {
        /// The allocation.
        alloc: AllocationId,
        /// The peer IP.
        peer_ip: IpAddr,
    },
    /// Remove a permission (it expired).
    RemovePermission {
        /// The allocation.
        alloc: AllocationId,
        /// The peer IP.
        peer_ip: IpAddr,
    },
    /// Bind `channel` to `peer` (RFC 8656 §12).
    BindChannel {
        /// The allocation.
        alloc: AllocationId,
        /// 0x4000-0x4FFF.
        channel: u16,
        /// The peer transport address.
        peer: SocketAddr,
    },
    /// Remove a channel binding (it expired).
    UnbindChannel {
        /// The allocation.
        alloc: AllocationId,
        /// The channel number.
        channel: u16,
    },
    /// Remove the allocation with its permissions and channels, and close its relay sockets.
    RemoveAllocation {
        /// The allocation.
        alloc: AllocationId,
    },
}

/// What happened, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A request was answered; `code` is `None` for a success response.
    RequestHandled {
        /// The client.
        client: FiveTuple,
        /// The request method.
        method: Method,
        /// The error code, or `None` for success.
        code: Option<u16>,
    },
    /// A request failed authentication (it is also reported as `RequestHandled`).
    AuthFailed {
        /// The client.
        client: FiveTuple,
        /// The USERNAME given, if any.
        username: Option<String>,
        /// Why.
        reason: AuthFailure,
        /// The error code sent.
        code: u16,
    },
    /// An allocation was created.
    AllocationCreated {
        /// The allocation.
        alloc: AllocationId,
        /// The client.
        client: FiveTuple,
        /// The authenticated user.
        user: String,
        /// Its relayed addresses.
        relays: Vec<RelayAddress>,
        /// Granted lifetime.
        lifetime_secs: u32,
    },
    /// A Refresh set a new lifetime.
    AllocationRefreshed {
        /// The allocation.
        alloc: AllocationId,
        /// Granted lifetime.
        lifetime_secs: u32,
    },
    /// A Refresh with LIFETIME 0 deleted the allocation.
    AllocationDeleted {
        /// The allocation.
        alloc: AllocationId,
    },
    /// An operator ended the allocation ([`Engine::delete_allocation`]).
    AllocationRevoked {
        /// The allocation.
        alloc: AllocationId,
    },
    /// The allocation's lifetime ran out.
    AllocationExpired {
        /// The allocation.
        alloc: AllocationId,
    },
    /// A permission was installed.
    PermissionCreated {
        /// The allocation.
        alloc: AllocationId,
        /// The peer IP.
        peer_ip: IpAddr,
    },
    /// A permission expired.
    PermissionExpired {
        /// The allocation.
        alloc: AllocationId,
        /// The peer IP.
        peer_ip: IpAddr,
    },
    /// A channel was bound.
    ChannelBound {
        /// The allocation.
        alloc: AllocationId,
        /// The channel number.
        channel: u16,
        /// The peer.
        peer: SocketAddr,
    },
    /// A channel binding expired.
    ChannelExpired {
        /// The allocation.
        alloc: AllocationId,
        /// The channel number.
        channel: u16,
        /// The peer.
        peer: SocketAddr,
    },
    /// A CreatePermission or ChannelBind named a peer the policy refuses (answered 403).
    PeerDenied {
        /// The allocation.
        alloc: AllocationId,
        /// The refused peer IP.
        peer_ip: IpAddr,
        /// Why.
        reason: PeerDenied,
    },
    /// A reload made the peer policy refuse a peer that had a permission: the permission (and
    /// any channel to that peer) was removed.
    PermissionRevoked {
        /// The allocation.
        alloc: AllocationId,
        /// The peer IP.
        peer_ip: IpAddr,
        /// Why the new policy refuses it.
        reason: PeerDenied,
    },
    /// A port reserved with EVEN-PORT R=1 was not claimed in time and is free again.
    ReservationExpired {
        /// The port.
        port: u16,
    },
    /// The shell could not bind relay sockets; `retrying` tells whether other ports are tried.
    RelayBindFailed {
        /// The failed token.
        token: BindToken,
        /// Whether the engine tries again (otherwise the Allocate is answered 508).
        retrying: bool,
    },
    /// A message was dropped without an answer.
    Dropped {
        /// The sender.
        client: FiveTuple,
        /// Why.
        reason: DropReason,
    },
}

/// Why a message was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// Not a STUN message that parses (RFC 8489 §6.3: silently discarded).
    Malformed,
    /// An indication: Send indications belong to the data plane (RFC 8656 §11.2) and any other
    /// indication from a client has no meaning here.
    Indication(Method),
    /// A success or error response: the server sends no requests.
    Response,
    /// A retransmitted Allocate whose relay sockets are still being bound; the answer to the
    /// first transmission will come.
    AllocatePending,
    /// The source is over its budget of answers to unauthenticated requests
    /// (`limits.unauthenticated_per_source_per_sec`): no answer, so no reflection.
    RateLimited,
    /// The source or the user is over its budget of failed authentications
    /// (`limits.auth_failures_per_*`).
    AuthRateLimited,
}

impl DropReason {
    /// A static label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Indication(_) => "indication",
            Self::Response => "response",
            Self::AllocatePending => "allocate_pending",
            Self::RateLimited => "rate_limited",
            Self::AuthRateLimited => "auth_rate_limited",
        }
    }
}

/// One allocation as [`Engine::allocations`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationInfo<'a> {
    /// The allocation.
    pub id: AllocationId,
    /// The client 5-tuple.
    pub client: FiveTuple,
    /// The shard that owns it.
    pub shard: ShardId,
    /// The authenticated user.
    pub user: &'a str,
    /// Its relayed addresses.
    pub relays: &'a [RelayAddress],
    /// When it expires unless refreshed.
    pub expires_at: Instant,
    /// Number of permissions.
    pub permissions: usize,
    /// Number of channel bindings.
    pub channels: usize,
}

/// One allocation in full, as the admin API shows it (owned, so it can leave the control
/// thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationSnapshot {
    /// The allocation.
    pub id: AllocationId,
    /// The client 5-tuple.
    pub client: FiveTuple,
    /// The shard that owns it.
    pub shard: ShardId,
    /// The authenticated user.
    pub user: String,
    /// Its relayed addresses.
    pub relays: Vec<RelayAddress>,
    /// When it was created.
    pub created_at: Instant,
    /// When it expires unless refreshed.
    pub expires_at: Instant,
    /// Permissions: peer IP and expiry, sorted by IP.
    pub permissions: Vec<(IpAddr, Instant)>,
    /// Channel bindings: number, peer and expiry, sorted by number.
    pub channels: Vec<(u16, SocketAddr, Instant)>,
    /// Requests answered on its 5-tuple (the Allocate included).
    pub requests: u64,
    /// Of those, error responses.
    pub errors: u64,
}

/// Why a reload was refused; the old configuration stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReloadRefused(pub &'static str);

/// An engine that cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The port range is empty.
    #[error("relay.port_min/port_max: {0}")]
    PortRange(#[from] PortRangeTooSmall),
    /// The user table was built for another realm.
    #[error("user table realm {found:?} differs from auth.realm {expected:?}")]
    RealmMismatch {
        /// The engine's realm.
        expected: String,
        /// The table's realm.
        found: String,
    },
}

/// Settings read once from the config.
#[derive(Debug, Clone)]
struct Settings {
    software: Option<String>,
    binding_requires_auth: bool,
    allocation_lifetime_default_secs: u32,
    allocation_lifetime_max_secs: u32,
    permission_lifetime: Duration,
    channel_lifetime: Duration,
    reservation_lifetime: Duration,
    allocations_per_user: u32,
    allocations_total: u32,
    /// Alternate servers for 300 (Try Alternate) while draining, from `ops.alternate_servers`.
    alternate_servers: Vec<SocketAddr>,
    permissions_per_allocation: u32,
    channels_per_allocation: u32,
    accept_rfc5766_channel_numbers: bool,
}

/// Where a 5-tuple stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Pending(BindToken),
    Active(AllocationId),
}

/// The request being answered.
#[derive(Debug, Clone, Copy)]
struct RequestContext {
    shard: ShardId,
    five_tuple: FiveTuple,
    method: Method,
    transaction: TransactionId,
    fingerprint: bool,
}

/// An Allocate that passed every check and waits for its relay sockets.
#[derive(Debug)]
struct PendingAllocate {
    request: RequestContext,
    auth: Authenticated,
    families: Vec<Family>,
    shape: PortShape,
    /// Ports chosen for this attempt, one per family.
    ports: Vec<u16>,
    /// The port taken from a RESERVATION-TOKEN, if any (not re-picked on bind failure).
    from_reservation: bool,
    lifetime_secs: u32,
    dont_fragment: bool,
    /// RFC 8656 §7.2 item 9: ADDRESS-ERROR-CODE for the family that could not be allocated.
    address_error: Option<(AddressFamily, u16)>,
    attempts: u8,
}

/// The sans-IO TURN engine (RFC 8656 server side, with RFC 8489 long-term authentication).
///
/// It takes inputs with an explicit `now` ([`Engine::handle_message`],
/// [`Engine::handle_relay_bound`], [`Engine::handle_timeout`]) and queues [`Output`]s: responses
/// for clients, relay sockets to bind, table changes for the shards, and events. It never
/// reads the clock, performs no I/O and holds no locks; randomness (nonce secret, ports,
/// reservation tokens) comes from `R`.
///
/// **After every input, call [`Engine::poll_output`] until it returns `None`, then
/// [`Engine::poll_timeout`] to learn when to call [`Engine::handle_timeout`].** Outputs are in
/// the order the shell must execute them: an allocation's `OpenAllocation` comes before its
/// success response, so forwarding them through one FIFO per shard keeps them ordered.
///
/// ```no_run
/// use std::time::{Instant, SystemTime};
/// use rand::SeedableRng;
/// use uturn_engine::{EngineConfig, Engine, FiveTuple, Output, ShardId, Transport, UserTable};
///
/// let config = EngineConfig::default();
/// let users = UserTable::from_users(&config.auth.realm, &config.auth.users).expect("users");
/// let rng = rand::rngs::StdRng::from_os_rng();
/// let mut engine = Engine::new(&config, users, 1, Instant::now(), rng).expect("engine");
/// let client = FiveTuple {
///     transport: Transport::Udp,
///     client: "198.51.100.1:5000".parse().unwrap(),
///     server: "192.0.2.1:3478".parse().unwrap(),
/// };
/// let datagram = [0u8; 20]; // bytes received from the client
/// engine.handle_message(Instant::now(), SystemTime::now(), ShardId(0), client, &datagram);
/// while let Some(output) = engine.poll_output() {
///     match output {
///         Output::Transmit { shard, to, bytes } => { /* queue to the shard */ }
///         Output::BindRelay { token, shard, addrs, hold } => {
///             // bind sockets (and hold `hold`), then:
///             engine.handle_relay_bound(Instant::now(), token, Ok(()));
///         }
///         Output::ReleaseHeld { addr } => { /* close the socket held on `addr` */ }
///         Output::Table { shard, change } => { /* forward to the shard */ }
///         Output::Event(event) => { /* log, count */ }
///     }
/// }
/// if let Some(deadline) = engine.poll_timeout() {
///     // sleep until `deadline` (or the next input), then:
///     engine.handle_timeout(deadline);
/// }
/// ```
pub struct Engine<R: RngCore> {
    rng: R,
    settings: Settings,
    auth: Authenticator,
    policy: PeerPolicy,
    ports: PortAllocator,
    /// Bound and advertised relay IP, per family (index 0 IPv4, 1 IPv6).
    relay_ips: [Option<(IpAddr, IpAddr)>; 2],
    allocations: ShrinkingMap<AllocationId, Allocation>,
    slots: ShrinkingMap<FiveTuple, Slot>,
    pending: ShrinkingMap<BindToken, PendingAllocate>,
    reservations: ShrinkingMap<[u8; 8], Reservation>,
    /// Allocations (active and pending) per user, for RFC 8656 §7.2 item 10.
    per_user: HashMap<String, u32>,
    timers: Timers<Expiry>,
    outputs: VecDeque<Output>,
    next_allocation: u64,
    next_token: u64,
    scratch: Vec<u8>,
    /// Draining: new Allocates are refused (300 or 508), existing allocations run on.
    draining: bool,
    /// Answers to unauthenticated requests, per source (issue 8: reflection).
    unauthenticated: RateTable,
    /// Failed authentications per source and per user (password guessing).
    auth_failures_source: RateTable,
    auth_failures_user: RateTable,
}

impl<R: RngCore> std::fmt::Debug for Engine<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("allocations", &self.allocations.len())
            .field("pending", &self.pending.len())
            .field("reservations", &self.reservations.len())
            .field("timers", &self.timers.len())
            .finish_non_exhaustive()
    }
}

impl<R: RngCore> Engine<R> {
    /// Builds an engine. `users` is the static user table (see [`UserTable::from_config`]);
    /// `shard_count` is the number of data-plane shards (`server.threads` once resolved); they
    /// share one port range (see [`crate::ports`]); `now` starts the engine's clock.
    pub fn new(
        config: &EngineConfig,
        users: UserTable,
        shard_count: u16,
        now: Instant,
        mut rng: R,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        if users.realm() != config.auth.realm && !users.is_empty() {
            return Err(EngineError::RealmMismatch {
                expected: config.auth.realm.clone(),
                found: users.realm().to_owned(),
            });
        }
        let mapping = config.external_mappings()?;
        let mut relay_ips = [None, None];
        for ip in &config.relay.relay_ips {
            let advertised = mapping
                .iter()
                .find(|(private, _)| private == ip)
                .map_or(*ip, |(_, public)| *public);
            relay_ips[family_index(Family::of(*ip))] = Some((*ip, advertised));
        }
        // The shards share one port range (see `ports`), so nothing here is per shard: every
        // input names its shard. The count stays in the signature so that callers keep stating
        // the topology the engine serves.
        let _ = shard_count;
        let ports = PortAllocator::new(config.relay.port_min, config.relay.port_max)?;
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let slots = usize::try_from(config.limits.rate_limit_slots).unwrap_or(1 << 14);
        let limits = &config.limits;
        let unauthenticated = RateTable::new(
            limits.unauthenticated_per_source_per_sec,
            limits.unauthenticated_burst,
            slots,
            rng.next_u64(),
        );
        let auth_failures_source = RateTable::new(
            limits.auth_failures_per_source_per_sec,
            limits.auth_failures_per_source_burst,
            slots,
            rng.next_u64(),
        );
        let auth_failures_user = RateTable::new(
            limits.auth_failures_per_user_per_sec,
            limits.auth_failures_per_user_burst,
            slots,
            rng.next_u64(),
        );
        let relay = &config.relay;
        let limits = &config.limits;
        let settings = Settings {
            software: config.software.clone(),
            binding_requires_auth: config.auth.binding_requires_auth,
            allocation_lifetime_default_secs: relay.allocation_lifetime_default_secs,
            allocation_lifetime_max_secs: relay.allocation_lifetime_max_secs,
            permission_lifetime: secs(relay.permission_lifetime_secs),
            channel_lifetime: secs(relay.channel_lifetime_secs),
            reservation_lifetime: secs(relay.reservation_lifetime_secs),
            allocations_per_user: limits.allocations_per_user,
            allocations_total: limits.allocations_total,
            alternate_servers: config.alternate_servers.clone(),
            permissions_per_allocation: limits.permissions_per_allocation,
            channels_per_allocation: limits.channels_per_allocation,
            accept_rfc5766_channel_numbers: relay.accept_rfc5766_channel_numbers,
        };
        Ok(Self {
            rng,
            settings,
            auth: Authenticator::new(&config.auth, users, secret, now),
            policy: PeerPolicy::from_config(config),
            ports,
            relay_ips,
            allocations: ShrinkingMap::new(),
            slots: ShrinkingMap::new(),
            pending: ShrinkingMap::new(),
            reservations: ShrinkingMap::new(),
            per_user: HashMap::new(),
            timers: Timers::new(),
            outputs: VecDeque::new(),
            next_allocation: 0,
            next_token: 0,
            scratch: vec![0; RESPONSE_LEN_MAX],
            draining: false,
            unauthenticated,
            auth_failures_source,
            auth_failures_user,
        })
    }

    /// Replaces the static users (for example after the users file changed). Existing
    /// allocations keep the key they were authenticated with.
    pub fn reload_users(&mut self, users: UserTable) -> Result<(), EngineError> {
        if users.realm() != self.auth.realm() && !users.is_empty() {
            return Err(EngineError::RealmMismatch {
                expected: self.auth.realm().to_owned(),
                found: users.realm().to_owned(),
            });
        }
        self.auth.replace_users(users);
        Ok(())
    }

    /// Replaces the TURN REST shared secrets (`auth.secrets`, `auth.rest_separator`,
    /// `auth.rest_key_cache_entries`, `auth.rest_expiry_max_secs`). Refused when it would switch
    /// REST credentials on or off.
    pub fn reload_secrets(
        &mut self,
        auth: &crate::config::AuthConfig,
    ) -> Result<(), ReloadRefused> {
        self.auth.replace_secrets(auth).map_err(ReloadRefused)
    }

    /// Tells the policy uturn's bound listening addresses (known once the data plane runs): a
    /// peer equal to one of them is refused, so a client cannot make uturn talk to itself.
    pub fn set_listener_addrs(&mut self, listeners: &[SocketAddr]) {
        self.policy.own.listeners = listeners.to_vec();
    }

    /// Replaces the peer policy (a reload): `allow_loopback` and the allowed and denied
    /// lists. uturn's own addresses (relay IPs, relay port range, listeners) carry over from
    /// the running policy whatever `policy` says, because they change only with a restart: a
    /// reloaded file that edits them must not make the engine judge peers by relay ports
    /// nothing is bound on. Permissions and channels the new policy refuses are revoked at
    /// once ([`TableChange::RemovePermission`], [`TableChange::UnbindChannel`],
    /// [`Event::PermissionRevoked`]), so a peer taken off the allow list stops receiving
    /// within one command round trip instead of living on until its permission expires.
    /// The shell sends the shards the policy's data-path part as well
    /// (`shell::data_path_guard`).
    pub fn set_peer_policy(&mut self, mut policy: PeerPolicy) {
        policy.own = std::mem::take(&mut self.policy.own);
        self.policy = policy;
        let mut ids: Vec<AllocationId> = self.allocations.keys().copied().collect();
        ids.sort();
        for alloc in ids {
            let Some(allocation) = self.allocations.get_mut(&alloc) else {
                continue;
            };
            let shard = allocation.shard;
            let mut channels: Vec<(u16, SocketAddr)> = allocation
                .channels
                .iter()
                .filter(|(_, (peer, _))| self.policy.check(*peer).is_err())
                .map(|(n, (peer, _))| (*n, *peer))
                .collect();
            channels.sort();
            let mut permissions: Vec<IpAddr> = allocation
                .permissions
                .keys()
                .filter(|ip| self.policy.check_permission(**ip).is_err())
                .copied()
                .collect();
            permissions.sort();
            let mut changes = Vec::new();
            for (channel, peer) in channels {
                if let Some((_, key)) = allocation.channels.remove(&channel) {
                    self.timers.cancel(key);
                }
                allocation.channel_by_peer.remove(&peer);
                changes.push(TableChange::UnbindChannel { alloc, channel });
            }
            for peer_ip in permissions {
                if let Some(key) = allocation.permissions.remove(&peer_ip) {
                    self.timers.cancel(key);
                }
                changes.push(TableChange::RemovePermission { alloc, peer_ip });
                let reason = self
                    .policy
                    .check_permission(peer_ip)
                    .err()
                    .unwrap_or(PeerDenied::Configured);
                self.outputs
                    .push_back(Output::Event(Event::PermissionRevoked {
                        alloc,
                        peer_ip,
                        reason,
                    }));
            }
            for change in changes {
                self.push_table(shard, change);
            }
        }
    }

    /// The peer policy in force.
    pub fn peer_policy(&self) -> &PeerPolicy {
        &self.policy
    }

    /// Starts or stops draining. While draining every new Allocate is answered 300 (Try
    /// Alternate) with ALTERNATE-SERVER when `ops.alternate_servers` has an address of the
    /// client's family, else 508 (Insufficient Capacity); existing allocations, their
    /// refreshes, permissions and channels carry on until they expire.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Replaces the alternate servers a draining engine sends new clients to
    /// (`ops.alternate_servers`, reloadable so that an operator can name them just before
    /// draining).
    pub fn set_alternate_servers(&mut self, servers: Vec<SocketAddr>) {
        self.settings.alternate_servers = servers;
    }

    /// Whether the engine is draining.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Ends one allocation now, as an operator's decision: its shard is told to remove it
    /// (`RemoveAllocation`) and [`Event::AllocationRevoked`] is emitted. Returns false when no
    /// such allocation exists. `now` is unused today and kept for symmetry with the other
    /// inputs.
    pub fn delete_allocation(&mut self, now: Instant, alloc: AllocationId) -> bool {
        let _ = now;
        if !self.allocations.contains_key(&alloc) {
            return false;
        }
        self.remove_allocation(alloc);
        self.push_event(Event::AllocationRevoked { alloc });
        true
    }

    /// Every allocation in full (permissions and channels with their expiry, request counts),
    /// sorted by id.
    pub fn allocation_snapshots(&self) -> Vec<AllocationSnapshot> {
        let mut all: Vec<AllocationSnapshot> = self
            .allocations
            .iter()
            .map(|(id, a)| {
                let mut permissions: Vec<(IpAddr, Instant)> = a
                    .permissions
                    .iter()
                    .map(|(ip, key)| (*ip, key.deadline()))
                    .collect();
                permissions.sort();
                let mut channels: Vec<(u16, SocketAddr, Instant)> = a
                    .channels
                    .iter()
                    .map(|(n, (peer, key))| (*n, *peer, key.deadline()))
                    .collect();
                channels.sort();
                AllocationSnapshot {
                    id: *id,
                    client: a.five_tuple,
                    shard: a.shard,
                    user: a.auth.user().to_owned(),
                    relays: a.relays.clone(),
                    created_at: a.created_at,
                    expires_at: a.expiry.deadline(),
                    permissions,
                    channels,
                    requests: a.requests,
                    errors: a.errors,
                }
            })
            .collect();
        all.sort_by_key(|a| a.id);
        all
    }

    /// Number of allocations (not counting those waiting for their relay sockets).
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// A read-only view of every allocation, for status pages and the admin API.
    pub fn allocations(&self) -> impl Iterator<Item = AllocationInfo<'_>> + '_ {
        self.allocations
            .iter()
            .map(|(id, allocation)| AllocationInfo {
                id: *id,
                client: allocation.five_tuple,
                shard: allocation.shard,
                user: allocation.auth.user(),
                relays: &allocation.relays,
                expires_at: allocation.expiry.deadline(),
                permissions: allocation.permissions.len(),
                channels: allocation.channels.len(),
            })
    }

    /// The next output, in execution order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next deadline at which [`Engine::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Expires everything due at `now` (deadline `<= now`). Calling it early is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((_, expiry)) = self.timers.pop_due(now) {
            match expiry {
                Expiry::Allocation(alloc) => {
                    self.remove_allocation(alloc);
                    self.push_event(Event::AllocationExpired { alloc });
                }
                Expiry::Permission(alloc, peer_ip) => {
                    let Some(allocation) = self.allocations.get_mut(&alloc) else {
                        continue;
                    };
                    allocation.permissions.remove(&peer_ip);
                    let shard = allocation.shard;
                    self.push_table(shard, TableChange::RemovePermission { alloc, peer_ip });
                    self.push_event(Event::PermissionExpired { alloc, peer_ip });
                }
                Expiry::Channel(alloc, channel) => {
                    let Some(allocation) = self.allocations.get_mut(&alloc) else {
                        continue;
                    };
                    let Some((peer, _)) = allocation.channels.remove(&channel) else {
                        continue;
                    };
                    allocation.channel_by_peer.remove(&peer);
                    let shard = allocation.shard;
                    self.push_table(shard, TableChange::UnbindChannel { alloc, channel });
                    self.push_event(Event::ChannelExpired {
                        alloc,
                        channel,
                        peer,
                    });
                }
                Expiry::Reservation(token) => {
                    if let Some(reservation) = self.reservations.remove(&token) {
                        self.ports.release(reservation.family, reservation.port);
                        if let Some((bound, _)) = self.relay_ips[family_index(reservation.family)] {
                            self.outputs.push_back(Output::ReleaseHeld {
                                addr: SocketAddr::new(bound, reservation.port),
                            });
                        }
                        self.push_event(Event::ReservationExpired {
                            port: reservation.port,
                        });
                    }
                }
            }
        }
    }

    /// Handles one STUN message from a client. `wall_clock` is only used for TURN REST
    /// credential expiry; `shard` is the shard that received the message.
    pub fn handle_message(
        &mut self,
        now: Instant,
        wall_clock: SystemTime,
        shard: ShardId,
        five_tuple: FiveTuple,
        bytes: &[u8],
    ) {
        let Ok(message) = Message::parse(bytes) else {
            self.push_event(Event::Dropped {
                client: five_tuple,
                reason: DropReason::Malformed,
            });
            return;
        };
        match message.class() {
            Class::Request => {}
            Class::Indication => {
                // RFC 8656 §11.2: Send indications are handled by the data plane (permission
                // check, then relay); one that reaches the engine is dropped. Indications
                // cannot be authenticated (RFC 8489 §9.2), so nothing else is done with them.
                let reason = DropReason::Indication(message.method());
                self.push_event(Event::Dropped {
                    client: five_tuple,
                    reason,
                });
                return;
            }
            Class::SuccessResponse | Class::ErrorResponse => {
                self.push_event(Event::Dropped {
                    client: five_tuple,
                    reason: DropReason::Response,
                });
                return;
            }
        }
        let request = RequestContext {
            shard,
            five_tuple,
            method: message.method(),
            transaction: message.transaction_id(),
            fingerprint: message.has_fingerprint(),
        };
        let unix_secs = wall_clock
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());

        if request.method == Method::BINDING && !self.settings.binding_requires_auth {
            // RFC 8489 §6.3.1: Binding needs no credentials unless configured otherwise.
            if !self.unauthenticated_budget(now, &request) {
                return;
            }
            let attrs = [Attribute::XorMappedAddress(five_tuple.client)];
            self.respond_success(&request, &attrs, None);
            return;
        }
        if request.method == Method::ALLOCATE {
            // RFC 8656 §7.2 note: a retransmitted Allocate gets the original success response.
            match self.slots.get(&five_tuple) {
                Some(Slot::Active(alloc)) => {
                    if let Some(allocation) = self.allocations.get(alloc) {
                        if allocation.allocate_transaction == request.transaction {
                            let bytes = allocation.allocate_response.clone();
                            self.outputs.push_back(Output::Transmit {
                                shard,
                                to: five_tuple,
                                bytes,
                            });
                            self.push_handled(&request, None);
                            return;
                        }
                    }
                }
                Some(Slot::Pending(token)) => {
                    let same = self
                        .pending
                        .get(token)
                        .is_some_and(|p| p.request.transaction == request.transaction);
                    if same {
                        let reason = DropReason::AllocatePending;
                        self.push_event(Event::Dropped {
                            client: five_tuple,
                            reason,
                        });
                        return;
                    }
                }
                None => {}
            }
        }
        if !matches!(
            request.method,
            Method::BINDING
                | Method::ALLOCATE
                | Method::REFRESH
                | Method::CREATE_PERMISSION
                | Method::CHANNEL_BIND
        ) {
            // RFC 8489 §6.3.1: a request with a method the server does not handle (including
            // RFC 6062 TCP relaying, which uturn does not offer) is answered 400.
            if self.unauthenticated_budget(now, &request) {
                self.respond_error(&request, 400, &[], None);
            }
            return;
        }
        // A source over its budget of failed authentications has every credentialed request
        // dropped until the budget refills: password guessing from it gets no answer at all.
        if message.has_integrity() || message.has_integrity_sha256() {
            let source = source_key(five_tuple.client.ip());
            if !self.auth_failures_source.has_token(source, now) {
                let reason = DropReason::AuthRateLimited;
                self.push_event(Event::Dropped {
                    client: five_tuple,
                    reason,
                });
                return;
            }
        }
        let auth = match self
            .auth
            .authenticate(&message, &five_tuple, now, unix_secs)
        {
            Ok(auth) => auth,
            Err(rejection) => {
                self.reject_auth(&request, now, rejection);
                return;
            }
        };
        match request.method {
            Method::BINDING => {
                let attrs = [Attribute::XorMappedAddress(five_tuple.client)];
                self.respond_success(&request, &attrs, Some(&auth));
            }
            Method::ALLOCATE => self.handle_allocate(&request, &message, auth),
            Method::REFRESH => self.handle_refresh(now, &request, &message, &auth),
            Method::CREATE_PERMISSION => {
                self.handle_create_permission(now, &request, &message, &auth);
            }
            _ => self.handle_channel_bind(now, &request, &message, &auth),
        }
    }

    /// A TCP or TLS connection from a client closed. RFC 8656 §3.1: over a stream transport
    /// the 5-tuple is the connection, and "if the TCP connection is closed, the allocation is
    /// deleted"; the allocation (if any) on `five_tuple` goes at once, with
    /// [`TableChange::RemoveAllocation`] for its shard and [`Event::AllocationDeleted`].
    /// A pending Allocate (relay not bound yet) is abandoned the same way when its bind
    /// completes: the slot is forgotten here, so [`Engine::handle_relay_bound`] answers a client
    /// that is gone and the allocation is created and then expires. The shell binds relays
    /// before it handles the next input, so that window does not occur in uturn. UDP 5-tuples
    /// have no connection; calling this for one is a no-op.
    pub fn handle_connection_closed(&mut self, now: Instant, five_tuple: FiveTuple) {
        let _ = now;
        if five_tuple.transport == crate::Transport::Udp {
            return;
        }
        if let Some(&Slot::Active(alloc)) = self.slots.get(&five_tuple) {
            self.remove_allocation(alloc);
            self.push_event(Event::AllocationDeleted { alloc });
        }
    }

    /// The shell's answer to [`Output::BindRelay`]. On failure the engine picks other ports
    /// (up to [`RELAY_BIND_ATTEMPTS_MAX`] attempts) or answers the Allocate 508.
    pub fn handle_relay_bound(
        &mut self,
        now: Instant,
        token: BindToken,
        result: Result<(), BindFailed>,
    ) {
        let Some(mut pending) = self.pending.remove(&token) else {
            return;
        };
        let request = pending.request;
        if result.is_err() {
            self.release_ports(&pending.families, &pending.ports);
            if pending.shape == PortShape::EvenPair {
                if let Some((family, port)) = pending.families.first().zip(pending.ports.first()) {
                    self.ports.release(*family, port + 1);
                }
            }
            let retrying = !pending.from_reservation && pending.attempts < RELAY_BIND_ATTEMPTS_MAX;
            self.push_event(Event::RelayBindFailed { token, retrying });
            if retrying {
                if let Some(ports) = self.pick_ports(&pending.families, pending.shape) {
                    pending.ports = ports;
                    pending.attempts += 1;
                    self.start_bind(pending);
                    return;
                }
            }
            self.slots.remove(&request.five_tuple);
            self.uncount_user(pending.auth.user());
            self.respond_error(&request, 508, &[], Some(&pending.auth));
            return;
        }

        self.next_allocation += 1;
        let alloc = AllocationId(self.next_allocation);
        let relays = self.relay_addresses(&pending.families, &pending.ports);
        let lifetime_secs = pending.lifetime_secs;
        let expiry = self
            .timers
            .schedule(now + secs(lifetime_secs), Expiry::Allocation(alloc));

        let mut token_attr = None;
        if pending.shape == PortShape::EvenPair {
            if let Some((family, port)) = pending.families.first().zip(pending.ports.first()) {
                let mut reservation_token = [0u8; 8];
                self.rng.fill_bytes(&mut reservation_token);
                let deadline = now + self.settings.reservation_lifetime;
                let expiry = self
                    .timers
                    .schedule(deadline, Expiry::Reservation(reservation_token));
                let reservation = Reservation {
                    family: *family,
                    port: port + 1,
                    expiry,
                };
                self.reservations.insert(reservation_token, reservation);
                token_attr = Some(reservation_token);
            }
        }

        let mut attrs: Vec<Attribute<'_>> = relays
            .iter()
            .map(|relay| Attribute::XorRelayedAddress(relay.advertised))
            .collect();
        attrs.push(Attribute::Lifetime(lifetime_secs));
        if let Some(token) = token_attr {
            attrs.push(Attribute::ReservationToken(ReservationToken(token)));
        }
        if let Some((family, code)) = pending.address_error {
            attrs.push(Attribute::AddressErrorCode(AddressErrorCode {
                family,
                code: ErrorCode(code),
                reason: ErrorCode(code).reason_phrase(),
            }));
        }
        attrs.push(Attribute::XorMappedAddress(request.five_tuple.client));
        let response = self.build(&request, None, &attrs, Some(&pending.auth));

        self.push_table(
            request.shard,
            TableChange::OpenAllocation {
                alloc,
                token,
                client: request.five_tuple,
                relays: relays.clone(),
                dont_fragment: pending.dont_fragment,
            },
        );
        self.push_event(Event::AllocationCreated {
            alloc,
            client: request.five_tuple,
            user: pending.auth.user().to_owned(),
            relays: relays.clone(),
            lifetime_secs,
        });
        self.outputs.push_back(Output::Transmit {
            shard: request.shard,
            to: request.five_tuple,
            bytes: response.clone(),
        });
        self.push_handled(&request, None);
        self.slots.insert(request.five_tuple, Slot::Active(alloc));
        // Tier 1 of the peer policy: from now on other clients may reach these addresses.
        for relay in &relays {
            self.policy.own.relay_live(relay.bound);
            self.policy.own.relay_live(relay.advertised);
        }
        self.allocations.insert(
            alloc,
            Allocation {
                five_tuple: request.five_tuple,
                shard: request.shard,
                auth: pending.auth,
                relays,
                expiry,
                permissions: HashMap::new(),
                channels: HashMap::new(),
                channel_by_peer: HashMap::new(),
                allocate_transaction: request.transaction,
                allocate_response: response,
                created_at: now,
                requests: 1,
                errors: 0,
            },
        );
    }

    /// RFC 8656 §7.2, checks 2 to 10 (check 1, authentication, has passed).
    fn handle_allocate(
        &mut self,
        request: &RequestContext,
        message: &Message<'_>,
        auth: Authenticated,
    ) {
        let auth_ref = Some(&auth);
        // 2. "The server checks if the 5-tuple is currently in use by an existing allocation.
        //    If yes, the server rejects the request with a 437 (Allocation Mismatch) error."
        if self.slots.contains_key(&request.five_tuple) {
            return self.respond_error(request, 437, &[], auth_ref);
        }
        // Draining (operator's choice): send new clients elsewhere (RFC 8489 §10: 300 with
        // ALTERNATE-SERVER, protected like any response to an authenticated request), or refuse
        // them with 508 when no alternate of the client's family is configured.
        if self.draining {
            let client_v4 = request.five_tuple.client.is_ipv4();
            let alternate = self
                .settings
                .alternate_servers
                .iter()
                .find(|a| a.is_ipv4() == client_v4)
                .copied();
            return match alternate {
                Some(addr) => {
                    self.respond_error(request, 300, &[Attribute::AlternateServer(addr)], auth_ref)
                }
                None => self.respond_error(request, 508, &[], auth_ref),
            };
        }
        // 3. "If the REQUESTED-TRANSPORT attribute is not included or is malformed ... 400.
        //    ... specifies a protocol that is not supported by the server ... 442".
        match message.requested_transport() {
            Ok(Some(protocol)) if protocol == Protocol::UDP => {}
            Ok(Some(_)) => return self.respond_error(request, 442, &[], auth_ref),
            Ok(None) | Err(_) => return self.respond_error(request, 400, &[], auth_ref),
        }
        // RFC 8489 §6.3.1 (and RFC 8656 §7.2 item 4 for DONT-FRAGMENT, which uturn supports):
        // unknown comprehension-required attributes are answered 420 with UNKNOWN-ATTRIBUTES.
        if self.reject_unknown(request, message, &auth) {
            return;
        }
        let dont_fragment = matches!(message.dont_fragment(), Ok(Some(())));
        let even_port = message.even_port();
        let requested_family = message.requested_address_family();
        let additional_family = message.additional_address_family();
        let reservation = message.reservation_token();
        let (Ok(even_port), Ok(reservation)) = (even_port, reservation) else {
            return self.respond_error(request, 400, &[], auth_ref);
        };
        let has_requested = message
            .attribute(AttributeType::REQUESTED_ADDRESS_FAMILY)
            .is_some();
        let has_additional = message
            .attribute(AttributeType::ADDITIONAL_ADDRESS_FAMILY)
            .is_some();
        // 5. "If yes [RESERVATION-TOKEN], and the request also contains an EVEN-PORT or
        //    REQUESTED-ADDRESS-FAMILY or ADDITIONAL-ADDRESS-FAMILY attribute ... 400. ... If the
        //    token is not valid for some reason, the server rejects the request with a 508".
        let mut reserved: Option<(Family, u16, [u8; 8])> = None;
        if let Some(ReservationToken(token)) = reservation {
            if even_port.is_some() || has_requested || has_additional {
                return self.respond_error(request, 400, &[], auth_ref);
            }
            match self.reservations.get(&token) {
                Some(r) => reserved = Some((r.family, r.port, token)),
                None => return self.respond_error(request, 508, &[], auth_ref),
            }
        }
        // 6. "... both REQUESTED-ADDRESS-FAMILY and ADDITIONAL-ADDRESS-FAMILY ... 400".
        if has_requested && has_additional {
            return self.respond_error(request, 400, &[], auth_ref);
        }
        // 7. "If the server does not support the address family requested ... 440. If the
        //    REQUESTED-ADDRESS-FAMILY attribute is absent and the server does not support the
        //    IPv4 address family ... 440".
        let primary = match (reserved, requested_family) {
            (Some((family, _, _)), _) => family,
            (None, Ok(Some(AddressFamily::V6))) => Family::V6,
            (None, Ok(Some(AddressFamily::V4)) | Ok(None)) => Family::V4,
            (None, Err(_)) => return self.respond_error(request, 440, &[], auth_ref),
        };
        if self.relay_ips[family_index(primary)].is_none() {
            return self.respond_error(request, 440, &[], auth_ref);
        }
        // 8. "... EVEN-PORT attribute with the R bit set to 1. If yes, and the request also
        //    contains an ADDITIONAL-ADDRESS-FAMILY attribute ... 400."
        let shape = match even_port {
            Some(even) if even.reserve_next => PortShape::EvenPair,
            Some(_) => PortShape::Even,
            None => PortShape::Any,
        };
        if shape == PortShape::EvenPair && has_additional {
            return self.respond_error(request, 400, &[], auth_ref);
        }
        // 9. "If yes [ADDITIONAL-ADDRESS-FAMILY], and the attribute value is 0x01 (IPv4
        //    address family), then the server rejects the request with a 400".
        let mut families = vec![primary];
        let mut address_error = None;
        if has_additional {
            match additional_family {
                Ok(Some(AddressFamily::V6)) => {
                    if self.relay_ips[family_index(Family::V6)].is_some() {
                        families.push(Family::V6);
                    } else {
                        // Partial: "it includes ADDRESS-ERROR-CODE attribute in the success
                        // response ... 440 (Address Family not Supported)".
                        address_error = Some((AddressFamily::V6, 440));
                    }
                }
                _ => return self.respond_error(request, 400, &[], auth_ref),
            }
        }
        // 10. "... 486 (Allocation Quota Reached) ... based on the username".
        let user_count = self.per_user.get(auth.user()).copied().unwrap_or(0);
        if self.settings.allocations_per_user != 0
            && user_count >= self.settings.allocations_per_user
        {
            return self.respond_error(request, 486, &[], auth_ref);
        }
        // Capacity: total allocations (active and pending), answered 508.
        if self.settings.allocations_total != 0
            && self.allocations.len() + self.pending.len()
                >= self.settings.allocations_total as usize
        {
            return self.respond_error(request, 508, &[], auth_ref);
        }
        // Choose the relay ports: from the reservation, or from the range all shards share (8:
        // "If the server cannot satisfy the request, then the server rejects the request with a
        // 508").
        let ports = if let Some((_, port, token)) = reserved {
            if let Some(r) = self.reservations.remove(&token) {
                self.timers.cancel(r.expiry);
            }
            // The reserved port stays claimed: it passes from the reservation to this Allocate.
            vec![port]
        } else {
            match self.pick_ports(&families, shape) {
                Some(ports) => ports,
                None => return self.respond_error(request, 508, &[], auth_ref),
            }
        };
        let lifetime_secs = self.granted_lifetime(message.lifetime().ok().flatten());
        *self.per_user.entry_ref(auth.user()).or_insert(0) += 1;
        let pending = PendingAllocate {
            request: *request,
            auth,
            families,
            shape,
            ports,
            from_reservation: reserved.is_some(),
            lifetime_secs,
            dont_fragment,
            address_error,
            attempts: 1,
        };
        self.start_bind(pending);
    }

    /// RFC 8656 §8.2.
    fn handle_refresh(
        &mut self,
        now: Instant,
        request: &RequestContext,
        message: &Message<'_>,
        auth: &Authenticated,
    ) {
        let Some(alloc) = self.admit_on_allocation(request, message, auth) else {
            return;
        };
        // "If the server receives a Refresh Request with a REQUESTED-ADDRESS-FAMILY attribute
        // and the attribute value does not match the address family of the allocation, the
        // server MUST reply with a 443 (Peer Address Family Mismatch)". For a dual-stack
        // allocation either family matches.
        if message
            .attribute(AttributeType::REQUESTED_ADDRESS_FAMILY)
            .is_some()
        {
            let family = match message.requested_address_family() {
                Ok(Some(AddressFamily::V4)) => Some(Family::V4),
                Ok(Some(AddressFamily::V6)) => Some(Family::V6),
                _ => None,
            };
            let matches = family.is_some_and(|family| {
                self.allocations
                    .get(&alloc)
                    .is_some_and(|a| a.has_family(family))
            });
            if !matches {
                return self.respond_error(request, 443, &[], Some(auth));
            }
        }
        let requested = message.lifetime().ok().flatten();
        // "if the request contains a LIFETIME attribute and the attribute value is zero, then
        // the 'desired lifetime' is zero ... the request succeeds and the allocation is
        // deleted."
        if requested == Some(0) {
            self.remove_allocation(alloc);
            self.push_event(Event::AllocationDeleted { alloc });
            return self.respond_success(request, &[Attribute::Lifetime(0)], Some(auth));
        }
        let lifetime_secs = self.granted_lifetime(requested);
        if let Some(allocation) = self.allocations.get_mut(&alloc) {
            if let Some(key) = self
                .timers
                .reschedule(allocation.expiry, now + secs(lifetime_secs))
            {
                allocation.expiry = key;
            }
        }
        self.push_event(Event::AllocationRefreshed {
            alloc,
            lifetime_secs,
        });
        self.respond_success(request, &[Attribute::Lifetime(lifetime_secs)], Some(auth));
    }

    /// RFC 8656 §10.2.
    fn handle_create_permission(
        &mut self,
        now: Instant,
        request: &RequestContext,
        message: &Message<'_>,
        auth: &Authenticated,
    ) {
        let Some(alloc) = self.admit_on_allocation(request, message, auth) else {
            return;
        };
        // All-or-nothing: every XOR-PEER-ADDRESS is checked before any permission is touched.
        let mut peers: Vec<IpAddr> = Vec::new();
        for peer in message.xor_peer_addresses() {
            match peer {
                Ok(peer) => {
                    if !peers.contains(&peer.ip()) {
                        peers.push(peer.ip());
                    }
                }
                Err(_) => return self.respond_error(request, 400, &[], Some(auth)),
            }
        }
        // "When the server receives the CreatePermission request, it processes as per Section 5
        // plus the specific rules mentioned here. The message is checked for validity. The
        // CreatePermission request MUST contain at least one XOR-PEER-ADDRESS attribute".
        if peers.is_empty() {
            return self.respond_error(request, 400, &[], Some(auth));
        }
        let Some(allocation) = self.allocations.get(&alloc) else {
            return;
        };
        let mut new_count = 0usize;
        for ip in &peers {
            // "If an XOR-PEER-ADDRESS attribute contains an address of an address family that
            // is not the same as that of a relayed transport address for the allocation, the
            // server MUST generate an error response with the 443".
            if !allocation.has_family(Family::of(*ip)) {
                return self.respond_error(request, 443, &[], Some(auth));
            }
            // "If the server is unable to fulfill the request, the server replies with a
            // 403 (Forbidden)" — the peer policy (RFC 8656 §21.5).
            if let Err(reason) = self.policy.check_permission(*ip) {
                self.push_event(Event::PeerDenied {
                    alloc,
                    peer_ip: *ip,
                    reason,
                });
                return self.respond_error(request, 403, &[], Some(auth));
            }
            if !allocation.permissions.contains_key(ip) {
                new_count += 1;
            }
        }
        // Quota: "508 (Insufficient Capacity)" when the permissions would exceed the limit.
        if allocation.permissions.len() + new_count
            > self.settings.permissions_per_allocation as usize
        {
            return self.respond_error(request, 508, &[], Some(auth));
        }
        for ip in peers {
            self.install_permission(now, alloc, ip);
        }
        self.respond_success(request, &[], Some(auth));
    }

    /// RFC 8656 §12.2.
    fn handle_channel_bind(
        &mut self,
        now: Instant,
        request: &RequestContext,
        message: &Message<'_>,
        auth: &Authenticated,
    ) {
        let Some(alloc) = self.admit_on_allocation(request, message, auth) else {
            return;
        };
        // "The request contains both a CHANNEL-NUMBER and an XOR-PEER-ADDRESS attribute; The
        // channel number is in the range 0x4000 through 0x4FFF (inclusive)" — else 400.
        let Ok(Some(channel)) = message.channel_number() else {
            return self.respond_error(request, 400, &[], Some(auth));
        };
        // 0x5000-0x7FFF were channels under RFC 5766 only; binding them is a config choice.
        if !channel.is_rfc8656() && !self.settings.accept_rfc5766_channel_numbers {
            return self.respond_error(request, 400, &[], Some(auth));
        }
        let mut peers = message.xor_peer_addresses();
        let Some(Ok(peer)) = peers.next() else {
            return self.respond_error(request, 400, &[], Some(auth));
        };
        let number = ChannelNumber::get(channel);
        let Some(allocation) = self.allocations.get(&alloc) else {
            return;
        };
        // RFC 8656 §12.2: "If the XOR-PEER-ADDRESS attribute contains an address of an address
        // family that is not the same as that of a relayed transport address for the
        // allocation, the server MUST generate an error response with the 443".
        if !allocation.has_family(Family::of(peer.ip())) {
            return self.respond_error(request, 443, &[], Some(auth));
        }
        // "The channel number is not currently bound to a different transport address (same
        // transport address is OK); The transport address is not currently bound to a
        // different channel number." — else 400.
        let channel_peer = allocation.channels.get(&number).map(|(p, _)| *p);
        let peer_channel = allocation.channel_by_peer.get(&peer).copied();
        if channel_peer.is_some_and(|bound| bound != peer)
            || peer_channel.is_some_and(|bound| bound != number)
        {
            return self.respond_error(request, 400, &[], Some(auth));
        }
        if let Err(reason) = self.policy.check(peer) {
            self.push_event(Event::PeerDenied {
                alloc,
                peer_ip: peer.ip(),
                reason,
            });
            return self.respond_error(request, 403, &[], Some(auth));
        }
        let new_channel = channel_peer.is_none();
        let new_permission = !allocation.permissions.contains_key(&peer.ip());
        if (new_channel
            && allocation.channels.len() >= self.settings.channels_per_allocation as usize)
            || (new_permission
                && allocation.permissions.len()
                    >= self.settings.permissions_per_allocation as usize)
        {
            return self.respond_error(request, 508, &[], Some(auth));
        }
        let deadline = now + self.settings.channel_lifetime;
        let shard = allocation.shard;
        if let Some(allocation) = self.allocations.get_mut(&alloc) {
            if new_channel {
                let key = self
                    .timers
                    .schedule(deadline, Expiry::Channel(alloc, number));
                allocation.channels.insert(number, (peer, key));
                allocation.channel_by_peer.insert(peer, number);
            } else if let Some((_, key)) = allocation.channels.get_mut(&number) {
                // "If a value in the CHANNEL-NUMBER attribute ... already bound to the same
                // transport address ... the server refreshes the channel binding."
                if let Some(moved) = self.timers.reschedule(*key, deadline) {
                    *key = moved;
                }
            }
        }
        if new_channel {
            self.push_table(
                shard,
                TableChange::BindChannel {
                    alloc,
                    channel: number,
                    peer,
                },
            );
            self.push_event(Event::ChannelBound {
                alloc,
                channel: number,
                peer,
            });
        }
        // "In addition, the server MUST install or refresh a permission for the IP address in
        // the XOR-PEER-ADDRESS attribute as described in Section 9."
        self.install_permission(now, alloc, peer.ip());
        self.respond_success(request, &[], Some(auth));
    }

    fn install_permission(&mut self, now: Instant, alloc: AllocationId, peer_ip: IpAddr) {
        let deadline = now + self.settings.permission_lifetime;
        let Some(allocation) = self.allocations.get_mut(&alloc) else {
            return;
        };
        match allocation.permissions.get_mut(&peer_ip) {
            Some(key) => {
                if let Some(moved) = self.timers.reschedule(*key, deadline) {
                    *key = moved;
                }
            }
            None => {
                let key = self
                    .timers
                    .schedule(deadline, Expiry::Permission(alloc, peer_ip));
                allocation.permissions.insert(peer_ip, key);
                let shard = allocation.shard;
                self.push_table(shard, TableChange::SetPermission { alloc, peer_ip });
                self.push_event(Event::PermissionCreated { alloc, peer_ip });
            }
        }
    }

    /// Deletes an allocation with everything it holds and tells its shard.
    fn remove_allocation(&mut self, alloc: AllocationId) {
        let Some(allocation) = self.allocations.remove(&alloc) else {
            return;
        };
        self.timers.cancel(allocation.expiry);
        for key in allocation.permissions.values() {
            self.timers.cancel(*key);
        }
        for (_, key) in allocation.channels.values() {
            self.timers.cancel(*key);
        }
        for relay in &allocation.relays {
            self.ports
                .release(Family::of(relay.bound.ip()), relay.bound.port());
            self.policy.own.relay_gone(relay.bound);
            self.policy.own.relay_gone(relay.advertised);
        }
        self.slots.remove(&allocation.five_tuple);
        self.uncount_user(allocation.auth.user());
        self.push_table(allocation.shard, TableChange::RemoveAllocation { alloc });
    }

    fn uncount_user(&mut self, user: &str) {
        if let Some(count) = self.per_user.get_mut(user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_user.remove(user);
            }
        }
    }

    fn active_allocation(&self, five_tuple: &FiveTuple) -> Option<AllocationId> {
        match self.slots.get(five_tuple) {
            Some(Slot::Active(alloc)) => Some(*alloc),
            _ => None,
        }
    }

    /// RFC 8656 §7.2 and §8.2: min(requested, max), but never below the default.
    fn granted_lifetime(&self, requested: Option<u32>) -> u32 {
        let default = self.settings.allocation_lifetime_default_secs;
        match requested {
            Some(requested) => requested
                .min(self.settings.allocation_lifetime_max_secs)
                .max(default),
            None => default,
        }
    }

    fn pick_ports(&mut self, families: &[Family], shape: PortShape) -> Option<Vec<u16>> {
        let mut ports = Vec::with_capacity(families.len());
        for (index, family) in families.iter().enumerate() {
            // EVEN-PORT applies to the primary relay address only.
            let this_shape = if index == 0 { shape } else { PortShape::Any };
            match self.ports.allocate(&mut self.rng, *family, this_shape) {
                Some(port) => ports.push(port),
                None => {
                    self.release_ports(&families[..index], &ports);
                    if index > 0 && shape == PortShape::EvenPair {
                        self.ports.release(families[0], ports[0] + 1);
                    }
                    return None;
                }
            }
        }
        Some(ports)
    }

    fn release_ports(&mut self, families: &[Family], ports: &[u16]) {
        for (family, port) in families.iter().zip(ports) {
            self.ports.release(*family, *port);
        }
    }

    /// The relayed transport addresses of one port per family (families without a relay IP
    /// are skipped: the Allocate checks refused them before).
    fn relay_addresses(&self, families: &[Family], ports: &[u16]) -> Vec<RelayAddress> {
        families
            .iter()
            .zip(ports)
            .filter_map(|(family, port)| {
                let (bound, advertised) = self.relay_ips[family_index(*family)]?;
                Some(RelayAddress {
                    bound: SocketAddr::new(bound, *port),
                    advertised: SocketAddr::new(advertised, *port),
                })
            })
            .collect()
    }

    fn start_bind(&mut self, pending: PendingAllocate) {
        self.next_token += 1;
        let token = BindToken(self.next_token);
        let addrs: Vec<SocketAddr> = self
            .relay_addresses(&pending.families, &pending.ports)
            .iter()
            .map(|relay| relay.bound)
            .collect();
        // The pair's upper port (claimed in the books by `pick_ports`) is held by a socket too.
        let hold = match (pending.shape, addrs.first()) {
            (PortShape::EvenPair, Some(first)) => first
                .port()
                .checked_add(1)
                .map(|port| SocketAddr::new(first.ip(), port)),
            _ => None,
        };
        self.slots
            .insert(pending.request.five_tuple, Slot::Pending(token));
        self.outputs.push_back(Output::BindRelay {
            token,
            shard: pending.request.shard,
            addrs,
            hold,
        });
        self.pending.insert(token, pending);
    }

    /// The common opening of every request on an existing allocation (Refresh,
    /// CreatePermission, ChannelBind): 420 for unknown comprehension-required attributes,
    /// then 437 when the 5-tuple has no allocation (RFC 8656 §5). `None` when it answered.
    fn admit_on_allocation(
        &mut self,
        request: &RequestContext,
        message: &Message<'_>,
        auth: &Authenticated,
    ) -> Option<AllocationId> {
        if self.reject_unknown(request, message, auth) {
            return None;
        }
        let alloc = self.active_allocation(&request.five_tuple);
        if alloc.is_none() {
            self.respond_error(request, 437, &[], Some(auth));
        }
        alloc
    }

    /// 420 with UNKNOWN-ATTRIBUTES when the request has comprehension-required attributes
    /// the server does not understand (RFC 8489 §6.3.1). True when it answered.
    fn reject_unknown(
        &mut self,
        request: &RequestContext,
        message: &Message<'_>,
        auth: &Authenticated,
    ) -> bool {
        let unknown = message.unknown_comprehension_required();
        if unknown.is_empty() {
            return false;
        }
        let attrs = [Attribute::UnknownAttributes(unknown.as_list())];
        self.respond_error(request, 420, &attrs, Some(auth));
        true
    }

    fn reject_auth(&mut self, request: &RequestContext, now: Instant, rejection: AuthRejection) {
        self.push_event(Event::AuthFailed {
            client: request.five_tuple,
            username: rejection.username.clone(),
            reason: rejection.reason,
            code: rejection.code,
        });
        // A missing credential (the first challenge) and a stale nonce are the protocol's
        // normal course; everything else is a failed attempt and spends the failure budgets.
        if !matches!(
            rejection.reason,
            AuthFailure::NoCredentials | AuthFailure::StaleNonce
        ) {
            let source = source_key(request.five_tuple.client.ip());
            let source_ok = self.auth_failures_source.take(source, now);
            let user_ok = rejection
                .username
                .as_deref()
                .is_none_or(|user| self.auth_failures_user.take(user_key(user.as_bytes()), now));
            if !(source_ok && user_ok) {
                let reason = DropReason::AuthRateLimited;
                self.push_event(Event::Dropped {
                    client: request.five_tuple,
                    reason,
                });
                return;
            }
        }
        if !self.unauthenticated_budget(now, request) {
            return;
        }
        if rejection.challenge {
            // RFC 8489 §9.2.4: 401 and 438 carry REALM, a fresh NONCE and PASSWORD-ALGORITHMS.
            let nonce = self.auth.issue_nonce(now, &request.five_tuple);
            let realm = self.auth.realm().to_owned();
            let algorithms = [PasswordAlgorithm::SHA256, PasswordAlgorithm::MD5];
            let attrs = [
                Attribute::Realm(&realm),
                Attribute::Nonce(&nonce),
                Attribute::PasswordAlgorithms(PasswordAlgorithms::new(&algorithms)),
            ];
            self.respond_error(request, rejection.code, &attrs, None);
        } else {
            self.respond_error(request, rejection.code, &[], None);
        }
    }

    /// Spends one answer of the source's unauthenticated budget; false (with a
    /// [`DropReason::RateLimited`] event) when it is spent: the request goes unanswered, so a
    /// reflected flood gets at most the budget out of uturn.
    fn unauthenticated_budget(&mut self, now: Instant, request: &RequestContext) -> bool {
        let source = source_key(request.five_tuple.client.ip());
        if self.unauthenticated.take(source, now) {
            return true;
        }
        self.push_event(Event::Dropped {
            client: request.five_tuple,
            reason: DropReason::RateLimited,
        });
        false
    }

    fn respond_success(
        &mut self,
        request: &RequestContext,
        attrs: &[Attribute<'_>],
        auth: Option<&Authenticated>,
    ) {
        let bytes = self.build(request, None, attrs, auth);
        self.outputs.push_back(Output::Transmit {
            shard: request.shard,
            to: request.five_tuple,
            bytes,
        });
        self.push_handled(request, None);
    }

    fn respond_error(
        &mut self,
        request: &RequestContext,
        code: u16,
        attrs: &[Attribute<'_>],
        auth: Option<&Authenticated>,
    ) {
        let bytes = self.build(request, Some(code), attrs, auth);
        self.outputs.push_back(Output::Transmit {
            shard: request.shard,
            to: request.five_tuple,
            bytes,
        });
        self.push_handled(request, Some(code));
    }

    /// Writes a response: ERROR-CODE (for an error), `attrs`, SOFTWARE, the integrity attribute
    /// of the request (RFC 8489 §9.2.4: responses to an authenticated request are protected
    /// with the same key) and FINGERPRINT when the request carried one (RFC 8489 §7.3:
    /// mirroring the client's choice is how uturn decides it).
    ///
    /// An error answer without integrity goes to a source that proved nothing and may be a
    /// spoofed victim (401, 438, 400 to an unauthenticated request), so it carries no reason
    /// phrase and no SOFTWARE: RFC 8489 §14.8 leaves the phrase free ("meant for diagnostic
    /// purposes"; empty is fewer than 128 characters) and clients act on the code. What is
    /// left is what the client needs (SECURITY.md, amplification).
    fn build(
        &mut self,
        request: &RequestContext,
        code: Option<u16>,
        attrs: &[Attribute<'_>],
        auth: Option<&Authenticated>,
    ) -> Vec<u8> {
        let class = if code.is_some() {
            Class::ErrorResponse
        } else {
            Class::SuccessResponse
        };
        let mut builder = MessageBuilder::new(
            &mut self.scratch,
            class,
            request.method,
            request.transaction,
        );
        // Every response uturn writes fits RESPONSE_LEN_MAX; a failed write would leave the
        // attribute out rather than panic.
        let unprotected_error = code.is_some() && auth.is_none();
        if let Some(code) = code {
            let error = if unprotected_error {
                ErrorCodeAttribute {
                    code: ErrorCode(code),
                    reason: "",
                }
            } else {
                ErrorCodeAttribute::new(ErrorCode(code))
            };
            let _ = builder.attribute(&Attribute::ErrorCode(error));
        }
        for attr in attrs {
            let _ = builder.attribute(attr);
        }
        if let Some(software) = &self.settings.software
            && !unprotected_error
        {
            let _ = builder.attribute(&Attribute::Software(software));
        }
        if let Some(auth) = auth {
            let _ = match auth.integrity() {
                IntegrityKind::Sha1 => builder.message_integrity(auth.key().as_bytes()),
                IntegrityKind::Sha256 => builder.message_integrity_sha256(auth.key().as_bytes()),
            };
        }
        if request.fingerprint {
            let _ = builder.fingerprint();
        }
        let len = builder.finish();
        self.scratch[..len].to_vec()
    }

    fn push_handled(&mut self, request: &RequestContext, code: Option<u16>) {
        if let Some(Slot::Active(alloc)) = self.slots.get(&request.five_tuple)
            && let Some(allocation) = self.allocations.get_mut(alloc)
        {
            allocation.requests += 1;
            allocation.errors += u64::from(code.is_some());
        }
        self.push_event(Event::RequestHandled {
            client: request.five_tuple,
            method: request.method,
            code,
        });
    }

    fn push_table(&mut self, shard: ShardId, change: TableChange) {
        self.outputs.push_back(Output::Table { shard, change });
    }

    fn push_event(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }

    /// Checks the engine's invariants and panics with a description when one is broken: one
    /// allocation per 5-tuple, one owner per relay port, channels and peers mapped one to one
    /// within an allocation, a live timer for everything that expires, quotas. O(n); built only
    /// for tests and fuzzing (the `fuzzing` feature), never in a release binary.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn check_invariants(&self, now: Instant) {
        let mut owners: HashMap<(Family, u16), &str> = HashMap::new();
        let mut per_user: HashMap<&str, u32> = HashMap::new();
        let mut timers = 0usize;
        for (alloc, allocation) in &self.allocations {
            assert_eq!(
                self.slots.get(&allocation.five_tuple),
                Some(&Slot::Active(*alloc)),
                "allocation {alloc:?} is not the one of its 5-tuple"
            );
            assert!(
                self.timers.contains(allocation.expiry),
                "{alloc:?} has no expiry timer"
            );
            assert!(
                allocation.expiry.deadline() > now,
                "{alloc:?} outlived its deadline"
            );
            timers += 1;
            for relay in &allocation.relays {
                let key = (Family::of(relay.bound.ip()), relay.bound.port());
                assert!(
                    owners.insert(key, "allocation").is_none(),
                    "port {key:?} owned twice"
                );
                assert!(
                    self.ports.is_used(key.0, key.1),
                    "port {key:?} not marked used"
                );
            }
            for relay in &allocation.relays {
                assert!(
                    self.policy.own.relayed.contains(&relay.bound)
                        && self.policy.own.relayed.contains(&relay.advertised),
                    "{alloc:?}'s relayed address {relay:?} is not a live one for the policy"
                );
            }
            for (ip, key) in &allocation.permissions {
                assert!(self.timers.contains(*key), "permission {ip} has no timer");
                assert!(
                    key.deadline() > now,
                    "permission {ip} outlived its deadline"
                );
                timers += 1;
            }
            assert_eq!(allocation.channels.len(), allocation.channel_by_peer.len());
            for (channel, (peer, key)) in &allocation.channels {
                assert_eq!(allocation.channel_by_peer.get(peer), Some(channel));
                assert!((0x4000..=0x7FFF).contains(channel));
                assert!(*channel <= 0x4FFF || self.settings.accept_rfc5766_channel_numbers);
                assert!(self.timers.contains(*key), "channel {channel} has no timer");
                assert!(
                    key.deadline() > now,
                    "channel {channel} outlived its deadline"
                );
                timers += 1;
            }
            assert!(
                allocation.permissions.len() <= self.settings.permissions_per_allocation as usize
            );
            assert!(allocation.channels.len() <= self.settings.channels_per_allocation as usize);
            *per_user.entry(allocation.auth.user()).or_insert(0) += 1;
        }
        for pending in self.pending.values() {
            for (family, port) in pending.families.iter().zip(&pending.ports) {
                assert!(owners.insert((*family, *port), "pending").is_none());
            }
            if pending.shape == PortShape::EvenPair {
                if let Some((family, port)) = pending.families.first().zip(pending.ports.first()) {
                    assert!(owners.insert((*family, port + 1), "pending pair").is_none());
                }
            }
            *per_user.entry(pending.auth.user()).or_insert(0) += 1;
        }
        for reservation in self.reservations.values() {
            let key = (reservation.family, reservation.port);
            assert!(
                owners.insert(key, "reservation").is_none(),
                "port {key:?} owned twice"
            );
            assert!(self.timers.contains(reservation.expiry));
            assert!(
                reservation.expiry.deadline() > now,
                "reservation outlived its deadline"
            );
            timers += 1;
        }
        assert_eq!(
            owners.len(),
            self.ports.in_use(),
            "ports marked used without an owner"
        );
        assert_eq!(timers, self.timers.len(), "timers without an owner");
        assert_eq!(
            self.slots.len(),
            self.allocations.len() + self.pending.len()
        );
        for (user, count) in &per_user {
            assert_eq!(
                self.per_user.get(*user),
                Some(count),
                "user count of {user}"
            );
            if self.settings.allocations_per_user != 0 {
                assert!(
                    *count <= self.settings.allocations_per_user,
                    "quota of {user}"
                );
            }
        }
        assert_eq!(per_user.len(), self.per_user.len());
        let relayed: std::collections::HashSet<SocketAddr> = self
            .allocations
            .values()
            .flat_map(|a| a.relays.iter().flat_map(|r| [r.bound, r.advertised]))
            .collect();
        assert_eq!(
            relayed, self.policy.own.relayed,
            "the policy's live relayed addresses are not those of the allocations"
        );
        if self.settings.allocations_total != 0 {
            assert!(
                self.allocations.len() + self.pending.len()
                    <= self.settings.allocations_total as usize
            );
        }
    }
}

fn family_index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

fn secs(secs: u32) -> Duration {
    Duration::from_secs(u64::from(secs))
}
