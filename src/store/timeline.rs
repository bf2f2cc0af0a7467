//! The boot timeline (`nox info NAME --boot`): for each boot, the time from
//! qemu resuming the guest to each phase nox can observe.
//!
//! The supervisor watches the serial console log and the guest's addresses
//! and writes `boot.json` (the last [`KEEP`] boots); `--wait` adds when SSH
//! first answered and when cloud-init was done (`boot-guest.json`), and the
//! first `nox info --boot` of a boot adds what the guest itself says about
//! it (`systemd-analyze`, `blame`, `cloud-init analyze show`), fetched once
//! over SSH, bounded (fetching it at `--wait`'s end cost a minute of
//! `--wait` under load here). All of it is guest
//! text: it is stored as it came (JSON escapes it) and made printable only
//! when shown on a terminal.
//!
//! The parsers here are pure: console lines to [`Mark`]s, systemd's and
//! cloud-init's reports to durations.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::{self, StoreError, VmPaths};

/// Boots kept in `boot.json`.
pub const KEEP: usize = 5;
/// Entries kept of `systemd-analyze blame` and of cloud-init's modules.
pub const TOP: usize = 15;
/// Longest guest string kept (a unit or module name, the summary line).
const MAX_TEXT: usize = 200;
/// Longest console line looked at; a longer one is cut.
const MAX_LINE: usize = 4096;

/// A phase of the boot seen on the serial console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// The bootloader printed (GRUB's "Booting"/"Loading Linux").
    Bootloader,
    /// The kernel's first line ("Linux version").
    Kernel,
    /// The kernel ran the initramfs ("Run /init").
    Initramfs,
    /// systemd on the real root ("Welcome to ...", not the initrd's).
    RootSwitched,
    CloudInitLocal,
    CloudInitNetwork,
    /// The guest reported an IPv4 address (cloud-init's ci-info table).
    GuestNetwork,
    CloudInitConfig,
    CloudInitFinal,
    /// cloud-init's final message ("Cloud-init v. X finished at").
    CloudInitFinished,
    /// A getty login prompt on the serial console.
    Login,
    /// A guest resumed from a warm template has taken its identity and
    /// SSH can answer (the identity hook's last line, [`WARM_READY_LINE`]).
    WarmReady,
}

/// The warm identity hook's last line (`crate::vmm::warm::APPLIED`).
pub const WARM_READY_LINE: &str = "nox-warm: identity applied";

impl Mark {
    pub fn label(self) -> &'static str {
        match self {
            Mark::Bootloader => "bootloader",
            Mark::Kernel => "kernel started",
            Mark::Initramfs => "initramfs",
            Mark::RootSwitched => "root switched (systemd)",
            Mark::CloudInitLocal => "cloud-init local",
            Mark::CloudInitNetwork => "cloud-init network",
            Mark::GuestNetwork => "guest has an address",
            Mark::CloudInitConfig => "cloud-init config",
            Mark::CloudInitFinal => "cloud-init final",
            Mark::CloudInitFinished => "cloud-init finished",
            Mark::Login => "login prompt",
            Mark::WarmReady => "warm identity applied (SSH can answer)",
        }
    }
}

/// Removes ANSI escape sequences (systemd colours its status lines).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, then one final byte.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The phase a console line marks, if any. Pure; the caller keeps only the
/// first time each phase is seen.
pub fn mark(line: &str) -> Option<Mark> {
    let l = strip_ansi(line);
    let l = l.trim_end_matches(['\r', '\n']);
    if l.contains("Linux version ") {
        return Some(Mark::Kernel);
    }
    if l.contains(WARM_READY_LINE) {
        return Some(Mark::WarmReady);
    }
    if l.contains("Run /init as init process") {
        return Some(Mark::Initramfs);
    }
    if l.contains("Welcome to ") && !l.contains("(Initrd)") && !l.contains("GRUB") {
        return Some(Mark::RootSwitched);
    }
    if l.contains("Loading Linux ") || l.contains("Booting `") || l.contains("Welcome to GRUB") {
        return Some(Mark::Bootloader);
    }
    if let Some(i) = l.find("Cloud-init v. ") {
        let rest = &l[i..];
        return if rest.contains(" running 'init-local'") {
            Some(Mark::CloudInitLocal)
        } else if rest.contains(" running 'init'") {
            Some(Mark::CloudInitNetwork)
        } else if rest.contains(" running 'modules:config'") {
            Some(Mark::CloudInitConfig)
        } else if rest.contains(" running 'modules:final'") {
            Some(Mark::CloudInitFinal)
        } else if rest.contains(" finished at ") {
            Some(Mark::CloudInitFinished)
        } else {
            None
        };
    }
    if l.contains("ci-info: |") && guest_ipv4(l).is_some() {
        return Some(Mark::GuestNetwork);
    }
    if l.trim_end().ends_with(" login:") {
        return Some(Mark::Login);
    }
    None
}

/// The address in a ci-info row like `| eth0 | True | 10.0.2.15 | ...`
/// (an interface that is up with an IPv4 address other than loopback).
fn guest_ipv4(line: &str) -> Option<std::net::Ipv4Addr> {
    let cells: Vec<&str> = line.split('|').map(str::trim).collect();
    let up = cells.iter().position(|c| *c == "True")?;
    let ip: std::net::Ipv4Addr = cells.get(up + 1)?.parse().ok()?;
    (!ip.is_loopback()).then_some(ip)
}

/// One boot as the supervisor saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boot {
    /// Unix milliseconds when the guest was resumed (the clock starts here).
    pub started_ms: u64,
    /// `direct` (kernel read from the disk) or `firmware`.
    pub method: String,
    /// Why the boot went through the firmware, when nox tried direct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Why a warm template's saved state was not resumed (the VM booted cold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_refused: Option<String>,
    /// Console phases, in the order first seen, with milliseconds since start.
    #[serde(default)]
    pub phases: Vec<(Mark, u64)>,
    /// When the supervisor first learned the guest's address (bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_known_ms: Option<u64>,
    /// A warm boot whose identity hook announces on the console when SSH
    /// can answer ([`Mark::WarmReady`]): `--wait` waits for that first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub announces: bool,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the supervisor keeps while it watches one boot.
#[derive(Debug)]
pub struct Watch {
    pub boot: Boot,
    /// Where this boot's output starts in console.log.
    offset: u64,
    partial: Vec<u8>,
}

impl Watch {
    /// Starts a boot's timeline at `offset` in the console log.
    pub fn new(method: &str, fallback: Option<String>, offset: u64) -> Watch {
        Watch {
            boot: Boot {
                started_ms: now_ms(),
                method: method.into(),
                fallback,
                warm_refused: None,
                phases: vec![],
                ip_known_ms: None,
                announces: false,
            },
            offset,
            partial: vec![],
        }
    }

    fn elapsed(&self) -> u64 {
        now_ms().saturating_sub(self.boot.started_ms)
    }

    /// Feeds console output; true if a new phase was seen. The last line
    /// without its newline is looked at too (a login prompt has none).
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let at = self.elapsed();
        self.partial.extend_from_slice(bytes);
        let mut new = false;
        let mut lines: Vec<Vec<u8>> = vec![];
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            lines.push(self.partial.drain(..=i).collect());
        }
        if self.partial.len() > MAX_LINE {
            lines.push(std::mem::take(&mut self.partial));
        }
        let tail = (!self.partial.is_empty()).then(|| self.partial.clone());
        for l in lines.iter().chain(tail.iter()) {
            if let Some(m) = mark(&String::from_utf8_lossy(l))
                && !self.boot.phases.iter().any(|(p, _)| *p == m)
            {
                self.boot.phases.push((m, at));
                new = true;
            }
        }
        new
    }

    /// Reads what the console log gained since the last call.
    pub fn poll(&mut self, console: &Path) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(console) else {
            return false;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut buf = Vec::new();
        let Ok(n) = f.take(1 << 20).read_to_end(&mut buf) else {
            return false;
        };
        self.offset += n as u64;
        self.feed(&buf)
    }

    /// Whether the boot is over as far as the console tells (cloud-init
    /// finished, or a login prompt, plus a grace period for what follows),
    /// so the console need no longer be read.
    pub fn done(&self) -> bool {
        let seen = |m| self.boot.phases.iter().any(|(p, _)| *p == m);
        (seen(Mark::CloudInitFinished) && seen(Mark::Login))
            || seen(Mark::WarmReady)
            || self.elapsed() > 30 * 60 * 1000
    }

    /// The guest's address became known; true the first time.
    pub fn ip_known(&mut self) -> bool {
        if self.boot.ip_known_ms.is_some() {
            return false;
        }
        self.boot.ip_known_ms = Some(self.elapsed());
        true
    }
}

/// `boot.json`: the last boots, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boots {
    pub boots: Vec<Boot>,
}

pub fn load(vm: &VmPaths) -> Boots {
    store::read_json(&vm.dir.join("boot.json"))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Whether the VM's current (newest) boot resumed a warm template: no
/// cloud-init runs in it, so nothing waits for one.
/// Whether the newest boot's guest has shown on its console that its
/// network is up: cloud-init's network stage (it runs once the network is
/// online) or anything after it. Guest output, so only a hint of when to
/// start looking (`--wait`), never a proof of anything. A VM with no boot
/// record (started by an older nox) counts as seen.
pub fn guest_network_seen(vm: &VmPaths) -> bool {
    const AFTER: [Mark; 6] = [
        Mark::CloudInitNetwork,
        Mark::GuestNetwork,
        Mark::CloudInitConfig,
        Mark::CloudInitFinal,
        Mark::CloudInitFinished,
        Mark::Login,
    ];
    load(vm)
        .boots
        .last()
        .is_none_or(|b| b.phases.iter().any(|(m, _)| AFTER.contains(m)))
}

pub fn resumed_warm(vm: &VmPaths) -> bool {
    load(vm).boots.last().is_some_and(|b| b.method == "warm")
}

/// Records `boot` as the newest boot (replacing the entry with the same start).
pub fn save(vm: &VmPaths, boot: &Boot) -> Result<(), StoreError> {
    let mut all = load(vm);
    all.boots.retain(|b| b.started_ms != boot.started_ms);
    all.boots.push(boot.clone());
    let extra = all.boots.len().saturating_sub(KEEP);
    all.boots.drain(..extra);
    store::write_json(&vm.dir.join("boot.json"), &all)
}

/// A named duration from the guest's reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timed {
    pub name: String,
    pub seconds: f64,
}

/// What `--wait` learned about a boot (`boot-guest.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestReport {
    /// The boot this belongs to ([`Boot::started_ms`]).
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init_done_ms: Option<u64>,
    /// `systemd-analyze`'s "Startup finished in ..." line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd: Option<String>,
    /// The slowest units (`systemd-analyze blame`).
    #[serde(default)]
    pub units: Vec<Timed>,
    /// The slowest cloud-init modules (`cloud-init analyze show`).
    #[serde(default)]
    pub cloud_init: Vec<Timed>,
}

pub fn load_guest(vm: &VmPaths) -> Option<GuestReport> {
    store::read_json(&vm.dir.join("boot-guest.json"))
        .ok()
        .flatten()
}

pub fn save_guest(vm: &VmPaths, r: &GuestReport) -> Result<(), StoreError> {
    store::write_json(&vm.dir.join("boot-guest.json"), r)
}

fn bounded(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

/// A systemd time span ("1min 6.430s", "812ms", "2.5s", "1h 2min") in seconds.
pub fn span_seconds(s: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut any = false;
    for tok in s.split_whitespace() {
        let split = tok.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (num, unit) = tok.split_at(split);
        let n: f64 = num.parse().ok()?;
        total += n * match unit {
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "min" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        any = true;
    }
    any.then_some(total)
}

/// The slowest units from `systemd-analyze blame` ("18.6s unit.service").
pub fn parse_blame(text: &str) -> Vec<Timed> {
    let mut out: Vec<Timed> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (span, name) = l.rsplit_once(' ')?;
            Some(Timed {
                name: bounded(name),
                seconds: span_seconds(span)?,
            })
        })
        .collect();
    top(&mut out);
    out
}

/// The slowest modules from `cloud-init analyze show`: lines like
/// ``|`->config-ssh ran successfully and took 0.567 seconds @...s +00.56700s``.
pub fn parse_cloud_init(text: &str) -> Vec<Timed> {
    let mut out: Vec<Timed> = text
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("->")?.1;
            // "config-ssh ran successfully ...", "found local data from X @...".
            let name = rest.split(" ran ").next()?.split(" @").next()?.trim();
            let plus = rest.rsplit_once('+')?.1.trim().trim_end_matches('s');
            Some(Timed {
                name: bounded(name),
                seconds: plus.parse().ok()?,
            })
        })
        .filter(|t| !t.name.is_empty())
        .collect();
    top(&mut out);
    out
}

fn top(v: &mut Vec<Timed>) {
    v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    v.truncate(TOP);
}

/// The "Startup finished in ..." line of `systemd-analyze`.
pub fn parse_systemd(text: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with("Startup finished in"))
        .map(|l| bounded(l.trim()))
}

/// The guest commands `--wait` runs once at its end, and where each one's
/// output starts: sections separated by a line [`SEPARATOR`].
pub const SEPARATOR: &str = "--nox-section--";
/// The fast commands first: on a slow guest the output that arrived
/// before the time limit is kept.
pub fn guest_script() -> String {
    format!(
        "systemd-analyze 2>&1 | head -n 5; echo {SEPARATOR}; \
         systemd-analyze blame 2>&1 | head -n 40; echo {SEPARATOR}; \
         sudo -n cloud-init analyze show 2>&1 | head -n 400"
    )
}

/// Fills the guest's part of a report from [`guest_script`]'s output.
pub fn parse_guest(report: &mut GuestReport, output: &str) {
    let sep = format!("{SEPARATOR}\n");
    let mut parts = output.split(&sep);
    report.systemd = parts.next().and_then(parse_systemd);
    report.units = parts.next().map(parse_blame).unwrap_or_default();
    report.cloud_init = parts.next().map(parse_cloud_init).unwrap_or_default();
}

/// A boot and its guest report, as `nox info --boot --json` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BootView {
    #[serde(flatten)]
    pub boot: Boot,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestReport>,
}

/// Every kept boot, newest last, each with its guest report if it has one.
pub fn view(vm: &VmPaths) -> Vec<BootView> {
    let guest = load_guest(vm);
    load(vm)
        .boots
        .into_iter()
        .map(|b| BootView {
            guest: guest.clone().filter(|g| g.started_ms == b.started_ms),
            boot: b,
        })
        .collect()
}

/// The human rendering of one boot (guest text made printable).
pub fn render(v: &BootView) -> String {
    use std::fmt::Write as _;
    let p = |s: &str| crate::model::text::printable(s.as_bytes());
    let secs = |ms: u64| format!("{:>7.1} s", ms as f64 / 1000.0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "boot at {} (unix ms), {}",
        v.boot.started_ms, v.boot.method
    );
    if let Some(f) = &v.boot.fallback {
        let _ = writeln!(o, "  direct kernel boot not used: {}", p(f));
    }
    if let Some(w) = &v.boot.warm_refused {
        let _ = writeln!(o, "  warm state not resumed (booted cold): {}", p(w));
    }
    let mut rows: Vec<(u64, String)> = v
        .boot
        .phases
        .iter()
        .map(|(m, ms)| (*ms, m.label().to_string()))
        .collect();
    if let Some(ms) = v.boot.ip_known_ms {
        rows.push((ms, "IP known (host)".into()));
    }
    if let Some(g) = &v.guest {
        if let Some(ms) = g.ssh_ms {
            rows.push((ms, "SSH accepting".into()));
        }
        if let Some(ms) = g.cloud_init_done_ms {
            rows.push((ms, "cloud-init done".into()));
        }
    }
    rows.sort();
    for (ms, what) in rows {
        let _ = writeln!(o, "  {} {what}", secs(ms));
    }
    if let Some(g) = &v.guest {
        if let Some(s) = &g.systemd {
            let _ = writeln!(o, "  guest: {}", p(s));
        }
        for (title, list) in [
            ("slowest units", &g.units),
            ("slowest cloud-init modules", &g.cloud_init),
        ] {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(o, "  {title}:");
            for t in list.iter().take(10) {
                let _ = writeln!(o, "    {:>7.2} s  {}", t.seconds, p(&t.name));
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_mark_phases() {
        let cases = [
            (
                "\x1b[H\x1b[J  Booting `Debian GNU/Linux'",
                Some(Mark::Bootloader),
            ),
            (
                "Loading Linux 6.12.117+deb13-cloud-amd64 ...",
                Some(Mark::Bootloader),
            ),
            (
                "[    0.000000] Linux version 6.12.117+deb13-cloud-amd64 (debian-kernel@",
                Some(Mark::Kernel),
            ),
            (
                "[  371.204610] nox-warm: identity applied",
                Some(Mark::WarmReady),
            ),
            ("[  370.9] nox-warm: crng reseeded", None),
            (
                "[    5.598510] Run /init as init process",
                Some(Mark::Initramfs),
            ),
            (
                "\x1b[0;1;39mWelcome to \x1b[0m\x1b[1mDebian GNU/Linux 13 (trixie)\x1b[0m!",
                Some(Mark::RootSwitched),
            ),
            ("Welcome to Fedora Linux 40 dracut-101 (Initrd)!", None),
            (
                "[   47.5] cloud-init[441]: Cloud-init v. 25.1.4 running 'init-local' at Sun, 22 Nov 2026 06:24:32 +0000. Up 46.39 seconds.",
                Some(Mark::CloudInitLocal),
            ),
            (
                "cloud-init[441]: Cloud-init v. 25.1.4 running 'init' at Sun",
                Some(Mark::CloudInitNetwork),
            ),
            (
                "cloud-init[441]: ci-info: | enp0s3 | True |         10.0.2.15          | 255.255.255.0 | global | 52:54:00:e8:b0:ef |",
                Some(Mark::GuestNetwork),
            ),
            (
                "ci-info: |   lo   | True |         127.0.0.1          |   255.0.0.0   |  host  |     .     |",
                None,
            ),
            (
                "ci-info: | enp0s3 | True | fe80::5054:ff:fee8:b0ef/64 |       .       |  link  |",
                None,
            ),
            (
                "Cloud-init v. 25.1.4 running 'modules:config' at Sun",
                Some(Mark::CloudInitConfig),
            ),
            (
                "Cloud-init v. 25.1.4 running 'modules:final' at Sun",
                Some(Mark::CloudInitFinal),
            ),
            (
                "Cloud-init v. 25.1.4 finished at Sun, 22 Nov 2026 06:25:10 +0000. Datasource DataSourceNoCloud",
                Some(Mark::CloudInitFinished),
            ),
            ("lev login: ", Some(Mark::Login)),
            ("[  OK  ] Reached target network.target - Network.", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(mark(line), want, "{line:?}");
        }
    }

    #[test]
    fn a_watch_keeps_the_first_sighting_and_reads_partial_lines() {
        let mut w = Watch::new("direct", None, 0);
        assert!(!w.feed(b"SeaBIOS\n[    0.0] Linux vers"));
        assert!(w.feed(b"ion 6.12\nRun /init as init process\n"));
        assert!(!w.feed(b"[ 0.1] Linux version again\n"));
        // A prompt without a newline still counts.
        assert!(w.feed(b"Debian GNU/Linux 13 lev ttyS0\n\nlev login: "));
        let seen: Vec<Mark> = w.boot.phases.iter().map(|(m, _)| *m).collect();
        assert_eq!(seen, [Mark::Kernel, Mark::Initramfs, Mark::Login]);
        // A flood without newlines is cut, not kept whole.
        w.feed(&vec![b'x'; 3 * MAX_LINE]);
        assert!(w.partial.len() <= MAX_LINE);
        assert!(w.ip_known());
        assert!(!w.ip_known());
    }

    #[test]
    fn guest_reports_parse() {
        assert_eq!(span_seconds("1min 6.430s"), Some(66.43));
        assert_eq!(span_seconds("812ms"), Some(0.812));
        assert_eq!(span_seconds("1h 2min"), Some(3720.0));
        assert_eq!(span_seconds("soon"), None);
        let out = format!(
            "Startup finished in 10.766s (kernel) + 1min 6.430s (userspace) = 1min 17.196s \n\
graphical.target reached after 1min 1.380s in userspace.\n{SEPARATOR}\n\
 9.816s cloud-init-local.service\n\
18.611s cloud-init-main.service\n\
   120ms \x1b]0;evil\x07.service\n{SEPARATOR}\n\
-- Boot Record 01 --\n\
Starting stage: init-local\n\
|`->no cache found @00.00100s +00.00000s\n\
|`->found local data from DataSourceNoCloud @00.10000s +00.50000s\n\
|`->config-growpart ran successfully and took 0.567 seconds @01.00000s +00.56700s\n\
|`->config-ssh ran successfully @02.00000s +01.20000s\n\
Finished stage: (init-local) 00.26000 seconds\n"
        );
        let mut r = GuestReport::default();
        parse_guest(&mut r, &out);
        assert!(
            r.systemd
                .as_deref()
                .unwrap()
                .starts_with("Startup finished in 10.766s")
        );
        let units: Vec<(&str, f64)> = r
            .units
            .iter()
            .map(|t| (t.name.as_str(), t.seconds))
            .collect();
        assert_eq!(
            units,
            [
                ("cloud-init-main.service", 18.611),
                ("cloud-init-local.service", 9.816),
                ("\x1b]0;evil\x07.service", 0.12)
            ]
        );
        let ci: Vec<(&str, f64)> = r
            .cloud_init
            .iter()
            .map(|t| (t.name.as_str(), t.seconds))
            .collect();
        assert_eq!(
            ci[..3],
            [
                ("config-ssh", 1.2),
                ("config-growpart", 0.567),
                ("found local data from DataSourceNoCloud", 0.5)
            ]
        );
        // Shown on a terminal, the guest's control characters are escaped.
        let v = BootView {
            boot: Boot {
                started_ms: 1,
                method: "direct".into(),
                fallback: None,
                warm_refused: Some("t.state: its SHA-256 is \x1b[2J...".into()),
                phases: vec![(Mark::Kernel, 1500)],
                ip_known_ms: None,
                announces: false,
            },
            guest: Some(GuestReport {
                started_ms: 1,
                ssh_ms: Some(20_000),
                ..r
            }),
        };
        let shown = render(&v);
        assert!(
            !shown.contains('\x1b') && !shown.contains('\x07'),
            "{shown}"
        );
        assert!(shown.contains("1.5 s kernel started"), "{shown}");
        assert!(shown.contains("20.0 s SSH accepting"), "{shown}");
        assert!(
            shown.contains("warm state not resumed (booted cold): t.state: its SHA-256"),
            "{shown}"
        );
    }

    #[test]
    fn boots_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let st = crate::store::Store::at(d.path().into(), d.path().join("run"));
        let vm = st.vm_paths(&"a".parse().unwrap());
        std::fs::create_dir_all(&vm.dir).unwrap();
        for i in 0..(KEEP as u64 + 3) {
            let mut w = Watch::new("firmware", None, 0);
            w.boot.started_ms = i;
            save(&vm, &w.boot).unwrap();
            // Saved again with more phases: replaced, not added.
            w.boot.phases.push((Mark::Kernel, 5));
            save(&vm, &w.boot).unwrap();
        }
        let b = load(&vm).boots;
        assert_eq!(b.len(), KEEP);
        assert_eq!(b.last().unwrap().started_ms, KEEP as u64 + 2);
        assert_eq!(b[0].phases.len(), 1);
    }

    #[test]
    fn the_guests_network_is_seen_from_cloud_inits_network_stage_on() {
        let d = tempfile::tempdir().unwrap();
        let st = crate::store::Store::at(d.path().into(), d.path().join("run"));
        let vm = st.vm_paths(&"a".parse().unwrap());
        std::fs::create_dir_all(&vm.dir).unwrap();
        // No record (an older nox's VM): nothing to wait for.
        assert!(guest_network_seen(&vm));
        let mut w = Watch::new("direct", None, 0);
        w.boot.phases.push((Mark::Kernel, 5));
        w.boot.phases.push((Mark::CloudInitLocal, 9));
        save(&vm, &w.boot).unwrap();
        assert!(!guest_network_seen(&vm));
        w.boot.phases.push((Mark::CloudInitNetwork, 30));
        save(&vm, &w.boot).unwrap();
        assert!(guest_network_seen(&vm));
    }
}
