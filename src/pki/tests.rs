//! Tests of the PKI: set-up, loading, verification, identification and issuing.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};

use super::*;

fn config(dir: &Path) -> PkiConfig {
    PkiConfig {
        dir: dir.to_path_buf(),
        ..PkiConfig::default()
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
    factory: Issuer,
    operational: Issuer,
    admin: Issuer,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let cfg = config(&dir);
    Pki::init(&cfg).expect("init");
    let pki = Pki::load(&cfg).expect("load");
    Fixture {
        factory: Issuer::load(&dir, "factory-ca").expect("factory CA"),
        operational: Issuer::load(&dir, "operational-ca").expect("operational CA"),
        admin: Issuer::load(&dir, "admin-ca").expect("admin CA"),
        _tmp: tmp,
        dir,
        pki,
    }
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM")
}

fn verify(pki: &Pki, pem: &str) -> Result<Role, CertRefusal> {
    pki.client_verifier()
        .verify(&der_of(pem), &[], UnixTime::now())
}

/// Through the rustls trait, as the handshake calls it; the refusal comes back typed.
fn verify_via_trait(pki: &Pki, der: &CertificateDer<'_>) -> Result<(), CertRefusal> {
    use rustls::server::danger::ClientCertVerifier;
    match pki
        .client_verifier()
        .verify_client_cert(der, &[], UnixTime::now())
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
            Err(refusal_from_tls_error(&io).expect("a certificate refusal"))
        }
    }
}

/// An RSA-1024 key (made once: key generation is slow in debug builds).
fn rsa_1024() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).expect("RSA key"))
}

/// rcgen signs through this with an RSA key of any size.
struct RsaSigner {
    key: rsa::RsaPrivateKey,
    public_pkcs1: Vec<u8>,
}

impl rcgen::RemoteKeyPair for RsaSigner {
    fn public_key(&self) -> &[u8] {
        &self.public_pkcs1
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        use rsa::signature::{SignatureEncoding, Signer};
        let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(self.key.clone());
        Ok(signer.sign(msg).to_vec())
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

fn csr_for(cn: Option<&str>, key: &rcgen::KeyPair) -> String {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    params
        .serialize_request(key)
        .expect("CSR")
        .pem()
        .expect("CSR PEM")
}

#[test]
fn init_creates_every_file_with_private_keys_0600_and_is_idempotent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let report = Pki::init(&config(&dir)).expect("init");
    let names = [
        "factory-ca.pem",
        "factory-ca.key",
        "operational-ca.pem",
        "operational-ca.key",
        "admin-ca.pem",
        "admin-ca.key",
        "server.pem",
        "server.key",
    ];
    assert_eq!(report.created.len(), names.len(), "{:?}", report.created);
    for name in names {
        let path = dir.join(name);
        assert!(report.created.contains(&path), "{name} not reported");
        let meta = std::fs::metadata(&path).expect("file exists");
        #[cfg(unix)]
        if name.ends_with(".key") {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        }
        let _ = meta;
    }
    let before = std::fs::read(dir.join("operational-ca.pem")).expect("read");
    let again = Pki::init(&config(&dir)).expect("second init");
    assert!(again.created.is_empty(), "{:?}", again.created);
    assert_eq!(
        before,
        std::fs::read(dir.join("operational-ca.pem")).expect("read")
    );

    // A removed server certificate is made again, for the key that is still there.
    std::fs::remove_file(dir.join("server.pem")).expect("remove");
    let third = Pki::init(&config(&dir)).expect("third init");
    assert_eq!(third.created, vec![dir.join("server.pem")]);
    Pki::load(&config(&dir)).expect("load after re-creating server.pem");
}

#[test]
fn ca_and_server_profiles() {
    let f = fixture();
    let subjects: Vec<String> = ["factory-ca.pem", "operational-ca.pem", "admin-ca.pem"]
        .iter()
        .map(|name| {
            let der = der_of(&std::fs::read_to_string(f.dir.join(name)).expect("read"));
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
            let bc = cert
                .basic_constraints()
                .expect("basic constraints")
                .expect("present");
            assert!(bc.value.ca, "{name}");
            let ku = cert.key_usage().expect("key usage").expect("present");
            assert!(ku.value.key_cert_sign(), "{name}");
            let years = (cert.validity().not_after.to_datetime()
                - cert.validity().not_before.to_datetime())
            .whole_days();
            assert!(years >= 3650, "{name}: {years} days");
            cert.subject().to_string()
        })
        .collect();
    assert_ne!(subjects[0], subjects[1]);
    assert_ne!(subjects[1], subjects[2]);
    assert_ne!(subjects[0], subjects[2]);

    let server = der_of(&std::fs::read_to_string(f.dir.join("server.pem")).expect("read"));
    let (_, cert) = x509_parser::parse_x509_certificate(server.as_ref()).expect("parse");
    let san = cert
        .subject_alternative_name()
        .expect("san")
        .expect("present");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert!(names.iter().any(|n| n.contains("localhost")), "{names:?}");
    assert!(
        names.iter().any(|n| n == "IPAddress(7f:00:00:01)"),
        "{names:?}"
    );
    assert!(
        cert.extended_key_usage()
            .expect("eku")
            .expect("present")
            .value
            .server_auth
    );
    assert_eq!(f.pki.server_ca_pem(), f.operational.certificate_pem());
    assert_eq!(f.pki.ca_chain_pem(), f.operational.certificate_pem());
}

#[test]
fn load_reports_missing_and_bad_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    match Pki::load(&config(&dir)) {
        Err(PkiError::Missing(d, _)) => assert_eq!(d, dir),
        other => panic!("expected Missing, got {:?}", other.map(|_| ())),
    }
    Pki::init(&config(&dir)).expect("init");
    std::fs::write(dir.join("admin-ca.pem"), "not a certificate").expect("write");
    let err = Pki::load(&config(&dir))
        .map(|_| ())
        .expect_err("bad admin CA");
    assert!(err.to_string().contains("admin-ca.pem"), "{err}");

    let mut cfg = config(&dir);
    cfg.factory_cas.push(PathBuf::from("maker-x.pem"));
    let err = Pki::load(&cfg).map(|_| ()).expect_err("missing maker CA");
    assert!(err.to_string().contains("maker-x.pem"), "{err}");

    std::fs::remove_file(dir.join("operational-ca.key")).expect("remove");
    assert!(matches!(
        Pki::load(&config(&dir)),
        Err(PkiError::Missing(_, _)) | Err(PkiError::BadFile { .. })
    ));
}

#[test]
fn load_refuses_two_domains_with_one_subject() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    Pki::init(&config(&dir)).expect("init");
    let clash = Issuer::generate_ca("onboard factory CA (development)").expect("CA");
    clash.write(&dir, "admin-ca").expect("write");
    match Pki::load(&config(&dir)) {
        Err(PkiError::BadFile { message, .. }) => {
            assert!(message.contains("subject"), "{message}")
        }
        other => panic!("expected BadFile, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn load_takes_several_factory_cas() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    Pki::init(&config(&dir)).expect("init");
    let maker_a = Issuer::generate_ca("maker A").expect("CA");
    let maker_b = Issuer::generate_ca("maker B").expect("CA");
    let bundle = format!("{}{}", maker_a.certificate_pem(), maker_b.certificate_pem());
    std::fs::write(dir.join("makers.pem"), bundle).expect("write");
    let mut cfg = config(&dir);
    cfg.factory_cas.push(PathBuf::from("makers.pem"));
    let pki = Pki::load(&cfg).expect("load");
    for maker in [&maker_a, &maker_b] {
        let cert = maker
            .issue_client("dev-1", &CertOptions::valid_for_days(1))
            .expect("issue");
        assert_eq!(
            verify(&pki, &cert.certificate_pem).ok(),
            Some(Role::Bootstrap)
        );
    }
}

#[test]
fn verifier_accepts_each_role_and_identify_agrees() {
    let f = fixture();
    let mut options = CertOptions::valid_for_days(30);
    options.dns_names = vec!["dev-1.example".into()];
    for (issuer, role, cn) in [
        (&f.factory, Role::Bootstrap, "dev-1"),
        (&f.operational, Role::Device, "dev-2"),
        (&f.admin, Role::Admin, "alice"),
    ] {
        let cert = issuer.issue_client(cn, &options).expect("issue");
        assert_eq!(
            verify(&f.pki, &cert.certificate_pem).ok(),
            Some(role),
            "{cn}"
        );
        assert!(verify_via_trait(&f.pki, &der_of(&cert.certificate_pem)).is_ok());
        let der = der_of(&cert.certificate_pem);
        let peer = f
            .pki
            .identify(std::slice::from_ref(&der))
            .expect("identify");
        assert_eq!(peer.role, role);
        assert_eq!(peer.common_name.as_deref(), Some(cn));
        assert_eq!(peer.alt_names, vec!["dev-1.example".to_string()]);
        assert_eq!(peer.serial, cert.serial);
        assert_eq!(peer.serial.len(), 32);
        assert_eq!(peer.fingerprint, issue::fingerprint(der.as_ref()));
        assert!(peer.not_after > OffsetDateTime::now_utc() + Duration::days(29));
    }
}

#[test]
fn verifier_refuses_each_reason_with_the_cn() {
    let f = fixture();
    let now = OffsetDateTime::now_utc();
    let refused = |pem: &str, reason: CertRefusalReason, cn: &str| {
        let refusal = verify(&f.pki, pem).expect_err("refused");
        assert_eq!(refusal.reason, reason, "{refusal}");
        assert_eq!(refusal.subject_cn.as_deref(), Some(cn));
        let via_trait = verify_via_trait(&f.pki, &der_of(pem)).expect_err("refused");
        assert_eq!(via_trait.reason, reason);
        assert_eq!(via_trait.subject_cn.as_deref(), Some(cn));
    };

    let rogue = Issuer::generate_ca("rogue CA").expect("CA");
    let cert = rogue
        .issue_client("dev-rogue", &CertOptions::valid_for_days(1))
        .expect("issue");
    refused(
        &cert.certificate_pem,
        CertRefusalReason::UnknownCa,
        "dev-rogue",
    );

    // Same subject as our factory CA, different key: the signature does not verify.
    let impostor = Issuer::generate_ca("onboard factory CA (development)").expect("CA");
    let cert = impostor
        .issue_client("dev-impostor", &CertOptions::valid_for_days(1))
        .expect("issue");
    refused(
        &cert.certificate_pem,
        CertRefusalReason::UnknownCa,
        "dev-impostor",
    );

    let expired = CertOptions {
        not_before: now - Duration::days(10),
        not_after: now - Duration::days(1),
        ..CertOptions::valid_for_days(1)
    };
    let cert = f.factory.issue_client("dev-old", &expired).expect("issue");
    refused(&cert.certificate_pem, CertRefusalReason::Expired, "dev-old");

    let future = CertOptions {
        not_before: now + Duration::days(1),
        not_after: now + Duration::days(10),
        ..CertOptions::valid_for_days(1)
    };
    let cert = f
        .operational
        .issue_client("dev-new", &future)
        .expect("issue");
    refused(
        &cert.certificate_pem,
        CertRefusalReason::NotYetValid,
        "dev-new",
    );

    let no_eku = CertOptions {
        client_auth: false,
        ..CertOptions::valid_for_days(1)
    };
    let cert = f.factory.issue_client("dev-noeku", &no_eku).expect("issue");
    let no_eku_der = der_of(&cert.certificate_pem);
    let (_, parsed) = x509_parser::parse_x509_certificate(no_eku_der.as_ref()).expect("parse");
    assert!(parsed.extended_key_usage().expect("eku").is_none());
    refused(
        &cert.certificate_pem,
        CertRefusalReason::MissingClientAuth,
        "dev-noeku",
    );

    use rsa::pkcs8::EncodePublicKey;
    let spki = rsa_1024()
        .to_public_key()
        .to_public_key_der()
        .expect("SPKI");
    let cert = f
        .factory
        .issue_client_with_key("dev-weak", &CertOptions::valid_for_days(1), spki.as_bytes())
        .expect("issue");
    refused(
        &cert.certificate_pem,
        CertRefusalReason::WeakKey,
        "dev-weak",
    );

    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
    let refusal = f
        .pki
        .client_verifier()
        .verify(&garbage, &[], UnixTime::now())
        .expect_err("garbage");
    assert_eq!(refusal.reason, CertRefusalReason::Malformed);
    assert_eq!(refusal.subject_cn, None);
    assert_eq!(
        verify_via_trait(&f.pki, &garbage)
            .expect_err("garbage")
            .reason,
        CertRefusalReason::Malformed
    );
    let unknown = f.pki.identify(&[der_of(
        &rogue
            .issue_client("x", &CertOptions::valid_for_days(1))
            .expect("issue")
            .certificate_pem,
    )]);
    assert_eq!(
        unknown.expect_err("unknown").reason,
        CertRefusalReason::UnknownCa
    );
}

#[test]
fn refusal_from_other_tls_errors() {
    let wrap = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let r = refusal_from_tls_error(&wrap(rustls::Error::NoCertificatesPresented)).expect("some");
    assert_eq!(r.reason, CertRefusalReason::NoCertificate);
    for (error, reason) in [
        (
            rustls::CertificateError::Expired,
            CertRefusalReason::Expired,
        ),
        (
            rustls::CertificateError::NotValidYet,
            CertRefusalReason::NotYetValid,
        ),
        (
            rustls::CertificateError::UnknownIssuer,
            CertRefusalReason::UnknownCa,
        ),
        (
            rustls::CertificateError::BadEncoding,
            CertRefusalReason::Malformed,
        ),
    ] {
        let r =
            refusal_from_tls_error(&wrap(rustls::Error::InvalidCertificate(error))).expect("some");
        assert_eq!(r.reason, reason);
    }
    assert!(refusal_from_tls_error(&wrap(rustls::Error::DecryptError)).is_none());
    assert!(refusal_from_tls_error(&std::io::Error::other("plain")).is_none());
}

#[test]
fn sign_csr_accepts_p256_p384_ed25519_and_named_or_empty_subjects() {
    let f = fixture();
    for alg in [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ] {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        for cn in [Some("dev-7"), None] {
            let issued = f.pki.sign_csr("dev-7", &csr_for(cn, &key)).expect("signed");
            let der = der_of(&issued.certificate_pem);
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
            assert_eq!(cert.public_key().raw, key.public_key_der().as_slice());
            let peer = f
                .pki
                .identify(std::slice::from_ref(&der))
                .expect("identify");
            assert_eq!(peer.role, Role::Device);
            assert_eq!(peer.common_name.as_deref(), Some("dev-7"));
            assert_eq!(peer.serial, issued.serial);
            assert_eq!(peer.fingerprint, issued.fingerprint);
            assert_eq!(peer.not_after, issued.not_after);
            let days = (issued.not_after - OffsetDateTime::now_utc()).whole_days();
            assert!((364..=365).contains(&days), "{days}");
            assert_eq!(
                verify(&f.pki, &issued.certificate_pem).ok(),
                Some(Role::Device)
            );
            let eku = cert.extended_key_usage().expect("eku").expect("present");
            assert!(eku.value.client_auth);
            let ku = cert.key_usage().expect("ku").expect("present");
            assert!(ku.value.digital_signature());
        }
    }
}

#[test]
fn sign_csr_refuses_bad_requests() {
    let f = fixture();
    let key = rcgen::KeyPair::generate().expect("key");

    match f.pki.sign_csr("dev-7", &csr_for(Some("dev-8"), &key)) {
        Err(CsrError::SubjectMismatch { expected, found }) => {
            assert_eq!((expected.as_str(), found.as_str()), ("dev-7", "dev-8"))
        }
        other => panic!("expected SubjectMismatch, got {other:?}"),
    }

    // Flip a bit in the signature (the last bytes of the DER) and re-encode.
    let pem = csr_for(Some("dev-7"), &key);
    let mut der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("PEM")
        .as_ref()
        .to_vec();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let tampered = files::pem_encode("CERTIFICATE REQUEST", &der);
    match f.pki.sign_csr("dev-7", &tampered) {
        Err(CsrError::Invalid(message)) => {
            assert!(
                message.starts_with("CSR signature does not verify"),
                "{message}"
            )
        }
        other => panic!("expected Invalid, got {other:?}"),
    }

    for garbage in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        assert!(
            matches!(f.pki.sign_csr("dev-7", garbage), Err(CsrError::Invalid(_))),
            "{garbage:?}"
        );
    }
    let huge = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        "A".repeat(1 << 20)
    );
    assert!(matches!(
        f.pki.sign_csr("dev-7", &huge),
        Err(CsrError::Invalid(_))
    ));

    use rsa::pkcs1::EncodeRsaPublicKey;
    let rsa_key = rsa_1024().clone();
    let public_pkcs1 = rsa_key
        .to_public_key()
        .to_pkcs1_der()
        .expect("PKCS#1")
        .as_bytes()
        .to_vec();
    let remote = rcgen::KeyPair::from_remote(Box::new(RsaSigner {
        key: rsa_key,
        public_pkcs1,
    }))
    .expect("remote key");
    let weak = csr_for(Some("dev-7"), &remote);
    match f.pki.sign_csr("dev-7", &weak) {
        Err(CsrError::WeakKey(message)) => {
            assert_eq!(message, "RSA key of 1024 bits; at least 2048 are required")
        }
        other => panic!("expected WeakKey, got {other:?}"),
    }
}

#[test]
fn generated_credential_key_matches_certificate() {
    let f = fixture();
    let (issued, key_pem) = f.pki.generate_credential("dev-9").expect("generate");
    let key = rcgen::KeyPair::from_pem(&key_pem).expect("PKCS#8 key");
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let der = der_of(&issued.certificate_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
    assert_eq!(cert.public_key().raw, key.public_key_der().as_slice());
    assert_eq!(
        verify(&f.pki, &issued.certificate_pem).ok(),
        Some(Role::Device)
    );
    let peer = f.pki.identify(&[der]).expect("identify");
    assert_eq!(peer.common_name.as_deref(), Some("dev-9"));
    assert_eq!(peer.serial, issued.serial);
}

#[test]
fn batch_helpers_write_credentials() {
    let f = fixture();
    let out = f.dir.join("out");
    let ids: Vec<String> = (0..5).map(|i| format!("dev-{i}")).collect();
    let written =
        issue_factory_batch(&f.dir, &ids, &out, &CertOptions::valid_for_days(30)).expect("batch");
    assert_eq!(written.len(), ids.len());
    for cred in &written {
        let pem = std::fs::read_to_string(&cred.cert_path).expect("cert");
        assert_eq!(verify(&f.pki, &pem).ok(), Some(Role::Bootstrap));
        let peer = f.pki.identify(&[der_of(&pem)]).expect("identify");
        assert_eq!(peer.common_name.as_deref(), Some(cred.device_id.as_str()));
        assert_eq!(peer.serial, cred.serial);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&cred.key_path)
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
    assert_eq!(
        std::fs::read_to_string(out.join("server-ca.pem")).expect("server CA"),
        f.pki.server_ca_pem()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("factory-ca.pem")).expect("factory CA"),
        f.factory.certificate_pem()
    );
    assert!(issue_factory_batch(
        &f.dir,
        &["../x".to_string()],
        &out,
        &CertOptions::valid_for_days(1)
    )
    .is_err());

    let admin = issue_admin(&f.dir, "alice", &out).expect("admin");
    assert_eq!(
        verify(&f.pki, &admin.certificate_pem).ok(),
        Some(Role::Admin)
    );
    assert!(out.join("alice.key").exists());
}

fn client_config(pki: &Pki, cred: Option<&CertAndKey>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der_of(&pki.server_ca_pem())).expect("server CA");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let config = match cred {
        Some(cred) => builder
            .with_client_auth_cert(
                vec![der_of(&cred.certificate_pem)],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(cred.private_key_pem.as_bytes())
                    .expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Result<Vec<CertificateDer<'static>>, std::io::Error> {
    use tokio::io::AsyncWriteExt;
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let client_side = async move {
        if let Ok(mut stream) = connector.connect(name, a).await {
            let _ = stream.write_all(b"x").await;
            let _ = stream.flush().await;
            // Keep the stream open until the server is done.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let server_side = async move {
        let stream = acceptor.accept(b).await?;
        Ok(stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.to_vec())
            .unwrap_or_default())
    };
    let (_, result) = tokio::join!(client_side, server_side);
    result
}

#[tokio::test]
async fn mtls_handshakes_accept_and_refuse() {
    let f = fixture();
    let server = f.pki.mtls_server_config();
    assert!(Arc::ptr_eq(&server, &f.pki.mtls_server_config()));

    let good = f
        .factory
        .issue_client("dev-tls", &CertOptions::valid_for_days(1))
        .expect("issue");
    let chain = handshake(server.clone(), client_config(&f.pki, Some(&good)))
        .await
        .expect("handshake");
    let peer = f.pki.identify(&chain).expect("identify");
    assert_eq!(peer.role, Role::Bootstrap);
    assert_eq!(peer.common_name.as_deref(), Some("dev-tls"));

    let now = OffsetDateTime::now_utc();
    let expired = f
        .factory
        .issue_client(
            "dev-expired",
            &CertOptions {
                not_before: now - Duration::days(3),
                not_after: now - Duration::days(1),
                ..CertOptions::valid_for_days(1)
            },
        )
        .expect("issue");
    let err = handshake(server.clone(), client_config(&f.pki, Some(&expired)))
        .await
        .expect_err("refused");
    let refusal = refusal_from_tls_error(&err).expect("certificate refusal");
    assert_eq!(refusal.reason, CertRefusalReason::Expired);
    assert_eq!(refusal.subject_cn.as_deref(), Some("dev-expired"));

    let err = handshake(server.clone(), client_config(&f.pki, None))
        .await
        .expect_err("refused");
    let refusal = refusal_from_tls_error(&err).expect("certificate refusal");
    assert_eq!(refusal.reason, CertRefusalReason::NoCertificate);

    // The password listener takes clients without a certificate.
    let chain = handshake(f.pki.tls_server_config(), client_config(&f.pki, None))
        .await
        .expect("handshake");
    assert!(chain.is_empty());
}

#[test]
fn a_revoked_admin_is_refused_after_a_reload_and_others_are_not() {
    let f = fixture();
    let alice = f
        .admin
        .issue_client("alice", &CertOptions::valid_for_days(30))
        .unwrap();
    let bob = f
        .admin
        .issue_client("bob", &CertOptions::valid_for_days(30))
        .unwrap();
    std::fs::write(f.dir.join("alice.pem"), &alice.certificate_pem).unwrap();
    let crl_path = f.dir.join("admin-crl.pem");
    let done = revoke_admin(&f.dir, &crl_path, &f.dir.join("alice.pem")).expect("revoked");
    assert_eq!(
        (done.name.as_deref(), done.already, done.listed),
        (Some("alice"), false, 1)
    );
    // Not before the reload; then at the handshake and at identification (resumed sessions).
    assert_eq!(
        verify(&f.pki, &alice.certificate_pem).ok(),
        Some(Role::Admin)
    );
    let reloaded = f.pki.reload(&config(&f.dir)).expect("reload");
    assert!(reloaded.revoked_admins.contains(&alice.serial));
    let refused = verify(&f.pki, &alice.certificate_pem).unwrap_err();
    assert_eq!(refused.reason, CertRefusalReason::Revoked);
    let chain = [der_of(&alice.certificate_pem)];
    assert_eq!(
        f.pki.identify(&chain).unwrap_err().reason,
        CertRefusalReason::Revoked
    );
    assert_eq!(verify(&f.pki, &bob.certificate_pem).ok(), Some(Role::Admin));
}

#[test]
fn a_revocation_list_not_signed_by_the_admin_ca_fails_the_reload_and_changes_nothing() {
    let f = fixture();
    let alice = f
        .admin
        .issue_client("alice", &CertOptions::valid_for_days(30))
        .unwrap();
    std::fs::write(f.dir.join("alice.pem"), &alice.certificate_pem).unwrap();
    // A list made by another CA with the admin CA's subject.
    let other = tempfile::tempdir().unwrap();
    let impostor = Issuer::generate_ca("onboard admin CA (development)").unwrap();
    impostor.write(other.path(), "admin-ca").unwrap();
    let forged = other.path().join("crl.pem");
    let forged_cert = impostor
        .issue_client("mallory", &CertOptions::valid_for_days(1))
        .unwrap();
    std::fs::write(other.path().join("m.pem"), forged_cert.certificate_pem).unwrap();
    revoke_admin(other.path(), &forged, &other.path().join("m.pem")).unwrap();
    std::fs::copy(&forged, f.dir.join("admin-crl.pem")).unwrap();
    let err = f.pki.reload(&config(&f.dir)).unwrap_err();
    assert!(
        err.to_string().contains("not signed by the admin CA"),
        "{err}"
    );
    std::fs::write(f.dir.join("admin-crl.pem"), "garbage").unwrap();
    assert!(f.pki.reload(&config(&f.dir)).is_err());
    assert_eq!(
        verify(&f.pki, &alice.certificate_pem).ok(),
        Some(Role::Admin)
    );
}

#[test]
fn certificates_of_previous_operational_cas_keep_the_device_role() {
    let f = fixture();
    let device = f
        .operational
        .issue_client("dev-1", &CertOptions::valid_for_days(30))
        .unwrap();
    std::fs::rename(f.dir.join("operational-ca.pem"), f.dir.join("old-ca.pem")).unwrap();
    std::fs::remove_file(f.dir.join("operational-ca.key")).unwrap();
    Issuer::generate_ca("onboard operational CA 2")
        .unwrap()
        .write(&f.dir, "operational-ca")
        .unwrap();
    f.pki.reload(&config(&f.dir)).expect("reload");
    assert_eq!(
        verify(&f.pki, &device.certificate_pem).unwrap_err().reason,
        CertRefusalReason::UnknownCa
    );
    let mut rotated = config(&f.dir);
    rotated.previous_operational_cas = vec![PathBuf::from("old-ca.pem")];
    f.pki.reload(&rotated).expect("reload");
    assert_eq!(
        verify(&f.pki, &device.certificate_pem).ok(),
        Some(Role::Device)
    );
    let current = std::fs::read_to_string(f.dir.join("operational-ca.pem")).unwrap();
    assert_eq!(f.pki.ca_chain_pem(), current);
}

#[test]
fn a_certificate_verified_before_is_still_refused_once_it_expired() {
    let f = fixture();
    let device = f
        .operational
        .issue_client("dev-cache", &CertOptions::valid_for_days(1))
        .unwrap();
    let der = der_of(&device.certificate_pem);
    let verifier = f.pki.client_verifier();
    // Verified (and remembered), then again: the same answer.
    for _ in 0..2 {
        assert_eq!(
            verifier.verify(&der, &[], UnixTime::now()).ok(),
            Some(Role::Device)
        );
    }
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        (OffsetDateTime::now_utc() + Duration::days(2)).unix_timestamp() as u64,
    ));
    let refused = verifier.verify(&der, &[], later).unwrap_err();
    assert_eq!(refused.reason, CertRefusalReason::Expired);
    // A certificate with other bytes is verified in full, whatever was remembered.
    let mut tampered = der.as_ref().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    assert!(verifier
        .verify(&CertificateDer::from(tampered), &[], UnixTime::now())
        .is_err());
}
