//! TLS for the stream listeners: load the certificate at start-up (a clear error naming the
//! file) and reload it on SIGHUP without touching open connections.

use anyhow::Context as _;
use tracing::info;
use uturn_control::Config;
use uturn_control::shell::ReloadHook;
use uturn_control::tls::load_server_config;
use uturn_dataplane::TlsConfig;

/// The TLS configuration when a certificate is configured.
pub(crate) fn load_tls(config: &Config) -> anyhow::Result<Option<TlsConfig>> {
    let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) else {
        return Ok(None);
    };
    let server = load_server_config(cert, key).context("load the TLS certificate")?;
    Ok(Some(TlsConfig::new(server)))
}

/// A reload hook (SIGHUP or `POST /api/v1/reload`) that loads the certificate and key named by
/// the new configuration. A missing or invalid file fails the hook, so the whole reload is
/// refused and the old certificate stays; open connections keep theirs either way.
pub(crate) fn reload_hook(tls: Option<TlsConfig>) -> Option<ReloadHook> {
    let tls = tls?;
    Some(Box::new(move |config: &Config| {
        let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) else {
            return Err(
                "server.tls_cert/tls_key: removed while TLS listeners run; restart to \
                        drop TLS"
                    .to_owned(),
            );
        };
        let server = load_server_config(cert, key).map_err(|e| format!("{e:#}"))?;
        tls.replace(server);
        info!(cert = %cert.display(), "TLS certificate reloaded; open connections keep theirs");
        Ok(uturn_control::shell::RELOADED_TLS_CERTIFICATE)
    }))
}
