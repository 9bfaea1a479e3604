//! TLS for the HTTP endpoint (rustls, with ring's cryptography): the certificate chain and
//! private key of `[service] tls_certificate` and `tls_key`, PEM files. They are read at start
//! (a missing or mismatched pair stops the service with the reason) and again when either file
//! changes, so that a renewed certificate is served without a restart; a renewal that cannot be
//! read is logged and the certificate before it kept.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rampart_engine::pipeline::config::TlsFiles;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Accepts TLS connections with the certificate and key of `files`: TLS 1.2 and 1.3 with
/// rustls' safe defaults, HTTP/1.1 offered by ALPN.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificate = CertificateFiles::load(files.clone(), Arc::clone(&provider))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certificate));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The certificate served, kept up to date with its files.
#[derive(Debug)]
struct CertificateFiles {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current>,
}

/// The certificate read last, and what its files looked like then.
#[derive(Debug)]
struct Current {
    seen: [Option<Stamp>; 2],
    key: Arc<CertifiedKey>,
}

/// A file's modification time and length: a change to either is a new file.
type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl CertificateFiles {
    fn load(files: TlsFiles, provider: Arc<CryptoProvider>) -> Result<Self, String> {
        let seen = [stamp(&files.certificate), stamp(&files.key)];
        let key = Arc::new(read(&files, &provider)?);
        Ok(Self {
            files,
            provider,
            current: Mutex::new(Current { seen, key }),
        })
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let seen = [stamp(&self.files.certificate), stamp(&self.files.key)];
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen != current.seen {
            // Looked at once per change, good or bad, not at every handshake.
            current.seen = seen;
            match read(&self.files, &self.provider) {
                Ok(key) => {
                    current.key = Arc::new(key);
                    tracing::info!(certificate = %self.files.certificate.display(), "TLS certificate re-read");
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "the TLS certificate or key changed and cannot be used: the previous one is still served"
                ),
            }
        }
        Some(Arc::clone(&current.key))
    }
}

/// The certificate chain and its key, checked to belong together.
fn read(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let (cert_path, key_path) = (files.certificate.display(), files.key.display());
    let chain = CertificateDer::pem_file_iter(&files.certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the TLS certificate {cert_path}: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "the TLS certificate file {cert_path} holds no certificate (PEM, BEGIN CERTIFICATE)"
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("cannot read the TLS private key {key_path}: {e}"))?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("cannot use the TLS private key {key_path}: {e}"))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| {
        format!("the TLS private key {key_path} does not belong to the certificate {cert_path}: {e}")
    })?;
    Ok(certified)
}
