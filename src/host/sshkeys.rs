//! SSH keys: the guest's host key that nox generates and pins, and the
//! user's public keys that go into the guest's `authorized_keys`.

use std::fmt;
use std::path::{Path, PathBuf};

use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot generate an ed25519 key")]
    Generate(#[source] ssh_key::Error),
    #[error("invalid private key")]
    InvalidPrivate(#[source] ssh_key::Error),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a private key; give the public key (.pub) instead")]
    PrivateKeyFile { path: PathBuf },
    #[error("{path} holds no public keys")]
    NoKeys { path: PathBuf },
    #[error("{path} line {line}: not an OpenSSH public key ({reason})")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// An OpenSSH key pair as text, ready for cloud-init's `ssh_keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----` block, unencrypted, LF line endings.
    pub private_openssh: String,
    /// One line: `ssh-ed25519 AAAA... comment`.
    pub public_openssh: String,
}

// Hand-written so that logging a config never prints the private key.
impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("private_openssh", &"<redacted>")
            .field("public_openssh", &self.public_openssh)
            .finish()
    }
}

impl KeyPair {
    /// Rebuilds a pair from a saved OpenSSH private key (e.g. a host key kept
    /// in the VM's state dir), so the pinned public key stays the same.
    pub fn from_private_openssh(private_openssh: &str) -> Result<KeyPair, KeyError> {
        let key = PrivateKey::from_openssh(private_openssh).map_err(KeyError::InvalidPrivate)?;
        pair_of(&key)
    }
}

fn pair_of(key: &PrivateKey) -> Result<KeyPair, KeyError> {
    let private = key.to_openssh(LineEnding::LF).map_err(KeyError::Generate)?;
    let public = key.public_key().to_openssh().map_err(KeyError::Generate)?;
    Ok(KeyPair {
        private_openssh: private.to_string(),
        public_openssh: public,
    })
}

/// A fresh ed25519 key pair from the OS random source.
pub fn generate_ed25519(comment: &str) -> Result<KeyPair, KeyError> {
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(KeyError::Generate)?;
    key.set_comment(comment);
    pair_of(&key)
}

/// Reads a public key file (one or more OpenSSH public key lines, comments and
/// blank lines allowed), validates every line and returns them normalised
/// (`algorithm base64 [comment]`).
pub fn read_public_keys(path: &Path) -> Result<Vec<String>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_public_keys(path, &text)
}

/// The public keys in `text`, read from `path` (named in errors).
pub(crate) fn parse_public_keys(path: &Path, text: &str) -> Result<Vec<String>, KeyError> {
    if text.contains("PRIVATE KEY-----") {
        return Err(KeyError::PrivateKeyFile {
            path: path.to_path_buf(),
        });
    }
    let mut keys = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = PublicKey::from_openssh(line).map_err(|e| KeyError::Invalid {
            path: path.to_path_buf(),
            line: idx + 1,
            reason: e.to_string(),
        })?;
        let normalised = key.to_openssh().map_err(|e| KeyError::Invalid {
            path: path.to_path_buf(),
            line: idx + 1,
            reason: e.to_string(),
        })?;
        keys.push(normalised);
    }
    if keys.is_empty() {
        return Err(KeyError::NoKeys {
            path: path.to_path_buf(),
        });
    }
    Ok(keys)
}

/// Existing `~/.ssh/id_*.pub` under `home` (sorted), for the default
/// authorized keys. Certificates (`id_*-cert.pub`) are left out.
pub fn default_public_key_files(home: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(home.join(".ssh")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("id_") && name.ends_with(".pub") && !name.ends_with("-cert.pub")
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// A known_hosts line pinning `public_openssh` for host:port, e.g.
/// `[127.0.0.1]:2222 ssh-ed25519 AAAA...`; port 22 gives the bare host.
/// The key's comment is dropped.
pub fn known_hosts_line(host: &str, port: u16, public_openssh: &str) -> String {
    let key: Vec<&str> = public_openssh.split_whitespace().take(2).collect();
    let key = key.join(" ");
    if port == 22 {
        format!("{host} {key}")
    } else {
        format!("[{host}]:{port} {key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    use crate::testing::prereq;

    fn have(cmd: &str) -> bool {
        Command::new(cmd).arg("-?").output().is_ok()
    }

    #[test]
    fn generated_key_round_trips() {
        let kp = generate_ed25519("nox-host@vm1").unwrap();
        assert!(kp.public_openssh.starts_with("ssh-ed25519 AAAA"));
        assert!(kp.public_openssh.ends_with(" nox-host@vm1"));
        assert!(
            kp.private_openssh
                .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n")
        );
        let parsed = PrivateKey::from_openssh(&kp.private_openssh).unwrap();
        assert_eq!(parsed.algorithm(), Algorithm::Ed25519);
        assert_eq!(parsed.public_key().to_openssh().unwrap(), kp.public_openssh);
        assert_eq!(
            KeyPair::from_private_openssh(&kp.private_openssh).unwrap(),
            kp
        );
        // Two keys differ.
        assert_ne!(
            generate_ed25519("x").unwrap().public_openssh,
            kp.public_openssh
        );
        assert!(!format!("{kp:?}").contains("PRIVATE"));
    }

    #[test]
    fn reads_public_keys_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let kp = generate_ed25519("me@host").unwrap();
        let kp2 = generate_ed25519("").unwrap();

        let good = dir.path().join("id_ed25519.pub");
        std::fs::write(
            &good,
            format!(
                "# my keys\n\n  {}  \r\n{}\n",
                kp.public_openssh, kp2.public_openssh
            ),
        )
        .unwrap();
        assert_eq!(
            read_public_keys(&good).unwrap(),
            vec![kp.public_openssh.clone(), kp2.public_openssh.clone()]
        );

        let private = dir.path().join("id_ed25519");
        std::fs::write(&private, &kp.private_openssh).unwrap();
        let err = read_public_keys(&private).unwrap_err().to_string();
        assert!(err.contains("is a private key"), "{err}");
        assert!(err.contains("id_ed25519"), "{err}");

        let empty = dir.path().join("empty.pub");
        std::fs::write(&empty, "").unwrap();
        let err = read_public_keys(&empty).unwrap_err().to_string();
        assert!(err.ends_with("empty.pub holds no public keys"), "{err}");

        let comments = dir.path().join("comments.pub");
        std::fs::write(&comments, "# nothing\n\n").unwrap();
        assert!(matches!(
            read_public_keys(&comments),
            Err(KeyError::NoKeys { .. })
        ));

        let junk = dir.path().join("junk.pub");
        std::fs::write(&junk, format!("{}\nhello world\n", kp.public_openssh)).unwrap();
        let err = read_public_keys(&junk).unwrap_err().to_string();
        assert!(
            err.contains("junk.pub line 2: not an OpenSSH public key"),
            "{err}"
        );

        // Truncated base64 is caught too, not only garbage words.
        let cut = dir.path().join("cut.pub");
        std::fs::write(&cut, &kp.public_openssh[..40]).unwrap();
        assert!(matches!(
            read_public_keys(&cut),
            Err(KeyError::Invalid { line: 1, .. })
        ));

        let missing = dir.path().join("nope.pub");
        let err = read_public_keys(&missing).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read ") && err.contains("nope.pub"),
            "{err}"
        );
    }

    #[test]
    fn reads_keys_made_by_ssh_keygen() {
        if !prereq(have("ssh-keygen"), "ssh-keygen not installed") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for t in ["ed25519", "rsa", "ecdsa"] {
            let f = dir.path().join(format!("id_{t}"));
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", t, "-N", "", "-C", "c@h", "-f"])
                .arg(&f)
                .status()
                .unwrap();
            assert!(st.success());
            let keys = read_public_keys(&f.with_extension("pub")).unwrap();
            assert_eq!(keys.len(), 1);
            let on_disk = std::fs::read_to_string(f.with_extension("pub")).unwrap();
            assert_eq!(keys[0], on_disk.trim());
            assert!(matches!(
                read_public_keys(&f),
                Err(KeyError::PrivateKeyFile { .. })
            ));
        }
    }

    #[test]
    fn ssh_keygen_accepts_generated_keys() {
        if !prereq(have("ssh-keygen"), "ssh-keygen not installed") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let kp = generate_ed25519("nox-host@vm1").unwrap();
        let public = dir.path().join("k.pub");
        std::fs::write(&public, format!("{}\n", kp.public_openssh)).unwrap();
        let out = Command::new("ssh-keygen")
            .arg("-l")
            .arg("-f")
            .arg(&public)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("(ED25519)"), "{text}");

        // The private half too: ssh-keygen derives the same public key.
        let private = dir.path().join("k");
        std::fs::write(&private, &kp.private_openssh).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&private)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            kp.public_openssh
        );
    }

    #[test]
    fn default_files_are_sorted_id_pub_only() {
        let home = tempfile::tempdir().unwrap();
        assert!(default_public_key_files(home.path()).is_empty());
        let ssh = home.path().join(".ssh");
        std::fs::create_dir(&ssh).unwrap();
        for f in [
            "id_rsa.pub",
            "id_ed25519.pub",
            "id_ed25519",
            "id_ed25519-cert.pub",
            "known_hosts",
            "other.pub",
        ] {
            std::fs::write(ssh.join(f), "").unwrap();
        }
        std::fs::create_dir(ssh.join("id_dir.pub")).unwrap();
        assert_eq!(
            default_public_key_files(home.path()),
            vec![ssh.join("id_ed25519.pub"), ssh.join("id_rsa.pub")]
        );
    }

    #[test]
    fn known_hosts_format() {
        let public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB nox-host@vm1";
        assert_eq!(
            known_hosts_line("127.0.0.1", 2222, public),
            "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB"
        );
        assert_eq!(
            known_hosts_line("10.0.0.5", 22, public),
            "10.0.0.5 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB"
        );
    }
}
