//! Shared folders (`--mount HOSTDIR:GUESTDIR[:ro]`) as pure values: the
//! parsed flag, its record in the spec, the guest-side checks, and the names
//! qemu and the guest know a share by. The host side (the directory exists,
//! its canonical form, the roots nox refuses) is crate::host::sharehost's; how a
//! share reaches the guest is docs/shared-folders.md.
//!
//! A share reaches the guest over virtio-fs ([`Transport::VirtioFs`]: one
//! virtiofsd per share, jailed, crate::vmm::virtiofs) where the host has
//! virtiofsd, else over qemu's own 9p ([`Transport::NineP`]: the jailed
//! qemu serves it). Either way the serving process's jail holds the
//! directory as an idmapped bind mount (crate::vmm::jail), so nothing else
//! of the host is in reach.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How a share reaches the guest; decided at each start by what the host
/// has (crate::vmm::virtiofs::transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Transport {
    /// vhost-user-fs: a virtiofsd per share, the guest's `virtiofs`
    /// filesystem (Debian's cloud kernels have it; they have no 9p).
    #[serde(rename = "virtiofs")]
    VirtioFs,
    /// qemu's virtio-9p: no second process, but many distribution cloud
    /// kernels lack 9p.
    #[serde(rename = "9p")]
    NineP,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::VirtioFs => "virtiofs",
            Transport::NineP => "9p",
        }
    }
}

/// The guest uid and gid a virtio-fs share's files appear as: the first
/// user cloud-init makes (nox's login user). What the guest writes lands
/// as HOSTDIR's owner whoever writes it (docs/shared-folders.md, Owners).
pub const GUEST_OWNER: u32 = 1000;

/// At most this many shared folders per VM.
pub const MAX_MOUNTS: usize = 8;
/// 9p's msize (bytes per request) the guest mounts with: the largest the
/// virtio transport takes without the kernel clamping it (its ring holds
/// 128 pages per request) leaves room for the headers.
pub const MSIZE: u32 = 512_000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShareError {
    #[error("invalid --mount {value:?}: {why}")]
    Syntax { value: String, why: String },
    #[error("--mount {guest}: {why}")]
    Guest { guest: String, why: &'static str },
    #[error("--mount: {guest} is given twice")]
    Duplicate { guest: String },
    #[error("--remove-mount {guest}: {vm} has no share there")]
    Missing { vm: String, guest: String },
    #[error("{vm} would have more than {MAX_MOUNTS} shared folders, the most nox gives a VM")]
    TooMany { vm: String },
}

/// Guest directories a share may not cover: the guest's own system (a share
/// over /usr or /etc would hide what it boots with).
const GUEST_SYSTEM: [&str; 17] = [
    "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/root", "/run",
    "/sbin", "/sys", "/tmp", "/usr", "/var", "/home",
];

/// One shared folder as the spec records it (`spec.json` `mounts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The host directory, absolute and canonical (crate::host::sharehost::check).
    pub host: PathBuf,
    /// Where the guest mounts it, absolute.
    pub guest: String,
    /// The guest may read only (qemu's `readonly=on`, and the guest mounts
    /// it `ro`).
    #[serde(default)]
    pub readonly: bool,
}

impl std::str::FromStr for Mount {
    type Err = ShareError;
    /// `HOSTDIR:GUESTDIR[:ro|:rw]`. Neither path may hold `:`.
    fn from_str(value: &str) -> Result<Mount, ShareError> {
        let err = |why: &str| ShareError::Syntax {
            value: value.into(),
            why: why.into(),
        };
        let parts: Vec<&str> = value.split(':').collect();
        let (host, guest, readonly) = match parts.as_slice() {
            [h, g] => (*h, *g, false),
            [h, g, "ro"] => (*h, *g, true),
            [h, g, "rw"] => (*h, *g, false),
            [_, _, o] => return Err(err(&format!("unknown option {o:?} (use ro or rw)"))),
            _ => return Err(err("use HOSTDIR:GUESTDIR or HOSTDIR:GUESTDIR:ro")),
        };
        if host.is_empty() || !host.starts_with('/') {
            return Err(err("HOSTDIR must be an absolute path"));
        }
        check_guest(guest)?;
        Ok(Mount {
            host: host.into(),
            guest: normal_guest(guest),
            readonly,
        })
    }
}

impl std::fmt::Display for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host.display(), self.guest)?;
        if self.readonly {
            f.write_str(":ro")?;
        }
        Ok(())
    }
}

/// `guest` without a trailing `/` or doubled ones.
fn normal_guest(guest: &str) -> String {
    let mut out = String::new();
    for c in Path::new(guest).components() {
        if let Component::Normal(n) = c {
            out.push('/');
            out.push_str(&n.to_string_lossy());
        }
    }
    if out.is_empty() { "/".into() } else { out }
}

/// GUESTDIR: absolute, no `.`/`..`, only characters that need no quoting
/// anywhere (the seed's fstab line and shell: letters, digits, `._-+@`),
/// and not one of the guest's system directories.
pub fn check_guest(guest: &str) -> Result<(), ShareError> {
    let bad = |why| {
        Err(ShareError::Guest {
            guest: guest.into(),
            why,
        })
    };
    if !guest.starts_with('/') {
        return bad("GUESTDIR must be an absolute path");
    }
    if guest.len() > 200 {
        return bad("GUESTDIR is longer than 200 characters");
    }
    for c in Path::new(guest).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => {
                let n = n.to_string_lossy();
                if !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b))
                {
                    return bad(
                        "GUESTDIR may hold only letters, digits, '/', '.', '_', '-', '+', '@'",
                    );
                }
            }
            _ => return bad("GUESTDIR may not hold '.' or '..'"),
        }
    }
    if GUEST_SYSTEM.contains(&normal_guest(guest).as_str()) {
        return bad(
            "that is a system directory of the guest; mount the share elsewhere (e.g. /mnt/NAME)",
        );
    }
    Ok(())
}

/// The 9p mount tag of the share at `index` in the spec: what the guest
/// mounts (`mount -t 9p nox0 /mnt/x`).
pub fn tag(index: usize) -> String {
    format!("nox{index}")
}

/// qemu's fsdev id of the share at `index`.
pub fn fsdev_id(index: usize) -> String {
    format!("fsdev{index}")
}

/// The guest's line for the share at `index`: `TAG GUESTDIR FSTYPE
/// OPTIONS`, what [`GUEST_MOUNT_SCRIPT`] mounts. nodev/nosuid (a device
/// node or set-id file in the share is the host's business, never a way
/// into the guest's devices or root), ro for a read-only share; for 9p the
/// transport's own options (virtio, 9p2000.L, the largest msize).
pub fn guest_line(index: usize, m: &Mount, transport: Transport) -> String {
    let ro = if m.readonly { ",ro" } else { "" };
    let opts = match transport {
        Transport::VirtioFs => format!("nodev,nosuid{ro}"),
        Transport::NineP => {
            format!("trans=virtio,version=9p2000.L,msize={MSIZE},nodev,nosuid{ro}")
        }
    };
    format!("{} {} {} {opts}", tag(index), m.guest, transport.as_str())
}

/// What qemu hands the guest through fw_cfg ([`FW_CFG_NAME`]): one
/// [`guest_line`] per share. Through qemu, not the seed, so that `nox set
/// --mount` needs no new seed (and no new cloud-init instance): the next
/// start's qemu carries the new list.
pub fn guest_table(mounts: &[Mount], transport: Transport) -> String {
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| guest_line(i, m, transport) + "\n")
        .collect()
}

/// The fw_cfg item holding [`guest_table`]. (`opt/org.nox/mounts`, the
/// first nox with shares, had 9p lines of three fields.)
pub const FW_CFG_NAME: &str = "opt/org.nox/shares";

/// The seed's bootcmd (every boot, every VM; nothing in it is per VM):
/// mounts what [`guest_table`] lists, if qemu gave a table. The lines are
/// nox's (checked: [`check_guest`]), read as data, never run.
pub const GUEST_MOUNT_SCRIPT: &str = "modprobe -q qemu_fw_cfg 2>/dev/null; \
t=/sys/firmware/qemu_fw_cfg/by_name/opt/org.nox/shares/raw; \
if [ -r \"$t\" ]; then \
while read -r tag dir fs opts; do [ -n \"$opts\" ] || continue; \
case $fs in virtiofs) modprobe -q virtiofs 2>/dev/null;; \
9p) modprobe -q 9pnet_virtio 2>/dev/null; modprobe -q 9p 2>/dev/null;; *) continue;; esac; \
mkdir -p \"$dir\"; \
mountpoint -q \"$dir\" || mount -t \"$fs\" -o \"$opts\" \"$tag\" \"$dir\" || echo \"nox: cannot mount $tag on $dir\" >&2; \
done < \"$t\"; fi";

/// `mounts` with `add` replacing any share at the same guest directory,
/// without those whose guest directory is in `remove`. Pure.
pub fn after(
    vm: &str,
    have: &[Mount],
    add: &[Mount],
    remove: &[String],
) -> Result<Vec<Mount>, ShareError> {
    let mut out: Vec<Mount> = have.to_vec();
    for r in remove {
        let r = normal_guest(r);
        let before = out.len();
        out.retain(|m| m.guest != r);
        if out.len() == before {
            return Err(ShareError::Missing {
                vm: vm.into(),
                guest: r,
            });
        }
    }
    for (i, a) in add.iter().enumerate() {
        if add[..i].iter().any(|b| b.guest == a.guest) {
            return Err(ShareError::Duplicate {
                guest: a.guest.clone(),
            });
        }
        out.retain(|m| m.guest != a.guest);
        out.push(a.clone());
    }
    check_all(vm, &out)?;
    Ok(out)
}

/// The whole list: distinct guest directories, within the limit.
pub fn check_all(vm: &str, mounts: &[Mount]) -> Result<(), ShareError> {
    for (i, m) in mounts.iter().enumerate() {
        check_guest(&m.guest)?;
        if mounts[..i].iter().any(|o| o.guest == m.guest) {
            return Err(ShareError::Duplicate {
                guest: m.guest.clone(),
            });
        }
    }
    if mounts.len() > MAX_MOUNTS {
        return Err(ShareError::TooMany { vm: vm.into() });
    }
    Ok(())
}

/// The shares' guest directories, comma-separated (for refusals).
pub fn names(mounts: &[Mount]) -> String {
    mounts
        .iter()
        .map(|m| m.guest.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Mount {
        s.parse().unwrap()
    }

    #[test]
    fn mount_flag_parses_and_prints_back() {
        let a = m("/srv/data:/mnt/data");
        assert_eq!(a.host, PathBuf::from("/srv/data"));
        assert_eq!(a.guest, "/mnt/data");
        assert!(!a.readonly);
        assert_eq!(a.to_string(), "/srv/data:/mnt/data");
        let b = m("/srv/x:/mnt/x/:ro");
        assert!(b.readonly);
        assert_eq!(b.guest, "/mnt/x");
        assert_eq!(b.to_string(), "/srv/x:/mnt/x:ro");
        assert!(!m("/a:/mnt/a:rw").readonly);
        let j = serde_json::to_value(&b).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"host": "/srv/x", "guest": "/mnt/x", "readonly": true})
        );
        assert_eq!(serde_json::from_value::<Mount>(j).unwrap(), b);
    }

    #[test]
    fn bad_mount_flags_are_refused_with_the_reason() {
        let e = |s: &str| s.parse::<Mount>().unwrap_err().to_string();
        assert!(e("/a").contains("HOSTDIR:GUESTDIR"));
        assert!(e("/a:/b:rx").contains("unknown option \"rx\""));
        assert!(e("/a:/b:ro:x").contains("HOSTDIR:GUESTDIR"));
        assert!(e("rel:/mnt/x").contains("absolute"));
        assert!(e(":/mnt/x").contains("absolute"));
        assert!(e("/a:mnt").contains("absolute"));
        assert!(e("/a:/mnt/../etc").contains("'..'"));
        assert_eq!(m("/a:/mnt/./x//y").guest, "/mnt/x/y");
        assert!(e("/a:/mnt/a b").contains("only letters"));
        assert!(e("/a:/mnt/$(x)").contains("only letters"));
        assert!(e("/a:/mnt/a,b").contains("only letters"));
        for sys in ["/", "/etc", "/usr/", "/home", "/var", "//boot"] {
            assert!(
                e(&format!("/a:{sys}")).contains("system directory"),
                "{sys}"
            );
        }
        // Below them is fine.
        assert_eq!(m("/a:/home/nox/src").guest, "/home/nox/src");
    }

    #[test]
    fn set_adds_replaces_and_removes() {
        let have = vec![m("/a:/mnt/a"), m("/b:/mnt/b:ro")];
        let out = after("vm", &have, &[m("/c:/mnt/b")], &[]).unwrap();
        assert_eq!(out, vec![m("/a:/mnt/a"), m("/c:/mnt/b")]);
        let out = after("vm", &have, &[], &["/mnt/a/".into()]).unwrap();
        assert_eq!(out, vec![m("/b:/mnt/b:ro")]);
        let e = after("vm", &have, &[], &["/mnt/z".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--remove-mount /mnt/z: vm has no share there"
        );
        let e = after("vm", &[], &[m("/a:/mnt/a"), m("/b:/mnt/a")], &[]).unwrap_err();
        assert_eq!(e.to_string(), "--mount: /mnt/a is given twice");
        let many: Vec<Mount> = (0..=MAX_MOUNTS)
            .map(|i| m(&format!("/a:/mnt/{i}")))
            .collect();
        assert!(matches!(
            after("vm", &[], &many, &[]),
            Err(ShareError::TooMany { .. })
        ));
        assert_eq!(names(&have), "/mnt/a, /mnt/b");
    }

    #[test]
    fn guest_side_names() {
        assert_eq!(tag(0), "nox0");
        assert_eq!(fsdev_id(3), "fsdev3");
        assert_eq!(
            guest_line(1, &m("/b:/mnt/b:ro"), Transport::NineP),
            "nox1 /mnt/b 9p trans=virtio,version=9p2000.L,msize=512000,nodev,nosuid,ro"
        );
        assert_eq!(
            guest_table(&[m("/a:/mnt/a"), m("/b:/mnt/b:ro")], Transport::VirtioFs),
            "nox0 /mnt/a virtiofs nodev,nosuid\n\
             nox1 /mnt/b virtiofs nodev,nosuid,ro\n"
        );
        assert_eq!(guest_table(&[], Transport::VirtioFs), "");
    }
}
