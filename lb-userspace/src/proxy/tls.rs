//! Server TLS configuration from PEM files.

use std::{fmt, path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use super::TlsFiles;

/// ALPN protocols offered, in order of preference.
pub(super) const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Which of a service's two PEM files a [`TlsError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPart {
    Cert,
    Key,
}

impl TlsPart {
    /// The config field naming this file (`tls.cert_file`, `tls.key_file`).
    pub fn field(self) -> &'static str {
        match self {
            TlsPart::Cert => "cert_file",
            TlsPart::Key => "key_file",
        }
    }
}

/// A certificate or key that cannot serve: which file, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct TlsError {
    pub part: TlsPart,
    pub path: PathBuf,
    pub reason: String,
}

/// Loads the certificate chain (leaf first) and the private key (PKCS#8, PKCS#1 or SEC1) and
/// builds a server configuration offering ALPN `h2` then `http/1.1` (TLS 1.2 and 1.3, ring).
pub fn load_tls(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let err = |part: TlsPart, reason: String| TlsError {
        part,
        path: match part {
            TlsPart::Cert => files.cert_pem.clone(),
            TlsPart::Key => files.key_pem.clone(),
        },
        reason,
    };
    let cert_pem = std::fs::read(&files.cert_pem).map_err(|e| err(TlsPart::Cert, e.to_string()))?;
    let key_pem = std::fs::read(&files.key_pem).map_err(|e| err(TlsPart::Key, e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(TlsPart::Cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(err(TlsPart::Cert, "no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| err(TlsPart::Key, format!("no usable PEM private key: {e}")))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| err(TlsPart::Cert, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            // Mostly a key that does not match the certificate: name the pair.
            .map_err(|e| {
                err(
                    TlsPart::Cert,
                    format!("with private key {}: {e}", files.key_pem.display()),
                )
            })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// The TLS configuration a running proxy hands to each new connection. Replacing it (a
/// certificate renewed on reload) changes what new connections see; open ones keep theirs.
#[derive(Clone)]
pub struct TlsHandle(Arc<ArcSwap<ServerConfig>>);

impl TlsHandle {
    pub fn new(config: Arc<ServerConfig>) -> TlsHandle {
        TlsHandle(Arc::new(ArcSwap::new(config)))
    }

    /// [`load_tls`] into a new handle.
    pub fn load(files: &TlsFiles) -> Result<TlsHandle, TlsError> {
        load_tls(files).map(TlsHandle::new)
    }

    /// New connections get `config` from now on.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        self.0.store(config);
    }

    /// The configuration new connections get now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.0.load_full()
    }

    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current())
    }
}

impl fmt::Debug for TlsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsHandle(..)")
    }
}
