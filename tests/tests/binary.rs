//! The `uturn` binary as an operator meets it: start-up with no configuration, errors in flags
//! and config files, and a clean stop on SIGTERM.

use std::process::{Command, Stdio};

use uturn_e2e::{TempConfig, TurnClient, Uturn, uturn_binary};

/// With no credentials configured, uturn creates the user `demo` with a random password and
/// prints a ready-to-paste `turn:` URI; that user can allocate.
#[test]
fn with_no_credentials_a_demo_user_is_created_and_printed() {
    let server = Uturn::start(&["--listen", "127.0.0.1:0", "--relay-ip", "127.0.0.1"]);
    let uri = server
        .banner
        .iter()
        .find(|l| l.contains("turn:") && l.contains("username=demo"))
        .unwrap_or_else(|| panic!("no turn: URI in {:?}", server.banner));
    let password = uri
        .split("password=")
        .nth(1)
        .expect("password in the URI line")
        .trim();
    assert!(password.len() >= 16, "a strong random password");
    let mut client = TurnClient::new(server.listener(false), "demo", password);
    client.allocate(&[]).expect("the demo user can allocate");
}

/// A malformed config file is one clear line naming the field, and exit code 2.
#[test]
fn a_bad_config_field_is_named_and_exits_with_code_2() {
    let cases = [
        ("[relay]\nport_min = 70000\n", "port_min"),
        ("[relay]\nport_min = 5000\nport_max = 4000\n", "port"),
        ("[server]\nlisten = [\"not an address\"]\n", "listen"),
        ("[nonsense]\nx = 1\n", "nonsense"),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let config = TempConfig::new(&format!("bad-config-{i}"), text);
        let out = Command::new(uturn_binary())
            .args(["--config", config.path()])
            .stdin(Stdio::null())
            .output()
            .expect("run uturn");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {stderr}");
        assert!(
            stderr.contains(field),
            "{text:?}: error does not name {field}: {stderr}"
        );
    }
    let out = Command::new(uturn_binary())
        .args(["--ports", "9-1"])
        .stdin(Stdio::null())
        .output()
        .expect("run uturn");
    assert_eq!(out.status.code(), Some(2));
    let missing = Command::new(uturn_binary())
        .args(["--config", "/nonexistent/uturn.toml"])
        .stdin(Stdio::null())
        .output()
        .expect("run uturn");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/uturn.toml"));
}

/// SIGTERM stops the server: listeners close and the exit code is 0.
#[test]
fn sigterm_stops_the_server_with_exit_code_0() {
    for backend in uturn_e2e::BACKENDS {
        let args = uturn_e2e::standard_args(backend, 2);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Uturn::start(&refs);
        let listener = server.listener(false);
        let status = server
            .terminate()
            .expect("uturn exits within 10 s of SIGTERM");
        assert_eq!(status.code(), Some(0), "{backend}");
        // The port is free again: nothing kept it open.
        std::net::UdpSocket::bind(listener).expect("listener port released");
    }
}
