//! `nox migrate`, pure: what the two noxes say to each other over the
//! control channel (the ssh session of the target's hidden
//! `nox __migrate-in`), which files of a VM's directory travel, and which
//! VMs are refused and why. `migrate` (ops) runs it, `migration` (vmm)
//! drives the two qemus.
//!
//! The channel: one JSON message per line; the raw bytes of the base image
//! and of the VM's files follow the lines that announce them, each exactly
//! as long as announced, so no byte of data is ever read as a message.
//!
//! 1. source → [`Hello`] (the spec, the base image's digest, the files)
//! 2. target → [`Reply::Accepted`] (whether it needs the base) or `Error`
//! 3. source → the base's bytes (when needed), then every file's bytes,
//!    then [`Digests`]; the target checks each SHA-256 and the base's digest
//! 4. offline: target → `Done` (the VM is in place) and the source removes
//!    its copy. Live: target → `Ready` (its qemu waits with `-incoming`, the
//!    disk exported over NBD); the source mirrors its disk, migrates, ends
//!    the mirror, then → [`Handover::Go`]; target → `Running` once its guest runs,
//!    and the source removes its copy.
//!
//! Any `Error`, or the channel closing early, ends the migration: the
//! target removes all it made, the source keeps (or resumes) its VM.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::model::ident::VmName;
use crate::model::spec::VmSpec;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the other nox closed the migration channel")]
    Closed,
    #[error("reading the migration channel")]
    Io(#[source] std::io::Error),
    #[error("the other nox sent a message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the other nox sent {line:?}, not the message expected")]
    Bad {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0:?} is not a file a VM's directory holds")]
    BadFile(String),
}

/// The longest message line (the spec and a file list fit easily).
pub const MAX_LINE: usize = 1 << 20;

/// How the VM moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A running VM: memory migrated, disk mirrored while the guest runs.
    Live,
    /// A stopped VM: its files copied.
    Offline,
}

/// The base image the VM's disk sits on, by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// `sha256:HEX`.
    pub digest: String,
    pub size: u64,
    pub format: String,
}

/// One file of the VM's directory, by its name there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
}

/// The source's opening message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The source's nox version (the target refuses another).
    pub version: String,
    pub mode: Mode,
    pub spec: VmSpec,
    pub base: Base,
    /// Sent in this order, after the base when the target asks for it.
    pub files: Vec<FileEntry>,
}

/// The target's answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The name is free and the VM acceptable: send the base's bytes first
    /// when `need_base`.
    Accepted {
        need_base: bool,
    },
    /// Offline: the VM is in place at the target.
    Done,
    /// Live: the target's qemu waits for the disk (NBD) and the state.
    Ready,
    /// Live: the target's guest runs.
    Running,
    Error {
        message: String,
    },
}

/// Sent after the files: the SHA-256 (hex) of each, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digests {
    pub sha256: BTreeMap<String, String>,
}

/// Live, the source's last word once the target is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "handover", rename_all = "snake_case")]
pub enum Handover {
    /// The source's qemu has handed over (the migration completed, the
    /// mirror ended with the target's disk complete): the target may run.
    /// What the source's qemu measured, for the target's log.
    Go { total_ms: u64, downtime_ms: u64 },
    /// The source gave up (and resumes its guest): the target removes all.
    Abort { message: String },
}

/// Writes one message line.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), WireError> {
    let mut line = serde_json::to_vec(msg).map_err(|e| WireError::Io(e.into()))?;
    line.push(b'\n');
    w.write_all(&line).map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)
}

/// Reads one message line (at most [`MAX_LINE`] bytes).
pub fn recv<T: for<'de> Deserialize<'de>>(r: &mut impl BufRead) -> Result<T, WireError> {
    let mut line = Vec::new();
    let n = std::io::Read::take(&mut *r, MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(WireError::Io)?;
    if n == 0 {
        return Err(WireError::Closed);
    }
    if line.last() != Some(&b'\n') {
        return Err(if n > MAX_LINE {
            WireError::TooLong
        } else {
            WireError::Closed
        });
    }
    serde_json::from_slice(&line).map_err(|source| WireError::Bad {
        line: crate::model::text::printable(&line[..line.len().min(200)]),
        source,
    })
}

/// The files of a VM's directory that move with it, relative to it, in
/// the order they are sent. Logs, state, locks and run-time records stay
/// (the target makes its own); the disks only offline (live, they are
/// mirrored); `exists` says which are present.
pub fn files(spec: &VmSpec, mode: Mode, exists: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out: Vec<String> = [
        "seed.img",
        "id_ed25519",
        "id_ed25519.pub",
        "known_hosts",
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
        "user-data",
        "snapshots.json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if mode == Mode::Offline {
        out.push("disk.qcow2".into());
        out.push("efivars.qcow2".into());
        out.push("efivars.fd".into());
        out.extend(spec.disks.iter().map(|d| format!("disks/{}.qcow2", d.name)));
    }
    out.retain(|f| exists(f));
    out
}

/// Whether `name` may be written into the target's VM directory: one of
/// [`files`]' names (for any spec), nothing else, no path tricks.
pub fn check_file(name: &str) -> Result<(), WireError> {
    let fixed = [
        "seed.img",
        "id_ed25519",
        "id_ed25519.pub",
        "known_hosts",
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
        "user-data",
        "snapshots.json",
        "disk.qcow2",
        "efivars.qcow2",
        "efivars.fd",
    ];
    if fixed.contains(&name) {
        return Ok(());
    }
    let disk = name
        .strip_prefix("disks/")
        .and_then(|n| n.strip_suffix(".qcow2"))
        .and_then(|n| n.parse::<crate::model::disk::DiskName>().ok());
    match disk {
        Some(_) => Ok(()),
        None => Err(WireError::BadFile(name.into())),
    }
}

/// What the source knows of the VM beyond its spec, for [`refusal`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The VM's supervisor runs it.
    pub running: bool,
    /// Its systemd unit is enabled.
    pub enabled: bool,
    /// Internal snapshots of its disk.
    pub snapshots: Vec<String>,
    /// It was made from a warm template and has not started yet.
    pub warm_pending: bool,
    /// Its running qemu maps a warm template's RAM image.
    pub warm_ram: bool,
    /// It has UEFI variables (a writable flash store).
    pub efi_vars: bool,
}

/// Why VM `name` cannot move `mode`-wise, or None.
pub fn refusal(name: &VmName, spec: &VmSpec, mode: Mode, f: &Facts) -> Option<String> {
    if f.enabled {
        return Some(format!(
            "{name} is enabled (systemd starts it at boot here): `nox disable {name}` first, \
             migrate, then `nox enable {name}` on the target"
        ));
    }
    if f.warm_pending {
        return Some(format!(
            "{name} was made from a warm template and has never started: its first start \
             resumes the template's saved state, which stays on this host; start it once \
             (or create it on the target)"
        ));
    }
    if !spec.mounts.is_empty() {
        // Live or not: the spec names this host's directories, and a live
        // guest's share is held by a process of this host.
        return Some(format!(
            "{name} has shared folders ({}), directories of this host: `nox set {name} \
             --remove-mount GUESTDIR` for each first, and add the target's own with `nox set \
             --mount` there",
            crate::model::share::names(&spec.mounts)
        ));
    }
    match mode {
        Mode::Offline if f.running => Some(format!(
            "{name} is running: `nox migrate {name} --to URL` moves it live, or stop it first \
             for --offline"
        )),
        Mode::Offline => None,
        Mode::Live if !f.running => Some(format!(
            "{name} is not running: move it with --offline (or start it first)"
        )),
        Mode::Live => {
            let mut why = vec![];
            if !f.snapshots.is_empty() {
                why.push(format!(
                    "it has snapshots ({}), which a live move cannot carry: delete them, or \
                     stop it and use --offline (which moves them along)",
                    f.snapshots.join(", ")
                ));
            }
            if !spec.disks.is_empty() {
                why.push(format!(
                    "it has extra disks ({}): stop it and use --offline",
                    crate::model::disk::names(&spec.disks)
                ));
            }
            if f.efi_vars {
                why.push(
                    "it has UEFI variables (a writable flash store): stop it and use --offline"
                        .into(),
                );
            }
            if !spec.devices.is_empty() {
                why.push("it holds host devices (--device), which stay with this host".into());
            }
            if f.warm_ram {
                why.push(
                    "it runs on a warm template's shared RAM image: restart it (it then boots \
                     its own disk) or stop it and use --offline"
                        .into(),
                );
            }
            if why.is_empty() {
                None
            } else {
                Some(format!("{name} cannot move live: {}", why.join("; ")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "name": "web", "image": {"source": "x", "digest": "sha256:00", "path": "/b", "format": "qcow2"},
            "arch": "amd64", "cpus": 1, "memory": 536870912u64, "disk": 4294967296u64, "user": "debian",
            "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:12:34:56",
            "ssh_authorized_keys": [], "stop_timeout": 60, "created": 0
        }))
        .unwrap()
    }

    #[test]
    fn messages_round_trip_one_per_line() {
        let mut buf = vec![];
        send(&mut buf, &Reply::Accepted { need_base: true }).unwrap();
        send(
            &mut buf,
            &Reply::Error {
                message: "no\nroom".into(),
            },
        )
        .unwrap();
        assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 2);
        let mut r = std::io::Cursor::new(buf);
        assert_eq!(
            recv::<Reply>(&mut r).unwrap(),
            Reply::Accepted { need_base: true }
        );
        assert_eq!(
            recv::<Reply>(&mut r).unwrap(),
            Reply::Error {
                message: "no\nroom".into()
            }
        );
        assert!(matches!(recv::<Reply>(&mut r), Err(WireError::Closed)));
        let mut half = std::io::Cursor::new(b"{\"reply\":".to_vec());
        assert!(matches!(recv::<Reply>(&mut half), Err(WireError::Closed)));
        let mut bad = std::io::Cursor::new(b"{\"reply\":\"nope\"}\n".to_vec());
        assert!(matches!(
            recv::<Reply>(&mut bad),
            Err(WireError::Bad { .. })
        ));
    }

    #[test]
    fn only_known_files_travel() {
        let s = spec();
        let all = |_: &str| true;
        let live = files(&s, Mode::Live, all);
        assert!(live.contains(&"seed.img".to_string()));
        assert!(!live.iter().any(|f| f.contains("disk")), "{live:?}");
        let off = files(&s, Mode::Offline, |f| f != "efivars.fd");
        assert!(off.contains(&"disk.qcow2".to_string()) && !off.contains(&"efivars.fd".into()));
        for f in off.iter().chain(&live) {
            check_file(f).unwrap();
        }
        check_file("disks/data.qcow2").unwrap();
        for bad in [
            "../x",
            "spec.json",
            "state.json",
            "disks/../../x.qcow2",
            "/etc/passwd",
            "disks/a/b.qcow2",
        ] {
            assert!(check_file(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_say_why() {
        let s = spec();
        let n: VmName = "web".parse().unwrap();
        let running = Facts {
            running: true,
            ..Facts::default()
        };
        assert_eq!(refusal(&n, &s, Mode::Live, &running), None);
        assert_eq!(refusal(&n, &s, Mode::Offline, &Facts::default()), None);
        let e = refusal(&n, &s, Mode::Offline, &running).unwrap();
        assert!(e.contains("is running"), "{e}");
        let e = refusal(&n, &s, Mode::Live, &Facts::default()).unwrap();
        assert!(e.contains("--offline"), "{e}");
        let snap = Facts {
            snapshots: vec!["s1".into()],
            ..running.clone()
        };
        let e = refusal(&n, &s, Mode::Live, &snap).unwrap();
        assert!(e.contains("snapshots (s1)"), "{e}");
        let enabled = Facts {
            enabled: true,
            ..running.clone()
        };
        assert!(
            refusal(&n, &s, Mode::Live, &enabled)
                .unwrap()
                .contains("nox disable web")
        );
        let warm = Facts {
            warm_pending: true,
            ..Facts::default()
        };
        assert!(
            refusal(&n, &s, Mode::Offline, &warm)
                .unwrap()
                .contains("warm template")
        );
        let ram = Facts {
            warm_ram: true,
            ..running
        };
        assert!(
            refusal(&n, &s, Mode::Live, &ram)
                .unwrap()
                .contains("RAM image")
        );
        let mut shared = s.clone();
        shared.mounts = vec!["/srv/a:/mnt/a".parse().unwrap()];
        for (mode, f) in [(Mode::Live, &ram), (Mode::Offline, &Facts::default())] {
            let e = refusal(&n, &shared, mode, f).unwrap();
            assert!(
                e.contains("shared folders (/mnt/a)") && e.contains("--remove-mount"),
                "{e}"
            );
        }
    }
}
