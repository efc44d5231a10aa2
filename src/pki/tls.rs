//! rustls server configurations of the two listeners.
//!
//! Both listeners choose the cipher suite themselves, in the order of [`provider`]: suites on
//! SHA-256 before those on SHA-384. Every handshake hashes its transcript and derives its keys
//! with the suite's hash, and SHA-256 runs in hardware on today's servers (SHA-NI) where
//! SHA-384 does not: it was 6% of the CPU of a full mTLS handshake (client and server) with
//! the AES-256/SHA-384 suite that clients list first. AES-128-GCM is what TLS 1.3 requires
//! every implementation to support.
use std::sync::Arc;

use rustls::crypto::hash::HashAlgorithm;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ServerConfig, SupportedCipherSuite};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ring's provider with the cipher suites on SHA-256 first.
fn provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the relative order within each hash stays ring's.
    provider
        .cipher_suites
        .sort_by_key(|suite| hash_of(suite) != HashAlgorithm::SHA256);
    provider
}

fn hash_of(suite: &SupportedCipherSuite) -> HashAlgorithm {
    match suite {
        SupportedCipherSuite::Tls13(s) => s.common.hash_provider.algorithm(),
        SupportedCipherSuite::Tls12(s) => s.common.hash_provider.algorithm(),
    }
}

fn builder() -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, String> {
    ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))
}

/// The server's order of cipher suites, not the client's.
fn server_order(mut config: ServerConfig) -> ServerConfig {
    config.ignore_client_order = true;
    config
}

/// The mTLS listener: client certificate required, checked by `verifier`.
pub(crate) fn mtls_config(
    verifier: Arc<dyn ClientCertVerifier>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<ServerConfig, String> {
    builder()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key.clone_key())
        .map(server_order)
        .map_err(|e| format!("server certificate and key: {e}"))
}

/// The password listener: server authentication only.
pub(crate) fn plain_config(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<ServerConfig, String> {
    builder()?
        .with_no_client_auth()
        .with_single_cert(chain.to_vec(), key.clone_key())
        .map(server_order)
        .map_err(|e| format!("server certificate and key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_on_sha256_come_first_and_none_is_lost() {
        let ours = provider().cipher_suites;
        let ring = rustls::crypto::ring::default_provider().cipher_suites;
        assert_eq!(ours.len(), ring.len());
        let first_other = ours
            .iter()
            .position(|s| hash_of(s) != HashAlgorithm::SHA256)
            .expect("SHA-384 suites are still offered");
        assert!(ours[first_other..]
            .iter()
            .all(|s| hash_of(s) != HashAlgorithm::SHA256));
        assert_eq!(
            ours[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
