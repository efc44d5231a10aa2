//! Password credentials: a secret of 256 random bits, handed to the device once; the store keeps
//! only a salted SHA-256 of it (`sha256$<salt>$<hash>`, base64). A slow password hash buys
//! nothing for secrets that cannot be guessed, and would cap the connect rate.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const SCHEME: &str = "sha256";

/// A new secret: 32 random bytes, base64url (43 characters).
pub fn generate() -> String {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    URL_SAFE_NO_PAD.encode(secret)
}

fn digest(salt: &[u8], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// The stored form of `secret`, with a fresh salt.
pub fn hash(secret: &str) -> String {
    let mut salt = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    format!(
        "{SCHEME}${}${}",
        URL_SAFE_NO_PAD.encode(salt),
        URL_SAFE_NO_PAD.encode(digest(&salt, secret))
    )
}

/// Whether `secret` matches `stored` (constant time in the secret).
pub fn verify(secret: &str, stored: &str) -> bool {
    let mut parts = stored.split('$');
    let (Some(SCHEME), Some(salt), Some(expected), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Ok(salt), Ok(expected)) = (
        URL_SAFE_NO_PAD.decode(salt),
        URL_SAFE_NO_PAD.decode(expected),
    ) else {
        return false;
    };
    digest(&salt, secret).ct_eq(&expected).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_and_verify_only_themselves() {
        let secret = generate();
        assert_eq!(URL_SAFE_NO_PAD.decode(&secret).unwrap().len(), 32);
        let stored = hash(&secret);
        assert!(!stored.contains(&secret));
        assert!(verify(&secret, &stored));
        assert!(!verify(&generate(), &stored));
        assert_ne!(hash(&secret), stored, "salted");
        assert!(!verify(&secret, "plain"));
        assert!(!verify(&secret, "sha256$!!$!!"));
    }
}
