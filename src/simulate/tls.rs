//! TLS client configurations of the simulated devices.
//!
//! Every simulated device meets the same server certificate, and the simulator's CPU is shared
//! with the gateway it measures, so a [`Simulator`](super::Simulator) verifies the server's
//! chain once and then recognises the same chain for the same name for
//! [`REMEMBER_VERIFIED`]: a real device spends that CPU on its own hardware. The handshake
//! signature (the proof that the server holds the certificate's key) is still verified on every
//! connection. [`client_tls_config`], for tools and tests, verifies everything every time.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// How long a verified server chain is recognised without verifying it again.
pub const REMEMBER_VERIFIED: std::time::Duration = std::time::Duration::from_secs(60);

/// Trust anchors from the CA certificate(s) in `ca_pem`.
pub fn roots_from_pem(ca_pem: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("CA PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no CA certificate to trust".into());
    }
    Ok(roots)
}

/// A rustls client configuration trusting the CA(s) in `ca_pem`, optionally presenting a
/// client certificate (`(certificate_pem, private_key_pem)`). Session resumption is off: every
/// connection makes a full handshake, as a fleet of distinct devices does.
pub fn client_tls_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(roots_from_pem(ca_pem)?);
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    DeviceTls { provider, verifier }.config(client)
}

/// What every client configuration of a simulation shares: the crypto provider and the server
/// certificate verifier.
#[derive(Debug, Clone)]
pub struct DeviceTls {
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
}

impl DeviceTls {
    /// Trust `roots`; a verified server chain is remembered (see the module documentation).
    pub fn remembering(roots: Arc<rustls::RootCertStore>) -> Result<DeviceTls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(DeviceTls {
            provider,
            verifier: Arc::new(RememberingVerifier {
                inner,
                verified: Mutex::new(None),
            }),
        })
    }

    /// A client configuration, with a client certificate or without. No session resumption.
    pub fn config(
        &self,
        client: Option<(&str, &str)>,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let builder = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(self.verifier.clone());
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .collect::<Result<_, _>>()
                        .map_err(|e| format!("client certificate PEM: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .map_err(|e| format!("client key PEM: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate: {e}"))?
            }
        };
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// A server chain that passed full verification, and when.
#[derive(Debug)]
struct Verified {
    end_entity: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    server_name: ServerName<'static>,
    at: UnixTime,
}

impl Verified {
    fn matches(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        let age = now.as_secs().saturating_sub(self.at.as_secs());
        now.as_secs() >= self.at.as_secs()
            && age < REMEMBER_VERIFIED.as_secs()
            && self.end_entity.as_ref() == end_entity.as_ref()
            && self.intermediates.len() == intermediates.len()
            && self
                .intermediates
                .iter()
                .zip(intermediates)
                .all(|(a, b)| a.as_ref() == b.as_ref())
            && &self.server_name == server_name
    }
}

/// Full verification by webpki, remembered for the last chain that passed it.
#[derive(Debug)]
struct RememberingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    verified: Mutex<Option<Verified>>,
}

impl ServerCertVerifier for RememberingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let known = self.verified.lock().is_ok_and(|v| {
            v.as_ref()
                .is_some_and(|v| v.matches(end_entity, intermediates, server_name, now))
        });
        if known {
            return Ok(ServerCertVerified::assertion());
        }
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Ok(mut slot) = self.verified.lock() {
            *slot = Some(Verified {
                end_entity: end_entity.clone().into_owned(),
                intermediates: intermediates
                    .iter()
                    .map(|c| c.clone().into_owned())
                    .collect(),
                server_name: server_name.to_owned(),
                at: now,
            });
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(at: u64) -> Verified {
        Verified {
            end_entity: CertificateDer::from(vec![1, 2, 3]),
            intermediates: vec![CertificateDer::from(vec![4])],
            server_name: ServerName::try_from("localhost").expect("name"),
            at: UnixTime::since_unix_epoch(std::time::Duration::from_secs(at)),
        }
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
    }

    #[test]
    fn only_the_same_chain_for_the_same_name_is_recognised_for_a_while() {
        let v = verified(1000);
        let ee = CertificateDer::from(vec![1, 2, 3]);
        let mid = [CertificateDer::from(vec![4])];
        let name = ServerName::try_from("localhost").expect("name");
        assert!(v.matches(&ee, &mid, &name, at(1000)));
        assert!(v.matches(&ee, &mid, &name, at(1059)));
        assert!(!v.matches(&ee, &mid, &name, at(1060)), "too old");
        assert!(!v.matches(&ee, &mid, &name, at(999)), "clock went back");
        let other = CertificateDer::from(vec![1, 2, 4]);
        assert!(!v.matches(&other, &mid, &name, at(1000)));
        assert!(!v.matches(&ee, &[], &name, at(1000)));
        let elsewhere = ServerName::try_from("127.0.0.1").expect("name");
        assert!(!v.matches(&ee, &mid, &elsewhere, at(1000)));
    }
}
