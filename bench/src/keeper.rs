//! Keeping the traffic's allocations alive while it flows.
//!
//! A TURN server drops a permission 300 s after it was last installed (RFC 8656 §9), a channel
//! binding after 600 s (§12) and an allocation when its lifetime runs out (§7). A load test
//! longer than that must refresh all three from the client's own 5-tuple, as a real client
//! does, or the server rightly drops the traffic and the report would call that loss the
//! server's. Each worker has one [`Keeper`] for its flows:
//!
//! ```text
//!  due(now) ──► flow i ──► requests(i, session) ──► outbox ──► the worker sends them
//!    (one flow every period / flows: each flow once per period, spread evenly)
//!  a response on flow i's socket ──► on_response ──► success: done
//!                                                 └► 401/438 with a NONCE: renewal
//!  renew(renewal, session) ──► the session takes the new nonce, the request goes again
//!  expired(now) ──► retransmit(pending, session) (RFC 8489 §6.2.1: 500 ms, doubling)
//! ```
//!
//! It is sans-IO: it builds requests and reads responses, the worker owns the sockets and
//! the flows' [`Session`]s. It runs only when a refresh is due or a response arrives, never
//! per data packet; the worker's turn pays one `Instant` comparison otherwise.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uturn_proto::{
    Attribute, ChannelNumber, Class, Message, Method, PacketKind, TransactionId, classify,
    long_term_key_md5,
};

use crate::turn::{build_request, error_code};

/// Default time between two refreshes of one flow: five chances within a permission's 300 s.
pub const REFRESH_PERIOD_DEFAULT: Duration = Duration::from_secs(60);
/// Longest refresh period accepted: a lost round still leaves time for the next one.
pub const REFRESH_PERIOD_MAX: Duration = Duration::from_secs(240);
/// First retransmission timeout (RFC 8489 §6.2.1's RTO), doubled each time.
const RTO: Duration = Duration::from_millis(500);
/// Transmissions of one request at most (RFC 8489's Rc is 7; 5 spans 15.5 s here).
const TRANSMISSIONS_MAX: u8 = 5;
/// Nonce renewals of one request at most: a server that answers every nonce with 438 is
/// broken, and the keeper must not loop with it.
const RENEWALS_MAX: u8 = 2;
/// Flows refreshed in one turn at most, so a loop that fell behind (a long pause between
/// steps) catches up without starving its traffic.
const DUE_PER_TURN_MAX: usize = 64;

/// A flow's long-term credentials as the server last accepted them.
#[derive(Debug, Clone)]
pub struct Session {
    /// REALM.
    pub realm: String,
    /// NONCE, renewed when the server calls it stale.
    pub nonce: String,
    /// MD5(username:realm:password).
    pub key: [u8; 16],
}

impl Session {
    /// A session for `user` and `pass` in `realm` with `nonce`; `None` when the credentials
    /// cannot make a key (not valid OpaqueString).
    pub fn new(user: &str, pass: &str, realm: String, nonce: String) -> Option<Self> {
        let key = long_term_key_md5(user, &realm, pass).ok()?;
        Some(Self { realm, nonce, key })
    }
}

/// What keeps a flow's traffic allowed besides the allocation's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// ChannelBind again, which also refreshes the peer's permission (RFC 8656 §12.2).
    Channel(ChannelNumber, SocketAddr),
    /// CreatePermission again (Send indications).
    Permission(SocketAddr),
}

/// What the keeper did, counted since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshCounts {
    /// Requests sent, retransmissions and renewed nonces included.
    pub requests: u64,
    /// Requests answered with success.
    pub succeeded: u64,
    /// Stale nonces renewed (438, or 401 with a new NONCE).
    pub renewed_nonces: u64,
    /// Requests answered with an error or never answered: the server may drop the traffic of
    /// those flows from then on.
    pub failed: u64,
    /// The last failure's ERROR-CODE (0: no answer, or an answer that did not verify).
    pub last_failure_code: Option<u16>,
}

impl RefreshCounts {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            requests: self.requests - earlier.requests,
            succeeded: self.succeeded - earlier.succeeded,
            renewed_nonces: self.renewed_nonces - earlier.renewed_nonces,
            failed: self.failed - earlier.failed,
            last_failure_code: if self.failed > earlier.failed {
                self.last_failure_code
            } else {
                None
            },
        }
    }

    /// Adds another worker's counts.
    pub fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        self.succeeded += other.succeeded;
        self.renewed_nonces += other.renewed_nonces;
        self.failed += other.failed;
        if other.last_failure_code.is_some() {
            self.last_failure_code = other.last_failure_code;
        }
    }
}

/// Whether `bytes` is a STUN success or error response: what the keeper may be waiting for.
pub fn is_response(bytes: &[u8]) -> bool {
    classify(bytes) == PacketKind::Stun
        && Message::parse(bytes)
            .is_ok_and(|m| matches!(m.class(), Class::SuccessResponse | Class::ErrorResponse))
}

/// A request waiting for its response.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    flow: usize,
    method: Method,
    tid: TransactionId,
    deadline: Instant,
    transmissions: u8,
    renewals: u8,
}

/// A stale nonce to take before sending a request again.
#[derive(Debug, Clone)]
pub struct Renewal {
    pending: Pending,
    realm: String,
    nonce: String,
}

impl Renewal {
    /// The flow whose session it renews.
    pub fn flow(&self) -> usize {
        self.pending.flow
    }
}

impl Pending {
    /// The flow it refreshes.
    pub fn flow(&self) -> usize {
        self.flow
    }
}

/// Refreshes one worker's flows: see the module documentation.
#[derive(Debug)]
pub struct Keeper {
    user: String,
    pass: String,
    lifetime_secs: Option<u32>,
    binding: Binding,
    flows: usize,
    /// Time between two flows' refreshes: the period divided by the number of flows.
    spacing: Duration,
    next_due: Instant,
    /// The flow refreshed next.
    next_flow: usize,
    /// Flows taken by [`Keeper::due`] since the last [`Keeper::turn_done`].
    taken_this_turn: usize,
    pending: Vec<Pending>,
    renewals: Vec<Renewal>,
    outbox: Vec<(usize, Vec<u8>)>,
    counts: RefreshCounts,
}

impl Keeper {
    /// A keeper for `flows` flows set up by `now`, each refreshed every `period`: Refresh
    /// (with `lifetime_secs` when given, else the server's default) and `binding`, the same
    /// for every flow of a worker (one peer socket, one channel number).
    pub fn new(
        user: &str,
        pass: &str,
        lifetime_secs: Option<u32>,
        binding: Binding,
        flows: usize,
        period: Duration,
        now: Instant,
    ) -> Self {
        let spacing = period / u32::try_from(flows.max(1)).unwrap_or(u32::MAX);
        Self {
            user: user.to_owned(),
            pass: pass.to_owned(),
            lifetime_secs,
            binding,
            flows,
            spacing,
            next_due: crate::instant_after(now, spacing),
            next_flow: 0,
            taken_this_turn: 0,
            pending: Vec::new(),
            renewals: Vec::new(),
            outbox: Vec::new(),
            counts: RefreshCounts::default(),
        }
    }

    /// What it did so far.
    pub fn counts(&self) -> RefreshCounts {
        self.counts
    }

    /// Requests waiting for an answer.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The next flow due for its refresh, if one is due at `now`; call until `None`. At most
    /// [`DUE_PER_TURN_MAX`] per call of [`Keeper::turn_done`].
    pub fn due(&mut self, now: Instant) -> Option<usize> {
        if self.flows == 0 || now < self.next_due || self.taken_this_turn >= DUE_PER_TURN_MAX {
            return None;
        }
        let flow = self.next_flow;
        self.next_flow = (self.next_flow + 1) % self.flows;
        self.taken_this_turn += 1;
        self.next_due = crate::instant_after(self.next_due, self.spacing);
        Some(flow)
    }

    /// Ends a turn: the next one may take up to [`DUE_PER_TURN_MAX`] due flows again.
    pub fn turn_done(&mut self) {
        self.taken_this_turn = 0;
    }

    /// Queues flow `flow`'s refresh requests (Refresh, then the binding's) in the outbox.
    pub fn refresh(&mut self, flow: usize, session: &Session, now: Instant) {
        for method in [Method::REFRESH, self.binding_method()] {
            let pending = Pending {
                flow,
                method,
                tid: self.fresh_tid(),
                deadline: crate::instant_after(now, RTO),
                transmissions: 1,
                renewals: 0,
            };
            self.send(pending, session);
        }
    }

    fn binding_method(&self) -> Method {
        match self.binding {
            Binding::Channel(..) => Method::CHANNEL_BIND,
            Binding::Permission(_) => Method::CREATE_PERMISSION,
        }
    }

    fn fresh_tid(&mut self) -> TransactionId {
        let mut id = [0u8; 12];
        id[..8].copy_from_slice(&self.counts.requests.to_be_bytes());
        id[8..].copy_from_slice(b"utkp");
        // Distinct per request: the counter grows with each one sent.
        self.counts.requests += 1;
        TransactionId(id)
    }

    /// Builds `pending`'s request with `session`'s credentials into the outbox and waits for
    /// it; a request that cannot be built counts as failed.
    fn send(&mut self, pending: Pending, session: &Session) {
        let lifetime;
        let attrs: Vec<Attribute<'_>> = match (pending.method, self.binding) {
            (Method::REFRESH, _) => {
                lifetime = self.lifetime_secs;
                lifetime.map(Attribute::Lifetime).into_iter().collect()
            }
            (_, Binding::Channel(channel, peer)) => vec![
                Attribute::ChannelNumber(channel),
                Attribute::XorPeerAddress(peer),
            ],
            (_, Binding::Permission(peer)) => vec![Attribute::XorPeerAddress(peer)],
        };
        let creds = (
            self.user.as_str(),
            session.realm.as_str(),
            session.nonce.as_str(),
            &session.key,
        );
        match build_request(pending.method, pending.tid, &attrs, Some(creds)) {
            Ok(bytes) => {
                self.outbox.push((pending.flow, bytes));
                self.pending.push(pending);
            }
            Err(_) => self.fail(0),
        }
    }

    fn fail(&mut self, code: u16) {
        self.counts.failed += 1;
        self.counts.last_failure_code = Some(code);
    }

    /// Takes the requests to send: (flow, datagram or frame). Hand the vector back with
    /// [`Keeper::return_outbox`] to keep its capacity.
    pub fn take_outbox(&mut self) -> Vec<(usize, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// Gives back the vector [`Keeper::take_outbox`] returned, emptied.
    pub fn return_outbox(&mut self, mut outbox: Vec<(usize, Vec<u8>)>) {
        outbox.clear();
        if self.outbox.is_empty() {
            self.outbox = outbox;
        }
    }

    /// Reads what arrived on flow `flow` that is not relayed data; `true` when it answered one
    /// of the keeper's requests (`false`: not the keeper's, count it as foreign).
    pub fn on_response(&mut self, flow: usize, bytes: &[u8], session: &Session) -> bool {
        let Ok(msg) = Message::parse(bytes) else {
            return false;
        };
        let tid = msg.transaction_id();
        let Some(at) = self
            .pending
            .iter()
            .position(|p| p.tid == tid && p.flow == flow)
        else {
            return false;
        };
        let pending = self.pending.swap_remove(at);
        match msg.class() {
            Class::SuccessResponse => {
                // A response that claims integrity and fails it is not the server's.
                if msg.has_integrity() && msg.verify_integrity(&session.key).is_err() {
                    self.fail(0);
                } else {
                    self.counts.succeeded += 1;
                }
            }
            Class::ErrorResponse => {
                let code = error_code(&msg).unwrap_or(0);
                let nonce = msg.nonce().ok().flatten();
                let realm = msg.realm().ok().flatten();
                match (code, nonce, realm) {
                    // Not compared with the session's nonce: another request of the flow may
                    // have renewed it to this one already, after this request left with the
                    // old one. RENEWALS_MAX ends a loop with a server that keeps saying 438.
                    (401 | 438, Some(nonce), Some(realm)) if pending.renewals < RENEWALS_MAX => {
                        self.renewals.push(Renewal {
                            pending,
                            realm: realm.to_owned(),
                            nonce: nonce.to_owned(),
                        });
                    }
                    _ => self.fail(code),
                }
            }
            // A request or an indication with our transaction id: not an answer.
            Class::Request | Class::Indication => {
                self.pending.push(pending);
                return false;
            }
        }
        true
    }

    /// Takes the stale nonces to renew: apply each with [`Keeper::renew`].
    pub fn take_renewals(&mut self) -> Vec<Renewal> {
        std::mem::take(&mut self.renewals)
    }

    /// `session` takes the renewal's nonce (and realm), and the request goes again with it.
    pub fn renew(&mut self, renewal: Renewal, session: &mut Session, now: Instant) {
        if renewal.realm != session.realm {
            match Session::new(&self.user, &self.pass, renewal.realm, renewal.nonce) {
                Some(s) => *session = s,
                None => {
                    self.fail(0);
                    return;
                }
            }
        } else {
            session.nonce = renewal.nonce;
        }
        self.counts.renewed_nonces += 1;
        let pending = Pending {
            tid: self.fresh_tid(),
            deadline: crate::instant_after(now, RTO),
            transmissions: 1,
            renewals: renewal.pending.renewals + 1,
            ..renewal.pending
        };
        self.send(pending, session);
    }

    /// The next request whose answer is overdue at `now`, if any; call until `None` and hand
    /// each to [`Keeper::retransmit`].
    pub fn expired(&mut self, now: Instant) -> Option<Pending> {
        let at = self.pending.iter().position(|p| p.deadline <= now)?;
        Some(self.pending.swap_remove(at))
    }

    /// Sends an overdue request again (same transaction, RFC 8489 §6.2.1) with a doubled
    /// timeout, or gives up on it after [`TRANSMISSIONS_MAX`] transmissions.
    pub fn retransmit(&mut self, pending: Pending, session: &Session, now: Instant) {
        if pending.transmissions >= TRANSMISSIONS_MAX {
            self.fail(0);
            return;
        }
        let backoff = RTO.saturating_mul(1u32 << pending.transmissions.min(16));
        self.counts.requests += 1;
        self.send(
            Pending {
                deadline: crate::instant_after(now, backoff),
                transmissions: pending.transmissions + 1,
                ..pending
            },
            session,
        );
    }

    /// Whether a request waits for its answer or a renewal: the worker asks for expired
    /// requests and renewals only then.
    pub fn is_busy(&self) -> bool {
        !self.pending.is_empty() || !self.renewals.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use uturn_proto::{ErrorCode, ErrorCodeAttribute, MessageBuilder};

    const PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9);

    fn session() -> Session {
        Session::new("u1", "p1", "uturn".into(), "n1".into()).unwrap()
    }

    fn keeper(flows: usize, now: Instant) -> Keeper {
        Keeper::new(
            "u1",
            "p1",
            Some(600),
            Binding::Channel(ChannelNumber::MIN, PEER),
            flows,
            Duration::from_secs(60),
            now,
        )
    }

    /// The server's answer to `request`: success, or an error with REALM and NONCE.
    fn answer(request: &[u8], error: Option<(u16, &str)>, key: &[u8; 16]) -> Vec<u8> {
        let req = Message::parse(request).unwrap();
        let mut buf = vec![0u8; 512];
        let class = if error.is_some() {
            Class::ErrorResponse
        } else {
            Class::SuccessResponse
        };
        let mut b = MessageBuilder::new(&mut buf, class, req.method(), req.transaction_id());
        match error {
            Some((code, nonce)) => {
                b.attribute(&Attribute::ErrorCode(ErrorCodeAttribute {
                    code: ErrorCode(code),
                    reason: "stale",
                }))
                .unwrap()
                .attribute(&Attribute::Realm("uturn"))
                .unwrap()
                .attribute(&Attribute::Nonce(nonce))
                .unwrap();
            }
            None => {
                b.message_integrity(key).unwrap();
            }
        }
        b.fingerprint().unwrap();
        let n = b.finish();
        buf.truncate(n);
        buf
    }

    #[test]
    fn each_flow_is_refreshed_once_per_period_and_evenly_spread() {
        let t0 = Instant::now();
        let mut k = keeper(4, t0);
        assert_eq!(k.due(t0), None, "nothing is due at setup");
        let mut seen = Vec::new();
        // Two periods in 1 s steps; each turn takes what is due.
        for s in 1..=120 {
            let now = t0 + Duration::from_secs(s);
            while let Some(f) = k.due(now) {
                seen.push((s, f));
            }
            k.turn_done();
        }
        // One flow every 15 s, in order, twice round.
        let expected: Vec<(u64, usize)> = (1..=8).map(|i| (i * 15, (i as usize - 1) % 4)).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_loop_that_fell_behind_catches_up_a_bounded_number_per_turn() {
        let t0 = Instant::now();
        let mut k = keeper(1000, t0);
        let late = t0 + Duration::from_secs(30); // 500 flows overdue
        let mut first = 0;
        while k.due(late).is_some() {
            first += 1;
        }
        assert_eq!(first, DUE_PER_TURN_MAX);
        k.turn_done();
        let mut total = first;
        for _ in 0..20 {
            while k.due(late).is_some() {
                total += 1;
            }
            k.turn_done();
        }
        assert_eq!(total, 500, "every overdue flow, and no more");
    }

    #[test]
    fn a_refresh_sends_refresh_and_channel_bind_and_counts_their_success() {
        let t0 = Instant::now();
        let s = session();
        let mut k = keeper(1, t0);
        k.refresh(0, &s, t0);
        let out = k.take_outbox();
        let methods: Vec<Method> = out
            .iter()
            .map(|(_, b)| Message::parse(b).unwrap().method())
            .collect();
        assert_eq!(methods, vec![Method::REFRESH, Method::CHANNEL_BIND]);
        for (flow, bytes) in &out {
            let m = Message::parse(bytes).unwrap();
            assert!(m.verify_integrity(&s.key).is_ok());
            assert_eq!(m.nonce().unwrap(), Some("n1"));
            assert!(k.on_response(*flow, &answer(bytes, None, &s.key), &s));
        }
        assert_eq!(k.pending_len(), 0);
        let c = k.counts();
        assert_eq!((c.requests, c.succeeded, c.failed), (2, 2, 0));
    }

    #[test]
    fn a_stale_nonce_is_renewed_and_the_request_goes_again_with_it() {
        let t0 = Instant::now();
        let mut s = session();
        let mut k = keeper(1, t0);
        k.refresh(0, &s, t0);
        let out = k.take_outbox();
        let (flow, first) = &out[0];
        assert!(k.on_response(*flow, &answer(first, Some((438, "n2")), &s.key), &s));
        let renewals = k.take_renewals();
        assert_eq!(renewals.len(), 1);
        for r in renewals {
            k.renew(r, &mut s, t0);
        }
        assert_eq!(s.nonce, "n2");
        let again = k.take_outbox();
        assert_eq!(again.len(), 1);
        let m = Message::parse(&again[0].1).unwrap();
        assert_eq!(m.method(), Method::REFRESH);
        assert_eq!(m.nonce().unwrap(), Some("n2"));
        assert_eq!(k.counts().renewed_nonces, 1);
        assert_eq!(k.counts().failed, 0);
    }

    #[test]
    fn both_requests_of_a_refresh_renew_even_when_the_first_renewal_came_first() {
        let t0 = Instant::now();
        let mut s = session();
        let mut k = keeper(1, t0);
        k.refresh(0, &s, t0);
        let out = k.take_outbox();
        // The Refresh's 438 is handled (and its renewal applied) before the ChannelBind's
        // 438, which names the same new nonce, arrives.
        assert!(k.on_response(0, &answer(&out[0].1, Some((438, "n2")), &s.key), &s));
        for r in k.take_renewals() {
            k.renew(r, &mut s, t0);
        }
        assert!(k.on_response(0, &answer(&out[1].1, Some((438, "n2")), &s.key), &s));
        for r in k.take_renewals() {
            k.renew(r, &mut s, t0);
        }
        let again = k.take_outbox();
        assert_eq!(again.len(), 2, "both requests go again");
        for (flow, bytes) in &again {
            assert!(k.on_response(*flow, &answer(bytes, None, &s.key), &s));
        }
        let c = k.counts();
        assert_eq!((c.succeeded, c.renewed_nonces, c.failed), (2, 2, 0));
    }

    #[test]
    fn a_server_that_keeps_calling_every_nonce_stale_gets_a_failure_not_a_loop() {
        let t0 = Instant::now();
        let mut s = session();
        let mut k = keeper(1, t0);
        k.refresh(0, &s, t0);
        let mut out = k.take_outbox();
        out.truncate(1); // the Refresh only; the ChannelBind stays pending
        for round in 0..10 {
            let Some((flow, bytes)) = out.pop() else {
                assert_eq!(round, RENEWALS_MAX as usize + 1);
                break;
            };
            assert!(k.on_response(flow, &answer(&bytes, Some((438, "n2")), &s.key), &s));
            for r in k.take_renewals() {
                k.renew(r, &mut s, t0);
            }
            out = k.take_outbox();
        }
        let c = k.counts();
        assert_eq!((c.renewed_nonces, c.failed), (u64::from(RENEWALS_MAX), 1));
        assert_eq!(c.last_failure_code, Some(438));
    }

    #[test]
    fn an_error_or_silence_counts_as_a_failure_and_retransmissions_back_off() {
        let t0 = Instant::now();
        let s = session();
        let mut k = keeper(1, t0);
        k.refresh(0, &s, t0);
        let out = k.take_outbox();
        // ChannelBind refused outright.
        let (flow, bind) = &out[1];
        assert!(k.on_response(*flow, &answer(bind, Some((403, "n1")), &s.key), &s));
        assert_eq!(k.counts().last_failure_code, Some(403));
        // The Refresh is never answered: sent 5 times at 0, 0.5, 1.5, 3.5 and 7.5 s, then
        // given up at 15.5 s.
        let mut sent_at = vec![0.0];
        let mut now = t0;
        for _ in 0..100 {
            now += Duration::from_millis(250);
            while let Some(p) = k.expired(now) {
                k.retransmit(p, &s, now);
                if !k.take_outbox().is_empty() {
                    sent_at.push((now - t0).as_secs_f64());
                }
            }
        }
        assert_eq!(sent_at, vec![0.0, 0.5, 1.5, 3.5, 7.5]);
        assert_eq!(k.pending_len(), 0);
        let c = k.counts();
        assert_eq!((c.failed, c.last_failure_code), (2, Some(0)));
        assert_eq!(c.requests, 6, "two requests, four retransmissions");
    }

    #[test]
    fn foreign_messages_are_not_taken_for_answers() {
        let t0 = Instant::now();
        let s = session();
        let mut k = keeper(2, t0);
        k.refresh(0, &s, t0);
        let out = k.take_outbox();
        let reply = answer(&out[0].1, None, &s.key);
        assert!(!k.on_response(1, &reply, &s), "another flow's transaction");
        assert!(!k.on_response(0, b"not stun at all", &s));
        assert_eq!(k.pending_len(), 2);
    }
}
