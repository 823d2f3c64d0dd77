//! A harness that drives the engine on a fake clock: input, then the exact outputs, then an
//! assert that nothing else is queued.
#![allow(dead_code, unreachable_pub)]
// The harness reads the clock once for its base instant; the engine itself never does.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use uturn_engine::config::UserConfig;
use uturn_engine::{
    AllocationId, BindToken, Engine, EngineConfig, Event, FiveTuple, Output, RelayAddress, ShardId,
    TableChange, Transport, UserTable,
};
use uturn_proto::{
    Attribute, Class, Message, MessageBuilder, Method, PasswordAlgorithm, PasswordAlgorithms,
    Protocol, TransactionId,
};

pub const REALM: &str = "uturn";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "secret";
/// Wall clock of the tests: 2026-01-01T00:00:00Z.
pub const WALL_UNIX_SECS: u64 = 1_767_225_600;

pub fn config() -> EngineConfig {
    let mut config = EngineConfig::default();
    config.auth.users = vec![UserConfig {
        username: USER.into(),
        password: Some(PASSWORD.into()),
        key: None,
    }];
    config.relay.relay_ips = vec!["10.0.0.5".parse().unwrap(), "2001:db8::5".parse().unwrap()];
    config.peers.allow_loopback = false;
    config
}

pub fn tuple(client: &str) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: client.parse().unwrap(),
        server: "192.0.2.1:3478".parse().unwrap(),
    }
}

/// Which integrity attribute and algorithm a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// RFC 5389 style: MESSAGE-INTEGRITY, no PASSWORD-ALGORITHM(S).
    Classic,
    /// RFC 8489: PASSWORD-ALGORITHMS echoed, PASSWORD-ALGORITHM SHA-256,
    /// MESSAGE-INTEGRITY-SHA256.
    Sha256,
}

/// Client credentials and state.
#[derive(Debug, Clone)]
pub struct Client {
    pub tuple: FiveTuple,
    pub username: String,
    pub password: String,
    pub realm: String,
    pub nonce: Option<String>,
    pub mode: Mode,
    pub userhash: bool,
    pub fingerprint: bool,
}

impl Client {
    pub fn new(addr: &str) -> Self {
        Self {
            tuple: tuple(addr),
            username: USER.into(),
            password: PASSWORD.into(),
            realm: REALM.into(),
            nonce: None,
            mode: Mode::Classic,
            userhash: false,
            fingerprint: false,
        }
    }

    pub fn key(&self) -> Vec<u8> {
        match self.mode {
            Mode::Classic => {
                uturn_proto::long_term_key_md5(&self.username, &self.realm, &self.password)
                    .unwrap()
                    .to_vec()
            }
            Mode::Sha256 => {
                uturn_proto::long_term_key_sha256(&self.username, &self.realm, &self.password)
                    .unwrap()
                    .to_vec()
            }
        }
    }

    /// A request with `attrs`, authenticated when the client has a nonce.
    pub fn request(&self, method: Method, tid: u8, attrs: &[Attribute<'_>]) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        let mut b = MessageBuilder::new(&mut buf, Class::Request, method, txid(tid));
        for attr in attrs {
            b.attribute(attr).unwrap();
        }
        if let Some(nonce) = &self.nonce {
            if self.userhash {
                let hash = uturn_proto::userhash(&self.username, &self.realm);
                b.attribute(&Attribute::Userhash(hash)).unwrap();
            } else {
                b.attribute(&Attribute::Username(&self.username)).unwrap();
            }
            b.attribute(&Attribute::Realm(&self.realm)).unwrap();
            b.attribute(&Attribute::Nonce(nonce)).unwrap();
            let key = self.key();
            match self.mode {
                Mode::Classic => {
                    b.message_integrity(&key).unwrap();
                }
                Mode::Sha256 => {
                    let offered = [PasswordAlgorithm::SHA256, PasswordAlgorithm::MD5];
                    b.attribute(&Attribute::PasswordAlgorithms(PasswordAlgorithms::new(
                        &offered,
                    )))
                    .unwrap();
                    b.attribute(&Attribute::PasswordAlgorithm(PasswordAlgorithm::SHA256))
                        .unwrap();
                    b.message_integrity_sha256(&key).unwrap();
                }
            }
        }
        if self.fingerprint {
            b.fingerprint().unwrap();
        }
        let len = b.finish();
        buf.truncate(len);
        buf
    }
}

pub fn txid(n: u8) -> TransactionId {
    TransactionId([n; 12])
}

pub fn udp() -> Attribute<'static> {
    Attribute::RequestedTransport(Protocol::UDP)
}

/// A decoded response, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub bytes: Vec<u8>,
    pub to: FiveTuple,
    pub shard: ShardId,
}

impl Response {
    pub fn message(&self) -> Message<'_> {
        Message::parse(&self.bytes).unwrap()
    }

    /// `None` for a success response, else the error code.
    pub fn code(&self) -> Option<u16> {
        let m = self.message();
        match m.class() {
            Class::SuccessResponse => None,
            Class::ErrorResponse => Some(m.error_code().unwrap().unwrap().code.0),
            other => panic!("not a response: {other:?}"),
        }
    }

    pub fn nonce(&self) -> String {
        self.message().nonce().unwrap().unwrap().to_owned()
    }
}

pub struct Harness {
    pub engine: Engine<SmallRng>,
    pub base: Instant,
    pub now: Instant,
    pub wall: SystemTime,
    pub shard: ShardId,
}

impl Harness {
    pub fn new(config: EngineConfig) -> Self {
        Self::with_shards(config, 1)
    }

    pub fn with_shards(config: EngineConfig, shards: u16) -> Self {
        let base = Instant::now();
        let users = UserTable::from_users(&config.auth.realm, &config.auth.users).unwrap();
        let engine = Engine::new(&config, users, shards, base, SmallRng::seed_from_u64(1)).unwrap();
        Self {
            engine,
            base,
            now: base,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(WALL_UNIX_SECS),
            shard: ShardId(0),
        }
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.wall += by;
    }

    /// Moves the clock to `at` and runs the timers.
    pub fn run_until(&mut self, at: Instant) -> Vec<Output> {
        let by = at.saturating_duration_since(self.now);
        self.advance(by);
        self.engine.handle_timeout(self.now);
        self.drain()
    }

    pub fn drain(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(o) = self.engine.poll_output() {
            out.push(o);
        }
        assert!(self.engine.poll_output().is_none());
        out
    }

    /// One message in, every output out.
    pub fn send(&mut self, tuple: FiveTuple, bytes: &[u8]) -> Vec<Output> {
        self.engine
            .handle_message(self.now, self.wall, self.shard, tuple, bytes);
        self.drain()
    }

    /// Sends a request and expects exactly one response (with its RequestHandled event, and
    /// any events before) and nothing else.
    pub fn request(
        &mut self,
        client: &Client,
        method: Method,
        tid: u8,
        attrs: &[Attribute<'_>],
    ) -> Response {
        let bytes = client.request(method, tid, attrs);
        let outputs = self.send(client.tuple, &bytes);
        single_response(outputs)
    }

    /// Gets a nonce with an unauthenticated Allocate (401).
    pub fn challenge(&mut self, client: &mut Client) -> Response {
        let saved = client.nonce.take();
        let response = self.request(client, Method::ALLOCATE, 200, &[udp()]);
        assert_eq!(response.code(), Some(401));
        client.nonce = Some(response.nonce());
        let _ = saved;
        response
    }

    /// The whole handshake: challenge, authenticated Allocate, bind OK. Returns the
    /// allocation, its relays and the success response.
    pub fn allocate(
        &mut self,
        client: &mut Client,
        tid: u8,
        attrs: &[Attribute<'_>],
    ) -> (AllocationId, Vec<RelayAddress>, Response) {
        if client.nonce.is_none() {
            self.challenge(client);
        }
        let mut all = vec![udp()];
        all.extend_from_slice(attrs);
        let bytes = client.request(Method::ALLOCATE, tid, &all);
        let outputs = self.send(client.tuple, &bytes);
        let token = match outputs.as_slice() {
            [Output::BindRelay { token, .. }] => *token,
            other => panic!("expected one BindRelay, got {other:#?}"),
        };
        self.bind_ok(token)
    }

    /// Reports a successful bind and expects OpenAllocation, AllocationCreated, the success
    /// response and RequestHandled, in that order, and nothing else.
    pub fn bind_ok(&mut self, token: BindToken) -> (AllocationId, Vec<RelayAddress>, Response) {
        self.engine.handle_relay_bound(self.now, token, Ok(()));
        let outputs = self.drain();
        match outputs.as_slice() {
            [
                Output::Table {
                    change:
                        TableChange::OpenAllocation {
                            alloc,
                            token: t,
                            relays,
                            ..
                        },
                    ..
                },
                Output::Event(Event::AllocationCreated { alloc: created, .. }),
                Output::Transmit { bytes, to, shard },
                Output::Event(Event::RequestHandled { code: None, .. }),
            ] => {
                assert_eq!(*t, token);
                assert_eq!(alloc, created);
                let response = Response {
                    bytes: bytes.clone(),
                    to: *to,
                    shard: *shard,
                };
                assert_eq!(response.code(), None);
                (*alloc, relays.clone(), response)
            }
            other => panic!("unexpected outputs after bind: {other:#?}"),
        }
    }
}

/// The one response among `outputs`; events allowed only before it plus exactly one
/// RequestHandled after it.
pub fn single_response(outputs: Vec<Output>) -> Response {
    let transmits: Vec<_> = outputs
        .iter()
        .filter_map(|o| match o {
            Output::Transmit { shard, to, bytes } => Some(Response {
                bytes: bytes.clone(),
                to: *to,
                shard: *shard,
            }),
            _ => None,
        })
        .collect();
    assert_eq!(transmits.len(), 1, "expected one response: {outputs:#?}");
    let response = transmits.into_iter().next().unwrap();
    match outputs.last() {
        Some(Output::Event(Event::RequestHandled { code, .. })) => {
            assert_eq!(*code, response.code(), "RequestHandled code");
        }
        other => panic!("last output should be RequestHandled, got {other:?}"),
    }
    assert!(
        outputs.iter().all(|o| matches!(
            o,
            Output::Transmit { .. } | Output::Event(_) | Output::Table { .. }
        )),
        "{outputs:#?}"
    );
    response
}

/// The table changes among `outputs`, in order.
pub fn tables(outputs: &[Output]) -> Vec<TableChange> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Table { change, .. } => Some(change.clone()),
            _ => None,
        })
        .collect()
}

pub fn peer(addr: &str) -> SocketAddr {
    addr.parse().unwrap()
}
