//! The text of an API key: `rtap_<key id>_<secret>`.
//!
//! The key id (16 hex digits) is public: it finds the key's row, and lets a
//! lookup never depend on the secret. The secret (256 random bits, base64url)
//! is kept only as its SHA-256 hash: a hash of that much randomness cannot be
//! reversed or guessed, so no slow password hash is needed, and checking a
//! call costs one SHA-256 of 43 bytes.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::TryRngCore;
use sha2::{Digest, Sha256};

/// What every key starts with, so a leaked key is recognisable (secret
/// scanners) and a value that is not one is refused without a lookup.
const PREFIX: &str = "rtap_";
/// Random bytes of the key id.
const ID_BYTES: usize = 8;
/// Random bytes of the secret.
const SECRET_BYTES: usize = 32;

/// SHA-256 of a key's secret.
pub(crate) type SecretHash = [u8; 32];

/// A key just made: its text goes to the user once, the rest to PostgreSQL.
#[derive(Debug)]
pub(crate) struct NewKey {
    /// The whole key, shown once.
    pub(crate) text: String,
    /// Its public id.
    pub(crate) id: String,
    /// The hash of its secret.
    pub(crate) secret_hash: SecretHash,
}

impl NewKey {
    /// A fresh key from the operating system's random source.
    pub(crate) fn generate() -> Result<Self, String> {
        let mut id = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        let mut random = rand::rngs::OsRng;
        random
            .try_fill_bytes(&mut id)
            .and_then(|()| random.try_fill_bytes(&mut secret))
            .map_err(|e| format!("the operating system gave no random bytes: {e}"))?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let secret = URL_SAFE_NO_PAD.encode(secret);
        Ok(Self {
            text: format!("{PREFIX}{id}_{secret}"),
            secret_hash: hash_secret(&secret),
            id,
        })
    }
}

/// A key as presented by a caller, split into its id and secret; `None`
/// when the text cannot be a key.
pub(crate) fn parse(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == 2 * ID_BYTES && id.bytes().all(|b| b.is_ascii_hexdigit());
    // base64url of 32 bytes without padding.
    let secret_ok = secret.len() == 43
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some((id, secret))
}

/// The stored form of a secret.
pub(crate) fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_back_to_its_id_and_secret() {
        let key = NewKey::generate().expect("random bytes");
        let (id, secret) = parse(&key.text).expect("a generated key parses");
        assert_eq!(id, key.id);
        assert_eq!(hash_secret(secret), key.secret_hash);
        let other = NewKey::generate().expect("random bytes");
        assert_ne!(other.text, key.text);
    }

    #[test]
    fn text_that_cannot_be_a_key_is_refused() {
        let key = NewKey::generate().expect("random bytes");
        let (id, secret) = parse(&key.text).expect("parses");
        for bad in [
            String::new(),
            "rtap_".into(),
            format!("rtap_{id}"),
            format!("rtap_{id}_"),
            format!("xtap_{id}_{secret}"),
            format!("rtap_{}_{secret}", &id[1..]),
            format!("rtap_{id}_{}", &secret[1..]),
            format!("rtap_{id}_{}!", &secret[1..]),
            format!("rtap_{}g_{secret}", &id[1..]),
        ] {
            assert_eq!(parse(&bad), None, "{bad}");
        }
    }
}
