//! Server TLS configuration from PEM files.

use std::sync::Arc;

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use super::{ProxyError, TlsFiles};

/// ALPN protocols offered, in order of preference.
pub(super) const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Loads the certificate chain (leaf first) and the private key (PKCS#8, PKCS#1 or SEC1) and
/// builds a server configuration offering ALPN `h2` then `http/1.1` (TLS 1.2 and 1.3, ring).
pub fn load_tls(files: &TlsFiles) -> Result<Arc<ServerConfig>, ProxyError> {
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ProxyError::File {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read("certificate", &files.cert_pem)?;
    let key_pem = read("private key", &files.key_pem)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProxyError::Tls(format!("certificate {}: {e}", files.cert_pem.display())))?;
    if chain.is_empty() {
        return Err(ProxyError::Tls(format!(
            "certificate {}: no CERTIFICATE block",
            files.cert_pem.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| ProxyError::Tls(format!("private key {}: {e}", files.key_pem.display())))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ProxyError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                ProxyError::Tls(format!(
                    "{} with {}: {e}",
                    files.cert_pem.display(),
                    files.key_pem.display()
                ))
            })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}
