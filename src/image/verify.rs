//! OpenPGP signatures on distributions' checksum files, verified in-process with rpgp (the
//! `pgp` crate: pure Rust, maintained, no gpg binary or keyring directory involved).
//!
//! Keys are pinned in the source tree (`keys/`); a mirror's config entry in the store's
//! root-owned `config.json` may add key files for that mirror only.

use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use pgp::types::KeyDetails;
use thiserror::Error;

/// Why keys or a signature were not accepted (the caller names the file).
#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("not an OpenPGP public key: {0}")]
    NotAKey(pgp::errors::Error),
    #[error("bad OpenPGP public key: {0}")]
    BadKey(pgp::errors::Error),
    #[error("key {fingerprint}: bad self-signature: {error}")]
    SelfSignature {
        fingerprint: String,
        error: pgp::errors::Error,
    },
    #[error("no OpenPGP public key in it")]
    NoKey,
    #[error("not an OpenPGP signature: {0}")]
    NotASignature(pgp::errors::Error),
    #[error("no OpenPGP signature in it")]
    NoSignature,
    #[error("no good signature by a trusted key ({seen} signature(s) checked against {trusted})")]
    NoGoodSignature { seen: usize, trusted: String },
}

/// Ubuntu's cloud-image signing keys, as Debian's `ubuntu-keyring` package ships them
/// (`/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg`, version 2023.11.28.1):
/// D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81 "UEC Image Automatic Signing Key" and
/// 4A3CE3CD565D7EB5C810E2B97FF3F408476CF100 "Ubuntu Cloud Image Builder".
pub const UBUNTU_CLOUDIMAGE_KEYRING: &[u8] = include_bytes!("keys/ubuntu-cloudimage-keyring.gpg");

/// Most bytes of a key file or a signature file nox reads.
pub const MAX_KEY_BYTES: u64 = 256 << 10;

/// Parses one or more public keys (binary or ASCII-armoured) and checks their self-signatures.
pub fn load_keys(bytes: &[u8]) -> Result<Vec<SignedPublicKey>, VerifyError> {
    let (iter, _) = SignedPublicKey::from_reader_many(bytes).map_err(VerifyError::NotAKey)?;
    let mut keys = Vec::new();
    for k in iter {
        let k = k.map_err(VerifyError::BadKey)?;
        k.verify_bindings()
            .map_err(|error| VerifyError::SelfSignature {
                fingerprint: fingerprint(&k),
                error,
            })?;
        keys.push(k);
    }
    if keys.is_empty() {
        return Err(VerifyError::NoKey);
    }
    Ok(keys)
}

pub fn fingerprint(k: &SignedPublicKey) -> String {
    hex::encode_upper(k.fingerprint().as_bytes())
}

/// Checks a detached signature (binary or armoured, one or several signature packets) over
/// `data` against `keys` (primary keys and their bound subkeys). Returns the fingerprint of the
/// primary key that made a good signature.
pub fn verify_detached(
    keys: &[SignedPublicKey],
    data: &[u8],
    signature: &[u8],
) -> Result<String, VerifyError> {
    let (sigs, _) =
        DetachedSignature::from_reader_many(signature).map_err(VerifyError::NotASignature)?;
    let mut seen = 0;
    for sig in sigs {
        let Ok(sig) = sig else { continue };
        seen += 1;
        for k in keys {
            if sig.verify(k, data).is_ok()
                || k.public_subkeys.iter().any(|s| sig.verify(s, data).is_ok())
            {
                return Ok(fingerprint(k));
            }
        }
    }
    if seen == 0 {
        return Err(VerifyError::NoSignature);
    }
    Err(VerifyError::NoGoodSignature {
        seen,
        trusted: keys.iter().map(fingerprint).collect::<Vec<_>>().join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_ubuntu_keys_load() {
        let keys = load_keys(UBUNTU_CLOUDIMAGE_KEYRING).unwrap();
        let fps: Vec<String> = keys.iter().map(fingerprint).collect();
        assert_eq!(
            fps,
            [
                "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81",
                "4A3CE3CD565D7EB5C810E2B97FF3F408476CF100"
            ]
        );
        assert!(verify_detached(&keys, b"data", b"garbage").is_err());
        assert!(load_keys(b"not a key").is_err());
    }
}
