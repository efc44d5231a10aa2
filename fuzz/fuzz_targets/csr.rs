//! A CSR as a device sends it (PEM in the enrollment or renewal request): the PEM wrapper around
//! fuzzed DER, and fuzzed text as it is.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use onboard::pki::Pki;

fn pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE REQUEST-----\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let _ = Pki::check_csr("dev-1", &pem(data));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Pki::check_csr("dev-1", text);
    }
});
