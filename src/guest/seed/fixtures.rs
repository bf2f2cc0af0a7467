//! Test helpers shared by the seed tests: a typical config and parsers of
//! nox's own output.

use base64::Engine as _;
use serde_json::Value;

use super::*;
use crate::host::sshkeys;
use std::process::Command;
use std::sync::OnceLock;

pub(super) fn have(cmd: &str) -> bool {
    Command::new(cmd).arg("--version").output().is_ok()
}

pub(super) fn host_key() -> KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| sshkeys::generate_ed25519("nox-host@vm1").unwrap())
        .clone()
}

pub(super) fn config() -> SeedConfig {
    SeedConfig {
        hostname: "vm1".parse().unwrap(),
        user: "alice".parse().unwrap(),
        authorized_keys: vec![
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey1 alice@laptop".into(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey2 alice@desk".into(),
        ],
        host_key: host_key(),
        network: Network::Dhcp {
            mac: "52:54:00:AB:cd:01".parse().unwrap(),
        },
        user_data: None,
        reidentify: None,
        guest: GuestFlavour::Standard,
        warm: None,
    }
}

pub(super) fn json_of(doc: &str) -> Value {
    let body = doc.strip_prefix("#cloud-config\n").unwrap_or(doc);
    serde_json::from_str(body).unwrap()
}

/// Splits our own multipart output: (headers, decoded body) per part.
pub(super) fn parts_of(doc: &str) -> Vec<(String, String)> {
    let boundary = doc
        .split("boundary=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    let delim = format!("--{boundary}");
    let mut out = Vec::new();
    for chunk in doc.split(&delim).skip(1) {
        if chunk.starts_with("--") {
            break;
        }
        let chunk = chunk.strip_prefix('\n').unwrap();
        let (headers, body) = chunk.split_once("\n\n").unwrap();
        let body = if headers.contains("Content-Transfer-Encoding: base64") {
            let joined: String = body.lines().collect();
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(joined)
                    .unwrap(),
            )
            .unwrap()
        } else {
            body.to_string()
        };
        out.push((headers.to_string(), body));
    }
    out
}
