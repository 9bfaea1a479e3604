//! TLS for the HTTP endpoint (rustls, with ring's cryptography): the certificate chain and
//! private key of `[service] tls_certificate` and `tls_key`, PEM files. They are read at start
//! (a missing or mismatched pair stops the service with the reason) and again when either file
//! changes, so that a renewed certificate is served without a restart; a renewal that cannot be
//! read is logged and the certificate before it kept.

use std::sync::Arc;

use rampart_engine::pipeline::config::TlsFiles;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::watch::Reread;

/// Accepts TLS connections with the certificate and key of `files`: TLS 1.2 and 1.3 with
/// rustls' safe defaults, HTTP/1.1 offered by ALPN.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificate = CertificateFiles(Reread::load(
        "TLS certificate",
        vec![files.certificate.clone(), files.key.clone()],
        {
            let (files, provider) = (files.clone(), Arc::clone(&provider));
            move || read(&files, &provider)
        },
    )?);
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
struct CertificateFiles(Reread<CertifiedKey>);

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
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
