//! TLS for the probe's `turns:` / `transport=tls` (RFC 8656 §3.1: TURN over TLS over TCP),
//! with rustls: the Mozilla roots by default, a CA file, or no verification at all when the
//! operator asks for it by name (`--insecure`).

use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
    StreamOwned,
};
use thiserror::Error;

/// Which server certificates to trust.
#[derive(Debug, Clone)]
pub enum TlsTrust {
    /// The Mozilla root store (webpki-roots).
    WebPki,
    /// The CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Any certificate: checks reachability and TURN, not identity.
    InsecureAcceptAny,
}

/// TLS set-up failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA file could not be read or holds no certificate.
    #[error("CA file {path}: {what}")]
    CaFile {
        /// The file.
        path: String,
        /// What went wrong.
        what: String,
    },
    /// The host is not a valid TLS server name.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    /// rustls refused the configuration or the handshake.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The TCP connection failed or timed out during the handshake.
    #[error("TLS handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// A TLS stream to a TURN server, handshake done.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A client configuration for `trust`.
pub fn client_config(trust: &TlsTrust) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let config = match trust {
        TlsTrust::WebPki => {
            let roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsTrust::CaFile(path) => {
            let ca_err = |what: String| TlsError::CaFile {
                path: path.display().to_string(),
                what,
            };
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))? {
                let cert = cert.map_err(|e| ca_err(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ca_err("no certificate".to_owned()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsTrust::InsecureAcceptAny => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Completes a TLS handshake with `host` over `tcp` within `timeout`.
pub fn connect(
    tcp: TcpStream,
    host: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream, TlsError> {
    let name =
        ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName(host.to_owned()))?;
    let mut conn = ClientConnection::new(config, name)?;
    let mut tcp = tcp;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    // Bounded: each complete_io either makes progress or fails on the socket timeouts.
    for _ in 0..64 {
        if !conn.is_handshaking() {
            return Ok(StreamOwned::new(conn, tcp));
        }
        conn.complete_io(&mut tcp)?;
    }
    Err(TlsError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the TLS handshake did not finish",
    )))
}

/// Accepts any certificate, still checking the handshake signatures with the provider's
/// algorithms (so the connection is TLS, just not authenticated).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trust_mode_builds_a_configuration() {
        assert!(client_config(&TlsTrust::WebPki).is_ok());
        assert!(client_config(&TlsTrust::InsecureAcceptAny).is_ok());
        let missing = client_config(&TlsTrust::CaFile("/nonexistent/ca.pem".into()));
        assert!(matches!(missing, Err(TlsError::CaFile { .. })));
    }
}
