//! TLS for the stream listeners: load the certificate at start-up (a clear error naming the
//! file) and reload it on SIGHUP without touching open connections.

use std::path::PathBuf;

use anyhow::Context as _;
use tracing::{error, info};
use uturn_control::Config;
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

/// A SIGHUP hook that reloads the certificate and key; on failure the old pair stays.
pub(crate) fn reload_hook(
    config: &Config,
    tls: Option<TlsConfig>,
) -> Option<Box<dyn FnMut() + Send>> {
    let tls = tls?;
    let cert: PathBuf = config.server.tls_cert.clone()?;
    let key: PathBuf = config.server.tls_key.clone()?;
    Some(Box::new(move || match load_server_config(&cert, &key) {
        Ok(server) => {
            tls.replace(server);
            info!(cert = %cert.display(), "TLS certificate reloaded; open connections keep theirs");
        }
        Err(e) => error!(error = %e, "TLS certificate not reloaded; the old one stays"),
    }))
}
