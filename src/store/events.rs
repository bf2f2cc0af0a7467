//! What happens to VMs, as an append-only log per VM (`nox events`).
//!
//! Writers are the VM's supervisor (state changes through
//! the state recorder, addresses, SSH and cloud-init readiness,
//! restarts) and the CLI operations that change a VM (create, delete). There
//! is no daemon: each writer appends one JSON line to
//! `ROOT/events/NAME.jsonl` under an `flock`, and readers poll the files.
//! The log lives outside `vms/NAME/` so that a deleted VM's log, ending in
//! its `deleted` event, can still be read; it is capped at [`MAX_LOG`] bytes
//! and rotated once (`NAME.jsonl.1`), so a VM restarting in a loop cannot
//! fill the disk. Logs of VMs deleted more than [`KEEP_DELETED`] ago are
//! removed at the next delete.
//!
//! The line format is versioned ([`VERSION`], field `v`) and documented in
//! the README; fields are only ever added within a version. Readers keep
//! lines of types they do not know.
//!
//! Emitting is one call from anywhere: `events::emit(&vm, Kind::Deleted {})`.
//! A failed write is logged, never an error of the operation that emitted it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;

use crate::model::ident::VmName;
use crate::model::lifecycle::Phase;
use crate::store::{self, Store, StoreError, VmPaths};

/// The version of the line format (`"v"` in every line).
pub const VERSION: u32 = 1;
/// Size at which a VM's log is rotated (one old generation is kept).
pub const MAX_LOG: u64 = 1024 * 1024;
/// How long the log of a deleted VM is kept.
pub const KEEP_DELETED: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often `nox events --follow` looks for new lines.
pub const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Error)]
pub enum EventsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "invalid --since {0:?}: give a duration (30s, 10m, 2h, 1day) or an RFC 3339 time (2026-01-31T12:00:00Z)"
    )]
    Since(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EventsError + '_ {
    move |source| EventsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Whether cloud-init finished well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloudInit {
    Done,
    Error,
}

/// What happened, with its fields (the line's `type` and the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Kind {
    /// `nox create` defined the VM.
    Created { image: String, network: String },
    /// `nox delete` removed the VM.
    Deleted {},
    /// The VM's state changed (`from` → `state`).
    State {
        state: Phase,
        from: Phase,
        reason: Option<String>,
    },
    /// The guest's addresses were learned or changed.
    Ip {
        ip: Option<String>,
        ipv6: Vec<String>,
        previous: Option<String>,
    },
    /// The guest's sshd accepts nox's key at `host:port`.
    SshReady { host: String, port: u16 },
    /// cloud-init finished (`detail`: its `status --long` on error).
    CloudInit {
        status: CloudInit,
        detail: Option<String>,
    },
    /// The restart policy restarts the VM in `delay_secs` (restart number
    /// `restarts`) after `after`.
    Restart {
        restarts: u32,
        delay_secs: u64,
        after: Option<String>,
    },
    /// A snapshot was taken, restored or removed (`action`).
    Snapshot { action: String, snapshot: String },
}

/// One line of a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    /// RFC 3339, UTC, milliseconds: `2026-11-22T06:21:37.123Z`.
    pub time: String,
    pub vm: String,
    #[serde(flatten)]
    pub kind: Kind,
}

/// `time` as every line writes it.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Appends an event to the VM's log; a failure is logged and otherwise
/// ignored (an event log never fails what it records).
pub fn emit(vm: &VmPaths, kind: Kind) {
    let rec = Record {
        v: VERSION,
        time: timestamp(Utc::now()),
        vm: vm.name.to_string(),
        kind,
    };
    if let Err(e) = append(vm.events(), &rec) {
        warn!("cannot record event: {}", crate::error_chain(&e));
    }
}

/// Appends one line under the log's lock, rotating first when it would grow
/// past [`MAX_LOG`].
pub fn append(path: &Path, rec: &Record) -> Result<(), EventsError> {
    let line = serde_json::to_string(rec).map_err(|e| io(path)(e.into()))?;
    let mut line = crate::model::text::json_escape_c1(&line);
    line.push('\n');
    if let Some(dir) = path.parent()
        && !dir.is_dir()
    {
        store::mkdir_private(dir)?;
    }
    loop {
        let f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        let mut f = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| io(path)(std::io::Error::from(e)))?;
        let meta = f.metadata().map_err(io(path))?;
        // Another writer rotated the file while we waited for the lock:
        // write to the new one.
        if fs::metadata(path).map(|m| m.ino()).ok() != Some(meta.ino()) {
            continue;
        }
        if meta.len() > 0 && meta.len() + line.len() as u64 > MAX_LOG {
            fs::rename(path, rotated(path)).map_err(io(path))?;
            continue;
        }
        return f.write_all(line.as_bytes()).map_err(io(path));
    }
}

/// The previous generation of a log.
fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Removes the logs of VMs that no longer exist and whose last event is
/// older than [`KEEP_DELETED`]. Best effort.
pub fn prune(store: &Store) {
    let Ok(entries) = fs::read_dir(store.events_dir()) else {
        return;
    };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = log_name(&path) else {
            continue;
        };
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > KEEP_DELETED);
        if old && !store.vms_dir().join(name.as_str()).exists() {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(rotated(&path));
        }
    }
}

/// The VM a current log (`NAME.jsonl`) belongs to.
fn log_name(path: &Path) -> Option<VmName> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// `--since`: a duration back from `now` (`10m`, `1h 30m`, `2days`) or an
/// RFC 3339 time (any offset).
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, EventsError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = humantime::parse_duration(s.trim()).map_err(|_| EventsError::Since(s.into()))?;
    let d = chrono::Duration::from_std(d).map_err(|_| EventsError::Since(s.into()))?;
    now.checked_sub_signed(d)
        .ok_or_else(|| EventsError::Since(s.into()))
}

/// A line read from a log: its time, the line itself, and the parsed value.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub time: DateTime<Utc>,
    pub raw: String,
    pub value: serde_json::Value,
}

impl Line {
    fn parse(raw: &str) -> Option<Line> {
        let value: serde_json::Value = serde_json::from_str(raw).ok()?;
        let time = DateTime::parse_from_rfc3339(value.get("time")?.as_str()?)
            .ok()?
            .with_timezone(&Utc);
        Some(Line {
            time,
            raw: raw.to_string(),
            value,
        })
    }

    /// The line as `events --json` prints it: C1 controls escaped (a log
    /// written before they were is shown safely too).
    pub fn json(&self) -> String {
        crate::model::text::json_escape_c1(self.raw.trim_end())
    }

    /// The event in the form of this version, if it is one this nox knows.
    pub fn record(&self) -> Option<Record> {
        serde_json::from_value(self.value.clone()).ok()
    }

    /// One human line: `TIME VM TYPE details`. Guest-controlled text
    /// (cloud-init's detail) is escaped by the caller's `text::printable`.
    pub fn human(&self) -> String {
        let time = self
            .time
            .with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S%.3f");
        let vm = self.value["vm"].as_str().unwrap_or("?");
        let what = match self.record().map(|r| r.kind) {
            Some(k) => describe(&k),
            // A newer nox's event: its type and fields as they are.
            None => {
                let mut v = self.value.clone();
                let ty = v["type"].as_str().unwrap_or("?").to_string();
                if let Some(m) = v.as_object_mut() {
                    for k in ["v", "time", "vm", "type"] {
                        m.remove(k);
                    }
                }
                format!("{ty} {v}")
            }
        };
        format!("{time}  {vm:<20} {what}")
    }
}

fn describe(k: &Kind) -> String {
    let because = |r: &Option<String>| r.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
    match k {
        Kind::Created { image, network } => format!("created from {image}, network {network}"),
        Kind::Deleted {} => "deleted".into(),
        Kind::State {
            state,
            from,
            reason,
        } => format!("{from} -> {state}{}", because(reason)),
        Kind::Ip { ip, ipv6, previous } => {
            let mut s = format!("ip {}", ip.as_deref().unwrap_or("-"));
            if !ipv6.is_empty() {
                s.push_str(&format!(" {}", ipv6.join(" ")));
            }
            if let Some(p) = previous {
                s.push_str(&format!(" (was {p})"));
            }
            s
        }
        Kind::SshReady { host, port } => format!("ssh ready at {host}:{port}"),
        Kind::CloudInit { status, detail } => match status {
            CloudInit::Done => "cloud-init done".into(),
            CloudInit::Error => format!(
                "cloud-init failed{}",
                detail
                    .as_deref()
                    .map(|d| format!(": {}", d.replace('\n', "; ")))
                    .unwrap_or_default()
            ),
        },
        Kind::Restart {
            restarts,
            delay_secs,
            after,
        } => format!("restart #{restarts} in {delay_secs}s{}", because(after)),
        Kind::Snapshot { action, snapshot } => format!("snapshot {snapshot} {action}"),
    }
}

/// Where a reader is in one VM's log.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    ino: u64,
    offset: u64,
}

/// Reads the event logs of one VM or all, from the start, then whatever is
/// appended (rotation included) at each [`Reader::poll`].
#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    vm: Option<VmName>,
    since: Option<DateTime<Utc>>,
    cursors: HashMap<VmName, Cursor>,
}

impl Reader {
    pub fn new(store: &Store, vm: Option<VmName>, since: Option<DateTime<Utc>>) -> Reader {
        Reader {
            dir: store.events_dir(),
            vm,
            since,
            cursors: HashMap::new(),
        }
    }

    /// Every complete line not returned yet, oldest first (VMs merged by
    /// time). The first call returns the logs' history.
    pub fn poll(&mut self) -> Result<Vec<Line>, EventsError> {
        let mut lines = vec![];
        for name in self.logs()? {
            let path = self.dir.join(format!("{name}.jsonl"));
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let mut text = String::new();
            let offset = match self.cursors.get(&name) {
                Some(c) if c.ino == meta.ino() => c.offset,
                // Rotated since the last look: finish the old generation.
                Some(c) => {
                    let old = rotated(&path);
                    if fs::metadata(&old).is_ok_and(|m| m.ino() == c.ino) {
                        read_from(&old, c.offset, &mut text)?;
                    }
                    0
                }
                None => {
                    read_from(&rotated(&path), 0, &mut text)?;
                    0
                }
            };
            // A log cut short (by hand): start again.
            let offset = if offset > meta.len() { 0 } else { offset };
            let read = read_from(&path, offset, &mut text)?;
            self.cursors.insert(
                name,
                Cursor {
                    ino: meta.ino(),
                    offset: offset + read,
                },
            );
            lines.extend(
                text.lines()
                    .filter_map(Line::parse)
                    .filter(|l| self.since.is_none_or(|s| l.time >= s)),
            );
        }
        lines.sort_by_key(|l| l.time);
        Ok(lines)
    }

    /// The VMs whose logs to read.
    fn logs(&self) -> Result<Vec<VmName>, EventsError> {
        if let Some(vm) = &self.vm {
            return Ok(vec![vm.clone()]);
        }
        match fs::read_dir(&self.dir) {
            Ok(entries) => Ok(entries
                .flatten()
                .filter_map(|e| log_name(&e.path()))
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(io(&self.dir)(e)),
        }
    }
}

/// Appends the complete lines of `path` from `offset` on to `out`; returns
/// the bytes consumed (a last line still being written waits for the next
/// poll). A missing file reads as empty.
fn read_from(path: &Path, offset: u64, out: &mut String) -> Result<u64, EventsError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(path)(e)),
    };
    f.seek(SeekFrom::Start(offset)).map_err(io(path))?;
    let mut data = vec![];
    f.take(MAX_LOG * 2)
        .read_to_end(&mut data)
        .map_err(io(path))?;
    let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    out.push_str(&String::from_utf8_lossy(&data[..complete]));
    Ok(complete as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let t = tempfile::tempdir().unwrap();
        let s = Store::at(t.path().join("r"), t.path().join("run"));
        s.init().unwrap();
        (t, s)
    }

    fn state(from: Phase, to: Phase) -> Kind {
        Kind::State {
            state: to,
            from,
            reason: None,
        }
    }

    #[test]
    fn the_line_format_is_the_documented_one() {
        let rec = Record {
            v: VERSION,
            time: "2026-11-22T06:21:37.123Z".into(),
            vm: "web".into(),
            kind: Kind::State {
                state: Phase::Stopped,
                from: Phase::Stopping,
                reason: Some("guest-shutdown".into()),
            },
        };
        assert_eq!(
            serde_json::to_string(&rec).unwrap(),
            r#"{"v":1,"time":"2026-11-22T06:21:37.123Z","vm":"web","type":"state","state":"stopped","from":"stopping","reason":"guest-shutdown"}"#
        );
        let ready = Kind::SshReady {
            host: "127.0.0.1".into(),
            port: 2222,
        };
        let v = serde_json::to_value(&ready).unwrap();
        assert_eq!(v["type"], "ssh-ready");
        let ci = Kind::CloudInit {
            status: CloudInit::Done,
            detail: None,
        };
        assert_eq!(serde_json::to_value(&ci).unwrap()["type"], "cloud-init");
        assert_eq!(serde_json::to_value(&ci).unwrap()["status"], "done");
        assert_eq!(
            serde_json::to_string(&Kind::Deleted {}).unwrap(),
            r#"{"type":"deleted"}"#
        );
        assert_eq!(timestamp(DateTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn reader_merges_vms_by_time_and_follows_appends_and_rotation() {
        let (_t, s) = store();
        let a = s.vm_paths(&"a".parse().unwrap());
        let b = s.vm_paths(&"b".parse().unwrap());
        let rec = |vm: &str, ms: u64, kind: Kind| Record {
            v: VERSION,
            time: timestamp(DateTime::UNIX_EPOCH + Duration::from_millis(ms)),
            vm: vm.into(),
            kind,
        };
        append(
            a.events(),
            &rec("a", 10, state(Phase::Stopped, Phase::Starting)),
        )
        .unwrap();
        append(b.events(), &rec("b", 5, Kind::Deleted {})).unwrap();
        append(
            a.events(),
            &rec("a", 20, state(Phase::Starting, Phase::Running)),
        )
        .unwrap();
        // Private file in a private directory.
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(a.events()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut all = Reader::new(&s, None, None);
        let vms: Vec<String> = all
            .poll()
            .unwrap()
            .iter()
            .map(|l| l.record().unwrap().vm)
            .collect();
        assert_eq!(vms, ["b", "a", "a"]);
        assert!(all.poll().unwrap().is_empty());

        let mut only_a = Reader::new(&s, Some("a".parse().unwrap()), None);
        assert_eq!(only_a.poll().unwrap().len(), 2);
        // A half-written line waits for its newline.
        let mut f = OpenOptions::new().append(true).open(a.events()).unwrap();
        let line = serde_json::to_string(&rec("a", 30, Kind::Deleted {})).unwrap();
        f.write_all(&line.as_bytes()[..10]).unwrap();
        assert!(only_a.poll().unwrap().is_empty());
        f.write_all(&line.as_bytes()[10..]).unwrap();
        f.write_all(b"\n").unwrap();
        assert_eq!(only_a.poll().unwrap().len(), 1);
        // Fill the log past its cap: it rotates, nothing is lost or repeated.
        let filler = rec(
            "a",
            40,
            Kind::Ip {
                ip: Some("x".repeat(1000)),
                ipv6: vec![],
                previous: None,
            },
        );
        let n = (MAX_LOG / 1000) as usize + 10;
        for _ in 0..n {
            append(a.events(), &filler).unwrap();
        }
        assert!(rotated(a.events()).exists());
        assert!(fs::metadata(a.events()).unwrap().len() <= MAX_LOG);
        assert_eq!(only_a.poll().unwrap().len(), n);
        // Since: the recent past only.
        let since = DateTime::UNIX_EPOCH + Duration::from_millis(15);
        let mut recent = Reader::new(&s, Some("a".parse().unwrap()), Some(since));
        let got = recent.poll().unwrap();
        assert!(got.iter().all(|l| l.time >= since));
        assert!(!got.is_empty());
    }

    #[test]
    fn c1_controls_in_guest_text_are_escaped_in_json() {
        let (_t, s) = store();
        let a = s.vm_paths(&"a".parse().unwrap());
        let rec = Record {
            v: VERSION,
            time: "2026-01-01T00:00:00.000Z".into(),
            vm: "a".into(),
            kind: Kind::CloudInit {
                status: CloudInit::Error,
                detail: Some("boom\u{9b}31m red".into()),
            },
        };
        append(a.events(), &rec).unwrap();
        let written = fs::read_to_string(a.events()).unwrap();
        assert!(written.contains("boom\\u009b31m"), "{written:?}");
        // A log written before (raw C1 in it) is printed escaped too.
        fs::write(a.events(), serde_json::to_string(&rec).unwrap() + "\n").unwrap();
        let lines = Reader::new(&s, None, None).poll().unwrap();
        assert!(lines[0].raw.contains('\u{9b}'));
        let json = lines[0].json();
        assert!(
            !json.contains('\u{9b}') && json.contains("\\u009b"),
            "{json:?}"
        );
        assert_eq!(
            serde_json::from_str::<Record>(&json).unwrap(),
            rec,
            "the same event"
        );
    }

    #[test]
    fn unknown_types_and_garbage_are_handled() {
        let (_t, s) = store();
        let a = s.vm_paths(&"a".parse().unwrap());
        store::mkdir_private(&s.events_dir()).unwrap();
        fs::write(
            a.events(),
            "not json\n{\"v\":2,\"time\":\"2026-01-01T00:00:00.000Z\",\"vm\":\"a\",\"type\":\"teleported\",\"to\":\"mars\"}\n",
        )
        .unwrap();
        let lines = Reader::new(&s, None, None).poll().unwrap();
        assert_eq!(lines.len(), 1);
        assert!(lines[0].record().is_none());
        let h = lines[0].human();
        assert!(h.contains("teleported") && h.contains("mars"), "{h}");
    }

    #[test]
    fn since_takes_durations_and_times() {
        let now = DateTime::parse_from_rfc3339("2026-11-22T06:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |s: &str| timestamp(parse_since(s, now).unwrap());
        assert_eq!(at("10m"), "2026-11-22T05:50:00.000Z");
        assert_eq!(at("1h 30m"), "2026-11-22T04:30:00.000Z");
        assert_eq!(at("2026-11-22T07:00:00+02:00"), "2026-11-22T05:00:00.000Z");
        let e = parse_since("yesterday", now).unwrap_err().to_string();
        assert!(e.contains("\"yesterday\""), "{e}");
    }

    #[test]
    fn human_lines_say_what_happened() {
        let l = |kind: Kind| {
            let rec = Record {
                v: VERSION,
                time: "2026-11-22T06:21:37.123Z".into(),
                vm: "web".into(),
                kind,
            };
            Line::parse(&serde_json::to_string(&rec).unwrap())
                .unwrap()
                .human()
        };
        let s = l(Kind::State {
            state: Phase::Crashed,
            from: Phase::Running,
            reason: Some("qemu killed by SIGKILL".into()),
        });
        assert!(
            s.contains("web") && s.ends_with("running -> crashed (qemu killed by SIGKILL)"),
            "{s}"
        );
        let s = l(Kind::Ip {
            ip: Some("10.0.0.9".into()),
            ipv6: vec![],
            previous: Some("10.0.0.5".into()),
        });
        assert!(s.ends_with("ip 10.0.0.9 (was 10.0.0.5)"), "{s}");
    }
}
