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

/// Runs `uturn` with `args` until it exits (every case here fails before it is ready; one that
/// still runs after 30 s is killed and reported as `None`) and returns the exit code and
/// standard error.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(uturn_binary())
        .args(args)
        .args(["--http", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run uturn");
    let mut stderr = child.stderr.take().expect("stderr was piped");
    // Standard error reaches its end when the process exits: wait for that, with a deadline.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        let _ = done.send(text);
    });
    match finished.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(text) => (child.wait().expect("wait for uturn").code(), text),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            (None, "still running after 30 s".to_owned())
        }
    }
}

/// Every configuration error exits with the same status, 2 (`uturn --help` says so), and one
/// line naming the field or the file: an invalid `ops.log_level` (a typo EnvFilter would have
/// taken as a target name, silencing every other line), a users file that does not exist
/// (named as the users file), a TLS certificate or key that does not exist, a field the
/// validation refuses. A valid configuration that fails at run time (a listener port held by
/// another socket) exits with 1 instead.
#[test]
fn every_config_error_exits_with_status_2_naming_the_field_or_file() {
    let users = TempConfig::new("users-missing", "");
    let missing_users = users.sibling("no-such-users");
    let missing_users = missing_users.to_str().expect("UTF-8 temp path");
    let cases: Vec<(String, Vec<&str>, Vec<String>)> = vec![
        (
            "[ops]\nlog_level = \"verbose\"\n".to_owned(),
            vec![],
            vec!["ops.log_level".to_owned(), "verbose".to_owned()],
        ),
        (
            "[ops]\nlog_level = \"uturn_control=loud\"\n".to_owned(),
            vec![],
            vec!["ops.log_level".to_owned()],
        ),
        (
            format!("[auth]\nusers_file = {missing_users:?}\n"),
            vec![],
            vec![
                "users file (auth.users_file)".to_owned(),
                missing_users.to_owned(),
            ],
        ),
        (
            "[server]\nlisten = [\"tls://127.0.0.1:0\"]\ntls_cert = \"/nonexistent/cert.pem\"\n\
             tls_key = \"/nonexistent/key.pem\"\n"
                .to_owned(),
            vec![],
            vec!["/nonexistent/cert.pem".to_owned()],
        ),
        (
            "[auth]\nintegrity_failure_code = 403\n".to_owned(),
            vec![],
            vec!["auth.integrity_failure_code".to_owned()],
        ),
        (
            String::new(),
            vec!["--ports", "9-1"],
            vec!["--ports".to_owned()],
        ),
    ];
    for (i, (text, flags, names)) in cases.iter().enumerate() {
        let config = TempConfig::new(&format!("config-error-{i}"), text);
        let mut args = vec!["--config", config.path(), "--listen", "127.0.0.1:0"];
        args.extend(flags);
        let (code, stderr) = run_to_exit(&args);
        assert_eq!(code, Some(2), "{text:?} {flags:?}: {stderr}");
        for name in names {
            assert!(
                stderr.contains(name.as_str()),
                "{text:?} {flags:?}: stderr does not name {name}: {stderr}"
            );
        }
    }
    // Not a configuration error: the listener's port is held by a socket without
    // SO_REUSEPORT, so binding it fails at run time.
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a holder socket");
    let taken = format!("udp://{}", holder.local_addr().expect("holder address"));
    let (code, stderr) = run_to_exit(&["--listen", &taken, "--user", "a:b"]);
    assert_eq!(code, Some(1), "{stderr}");
}

/// `relay_ips = []` (what uturn.example.toml shows as the default) means: pick the relay IPs
/// at start-up, here the specific listen address's IP, and relay from it.
#[test]
fn an_empty_relay_ips_list_relays_on_the_listen_address_ip() {
    let config = TempConfig::new("empty-relay-ips", "[relay]\nrelay_ips = []\n");
    let server = Uturn::start(&[
        "--config",
        config.path(),
        "--listen",
        "127.0.0.1:0",
        "--user",
        "alice:secret",
    ]);
    let mut client = TurnClient::new(server.listener(false), "alice", "secret");
    let allocation = client.allocate(&[]).expect("allocate with relay_ips = []");
    assert_eq!(
        allocation.relayed[0].ip(),
        std::net::IpAddr::from([127, 0, 0, 1])
    );
    assert!(server.wait_for_log("relay_ips=127.0.0.1", std::time::Duration::from_secs(5)));
}

/// TURN REST credentials whose expiry lies more than `auth.rest_expiry_max_secs` ahead (one
/// day by default, the TTL draft-uberti-behave-turn-rest-00 §2.2 recommends) are refused with
/// 401; the log line names the limit and the failure is counted as `expiry_too_far`, while a
/// credential for one hour allocates.
#[test]
fn a_rest_credential_expiring_beyond_the_maximum_is_refused_logged_and_counted() {
    let secret = "e2e-secret";
    let server = Uturn::start(&[
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--auth-secret",
        secret,
    ]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let credential = |expiry: u64| {
        let username = format!("{expiry}:carol");
        let password = uturn_proto::rest_password(secret.as_bytes(), &username);
        (username, password)
    };
    let (username, password) = credential(now + 30 * 86_400);
    let mut far = TurnClient::new(server.listener(false), &username, &password);
    assert_eq!(far.allocate(&[]).map(|_| ()), Err(401));
    let (username, password) = credential(now + 3600);
    let mut hour = TurnClient::new(server.listener(false), &username, &password);
    hour.allocate(&[])
        .expect("a one-hour REST credential allocates");
    assert!(
        server.wait_for_log(
            "more than auth.rest_expiry_max_secs (86400 s) allows",
            std::time::Duration::from_secs(5)
        ),
        "{}",
        server.log()
    );
    let counted = server.wait_metric(
        "uturn_auth_failures_total",
        &[("reason", "expiry_too_far")],
        1.0,
        std::time::Duration::from_secs(5),
    );
    assert_eq!(counted, 1.0);
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
