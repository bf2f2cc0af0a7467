//! Shell completion, the man page, config.json's defaults, and every refusal
//! of `nox set` and `nox cp`. No VM boots (`--no-start`); these need
//! qemu-img (to make a small image) and bash.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPGgrCsLkEIaQwu5Z0P6/xbzjDTygp4wEJbs86l64pAp test@cliops";

/// What bash's completion function offers for `words` (the last one being
/// completed), run non-interactively against `nox completions bash`.
fn complete(h: &Home, words: &[&str]) -> Vec<String> {
    let script = h.ok(&["completions", "bash"]);
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_nox")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cur = words.last().unwrap();
    let prev = words[words.len() - 2];
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "{script}\nCOMP_WORDS=({}); COMP_CWORD={}; COMP_TYPE=9\n\
         _clap_complete_nox nox '{cur}' '{prev}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        quoted.join(" "),
        words.len() - 1
    );
    let out = Command::new("bash")
        .args(["--noprofile", "--norc", "-c", &prog])
        .env("PATH", path)
        .env("NOX_HOME", h.path())
        .env("HOME", h.path().join("home"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn bash_completes_vm_names_and_the_man_page_renders() {
    if !prereq(have("bash"), "bash not installed") {
        return;
    }
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    for n in ["alpha", "bravo"] {
        h.ok(&[
            "create",
            n,
            "--image",
            img,
            "--network",
            "user",
            "--no-start",
        ]);
    }
    let c = complete(&h, &["nox", "start", ""]);
    assert!(c.contains(&"alpha".to_string()), "{c:?}");
    assert!(c.contains(&"bravo".to_string()), "{c:?}");
    assert_eq!(complete(&h, &["nox", "ssh", "br"]), vec!["bravo"]);
    assert_eq!(complete(&h, &["nox", "set", "al"]), vec!["alpha"]);
    // cp offers NAME: for the guest side.
    let c = complete(&h, &["nox", "cp", "-r", "a"]);
    assert!(c.contains(&"alpha:".to_string()), "{c:?}");
    // A new VM's name is not an existing one.
    let c = complete(&h, &["nox", "create", ""]);
    assert!(!c.contains(&"alpha".to_string()), "{c:?}");
    let c = complete(&h, &["nox", "create", "--image", "debian-1"]);
    assert!(c.contains(&"debian-13".to_string()), "{c:?}");
    let c = complete(&h, &["nox", "sta"]);
    assert_eq!(c, vec!["start"]);

    for sh in ["zsh", "fish"] {
        let s = h.ok(&["completions", sh]);
        assert!(
            s.contains("COMPLETE=") || s.contains("COMPLETE "),
            "{sh}: {s}"
        );
    }
    let err = h.fails(&["completions", "tcsh"]);
    assert!(err.contains("invalid value 'tcsh'"), "{err}");
    assert!(err.contains("bash, zsh, fish"), "{err}");

    let man = h.ok(&["man"]);
    assert!(man.contains(".TH nox 1"), "{man}");
    assert!(man.contains("nox\\-set(1)"), "{man}");
    let dir = h.path().join("man1");
    h.ok(&["man", "--dir", dir.to_str().unwrap()]);
    let set = std::fs::read_to_string(dir.join("nox-set.1")).unwrap();
    assert!(set.contains("\\fBnox set\\fR"), "{set}");
    assert!(set.contains("\\-\\-disk"), "{set}");
}

fn spec_bytes(h: &Home, name: &str) -> Vec<u8> {
    std::fs::read(h.path().join("vms").join(name).join("spec.json")).unwrap()
}

fn disk_size(h: &Home, name: &str) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "-f", "qcow2", "--output=json"])
        .arg(h.path().join("vms").join(name).join("disk.qcow2"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[test]
fn set_refusals_change_nothing() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    h.ok(&[
        "create",
        "web",
        "--image",
        img,
        "--network",
        "user",
        "--cpus",
        "1",
        "--memory",
        "256M",
        "--disk",
        "2G",
        "--no-start",
    ]);
    let spec = spec_bytes(&h, "web");
    let cases: &[(&[&str], &str)] = &[
        (&["set", "web"], "required arguments"),
        (&["set", "web", "--cpus", "0"], "--cpus 0"),
        (&["set", "web", "--cpus", "100000"], "between 1 and 255"),
        (&["set", "web", "--cpus", "256"], "qemu's limit"),
        (&["set", "web", "--cpus", "two"], "invalid value"),
        (&["set", "web", "--memory", "12Q"], "--memory"),
        (&["set", "web", "--memory", "1024"], "add a unit"),
        (
            &["set", "web", "--memory", "100000G"],
            "more than this host",
        ),
        (&["set", "web", "--disk", "1G"], "disks only grow"),
        (&["set", "web", "--disk", "-1G"], "disks only grow"),
        (&["set", "web", "--disk", "+64T"], "more than 64T"),
        (&["set", "web", "--disk", "+1"], "add a unit"),
        // A valid change beside an invalid one: neither is made.
        (
            &["set", "web", "--cpus", "1", "--disk", "1G"],
            "disks only grow",
        ),
        (&["set", "ghost", "--cpus", "1"], "no VM named"),
        (&["set", "Bad", "--cpus", "1"], "invalid VM name"),
    ];
    for (args, want) in cases {
        let err = h.fails(args);
        assert!(err.contains(want), "nox {args:?}: want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(
            spec_bytes(&h, "web"),
            spec,
            "nox {args:?} changed spec.json"
        );
        assert_eq!(disk_size(&h, "web"), 2 << 30, "nox {args:?} resized");
    }

    // A VM whose lock is held (its supervisor is running) is refused.
    let held = nox::store::lock_file(&h.path().join("vms/web/lock"), false)
        .unwrap()
        .unwrap();
    let err = h.fails(&["set", "web", "--cpus", "1", "--disk", "+1G"]);
    assert!(err.contains("web is running; stop it first"), "{err}");
    assert_eq!(spec_bytes(&h, "web"), spec);
    assert_eq!(disk_size(&h, "web"), 2 << 30);
    drop(held);

    // Then it works: relative, then absolute growth.
    let cpus = if nox::model::spec::host_cpus() >= 2 {
        "2"
    } else {
        "1"
    };
    let out = h.ok(&[
        "set", "web", "--cpus", cpus, "--memory", "512M", "--disk", "+1G",
    ]);
    assert!(out.contains("root filesystem grows"), "{out}");
    let i = h.info("web");
    assert_eq!(i["cpus"].as_u64().unwrap().to_string(), cpus);
    assert_eq!(i["memory"], 512u64 << 20);
    assert_eq!(i["disk"], 3u64 << 30);
    assert_eq!(disk_size(&h, "web"), 3 << 30);
    h.ok(&["set", "web", "--disk", "4G"]);
    assert_eq!(disk_size(&h, "web"), 4 << 30);
    assert_eq!(h.info("web")["disk"], 4u64 << 30);
    // Same size: nothing to do, not an error.
    assert!(h.ok(&["set", "web", "--disk", "4G"]).contains("unchanged"));

    // More vCPUs than the host has: overcommit, allowed with a warning
    // (issue 18 item 12); qemu's bound for the machine stays the limit.
    let over = (nox::model::spec::host_cpus() + 1).to_string();
    let out = h.nox(&["set", "web", "--cpus", &over]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning:") && err.contains("overcommit"),
        "{err}"
    );
    assert_eq!(h.info("web")["cpus"].as_u64().unwrap().to_string(), over);
    let out = h.nox(&[
        "create",
        "many",
        "--image",
        img,
        "--network",
        "user",
        "--cpus",
        "255",
        "--no-start",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("255 vCPUs on a host with"), "{err}");
    let err = h.fails(&[
        "create",
        "more",
        "--image",
        img,
        "--network",
        "user",
        "--cpus",
        "256",
        "--no-start",
    ]);
    assert!(err.contains("between 1 and 255"), "{err}");
}

#[test]
fn cp_refusals() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    h.ok(&[
        "create",
        "web",
        "--image",
        img,
        "--network",
        "user",
        "--no-start",
    ]);
    let f = h.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let f = f.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["cp", f, "/tmp/y"], "neither"),
        (&["cp", "web:/a", "web:/b"], "both"),
        (&["cp", f, "ghost:/tmp/"], "no VM named \"ghost\""),
        (&["cp", "ghost:/etc/hostname", f], "no VM named \"ghost\""),
        (&["cp", f, "web:/tmp/"], "web is stopped"),
        (&["cp", "-r", "web:/tmp", f], "web is stopped"),
        (&["cp", "Web:/x", f], "./Web:/x"),
        (&["cp", f], "required"),
    ];
    for (args, want) in cases {
        let err = h.fails(args);
        assert!(err.contains(want), "nox {args:?}: want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(std::fs::read(f).unwrap(), b"x");
}

/// Issue 18 item 6: as root the default keys are root's (or SUDO_USER's),
/// from the passwd home: a `$HOME` the caller points elsewhere chooses none.
#[test]
fn default_ssh_keys_as_root_never_come_from_home_env() {
    let mut h = Home::new();
    h.env.push(("SUDO_USER".into(), String::new()));
    let Some(img) = small_image(&h) else { return };
    let ssh = h.path().join("home/.ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    std::fs::write(
        ssh.join("id_ed25519.pub"),
        KEY.replace("test@cliops", "evil@home"),
    )
    .unwrap();
    std::fs::write(ssh.join("id_ed25519"), "not read\n").unwrap();
    std::fs::set_permissions(
        ssh.join("id_ed25519"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let img = img.to_str().unwrap();
    let out = h.nox(&[
        "create",
        "k1",
        "--image",
        img,
        "--network",
        "user",
        "--no-start",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let spec = String::from_utf8(spec_bytes(&h, "k1")).unwrap();
    let home = h.path().join("home").display().to_string();
    if is_root() {
        assert!(
            !spec.contains("evil@home"),
            "$HOME's key authorised: {spec}"
        );
        assert!(!spec.contains(&home), "$HOME's identity recorded: {spec}");
        assert!(!err.contains(&home), "{err}");
    } else {
        assert!(spec.contains("evil@home"), "{spec}");
        assert!(
            err.contains("Authorised SSH key") && err.contains("id_ed25519.pub"),
            "{err}"
        );
    }
}

fn write_config(h: &Home, text: &str, mode: u32) -> std::path::PathBuf {
    let p = h.path().join("config.json");
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn config_defaults_apply_and_flags_win() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    std::fs::create_dir_all(h.path().join("home/keys")).unwrap();
    std::fs::write(h.path().join("home/keys/me.pub"), format!("{KEY}\n")).unwrap();

    // No file: the built-in defaults.
    let show: serde_json::Value =
        serde_json::from_str(&h.ok(&["config", "show", "--json"])).unwrap();
    assert_eq!(show["exists"], false);
    assert_eq!(show["defaults"]["image"], "debian-13");
    assert_eq!(show["defaults"]["memory"], "1G");
    assert_eq!(show["origin"]["memory"], "built-in");
    assert_eq!(show["defaults"]["warm"], false);

    let cfg = format!(
        r#"{{
  "mirror": "http://127.0.0.1:9/",
  "defaults": {{
    "image": "{img}",
    "cpus": 1,
    "memory": "256M",
    "disk": "3G",
    "network": "slirp",
    "ssh_keys": ["~/keys/me.pub"],
    "user": "alice",
    "warm": true
  }}
}}
"#
    );
    write_config(&h, &cfg, 0o600);
    let show: serde_json::Value =
        serde_json::from_str(&h.ok(&["config", "show", "--json"])).unwrap();
    assert_eq!(show["exists"], true);
    assert_eq!(show["defaults"]["image"], img);
    assert_eq!(show["defaults"]["cpus"], 1);
    assert_eq!(show["defaults"]["network"], "slirp");
    assert_eq!(show["defaults"]["user"], "alice");
    assert_eq!(show["origin"]["disk"], "config");
    assert_eq!(show["defaults"]["warm"], true);
    assert_eq!(show["origin"]["warm"], "config");
    let text = h.ok(&["config", "show"]);
    assert!(
        text.contains("256M") && text.contains("config.json"),
        "{text}"
    );
    // `~` is the caller's $HOME, except as root: root's passwd home (the
    // caller's environment is not believed), so root's create would read
    // /root/keys/me.pub; here the key is then named by its full path.
    let tilde = if is_root() {
        "/root/keys/me.pub".to_string()
    } else {
        h.path().join("home/keys/me.pub").display().to_string()
    };
    assert_eq!(show["defaults"]["ssh_keys"][0], tilde.as_str());
    if is_root() {
        let full = h.path().join("home/keys/me.pub");
        write_config(
            &h,
            &cfg.replace("~/keys/me.pub", full.to_str().unwrap()),
            0o600,
        );
    }

    // Config over built-ins.
    h.ok(&["create", "c1", "--no-start"]);
    let i = h.info("c1");
    assert_eq!(i["image"]["source"], img);
    assert_eq!(i["cpus"], 1);
    assert_eq!(i["memory"], 256u64 << 20);
    assert_eq!(i["disk"], 3u64 << 30);
    assert_eq!(i["network"], "slirp");
    assert_eq!(i["ssh"]["user"], "alice");
    let spec = String::from_utf8(spec_bytes(&h, "c1")).unwrap();
    assert!(
        spec.contains("test@cliops"),
        "the configured key is authorised"
    );

    // Flags over config.
    let other_key = h.path().join("home/other.pub");
    std::fs::write(&other_key, KEY.replace("test@cliops", "other@cliops")).unwrap();
    h.ok(&[
        "create",
        "c2",
        "--no-start",
        "--memory",
        "512M",
        "--disk",
        "4G",
        "--network",
        "user",
        "--user",
        "bob",
        "--ssh-key",
        other_key.to_str().unwrap(),
    ]);
    let i = h.info("c2");
    assert_eq!(i["memory"], 512u64 << 20);
    assert_eq!(i["disk"], 4u64 << 30);
    assert_eq!(i["network"], "user");
    assert_eq!(i["ssh"]["user"], "bob");
    assert_eq!(i["cpus"], 1, "unflagged values still come from config");
    let spec = String::from_utf8(spec_bytes(&h, "c2")).unwrap();
    assert!(spec.contains("other@cliops") && !spec.contains("test@cliops"));
}

#[test]
fn malformed_config_is_refused_naming_file_line_and_field() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    let create = [
        "create",
        "c3",
        "--image",
        img,
        "--network",
        "user",
        "--no-start",
    ];
    // (text, mode, what the error says, whether commands that read no
    // `defaults` still work: only not-JSON stops them)
    let cases: &[(&str, u32, &[&str], bool)] = &[
        (
            "{\n  \"defaults\": {\n    \"memory\": \"12Q\",\n    \"cpus\": 1\n  }\n}\n",
            0o600,
            &["line 3", "`defaults.memory`", "12Q"],
            true,
        ),
        (
            "{\n  \"defaults\": {\n    \"cpus\": 1,\n    \"memroy\": \"1G\"\n  }\n}\n",
            0o600,
            &["line 4", "`defaults.memroy`", "unknown field"],
            true,
        ),
        (
            "{\n  \"defaults\": {\n    \"network\": \"tap\"\n  }\n}\n",
            0o600,
            &["line 3", "`defaults.network`"],
            true,
        ),
        (
            "{\n  \"defaults\": {\n    \"image\": \"x\",\n  }\n}\n",
            0o600,
            &["line 4", "not valid JSON"],
            false,
        ),
        (
            "{\"defaults\": {\"cpus\": 1}}",
            0o666,
            &["not writable by group or others"],
            true,
        ),
    ];
    for (text, mode, wants, others_work) in cases {
        let path = write_config(&h, text, *mode);
        let list = h.nox(&["list"]);
        assert_eq!(
            list.status.success(),
            *others_work,
            "{text}: nox list: {list:?}"
        );
        for args in [&create[..], &["config", "show"][..]] {
            let err = h.fails(args);
            assert!(
                err.contains(&path.display().to_string()),
                "{text}: the file is not named: {err}"
            );
            for w in *wants {
                assert!(err.contains(w), "{text}: want {w:?} in {err}");
            }
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
        assert!(
            vm_dirs(&h).is_empty(),
            "{text}: a VM was made: {:?}",
            vm_dirs(&h)
        );
    }
    // An unknown top-level key (a typo of `defaults`) is named, not fatal.
    write_config(&h, "{\"defualts\": {\"cpus\": 1}}", 0o600);
    let out = h.nox(&["config", "show"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key \"defualts\""));
}

/// A bad value in `defaults` fails only what reads it (create, config
/// show): the store's other commands go on, and a VM made before can still
/// be listed, inspected and deleted. A bad mirror fails only a download.
#[test]
fn a_bad_config_part_fails_only_its_users() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    h.ok(&[
        "create",
        "old",
        "--image",
        img,
        "--network",
        "user",
        "--no-start",
    ]);
    let path = write_config(
        &h,
        "{\n  \"defaults\": {\n    \"memory\": \"12Q\"\n  },\n  \"mirrors\": {\"debian\": 5}\n}\n",
        0o600,
    );
    assert!(h.ok(&["list"]).contains("old"));
    h.info("old");
    let err = h.fails(&["create", "new", "--image", img, "--no-start"]);
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("line 3")
            && err.contains("`defaults.memory`"),
        "{err}"
    );
    let err = h.fails(&["image", "pull", "debian-13"]);
    assert!(
        err.contains("line 5") && err.contains("`mirrors.debian`"),
        "{err}"
    );
    h.ok(&["delete", "old"]);
    assert!(vm_dirs(&h).is_empty(), "{:?}", vm_dirs(&h));
}

/// The passt config.json `binaries` names is the one nox uses (issue 19):
/// doctor names it, not the system's.
#[test]
fn passt_is_the_one_config_json_binaries_names() {
    if std::env::var_os("NOX_PASST").is_some() && !is_root() {
        return; // $NOX_PASST comes first for users.
    }
    let h = Home::new();
    let bin = h.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = bin.join("renamed-passt");
    std::fs::write(
        &fake,
        "#!/bin/sh\ncase \"$1\" in --version) echo 'passt fake-1';; *) echo '--no-map-gw --fd';; esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_config(
        &h,
        &serde_json::json!({"binaries": {"passt": fake}}).to_string(),
        0o600,
    );
    let out = String::from_utf8(h.nox(&["doctor"]).stdout).unwrap();
    let line = out
        .lines()
        .find(|l| l.contains(" passt: "))
        .unwrap_or_default();
    assert!(
        line.starts_with("ok")
            && line.contains(&format!("passt: {} (passt fake-1", fake.display())),
        "{out}"
    );
}

/// Every qemu-img nox runs comes through the resolver that honours
/// config.json `binaries` (issue 19): a logging wrapper named there sees the
/// header probe and overlay of create, and the size check and resize of set.
#[test]
fn qemu_img_is_the_one_config_json_binaries_names() {
    if !prereq(
        is_root(),
        "needs root (binaries are honoured from a root-owned config.json)",
    ) {
        return;
    }
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let real = Command::new("sh")
        .args(["-c", "command -v qemu-img"])
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    assert!(!real.is_empty(), "qemu-img on PATH");
    let bin = h.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = h.path().join("qemu-img.log");
    let wrapper = bin.join("renamed-qemu-img");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$1\" >> {}\nexec {real} \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_config(
        &h,
        &serde_json::json!({"binaries": {"qemu-img": wrapper}}).to_string(),
        0o600,
    );
    h.ok(&[
        "create",
        "a",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--disk",
        "1G",
        "--no-start",
    ]);
    h.ok(&["set", "a", "--disk", "2G"]);
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let calls: Vec<&str> = calls.lines().collect();
    for sub in ["info", "create", "resize"] {
        assert!(
            calls.contains(&sub),
            "no qemu-img {sub} through binaries: {calls:?}"
        );
    }
}

/// ssh and scp come through the resolver that honours config.json
/// `binaries` too (issue 19): `nox ssh` and `nox cp` run the recording
/// fakes named there, not the system's clients. The VM is made to look
/// running (a state file with an ssh port, its lock held) without booting.
#[test]
fn ssh_and_scp_are_the_ones_config_json_binaries_names() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    h.ok(&[
        "create",
        "a",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--no-start",
    ]);
    let bin = h.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = h.path().join("clients.log");
    let mut binaries = serde_json::Map::new();
    for program in ["ssh", "scp"] {
        let fake = bin.join(format!("renamed-{program}"));
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho \"{program} $*\" >> {}\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        binaries.insert(program.into(), fake.to_str().unwrap().into());
    }
    write_config(
        &h,
        &serde_json::json!({ "binaries": binaries }).to_string(),
        0o600,
    );
    let vm = h.path().join("vms/a");
    let mut st = nox::store::state::State::new(nox::model::lifecycle::Phase::Running);
    st.ssh_port = Some(2222);
    nox::store::write_json(&vm.join("state.json"), &st).unwrap();
    let _lock = nox::store::lock_file(&vm.join("lock"), false)
        .unwrap()
        .expect("the VM's lock is free");
    h.ok(&["ssh", "a", "--", "true"]);
    h.ok(&["cp", "/etc/hostname", "a:/tmp/x"]);
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let calls: Vec<&str> = calls.lines().collect();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("ssh ") && c.contains("-p 2222")),
        "no ssh through binaries: {calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("scp -s ") && c.contains("-P 2222")),
        "no scp through binaries: {calls:?}"
    );
}
