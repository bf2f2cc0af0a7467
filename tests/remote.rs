//! `nox --host ssh://…` against a real sshd that each test starts on
//! 127.0.0.1 with its own host key, client key, authorized_keys and config
//! (killed when the test ends, pass or fail). The "remote" nox is this
//! build's, on another state directory (NOX_REMOTE_BIN sets its NOX_HOME);
//! the local nox reaches sshd through an ssh that config.json `binaries`
//! names (a wrapper giving ssh the test's client config), so root's own
//! ~/.ssh is neither used nor touched. No VM boots. Root only (sshd needs
//! it to log a user in); NOX_E2E=require makes a skip a failure.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::sshd::{Sshd, free_port, quote, write_exec};
use common::*;

/// The words that run this build's nox on the `remote` home.
fn remote_nox(remote: &Home) -> Vec<String> {
    vec![
        "env".into(),
        format!("NOX_HOME={}", remote.path().display()),
        format!("HOME={}", remote.path().join("home").display()),
        env!("CARGO_BIN_EXE_nox").into(),
    ]
}

fn words(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn with_host<'a>(url: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--host", url];
    a.extend_from_slice(args);
    a
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

#[test]
fn list_info_and_failures_are_the_same_as_locally() {
    let Some(sshd) = Sshd::start() else { return };
    let remote = Home::new();
    let Some(img) = small_image(&remote) else {
        return;
    };
    remote.ok(&[
        "create",
        "web",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--no-start",
    ]);
    let bin = remote_nox(&remote);
    let h = sshd.local(&words(&bin));
    let url = sshd.url();
    for args in [
        &["list", "--json"][..],
        &["list"],
        &["info", "web", "--json"],
        &["info", "web"],
        &["config", "show", "--json"],
        &["version", "--json"],
    ] {
        assert_eq!(
            h.ok(&with_host(&url, args)),
            remote.ok(args),
            "nox {args:?} differs over ssh"
        );
    }
    // NOX_HOST does what --host does; an empty --host is this host.
    let mut via_env = sshd.local(&words(&bin));
    via_env.env.push(("NOX_HOST".into(), url.clone()));
    assert_eq!(
        via_env.ok(&["list", "--json"]),
        remote.ok(&["list", "--json"])
    );
    assert_eq!(via_env.ok(&["--host=", "list", "--json"]), "[]\n");
    // An IPv6 host in brackets.
    if sshd.v6 {
        let url6 = format!("ssh://root@[::1]:{}", sshd.port);
        assert_eq!(
            h.ok(&with_host(&url6, &["list", "--json"])),
            remote.ok(&["list", "--json"])
        );
    } else {
        eprintln!("no IPv6 loopback here: ssh://[::1] not tried");
    }

    // A failing command: the same exit code and stderr as locally.
    for args in [
        &["info", "nosuch"][..],
        &["set", "web", "--cpus", "0"],
        &["delete", "nosuch"],
        &["image", "rm", "nosuch"],
    ] {
        let (there, here) = (h.nox(&with_host(&url, args)), remote.nox(args));
        assert!(!here.status.success(), "{args:?} should fail");
        assert_eq!(code(&there), code(&here), "exit code of {args:?}");
        assert_eq!(
            String::from_utf8_lossy(&there.stderr),
            String::from_utf8_lossy(&here.stderr),
            "stderr of {args:?}"
        );
        assert_eq!(there.stdout, here.stdout);
    }
    // A usage error is found here, before any connection.
    let o = h.nox(&with_host(&url, &["info"]));
    assert_eq!(code(&o), Some(2));
}

#[test]
fn create_and_delete_through_host() {
    let Some(sshd) = Sshd::start() else { return };
    let remote = Home::new();
    let Some(img) = small_image(&remote) else {
        return;
    };
    let h = sshd.local(&words(&remote_nox(&remote)));
    let url = sshd.url();
    let out = h.ok(&with_host(
        &url,
        &[
            "create",
            "far",
            "--image",
            img.to_str().unwrap(),
            "--network",
            "user",
            "--memory",
            "256M",
            "--no-start",
        ],
    ));
    assert!(out.contains("far"), "{out}");
    assert_eq!(remote.info("far")["state"], "stopped");
    assert!(vm_dirs(&h).is_empty(), "nothing is created locally");
    h.ok(&with_host(&url, &["delete", "far"]));
    assert_eq!(remote.ok(&["list", "--json"]), "[]\n");
}

/// Words that a shell would act on arrive as words: checked against a fake
/// remote nox that records its arguments, then against the real one.
#[test]
fn hostile_words_are_not_shell_syntax_remotely() {
    let Some(sshd) = Sshd::start() else { return };
    let d = sshd.dir.path();
    let canary = d.join("canary");
    let c = canary.display().to_string();
    let hostile: Vec<String> = vec![
        format!("; touch {c}"),
        format!("$(touch {c})"),
        format!("`touch {c}`"),
        format!("it's \"quoted\" && touch {c}"),
        format!("x\ntouch {c}"),
        format!("| touch {c}"),
        String::new(),
        "*".into(),
        "~".into(),
        "$HOME".into(),
        "--host=ssh://elsewhere".into(),
    ];

    // The fake: its arguments NUL-separated into a file, stdin to stdout,
    // exit 7; `version --json` answers this version.
    let args_file = d.join("args");
    let fake = d.join("fake-nox");
    write_exec(
        &fake,
        &format!(
            "#!/bin/sh\n\
             if [ \"$2\" = version ]; then echo '{{\"version\":\"{v}\"}}'; exit 0; fi\n\
             printf '%s\\0' \"$@\" > {args}\ncat\nexit 7\n",
            v = env!("CARGO_PKG_VERSION"),
            args = args_file.display()
        ),
    );
    let h = sshd.local(&[fake.to_str().unwrap()]);
    let url = sshd.url();
    let mut argv: Vec<&str> = vec!["--host", &url, "ssh", "vm", "--"];
    argv.extend(hostile.iter().map(String::as_str));
    let mut child = Command::new(env!("CARGO_BIN_EXE_nox"))
        .args(&argv)
        .env("NOX_HOME", h.path())
        .envs(h.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"stdin reaches the remote nox\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(code(&out), Some(7), "the remote exit code");
    assert_eq!(out.stdout, b"stdin reaches the remote nox\n");
    let got = std::fs::read(&args_file).unwrap();
    let got: Vec<String> = got
        .split(|b| *b == 0)
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect();
    let mut want: Vec<String> = ["--host=", "ssh", "vm", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    want.extend(hostile.iter().cloned());
    want.push(String::new()); // after the last NUL
    assert_eq!(got, want);

    // The real nox, with names it takes as plain strings: the same refusal
    // as locally, naming the word as typed.
    let remote = Home::new();
    let h = sshd.local(&words(&remote_nox(&remote)));
    for w in &hostile {
        let args = &["image", "rm", w.as_str()];
        let (there, here) = (h.nox(&with_host(&url, args)), remote.nox(args));
        assert_eq!(code(&there), code(&here), "{args:?}");
        assert_eq!(there.stderr, here.stderr, "{args:?}");
    }
    assert!(!canary.exists(), "a remote shell ran a word");
}

#[test]
fn version_mismatch_missing_nox_and_unreachable_host_are_clear() {
    let Some(sshd) = Sshd::start() else { return };
    let d = sshd.dir.path();
    let old = d.join("old-nox");
    write_exec(
        &old,
        "#!/bin/sh\necho \"$*\" >> \"$0.calls\"\necho '{\"version\":\"0.0.9\"}'\n",
    );
    let url = sshd.url();
    let h = sshd.local(&[old.to_str().unwrap()]);
    let o = h.nox(&with_host(&url, &["list"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), Some(255));
    assert!(
        err.contains(&format!("this host has nox {}", env!("CARGO_PKG_VERSION")))
            && err.contains(&format!("{url} has nox 0.0.9")),
        "{err}"
    );
    assert!(o.stdout.is_empty());
    let calls = std::fs::read_to_string(d.join("old-nox.calls")).unwrap();
    assert_eq!(
        calls, "--host= version --json\n",
        "only the version was asked"
    );

    let h = sshd.local(&["/nonexistent/nox"]);
    let o = h.nox(&with_host(&url, &["list"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), Some(255));
    assert!(
        err.contains(&format!("no nox on {url}")) && err.contains("NOX_REMOTE_BIN"),
        "{err}"
    );

    let closed = format!("ssh://root@127.0.0.1:{}", free_port());
    let o = h.nox(&with_host(&closed, &["list"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), Some(255));
    assert!(
        err.starts_with(&format!("error: cannot reach {closed} over ssh: "))
            && err.contains("Connection refused"),
        "{err}"
    );

    // A key sshd does not know: refused at once (BatchMode: no prompt).
    std::fs::write(d.join("authorized_keys"), "").unwrap();
    let h = sshd.local(&["nox"]);
    let o = h.nox(&with_host(&url, &["list"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), Some(255));
    assert!(
        err.contains("cannot reach") && err.contains("Permission denied"),
        "{err}"
    );
}

/// The verbs that hold the terminal get one on the other side when this
/// side has one (under `script`, a pty); the others, and every verb without
/// a terminal here, run without (their output byte-exact).
#[test]
fn terminal_verbs_get_a_terminal_there() {
    let Some(sshd) = Sshd::start() else { return };
    if !prereq(have("script"), "no script (util-linux)") {
        return;
    }
    let d = sshd.dir.path();
    let fake = d.join("tty-nox");
    write_exec(
        &fake,
        &format!(
            "#!/bin/sh\n\
             if [ \"$2\" = version ]; then echo '{{\"version\":\"{v}\"}}'; exit 0; fi\n\
             if [ -t 0 ] && [ -t 1 ]; then echo \"tty $2\"; else echo \"no tty $2\"; fi\n",
            v = env!("CARGO_PKG_VERSION"),
        ),
    );
    let h = sshd.local(&[fake.to_str().unwrap()]);
    let url = sshd.url();
    let in_pty = |args: &[&str]| -> String {
        let t0 = Instant::now();
        let mut line = vec![env!("CARGO_BIN_EXE_nox"), "--host", &url];
        line.extend_from_slice(args);
        let out = Command::new("script")
            .args(["-q", "-e", "-c", &quote(&line), "/dev/null"])
            .env("NOX_HOME", h.path())
            .envs(h.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // script echoes the end of its (empty) input as "^@" or "^D".
        let text = String::from_utf8_lossy(&out.stdout)
            .replace('\r', "")
            .replace("^@", "")
            .replace("^D", "");
        eprintln!("{args:?} in a pty ({:?}): {text}", t0.elapsed());
        text
    };
    for (args, want) in [
        (&["ssh", "vm"][..], "tty ssh"),
        (&["console", "vm"], "tty console"),
        (&["logs", "-f", "vm"], "tty logs"),
        (&["events", "-f"], "tty events"),
        (&["logs", "vm"], "no tty logs"),
        (&["list"], "no tty list"),
    ] {
        assert!(
            in_pty(args).lines().any(|l| l == want),
            "{args:?}: want {want:?}"
        );
    }
    assert_eq!(h.ok(&with_host(&url, &["ssh", "vm"])), "no tty ssh\n");
}
