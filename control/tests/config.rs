//! The configuration file: the example at the repository root, defaults and validation.

use std::time::Duration;

use uturn_control::config::{Config, ConfigError, IoBackend};

const EXAMPLE: &str = include_str!("../../uturn.example.toml");

/// The example documents the defaults: parsing it yields exactly `Config::default()`.
#[test]
fn the_example_config_parses_to_the_defaults() {
    let parsed = Config::from_toml_str(EXAMPLE).unwrap();
    assert_eq!(parsed, Config::default());
}

/// RFC 8656 §3.2, §7.2, §9, §12 values are the defaults.
#[test]
fn the_defaults_are_the_rfc_values() {
    let config = Config::default();
    assert_eq!(config.server.listen, ["0.0.0.0:3478".parse().unwrap()]);
    assert_eq!(config.server.io, IoBackend::Auto);
    assert_eq!(config.auth.realm, "uturn");
    assert_eq!(config.auth.nonce_lifetime_secs, 600);
    assert_eq!(config.auth.integrity_failure_code, 401);
    assert!(!config.auth.binding_requires_auth);
    assert_eq!(config.auth.rest_separator, ':');
    assert_eq!(
        (config.relay.port_min, config.relay.port_max),
        (49152, 65535)
    );
    assert_eq!(config.relay.allocation_lifetime_default_secs, 600);
    assert_eq!(config.relay.allocation_lifetime_max_secs, 3600);
    assert_eq!(config.relay.permission_lifetime_secs, 300);
    assert_eq!(config.relay.channel_lifetime_secs, 600);
    assert_eq!(config.relay.reservation_lifetime_secs, 30);
    assert!(!config.peers.allow_loopback);
    config.validate().unwrap();
}

/// draft-uberti-behave-turn-rest-00 §2.2: "A value of one day (86400 seconds) is recommended"
/// for the TTL; that is the default bound on a REST credential's expiry, and 0 means it.
#[test]
fn the_rest_expiry_maximum_defaults_to_one_day_and_zero_means_the_default() {
    assert_eq!(Config::default().auth.rest_expiry_max_secs, 86_400);
    assert_eq!(Config::default().auth.rest_expiry_max(), 86_400);
    let zero = Config::from_toml_str("[auth]\nrest_expiry_max_secs = 0").unwrap();
    assert_eq!(zero.auth.rest_expiry_max(), 86_400);
    let hour = Config::from_toml_str("[auth]\nrest_expiry_max_secs = 3600").unwrap();
    assert_eq!(hour.auth.rest_expiry_max(), 3600);
}

#[test]
fn an_expressway_style_config_parses() {
    let text = r#"
        [server]
        threads = 4
        io = "mmsg"
        software = "uturn"
        [auth]
        realm = "TANDBERG"
        integrity_failure_code = 431
        binding_requires_auth = true
        secrets = ["new", "old"]
        [[auth.users]]
        username = "alice"
        password = "pw"
        [[auth.users]]
        username = "bob"
        key = "0123456789abcdef0123456789abcdef"
        [relay]
        relay_ips = ["10.0.0.5"]
        external_ips = ["203.0.113.5"]
        port_min = 24000
        port_max = 29999
    "#;
    let config = Config::from_toml_str(text).unwrap();
    assert_eq!(config.server.threads, 4);
    assert_eq!(config.auth.users.len(), 2);
    assert_eq!(
        config.external_mappings().unwrap(),
        [("10.0.0.5".parse().unwrap(), "203.0.113.5".parse().unwrap())]
    );
}

fn field_of(text: &str) -> String {
    match Config::from_toml_str(text) {
        Err(ConfigError::Invalid { field, .. }) => field.to_owned(),
        Err(ConfigError::Toml(error)) => format!("toml: {error}"),
        other => panic!("expected an error for {text:?}, got {other:?}"),
    }
}

#[test]
fn invalid_values_are_refused_naming_their_field() {
    let cases = [
        (
            "[auth]\nintegrity_failure_code = 403",
            "auth.integrity_failure_code",
        ),
        ("[auth]\nrealm = \"\"", "auth.realm"),
        (
            "[auth]\nnonce_lifetime_secs = 0",
            "auth.nonce_lifetime_secs",
        ),
        ("[[auth.users]]\nusername = \"a\"", "auth.users"),
        (
            "[[auth.users]]\nusername = \"a\"\nkey = \"zz\"",
            "auth.users.key",
        ),
        ("[auth]\nsecrets = [\"\"]", "auth.secrets"),
        (
            "[relay]\nport_min = 60000\nport_max = 50000",
            "relay.port_min",
        ),
        (
            "[relay]\nrelay_ips = [\"10.0.0.1\", \"10.0.0.2\"]",
            "relay.relay_ips",
        ),
        ("[relay]\nrelay_ips = [\"0.0.0.0\"]", "relay.relay_ips"),
        (
            "[relay]\nrelay_ips = [\"10.0.0.1\"]\nexternal_ips = [\"203.0.113.5/10.9.9.9\"]",
            "relay.external_ips",
        ),
        (
            "[relay]\nexternal_ips = [\"203.0.113.5\"]",
            "relay.external_ips",
        ),
        (
            "[relay]\nallocation_lifetime_default_secs = 4000",
            "relay.allocation_lifetime_default_secs",
        ),
        (
            "[relay]\npermission_lifetime_secs = 0",
            "relay.permission_lifetime_secs",
        ),
        ("[server]\nlisten = []", "server.listen"),
        (
            "[server]\nlisten = [\"auto://0.0.0.0:443\"]",
            "server.tls_cert",
        ),
        ("[server]\ntls_cert = \"c.pem\"", "server.tls_key"),
        (
            "[server]\nstream_idle_timeout_secs = 0",
            "server.stream_connections_max",
        ),
    ];
    for (text, field) in cases {
        assert_eq!(field_of(text), field, "{text}");
    }
}

/// A log filter that EnvFilter would take as something else (a bare word is a target name, and
/// everything else would go quiet) is refused at load, naming `ops.log_level`.
#[test]
fn an_invalid_log_level_is_refused_naming_ops_log_level() {
    for level in ["verbose", "infoo", "", "info,,debug", "uturn_control=loud"] {
        let text = format!("[ops]\nlog_level = {level:?}");
        assert_eq!(field_of(&text), "ops.log_level", "{level:?}");
    }
    for level in [
        "info",
        "WARN",
        "off",
        "uturn_control=debug,info",
        "uturn_dataplane=trace",
    ] {
        let text = format!("[ops]\nlog_level = {level:?}");
        let config = Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{level:?}: {e}"));
        assert_eq!(config.ops.log_level, level);
    }
}

#[test]
fn unknown_keys_and_wrong_types_are_refused() {
    assert!(field_of("[relay]\nport_mn = 1").contains("unknown field"));
    assert!(field_of("[server]\nio = \"epoll\"").starts_with("toml:"));
    assert!(field_of("[auth]\nrealm = 5").starts_with("toml:"));
}

#[test]
fn load_reads_a_file_and_names_a_missing_one() {
    let dir = std::env::temp_dir().join(format!("uturn-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("uturn.toml");
    std::fs::write(&path, "[auth]\nrealm = \"example.org\"\n").unwrap();
    assert_eq!(Config::load(&path).unwrap().auth.realm, "example.org");
    let missing = dir.join("missing.toml");
    let error = Config::load(&missing).unwrap_err();
    assert!(error.to_string().contains("missing.toml"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_users_file_is_read_into_the_user_table() {
    let dir = std::env::temp_dir().join(format!("uturn-users-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("users");
    std::fs::write(
        &path,
        "# users\nalice:pw\nbob:key=0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let mut config = Config::default();
    config.auth.users_file = Some(path.clone());
    let table = uturn_control::config::user_table(&config.auth).unwrap();
    assert_eq!(table.len(), 2);
    std::fs::write(&path, "broken line\n").unwrap();
    let error = uturn_control::config::user_table(&config.auth).unwrap_err();
    assert!(error.to_string().contains("line 1"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A users file that cannot be read is named as the users file, not as the config file.
#[test]
fn a_missing_users_file_is_named_as_the_users_file() {
    let mut config = Config::default();
    let path = std::env::temp_dir().join(format!("uturn-no-users-{}", std::process::id()));
    config.auth.users_file = Some(path.clone());
    let error = uturn_control::config::user_table(&config.auth).unwrap_err();
    assert!(
        matches!(&error, ConfigError::UsersFile { path: p, .. } if *p == path),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(text.contains("users file (auth.users_file)"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(!text.contains("config file"), "{text}");
}

/// Listener schemes parse from the file; a bad one is a TOML error naming the expected form.
#[test]
fn listener_schemes_parse_from_the_file() {
    let config = Config::from_toml_str(
        "[server]\nlisten = [\"0.0.0.0:3478\", \"udp://[::]:3478\", \"tcp://0.0.0.0:3479\", \
         \"auto://0.0.0.0:443\", \"tls://0.0.0.0:5349\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
    )
    .unwrap();
    config.validate().unwrap();
    let text: Vec<String> = config
        .server
        .listen
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        text,
        [
            "0.0.0.0:3478",
            "udp://[::]:3478",
            "tcp://0.0.0.0:3479",
            "auto://0.0.0.0:443",
            "tls://0.0.0.0:5349"
        ]
    );
    assert!(field_of("[server]\nlisten = [\"dtls://0.0.0.0:3478\"]").contains("udp://"));
}

/// The shared-443 set-up of README "One public 443" parses as written; passthrough without an
/// `auto://` listener, or a PROXY header towards no backend, is refused naming its field.
#[test]
fn the_shared_443_config_parses_and_its_misuses_are_refused() {
    let text = r#"
        [server]
        listen = ["0.0.0.0:3478", "auto://0.0.0.0:443"]
        tls_cert = "/etc/uturn/turn.example.com.pem"
        tls_key = "/etc/uturn/turn.example.com.key"
        forward_other_to = "127.0.0.1:8443"
        forward_proxy_protocol = true
        turn_server_names = ["turn.example.com"]
        proxy_protocol_from = ["10.0.0.0/8", "2001:db8::/32"]
    "#;
    let config = Config::from_toml_str(text).unwrap();
    assert_eq!(
        config.server.forward_other_to,
        Some("127.0.0.1:8443".parse().unwrap())
    );
    assert_eq!(config.server.proxy_protocol_from.len(), 2);
    for (text, field) in [
        (
            "[server]\nforward_other_to = \"127.0.0.1:8443\"",
            "server.forward_other_to",
        ),
        (
            "[server]\nforward_proxy_protocol = true",
            "server.forward_proxy_protocol",
        ),
    ] {
        let error = Config::from_toml_str(text).unwrap_err().to_string();
        assert!(error.contains(field), "{text}: {error}");
    }
    assert!(Config::from_toml_str("[server]\nproxy_protocol_from = [\"10.0.0.0/33\"]").is_err());
}

/// The configuration the .deb installs is valid, and its ops settings are the safe ones.
#[test]
fn the_packaged_config_is_valid() {
    let config = Config::from_toml_str(include_str!("../../scripts/deploy/uturn.toml")).unwrap();
    assert!(config.ops.http_listen.ip().is_loopback());
    assert_eq!(config.ops.log_format, uturn_control::ops::LogFormat::Json);
    let unit = include_str!("../../scripts/deploy/uturn.service");
    let nofile: u32 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .and_then(|v| v.trim().parse().ok())
        .expect("LimitNOFILE in the unit");
    // One relay socket per family per allocation over the whole port range, plus headroom.
    let ports = u32::from(config.relay.port_max - config.relay.port_min) + 1;
    assert!(
        nofile >= 2 * ports + 1024,
        "LimitNOFILE={nofile} for {ports} ports"
    );
}

/// The admin listener's limits come from `[ops]`; a value it cannot use is refused naming the
/// field.
#[test]
fn the_admin_listener_limits_are_read_from_ops_and_checked() {
    let config =
        Config::from_toml_str("[ops]\nhttp_header_timeout_ms = 250\nhttp_max_connections = 8\n")
            .unwrap();
    config.validate().unwrap();
    let limits = uturn_control::http::HttpLimits::from_ops(&config.ops);
    assert_eq!(limits.header_timeout, Duration::from_millis(250));
    assert_eq!(limits.max_connections, 8);
    let defaults = uturn_control::http::HttpLimits::default();
    assert_eq!(
        (defaults.header_timeout, defaults.max_connections),
        (Duration::from_secs(5), 1024)
    );
    for (text, field) in [
        ("http_header_timeout_ms = 0", "ops.http_header_timeout_ms"),
        (
            "http_header_timeout_ms = 600000",
            "ops.http_header_timeout_ms",
        ),
        ("http_max_connections = 0", "ops.http_max_connections"),
    ] {
        let refused = Config::from_toml_str(&format!("[ops]\n{text}\n"))
            .and_then(|c| c.validate().map(|()| c))
            .unwrap_err()
            .to_string();
        assert!(refused.contains(field), "{text}: {refused}");
    }
}
