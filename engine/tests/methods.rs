//! Every method and every error path of the engine, driven through the public API.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use uturn_engine::{AuthFailure, DropReason, Event, Output, PeerDenied, ShardId, TableChange};
use uturn_proto::{
    AddressFamily, Attribute, AttributeType, ChannelNumber, Class, EvenPort, Message,
    MessageBuilder, Method, PasswordAlgorithm, RawAttribute, ReservationToken,
};

fn harness() -> Harness {
    Harness::new(config())
}

/// RFC 8489 §3: "the Binding method ... can be used ... to determine the particular binding a
/// NAT has allocated to a STUN client" — answered without credentials by default.
#[test]
fn a_binding_request_without_credentials_is_answered_with_the_mapped_address() {
    let mut h = harness();
    let client = Client::new("198.51.100.1:5000");
    let outputs = h.send(client.tuple, &client.request(Method::BINDING, 1, &[]));
    match outputs.as_slice() {
        [
            Output::Transmit { bytes, to, shard },
            Output::Event(Event::RequestHandled {
                code: None, method, ..
            }),
        ] => {
            assert_eq!(*to, client.tuple);
            assert_eq!(*shard, ShardId(0));
            assert_eq!(*method, Method::BINDING);
            let m = Message::parse(bytes).unwrap();
            assert_eq!(m.class(), Class::SuccessResponse);
            assert_eq!(m.transaction_id(), txid(1));
            assert_eq!(m.xor_mapped_address().unwrap(), Some(client.tuple.client));
            assert!(!m.has_integrity());
        }
        other => panic!("{other:#?}"),
    }
}

/// Cisco Expressway X12.6.1+ refuses unauthenticated Binding; `binding_requires_auth` does too.
#[test]
fn binding_requires_auth_challenges_a_binding_then_answers_it_with_integrity() {
    let mut config = config();
    config.auth.binding_requires_auth = true;
    let mut h = Harness::new(config);
    let mut client = Client::new("198.51.100.1:5000");
    let challenge = h.request(&client, Method::BINDING, 1, &[]);
    assert_eq!(challenge.code(), Some(401));
    client.nonce = Some(challenge.nonce());
    let response = h.request(&client, Method::BINDING, 2, &[]);
    assert_eq!(response.code(), None);
    let m = response.message();
    assert_eq!(m.xor_mapped_address().unwrap(), Some(client.tuple.client));
    m.verify_integrity(&client.key()).unwrap();
}

/// RFC 8489 §9.2.4: "If the message does not contain a MESSAGE-INTEGRITY or
/// MESSAGE-INTEGRITY-SHA256 attribute, the server MUST generate an error response with an
/// error code of 401 (Unauthenticated). This response MUST include a REALM value. The response
/// MUST include a NONCE".
#[test]
fn an_allocate_without_credentials_is_challenged_with_realm_nonce_and_password_algorithms() {
    let mut h = harness();
    let client = Client::new("198.51.100.1:5000");
    let outputs = h.send(client.tuple, &client.request(Method::ALLOCATE, 1, &[udp()]));
    match outputs.as_slice() {
        [
            Output::Event(Event::AuthFailed {
                reason: AuthFailure::NoCredentials,
                code: 401,
                username: None,
                ..
            }),
            Output::Transmit { bytes, .. },
            Output::Event(Event::RequestHandled {
                code: Some(401), ..
            }),
        ] => {
            let m = Message::parse(bytes).unwrap();
            assert_eq!(m.realm().unwrap(), Some(REALM));
            let nonce = m.nonce().unwrap().unwrap();
            assert!(nonce.starts_with("obMatJos2wAAA"), "{nonce}");
            let algorithms: Vec<_> = m
                .password_algorithms()
                .unwrap()
                .unwrap()
                .iter()
                .map(|a| a.algorithm)
                .collect();
            assert_eq!(
                algorithms,
                [
                    PasswordAlgorithm::SHA256.algorithm,
                    PasswordAlgorithm::MD5.algorithm
                ]
            );
            assert!(!m.has_integrity());
        }
        other => panic!("{other:#?}"),
    }
    assert_eq!(h.engine.allocation_count(), 0);
}

/// ARCHITECTURE.md: "The engine emits OpenAllocation before the success response".
/// RFC 8656 §7.2: the success response carries XOR-RELAYED-ADDRESS, LIFETIME and
/// XOR-MAPPED-ADDRESS.
#[test]
fn an_authenticated_allocate_binds_a_relay_then_opens_the_allocation_before_answering() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    h.challenge(&mut client);
    let outputs = h.send(client.tuple, &client.request(Method::ALLOCATE, 2, &[udp()]));
    let (token, addrs) = match outputs.as_slice() {
        [
            Output::BindRelay {
                token,
                shard: ShardId(0),
                addrs,
                hold: None,
            },
        ] => (*token, addrs.clone()),
        other => panic!("{other:#?}"),
    };
    assert_eq!(addrs.len(), 1);
    assert_eq!(
        addrs[0].ip(),
        "10.0.0.5".parse::<std::net::IpAddr>().unwrap()
    );
    assert!(addrs[0].port() >= 49152);
    let (_, relays, response) = h.bind_ok(token);
    assert_eq!(relays[0].bound, addrs[0]);
    let m = response.message();
    m.verify_integrity(&client.key()).unwrap();
    let relayed: Vec<_> = m.xor_relayed_addresses().map(Result::unwrap).collect();
    assert_eq!(relayed, [addrs[0]]);
    assert_eq!(m.lifetime().unwrap(), Some(600));
    assert_eq!(m.xor_mapped_address().unwrap(), Some(client.tuple.client));
    assert_eq!(h.engine.allocation_count(), 1);
    let info: Vec<_> = h.engine.allocations().collect();
    assert_eq!(info.len(), 1);
    assert_eq!((info[0].client, info[0].user), (client.tuple, USER));
    assert_eq!(info[0].relays, relays.as_slice());
    assert_eq!(info[0].expires_at, h.now + Duration::from_secs(600));
    h.engine.check_invariants(h.now);
}

/// RFC 8656 §7.2 note: "To detect retransmissions when the original request was successful
/// in creating an allocation, the server can store the transaction id that created the
/// request with the allocation data and compare it with incoming Allocate requests on the
/// same 5-tuple."
#[test]
fn a_retransmitted_allocate_gets_the_same_success_response_and_a_new_one_gets_437() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    let (_, _, first) = h.allocate(&mut client, 2, &[]);
    let again = h.request(&client, Method::ALLOCATE, 2, &[udp()]);
    assert_eq!(again.bytes, first.bytes);
    // RFC 8656 §7.2 item 2: "If yes, the server rejects the request with a 437".
    let other = h.request(&client, Method::ALLOCATE, 3, &[udp()]);
    assert_eq!(other.code(), Some(437));
    other.message().verify_integrity(&client.key()).unwrap();
    assert_eq!(h.engine.allocation_count(), 1);
}

#[test]
fn a_retransmitted_allocate_while_the_relay_is_being_bound_is_dropped() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    h.challenge(&mut client);
    let request = client.request(Method::ALLOCATE, 2, &[udp()]);
    let outputs = h.send(client.tuple, &request);
    assert!(matches!(outputs.as_slice(), [Output::BindRelay { .. }]));
    let outputs = h.send(client.tuple, &request);
    assert_eq!(
        outputs,
        [Output::Event(Event::Dropped {
            client: client.tuple,
            reason: DropReason::AllocatePending
        })]
    );
}

fn unknown_required() -> Attribute<'static> {
    Attribute::Other(RawAttribute {
        ty: AttributeType(0x0031),
        value: &[1, 2, 3, 4],
    })
}

/// RFC 8656 §7.2 checks 3 to 9, in order, with their codes.
#[test]
fn allocate_checks_answer_their_rfc_codes() {
    let token = Attribute::ReservationToken(ReservationToken([9; 8]));
    let even = Attribute::EvenPort(EvenPort {
        reserve_next: false,
    });
    let even_r = Attribute::EvenPort(EvenPort { reserve_next: true });
    let v4 = Attribute::RequestedAddressFamily(AddressFamily::V4);
    let v6 = Attribute::RequestedAddressFamily(AddressFamily::V6);
    let add_v6 = Attribute::AdditionalAddressFamily(AddressFamily::V6);
    let add_v4 = Attribute::AdditionalAddressFamily(AddressFamily::V4);
    let tcp = Attribute::RequestedTransport(uturn_proto::Protocol::TCP);
    let cases: Vec<(&str, Vec<Attribute<'_>>, u16)> = vec![
        ("REQUESTED-TRANSPORT missing: 400", vec![], 400),
        ("REQUESTED-TRANSPORT TCP: 442", vec![tcp], 442),
        (
            "unknown comprehension-required: 420",
            vec![udp(), unknown_required()],
            420,
        ),
        (
            "RESERVATION-TOKEN with EVEN-PORT: 400",
            vec![udp(), token, even],
            400,
        ),
        (
            "RESERVATION-TOKEN with REQUESTED-ADDRESS-FAMILY: 400",
            vec![udp(), token, v4],
            400,
        ),
        (
            "RESERVATION-TOKEN with ADDITIONAL-ADDRESS-FAMILY: 400",
            vec![udp(), token, add_v6],
            400,
        ),
        ("unknown RESERVATION-TOKEN: 508", vec![udp(), token], 508),
        (
            "both address family attributes: 400",
            vec![udp(), v6, add_v6],
            400,
        ),
        (
            "EVEN-PORT R=1 with ADDITIONAL-ADDRESS-FAMILY: 400",
            vec![udp(), even_r, add_v6],
            400,
        ),
        (
            "ADDITIONAL-ADDRESS-FAMILY IPv4: 400",
            vec![udp(), add_v4],
            400,
        ),
    ];
    for (name, attrs, code) in cases {
        let mut h = harness();
        let mut client = Client::new("198.51.100.1:5000");
        h.challenge(&mut client);
        let response = h.request(&client, Method::ALLOCATE, 2, &attrs);
        assert_eq!(response.code(), Some(code), "{name}");
        response.message().verify_integrity(&client.key()).unwrap();
        if code == 420 {
            let unknown: Vec<_> = response
                .message()
                .unknown_attributes()
                .unwrap()
                .unwrap()
                .iter()
                .collect();
            assert_eq!(unknown, [AttributeType(0x0031)], "{name}");
        }
        assert_eq!(h.engine.allocation_count(), 0, "{name}");
        h.engine.check_invariants(h.now);
    }
}

/// RFC 8656 §7.2 item 7: "If the server does not support the address family requested by the
/// client in REQUESTED-ADDRESS-FAMILY ... 440 ... If the REQUESTED-ADDRESS-FAMILY attribute is
/// absent and the server does not support the IPv4 address family ... 440".
#[test]
fn an_address_family_without_a_relay_ip_is_answered_440() {
    let mut config = config();
    config.relay.relay_ips = vec!["2001:db8::5".parse().unwrap()];
    let mut h = Harness::new(config);
    let mut client = Client::new("198.51.100.1:5000");
    h.challenge(&mut client);
    assert_eq!(
        h.request(&client, Method::ALLOCATE, 2, &[udp()]).code(),
        Some(440)
    );
    let v4 = Attribute::RequestedAddressFamily(AddressFamily::V4);
    assert_eq!(
        h.request(&client, Method::ALLOCATE, 3, &[udp(), v4]).code(),
        Some(440)
    );
    let v6 = Attribute::RequestedAddressFamily(AddressFamily::V6);
    let (_, relays, _) = h.allocate(&mut client, 4, &[v6]);
    assert!(relays[0].bound.is_ipv6());
}

/// RFC 8656 §7.2 item 10: "the server MAY choose to reject the request with a 486 (Allocation
/// Quota Reached) error ... based on the username".
#[test]
fn a_user_over_its_allocation_quota_gets_486_and_a_full_server_gets_508() {
    let mut config = config();
    config.limits.allocations_per_user = 2;
    let mut h = Harness::new(config);
    for n in 0..2 {
        let mut client = Client::new(&format!("198.51.100.1:{}", 5000 + n));
        h.allocate(&mut client, 2, &[]);
    }
    let mut third = Client::new("198.51.100.1:6000");
    h.challenge(&mut third);
    assert_eq!(
        h.request(&third, Method::ALLOCATE, 2, &[udp()]).code(),
        Some(486)
    );

    let mut config = common::config();
    config.limits.allocations_total = 1;
    let mut h = Harness::new(config);
    h.allocate(&mut Client::new("198.51.100.1:5000"), 2, &[]);
    let mut second = Client::new("198.51.100.2:5000");
    h.challenge(&mut second);
    assert_eq!(
        h.request(&second, Method::ALLOCATE, 2, &[udp()]).code(),
        Some(508)
    );
    h.engine.check_invariants(h.now);
}

#[test]
fn an_exhausted_port_range_is_answered_508() {
    let mut config = config();
    config.relay.port_min = 50000;
    config.relay.port_max = 50001;
    let mut h = Harness::new(config);
    h.allocate(&mut Client::new("198.51.100.1:5000"), 2, &[]);
    h.allocate(&mut Client::new("198.51.100.1:5001"), 2, &[]);
    let mut third = Client::new("198.51.100.1:5002");
    h.challenge(&mut third);
    assert_eq!(
        h.request(&third, Method::ALLOCATE, 2, &[udp()]).code(),
        Some(508)
    );
}

/// ARCHITECTURE.md: "On failure the engine tries another port (bounded) or answers 508."
#[test]
fn a_failed_relay_bind_is_retried_on_other_ports_then_answered_508() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    h.challenge(&mut client);
    let outputs = h.send(client.tuple, &client.request(Method::ALLOCATE, 2, &[udp()]));
    let [Output::BindRelay { token, .. }] = outputs.as_slice() else {
        panic!("{outputs:#?}")
    };
    let mut token = *token;
    let attempts = uturn_engine::engine::RELAY_BIND_ATTEMPTS_MAX;
    for attempt in 1..=attempts {
        h.engine
            .handle_relay_bound(h.now, token, Err(uturn_engine::BindFailed));
        let outputs = h.drain();
        if attempt < attempts {
            match outputs.as_slice() {
                [
                    Output::Event(Event::RelayBindFailed { retrying: true, .. }),
                    Output::BindRelay { token: next, .. },
                ] => token = *next,
                other => panic!("{other:#?}"),
            }
            h.engine.check_invariants(h.now);
        } else {
            assert!(matches!(
                outputs.first(),
                Some(Output::Event(Event::RelayBindFailed {
                    retrying: false,
                    ..
                }))
            ));
            let response = single_response(outputs);
            assert_eq!(response.code(), Some(508));
        }
    }
    assert_eq!(h.engine.allocation_count(), 0);
    h.engine.check_invariants(h.now);
    // The 5-tuple is free again.
    h.allocate(&mut client, 9, &[]);
}

/// RFC 8489 §9.2.4: "If the NONCE is no longer valid, the server MUST generate an error
/// response with an error code of 438 (Stale Nonce). This response MUST include NONCE, REALM,
/// and PASSWORD-ALGORITHMS attributes ... The NONCE attribute value MUST be valid."
#[test]
fn a_stale_nonce_is_answered_438_with_a_fresh_nonce_that_works() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    h.challenge(&mut client);
    h.advance(Duration::from_secs(600));
    let stale = h.request(&client, Method::ALLOCATE, 2, &[udp()]);
    assert_eq!(stale.code(), Some(438));
    assert_eq!(stale.message().realm().unwrap(), Some(REALM));
    assert!(stale.message().password_algorithms().unwrap().is_some());
    client.nonce = Some(stale.nonce());
    h.allocate(&mut client, 3, &[]);
}

#[test]
fn a_nonce_issued_to_another_client_is_stale() {
    let mut h = harness();
    let mut first = Client::new("198.51.100.1:5000");
    h.challenge(&mut first);
    let mut second = Client::new("198.51.100.1:5001");
    second.nonce = first.nonce.clone();
    assert_eq!(
        h.request(&second, Method::ALLOCATE, 2, &[udp()]).code(),
        Some(438)
    );
}

/// RFC 8489 §9.2.4: "If the resulting value does not match the contents of the
/// MESSAGE-INTEGRITY attribute ... This response MUST use an error code of 401".
/// Cisco Expressway answers 431 instead; `integrity_failure_code = 431` does the same.
#[test]
fn authentication_failures_carry_their_code_and_reason() {
    type Case = (&'static str, fn(&mut Client), u16, u16, AuthFailure);
    let cases: Vec<Case> = vec![
        (
            "wrong password",
            |c| c.password = "wrong".into(),
            401,
            401,
            AuthFailure::BadIntegrity,
        ),
        (
            "wrong password, 431 option",
            |c| c.password = "wrong".into(),
            431,
            431,
            AuthFailure::BadIntegrity,
        ),
        (
            "unknown user",
            |c| c.username = "mallory".into(),
            401,
            401,
            AuthFailure::UnknownUser,
        ),
        (
            "realm mismatch",
            |c| c.realm = "TANDBERG".into(),
            401,
            401,
            AuthFailure::RealmMismatch,
        ),
    ];
    for (name, spoil, setting, code, reason) in cases {
        let mut config = config();
        config.auth.integrity_failure_code = setting;
        let mut h = Harness::new(config);
        let mut client = Client::new("198.51.100.1:5000");
        h.challenge(&mut client);
        spoil(&mut client);
        let outputs = h.send(client.tuple, &client.request(Method::ALLOCATE, 2, &[udp()]));
        match outputs.first() {
            Some(Output::Event(Event::AuthFailed {
                reason: r, code: c, ..
            })) => {
                assert_eq!((*r, *c), (reason, code), "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        let response = single_response(outputs);
        assert_eq!(response.code(), Some(code), "{name}");
        assert!(response.message().nonce().unwrap().is_some(), "{name}");
        assert!(!response.message().has_integrity(), "{name}");
    }
}

/// RFC 8489 §9.2.4: "If the message contains a MESSAGE-INTEGRITY ... but is missing either the
/// USERNAME or USERHASH, REALM, or NONCE attribute ... 400".
#[test]
fn integrity_without_username_realm_or_nonce_is_answered_400() {
    let mut h = harness();
    let client = Client::new("198.51.100.1:5000");
    let mut buf = [0u8; 512];
    let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::ALLOCATE, txid(3));
    b.attribute(&udp()).unwrap();
    b.attribute(&Attribute::Username(USER)).unwrap();
    b.message_integrity(&client.key()).unwrap();
    let len = b.finish();
    let response = single_response(h.send(client.tuple, &buf[..len]));
    assert_eq!(response.code(), Some(400));
}

/// RFC 8489 §9.2.4: with the "Password algorithms" nonce cookie bit, "unless (1)
/// PASSWORD-ALGORITHM and PASSWORD-ALGORITHMS are both present ... the server MUST generate an
/// error response with an error code of 400".
#[test]
fn a_password_algorithm_without_the_offered_list_is_a_bid_down_answered_400() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    h.challenge(&mut client);
    let algorithm = Attribute::PasswordAlgorithm(PasswordAlgorithm::MD5);
    let response = h.request(&client, Method::ALLOCATE, 2, &[udp(), algorithm]);
    assert_eq!(response.code(), Some(400));
}

/// RFC 8489 §9.2.4: "Any response generated by the server MUST include the
/// MESSAGE-INTEGRITY-SHA256 attribute, computed using the username and password utilized to
/// authenticate the request".
#[test]
fn a_client_that_negotiates_sha256_is_answered_with_message_integrity_sha256() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    client.mode = Mode::Sha256;
    let (_, _, response) = h.allocate(&mut client, 2, &[]);
    let m = response.message();
    assert!(m.has_integrity_sha256());
    m.verify_integrity_sha256(&client.key()).unwrap();
}

#[test]
fn a_user_configured_with_an_md5_key_cannot_choose_sha256() {
    let mut config = config();
    let key = uturn_proto::long_term_key_md5("bob", REALM, "pw").unwrap();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    config.auth.users.push(uturn_engine::config::UserConfig {
        username: "bob".into(),
        password: None,
        key: Some(hex),
    });
    let mut h = Harness::new(config);
    let mut classic = Client::new("198.51.100.1:5000");
    classic.username = "bob".into();
    classic.password = "pw".into();
    h.allocate(&mut classic, 2, &[]);
    let mut modern = classic.clone();
    modern.tuple = tuple("198.51.100.1:5001");
    modern.mode = Mode::Sha256;
    h.challenge(&mut modern);
    let outputs = h.send(modern.tuple, &modern.request(Method::ALLOCATE, 2, &[udp()]));
    assert!(matches!(
        outputs.first(),
        Some(Output::Event(Event::AuthFailed {
            reason: AuthFailure::AlgorithmUnavailable,
            ..
        }))
    ));
}

/// RFC 8489 §14.4: "The USERHASH attribute is used as a replacement for the USERNAME attribute
/// when username anonymity is supported."
#[test]
fn a_client_that_sends_userhash_instead_of_username_is_authenticated() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    client.userhash = true;
    client.mode = Mode::Sha256;
    let (_, _, response) = h.allocate(&mut client, 2, &[]);
    response
        .message()
        .verify_integrity_sha256(&client.key())
        .unwrap();
}

/// RFC 8489 §14.7: FINGERPRINT is optional; uturn adds it to a response when the request had
/// one.
#[test]
fn a_response_carries_fingerprint_exactly_when_the_request_did() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    assert!(
        !h.request(&client, Method::BINDING, 1, &[])
            .message()
            .has_fingerprint()
    );
    client.fingerprint = true;
    assert!(
        h.request(&client, Method::BINDING, 2, &[])
            .message()
            .has_fingerprint()
    );
    let (_, _, response) = h.allocate(&mut client, 3, &[]);
    assert!(response.message().has_fingerprint());
    response.message().verify_integrity(&client.key()).unwrap();
}

#[test]
fn the_configured_software_is_added_to_responses() {
    let mut config = config();
    config.software = Some("uturn test".into());
    let mut h = Harness::new(config);
    let client = Client::new("198.51.100.1:5000");
    let response = h.request(&client, Method::BINDING, 1, &[]);
    assert_eq!(response.message().software().unwrap(), Some("uturn test"));
}

/// An error without integrity (the 401 a spoofed source could reflect) carries what the client
/// needs to authenticate (RFC 8489 §9.2.4: REALM, NONCE, PASSWORD-ALGORITHMS) and nothing
/// else: no reason phrase, no SOFTWARE. An authenticated error keeps both.
#[test]
fn an_unauthenticated_error_carries_no_reason_phrase_and_no_software() {
    let mut config = config();
    config.software = Some("uturn test".into());
    let mut h = Harness::new(config);
    let mut client = Client::new("198.51.100.1:5000");
    let challenge = h.challenge(&mut client);
    let message = challenge.message();
    let error = message.error_code().unwrap().unwrap();
    assert_eq!((error.code.0, error.reason), (401, ""));
    assert_eq!(message.software().unwrap(), None);
    assert_eq!(message.realm().unwrap(), Some(REALM));
    assert!(message.password_algorithms().unwrap().is_some());
    let nonce = challenge.nonce();
    assert!(nonce.starts_with("obMatJos2"), "{nonce}");
    assert_eq!(nonce.len(), 32, "{nonce}");

    h.allocate(&mut client, 2, &[]);
    let other = h.request(&client, Method::ALLOCATE, 3, &[udp()]);
    let message = other.message();
    let error = message.error_code().unwrap().unwrap();
    assert_eq!((error.code.0, error.reason), (437, "Allocation Mismatch"));
    assert_eq!(message.software().unwrap(), Some("uturn test"));
}

/// RFC 8656 §8.2: "If the 'desired lifetime' is zero, then the request succeeds and the
/// allocation is deleted."
#[test]
fn a_refresh_with_lifetime_zero_deletes_the_allocation_at_once() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
    let bytes = client.request(Method::REFRESH, 3, &[Attribute::Lifetime(0)]);
    let outputs = h.send(client.tuple, &bytes);
    assert_eq!(tables(&outputs), [TableChange::RemoveAllocation { alloc }]);
    assert!(outputs.contains(&Output::Event(Event::AllocationDeleted { alloc })));
    let response = single_response(outputs);
    assert_eq!(response.code(), None);
    assert_eq!(response.message().lifetime().unwrap(), Some(0));
    assert_eq!(h.engine.allocation_count(), 0);
    assert_eq!(h.engine.poll_timeout(), None);
    // RFC 8656 §8.3: a retransmitted delete gets 437.
    assert_eq!(
        h.request(&client, Method::REFRESH, 3, &[Attribute::Lifetime(0)])
            .code(),
        Some(437)
    );
    h.engine.check_invariants(h.now);
}

/// RFC 8656 §8.2: "the server computes the minimum of the client's requested lifetime and the
/// server's maximum allowed lifetime. If this computed value is greater than the default
/// lifetime, then the 'desired lifetime' is the computed value. Otherwise, the 'desired
/// lifetime' is the default lifetime."
#[test]
fn refresh_lifetimes_are_clamped_between_the_default_and_the_maximum() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    h.allocate(&mut client, 2, &[Attribute::Lifetime(100_000)]);
    for (requested, granted) in [
        (Some(100_000), 3600),
        (Some(60), 600),
        (Some(1200), 1200),
        (None, 600),
    ] {
        let attrs: Vec<_> = requested.map(Attribute::Lifetime).into_iter().collect();
        let response = h.request(&client, Method::REFRESH, 10, &attrs);
        assert_eq!(
            response.message().lifetime().unwrap(),
            Some(granted),
            "{requested:?}"
        );
    }
    let deadline = h.engine.poll_timeout().unwrap();
    assert_eq!(deadline, h.now + Duration::from_secs(600));
}

/// RFC 8656 §8.2: "If the server receives a Refresh Request with a REQUESTED-ADDRESS-FAMILY
/// attribute and the attribute value does not match the address family of the allocation,
/// the server MUST reply with a 443".
#[test]
fn a_refresh_naming_another_address_family_is_answered_443() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    h.allocate(&mut client, 2, &[]);
    let v6 = Attribute::RequestedAddressFamily(AddressFamily::V6);
    assert_eq!(
        h.request(&client, Method::REFRESH, 3, &[v6]).code(),
        Some(443)
    );
    let v4 = Attribute::RequestedAddressFamily(AddressFamily::V4);
    assert_eq!(h.request(&client, Method::REFRESH, 4, &[v4]).code(), None);
}

/// RFC 8656 §5: requests other than Allocate on a 5-tuple without an allocation get 437.
#[test]
fn requests_on_a_five_tuple_without_allocation_are_answered_437() {
    let peer_attr = Attribute::XorPeerAddress(peer("198.51.100.9:7000"));
    let channel = Attribute::ChannelNumber(ChannelNumber::new(0x4000).unwrap());
    let cases: Vec<(Method, Vec<Attribute<'_>>)> = vec![
        (Method::REFRESH, vec![]),
        (Method::CREATE_PERMISSION, vec![peer_attr]),
        (Method::CHANNEL_BIND, vec![channel, peer_attr]),
    ];
    for (method, attrs) in cases {
        let mut h = harness();
        let mut client = Client::new("198.51.100.1:5000");
        h.challenge(&mut client);
        let response = h.request(&client, method, 2, &attrs);
        assert_eq!(response.code(), Some(437), "{method:?}");
        response.message().verify_integrity(&client.key()).unwrap();
    }
}

/// RFC 8656 §10.2: "The CreatePermission request MUST contain at least one XOR-PEER-ADDRESS
/// attribute and MAY contain multiple such attributes."
#[test]
fn create_permission_installs_every_peer_ip_of_the_request() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
    let attrs = [
        Attribute::XorPeerAddress(peer("198.51.100.9:7000")),
        Attribute::XorPeerAddress(peer("198.51.100.10:7000")),
        Attribute::XorPeerAddress(peer("198.51.100.9:7001")),
    ];
    let outputs = h.send(
        client.tuple,
        &client.request(Method::CREATE_PERMISSION, 3, &attrs),
    );
    let ip = |s: &str| s.parse().unwrap();
    assert_eq!(
        outputs[..4],
        [
            Output::Table {
                shard: ShardId(0),
                change: TableChange::SetPermission {
                    alloc,
                    peer_ip: ip("198.51.100.9")
                }
            },
            Output::Event(Event::PermissionCreated {
                alloc,
                peer_ip: ip("198.51.100.9")
            }),
            Output::Table {
                shard: ShardId(0),
                change: TableChange::SetPermission {
                    alloc,
                    peer_ip: ip("198.51.100.10")
                }
            },
            Output::Event(Event::PermissionCreated {
                alloc,
                peer_ip: ip("198.51.100.10")
            }),
        ]
    );
    let response = single_response(outputs[4..].to_vec());
    assert_eq!(response.code(), None);
    // Refreshing an existing permission changes no table.
    let outputs = h.send(
        client.tuple,
        &client.request(Method::CREATE_PERMISSION, 4, &attrs[..1]),
    );
    assert!(tables(&outputs).is_empty());
    h.engine.check_invariants(h.now);
}

/// RFC 8656 §10.2: "If an XOR-PEER-ADDRESS attribute contains an address of an address family
/// that is not the same as that of a relayed transport address for the allocation, the server
/// MUST generate an error response with the 443"; the peer policy answers 403; a missing peer
/// 400; over the permission quota 508. Every case is all-or-nothing.
#[test]
fn create_permission_errors_install_nothing() {
    let mut config = config();
    config.limits.permissions_per_allocation = 2;
    let ok = Attribute::XorPeerAddress(peer("198.51.100.9:7000"));
    let cases: Vec<(&str, Vec<Attribute<'_>>, u16)> = vec![
        ("no peer", vec![], 400),
        (
            "IPv6 peer on IPv4 allocation",
            vec![ok, Attribute::XorPeerAddress(peer("[2001:db8::9]:7000"))],
            443,
        ),
        (
            "loopback peer",
            vec![ok, Attribute::XorPeerAddress(peer("127.0.0.1:7000"))],
            403,
        ),
        (
            "IPv4-mapped metadata",
            vec![
                ok,
                Attribute::XorPeerAddress(peer("[::ffff:169.254.169.254]:80")),
            ],
            443,
        ),
        (
            "metadata",
            vec![ok, Attribute::XorPeerAddress(peer("169.254.169.254:80"))],
            403,
        ),
        (
            "over quota",
            vec![
                ok,
                Attribute::XorPeerAddress(peer("198.51.100.10:1")),
                Attribute::XorPeerAddress(peer("198.51.100.11:1")),
            ],
            508,
        ),
        (
            "unknown comprehension-required",
            vec![ok, unknown_required()],
            420,
        ),
    ];
    for (name, attrs, code) in cases {
        let mut h = Harness::new(config.clone());
        let mut client = Client::new("198.51.100.1:5000");
        let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
        let outputs = h.send(
            client.tuple,
            &client.request(Method::CREATE_PERMISSION, 3, &attrs),
        );
        assert!(tables(&outputs).is_empty(), "{name}");
        if code == 403 {
            assert!(
                matches!(outputs.first(), Some(Output::Event(Event::PeerDenied { alloc: a, .. })) if *a == alloc),
                "{name}"
            );
        }
        assert_eq!(single_response(outputs).code(), Some(code), "{name}");
        h.engine.check_invariants(h.now);
    }
}

#[test]
fn allow_loopback_admits_a_loopback_peer() {
    let mut config = config();
    config.peers.allow_loopback = true;
    let mut h = Harness::new(config);
    let mut client = Client::new("198.51.100.1:5000");
    h.allocate(&mut client, 2, &[]);
    let attrs = [Attribute::XorPeerAddress(peer("127.0.0.1:7000"))];
    assert_eq!(
        h.request(&client, Method::CREATE_PERMISSION, 3, &attrs)
            .code(),
        None
    );
}

/// RFC 8656 §12.2: a new binding installs the channel and "the server MUST install or refresh
/// a permission for the IP address in the XOR-PEER-ADDRESS attribute".
#[test]
fn channel_bind_binds_the_channel_and_installs_the_permission() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
    let p = peer("198.51.100.9:7000");
    let attrs = [
        Attribute::ChannelNumber(ChannelNumber::new(0x4001).unwrap()),
        Attribute::XorPeerAddress(p),
    ];
    let outputs = h.send(
        client.tuple,
        &client.request(Method::CHANNEL_BIND, 3, &attrs),
    );
    assert_eq!(
        outputs[..4],
        [
            Output::Table {
                shard: ShardId(0),
                change: TableChange::BindChannel {
                    alloc,
                    channel: 0x4001,
                    peer: p
                }
            },
            Output::Event(Event::ChannelBound {
                alloc,
                channel: 0x4001,
                peer: p
            }),
            Output::Table {
                shard: ShardId(0),
                change: TableChange::SetPermission {
                    alloc,
                    peer_ip: p.ip()
                }
            },
            Output::Event(Event::PermissionCreated {
                alloc,
                peer_ip: p.ip()
            }),
        ]
    );
    assert_eq!(single_response(outputs[4..].to_vec()).code(), None);
    // Rebinding the same channel to the same peer refreshes it without table changes.
    h.advance(Duration::from_secs(100));
    let outputs = h.send(
        client.tuple,
        &client.request(Method::CHANNEL_BIND, 4, &attrs),
    );
    assert!(tables(&outputs).is_empty());
    assert_eq!(single_response(outputs).code(), None);
    h.engine.check_invariants(h.now);
}

/// RFC 8656 §12.2 narrowed channel numbers to 0x4000-0x4FFF; RFC 5766 §11 allowed up to
/// 0x7FFF, and clients written for it (coturn's turnutils_uclient) still pick numbers there. By
/// default such a bind is 400; `relay.accept_rfc5766_channel_numbers` binds it.
#[test]
fn an_rfc5766_channel_number_is_refused_by_default_and_bound_when_configured() {
    let p = peer("198.51.100.9:7000");
    let attrs = [
        Attribute::ChannelNumber(ChannelNumber::new_rfc5766(0x7ABC).unwrap()),
        Attribute::XorPeerAddress(p),
    ];

    let mut strict = harness();
    let mut client = Client::new("198.51.100.1:5000");
    allocate_then_bind(&mut strict, &mut client, &attrs, Some(400));

    let mut config = config();
    config.relay.accept_rfc5766_channel_numbers = true;
    let mut legacy = Harness::new(config);
    let mut client = Client::new("198.51.100.1:5000");
    let outputs = allocate_then_bind(&mut legacy, &mut client, &attrs, None);
    assert!(tables(&outputs).iter().any(|change| matches!(
        change,
        TableChange::BindChannel { channel: 0x7ABC, peer, .. } if *peer == p
    )));
    legacy.engine.check_invariants(legacy.now);
}

fn allocate_then_bind(
    h: &mut Harness,
    client: &mut Client,
    attrs: &[Attribute<'_>],
    expected_code: Option<u16>,
) -> Vec<Output> {
    h.allocate(client, 2, &[]);
    let outputs = h.send(
        client.tuple,
        &client.request(Method::CHANNEL_BIND, 3, attrs),
    );
    assert_eq!(single_response(outputs.clone()).code(), expected_code);
    outputs
}

/// RFC 8656 §12.2: "The channel number is in the range 0x4000 through 0x4FFF (inclusive); The
/// channel number is not currently bound to a different transport address (same transport
/// address is OK); The transport address is not currently bound to a different channel
/// number. If any of these tests fail, the server replies with a 400 (Bad Request) error."
#[test]
fn channel_bind_errors_bind_nothing() {
    let bound_peer = peer("198.51.100.9:7000");
    let channel = |n| Attribute::ChannelNumber(ChannelNumber::new(n).unwrap());
    let raw_channel = |n: u16| {
        let bytes: &'static [u8] = Box::leak(Box::new([(n >> 8) as u8, n as u8, 0, 0]));
        Attribute::Other(RawAttribute {
            ty: AttributeType::CHANNEL_NUMBER,
            value: bytes,
        })
    };
    let mut config = config();
    config.limits.channels_per_allocation = 2;
    let cases: Vec<(&str, Vec<Attribute<'_>>, u16)> = vec![
        (
            "channel 0x3FFF",
            vec![raw_channel(0x3FFF), Attribute::XorPeerAddress(bound_peer)],
            400,
        ),
        (
            "channel 0x5000",
            vec![raw_channel(0x5000), Attribute::XorPeerAddress(bound_peer)],
            400,
        ),
        (
            "no channel",
            vec![Attribute::XorPeerAddress(bound_peer)],
            400,
        ),
        ("no peer", vec![channel(0x4002)], 400),
        (
            "channel bound to another peer",
            vec![
                channel(0x4000),
                Attribute::XorPeerAddress(peer("198.51.100.9:7001")),
            ],
            400,
        ),
        (
            "peer bound to another channel",
            vec![channel(0x4003), Attribute::XorPeerAddress(bound_peer)],
            400,
        ),
        (
            "denied peer",
            vec![
                channel(0x4004),
                Attribute::XorPeerAddress(peer("0.0.0.0:7000")),
            ],
            403,
        ),
        (
            "IPv6 peer",
            vec![
                channel(0x4004),
                Attribute::XorPeerAddress(peer("[2001:db8::1]:7000")),
            ],
            443,
        ),
    ];
    for (name, attrs, code) in cases {
        let mut h = Harness::new(config.clone());
        let mut client = Client::new("198.51.100.1:5000");
        h.allocate(&mut client, 2, &[]);
        let first = [channel(0x4000), Attribute::XorPeerAddress(bound_peer)];
        assert_eq!(
            h.request(&client, Method::CHANNEL_BIND, 3, &first).code(),
            None
        );
        let outputs = h.send(
            client.tuple,
            &client.request(Method::CHANNEL_BIND, 4, &attrs),
        );
        assert!(tables(&outputs).is_empty(), "{name}");
        assert_eq!(single_response(outputs).code(), Some(code), "{name}");
        h.engine.check_invariants(h.now);
    }
    // Over the channel quota: 508.
    let mut h = Harness::new(config);
    let mut client = Client::new("198.51.100.1:5000");
    h.allocate(&mut client, 2, &[]);
    for (n, tid) in [(0x4000u16, 3u8), (0x4001, 4)] {
        let attrs = [
            channel(n),
            Attribute::XorPeerAddress(peer(&format!("198.51.100.9:{n}"))),
        ];
        assert_eq!(
            h.request(&client, Method::CHANNEL_BIND, tid, &attrs).code(),
            None
        );
    }
    let attrs = [
        channel(0x4002),
        Attribute::XorPeerAddress(peer("198.51.100.9:1")),
    ];
    assert_eq!(
        h.request(&client, Method::CHANNEL_BIND, 5, &attrs).code(),
        Some(508)
    );
}

/// RFC 8656 §11.2: Send indications are the data plane's; one that reaches the engine is
/// dropped silently, with an event.
#[test]
fn a_send_indication_reaching_the_engine_is_dropped_with_an_event() {
    let mut h = harness();
    let client = Client::new("198.51.100.1:5000");
    let mut buf = [0u8; 128];
    let mut b = MessageBuilder::new(&mut buf, Class::Indication, Method::SEND, txid(1));
    b.attribute(&Attribute::XorPeerAddress(peer("198.51.100.9:7000")))
        .unwrap();
    b.attribute(&Attribute::Data(b"hello")).unwrap();
    let len = b.finish();
    let outputs = h.send(client.tuple, &buf[..len]);
    assert_eq!(
        outputs,
        [Output::Event(Event::Dropped {
            client: client.tuple,
            reason: DropReason::Indication(Method::SEND)
        })]
    );
    let outputs = h.send(client.tuple, b"\x40\x00\x00\x04abcd");
    assert_eq!(
        outputs,
        [Output::Event(Event::Dropped {
            client: client.tuple,
            reason: DropReason::Malformed
        })]
    );
}

#[test]
fn an_unsupported_method_is_answered_400() {
    let mut h = harness();
    let client = Client::new("198.51.100.1:5000");
    assert_eq!(
        h.request(&client, Method::CONNECT, 1, &[]).code(),
        Some(400)
    );
}

/// RFC 8656 §7.2: "If the request contains an EVEN-PORT attribute with the R bit set to 1,
/// then the server looks for a pair of port numbers N and N+1 on the same IP address, where N
/// is even. Port N is used in the current allocation, while the relayed transport address
/// with port N+1 is assigned a token and reserved for a future allocation."
#[test]
fn even_port_with_r_reserves_the_next_port_for_the_token_holder() {
    let mut h = harness();
    let mut first = Client::new("198.51.100.1:5000");
    let even_r = Attribute::EvenPort(EvenPort { reserve_next: true });
    h.challenge(&mut first);
    let outputs = h.send(
        first.tuple,
        &first.request(Method::ALLOCATE, 2, &[udp(), even_r]),
    );
    let [
        Output::BindRelay {
            token: bind,
            addrs,
            hold,
            ..
        },
    ] = outputs.as_slice()
    else {
        panic!("expected one BindRelay, got {outputs:#?}");
    };
    // The upper port is bound as well and held for the reservation, so that nothing else on
    // the host can take it meanwhile.
    assert_eq!(
        *hold,
        Some(SocketAddr::new(addrs[0].ip(), addrs[0].port() + 1))
    );
    let (_, relays, response) = h.bind_ok(*bind);
    let port = relays[0].bound.port();
    assert_eq!(port % 2, 0);
    let token = response.message().reservation_token().unwrap().unwrap();
    h.engine.check_invariants(h.now);
    let mut second = Client::new("198.51.100.2:6000");
    let (_, relays, _) = h.allocate(&mut second, 2, &[Attribute::ReservationToken(token)]);
    assert_eq!(relays[0].bound.port(), port + 1);
    h.engine.check_invariants(h.now);
    // A token is good once.
    let mut third = Client::new("198.51.100.3:6000");
    h.challenge(&mut third);
    let again = h.request(
        &third,
        Method::ALLOCATE,
        2,
        &[udp(), Attribute::ReservationToken(token)],
    );
    assert_eq!(again.code(), Some(508));
}

#[test]
fn even_port_without_r_gets_an_even_port() {
    let mut h = harness();
    for n in 0..20u16 {
        let mut client = Client::new(&format!("198.51.100.1:{}", 5000 + n));
        let even = Attribute::EvenPort(EvenPort {
            reserve_next: false,
        });
        let (_, relays, response) = h.allocate(&mut client, 2, &[even]);
        assert_eq!(relays[0].bound.port() % 2, 0);
        assert!(response.message().reservation_token().unwrap().is_none());
    }
}

/// RFC 8656 §7.2 item 9: "If the server can fully meet the request, then the server allocates
/// one IPv4 and one IPv6 relay address and returns an Allocate success response containing
/// the relayed transport addresses assigned to the dual allocation in two
/// XOR-RELAYED-ADDRESS attributes."
#[test]
fn additional_address_family_gives_a_dual_stack_allocation() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    let (_, relays, response) = h.allocate(
        &mut client,
        2,
        &[Attribute::AdditionalAddressFamily(AddressFamily::V6)],
    );
    assert_eq!(relays.len(), 2);
    assert!(relays[0].bound.is_ipv4() && relays[1].bound.is_ipv6());
    let relayed: Vec<_> = response
        .message()
        .xor_relayed_addresses()
        .map(Result::unwrap)
        .collect();
    assert_eq!(relayed, [relays[0].advertised, relays[1].advertised]);
    // Both families may now be permitted.
    let attrs = [
        Attribute::XorPeerAddress(peer("198.51.100.9:7000")),
        Attribute::XorPeerAddress(peer("[2001:db8::9]:7000")),
    ];
    assert_eq!(
        h.request(&client, Method::CREATE_PERMISSION, 3, &attrs)
            .code(),
        None
    );
    h.engine.check_invariants(h.now);
}

/// RFC 8656 §7.2 item 9: "If the server can partially meet the request ... it includes
/// ADDRESS-ERROR-CODE attribute in the success response".
#[test]
fn additional_address_family_without_an_ipv6_relay_reports_address_error_code_440() {
    let mut config = config();
    config.relay.relay_ips = vec!["10.0.0.5".parse().unwrap()];
    let mut h = Harness::new(config);
    let mut client = Client::new("198.51.100.1:5000");
    let (_, relays, response) = h.allocate(
        &mut client,
        2,
        &[Attribute::AdditionalAddressFamily(AddressFamily::V6)],
    );
    assert_eq!(relays.len(), 1);
    let error = response.message().address_error_code().unwrap().unwrap();
    assert_eq!((error.family, error.code.0), (AddressFamily::V6, 440));
}

/// Static NAT / dual NIC: the relay binds the private IP and advertises the public one.
#[test]
fn an_external_ip_mapping_advertises_the_public_address() {
    let mut config = config();
    config.relay.external_ips = vec!["203.0.113.5/10.0.0.5".into()];
    let mut h = Harness::new(config);
    let mut client = Client::new("198.51.100.1:5000");
    let (_, relays, response) = h.allocate(&mut client, 2, &[]);
    assert_eq!(
        relays[0].bound.ip(),
        "10.0.0.5".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(
        relays[0].advertised.ip(),
        "203.0.113.5".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(relays[0].bound.port(), relays[0].advertised.port());
    let relayed: Vec<_> = response
        .message()
        .xor_relayed_addresses()
        .map(Result::unwrap)
        .collect();
    assert_eq!(relayed, [relays[0].advertised]);
}

/// The shards share one port range: a shard that serves every client (SO_REUSEPORT hashed
/// them all to it) may use every port of the range, and 508 (RFC 8656 §7.2: "If the server
/// cannot satisfy the request, then the server rejects the request with a 508") comes only
/// when the whole range is in use, on any shard. The relay sockets stay with the shard that
/// received the Allocate, which owns the client's 5-tuple.
#[test]
fn with_two_shards_one_shard_may_use_the_whole_port_range_before_508() {
    let mut config = config();
    config.relay.port_min = 50000;
    config.relay.port_max = 50005;
    let mut h = Harness::with_shards(config, 2);
    h.shard = ShardId(1);
    let mut ports = Vec::new();
    for n in 0..6u16 {
        let mut client = Client::new(&format!("198.51.100.1:{}", 5000 + n));
        let (_, relays, response) = h.allocate(&mut client, 2, &[]);
        assert_eq!(response.shard, ShardId(1), "answered on the client's shard");
        ports.push(relays[0].bound.port());
    }
    ports.sort_unstable();
    assert_eq!(ports, (50000..=50005).collect::<Vec<_>>());
    assert!(
        h.engine.allocations().all(|a| a.shard == ShardId(1)),
        "every relay socket belongs to the shard that serves its client"
    );
    h.engine.check_invariants(h.now);
    // The range is full: 508 on the busy shard and on the idle one alike.
    for shard in [ShardId(1), ShardId(0)] {
        h.shard = shard;
        let mut client = Client::new(&format!("198.51.100.2:{}", 6000 + shard.0));
        h.challenge(&mut client);
        assert_eq!(
            h.request(&client, Method::ALLOCATE, 2, &[udp()]).code(),
            Some(508)
        );
    }
}

/// A port freed by one shard's allocation is free for the other shard.
#[test]
fn a_port_freed_on_one_shard_is_taken_by_an_allocation_on_another() {
    let mut config = config();
    config.relay.port_min = 50000;
    config.relay.port_max = 50001;
    let mut h = Harness::with_shards(config, 2);
    h.shard = ShardId(0);
    let mut first = Client::new("198.51.100.1:5000");
    let (_, freed, _) = h.allocate(&mut first, 2, &[]);
    h.allocate(&mut Client::new("198.51.100.1:5001"), 2, &[]);
    let response = h.request(&first, Method::REFRESH, 3, &[Attribute::Lifetime(0)]);
    assert_eq!(response.code(), None);
    h.shard = ShardId(1);
    let mut other = Client::new("198.51.100.1:5002");
    let (_, relays, response) = h.allocate(&mut other, 2, &[]);
    assert_eq!(response.shard, ShardId(1));
    assert_eq!(relays[0].bound.port(), freed[0].bound.port());
    h.engine.check_invariants(h.now);
}

#[test]
fn a_reloaded_user_table_takes_effect_for_new_requests() {
    let mut h = harness();
    let users = uturn_engine::UserTable::from_users(
        REALM,
        &uturn_engine::parse_users_file("carol:pw2\n").unwrap(),
    )
    .unwrap();
    h.engine.reload_users(users).unwrap();
    let mut alice = Client::new("198.51.100.1:5000");
    h.challenge(&mut alice);
    assert_eq!(
        h.request(&alice, Method::ALLOCATE, 2, &[udp()]).code(),
        Some(401)
    );
    let mut carol = Client::new("198.51.100.1:5001");
    carol.username = "carol".into();
    carol.password = "pw2".into();
    h.allocate(&mut carol, 2, &[]);
    let wrong = uturn_engine::UserTable::from_users("other", &[]).unwrap();
    assert!(
        h.engine.reload_users(wrong).is_ok(),
        "an empty table of any realm is accepted"
    );
    let other = uturn_engine::UserTable::from_users(
        "other",
        &uturn_engine::parse_users_file("x:y\n").unwrap(),
    )
    .unwrap();
    assert!(h.engine.reload_users(other).is_err());
}

#[test]
fn a_permission_denied_event_names_the_reason() {
    let mut h = harness();
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
    let attrs = [Attribute::XorPeerAddress(peer("224.0.0.1:5000"))];
    let outputs = h.send(
        client.tuple,
        &client.request(Method::CREATE_PERMISSION, 3, &attrs),
    );
    assert_eq!(
        outputs[0],
        Output::Event(Event::PeerDenied {
            alloc,
            peer_ip: "224.0.0.1".parse().unwrap(),
            reason: PeerDenied::Multicast
        })
    );
}
