//! The user's own user-data: which kinds nox accepts, and the MIME multipart
//! document that carries it beside nox's cloud-config.

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::SeedError;

pub(super) enum UserDataKind {
    CloudConfig,
    Script,
}

/// Checks that user-data is a kind nox can merge, before anything is made.
pub fn check_user_data(s: &str) -> Result<(), SeedError> {
    classify_user_data(s).map(|_| ())
}

pub(super) fn classify_user_data(s: &str) -> Result<UserDataKind, SeedError> {
    let first = s.lines().next().unwrap_or("").trim_end();
    if first == "#cloud-config" {
        Ok(UserDataKind::CloudConfig)
    } else if first.starts_with("#!") {
        Ok(UserDataKind::Script)
    } else {
        // The file's content is never echoed: user-data often holds secrets.
        Err(SeedError::UnsupportedUserData(
            "it must start with a \"#cloud-config\" line or a \"#!\" script line".into(),
        ))
    }
}

pub(super) struct Part<'a> {
    pub(super) content_type: &'static str,
    pub(super) filename: &'static str,
    pub(super) merge_type: Option<&'static str>,
    pub(super) body: &'a str,
}

/// A MIME multipart/mixed document as cloud-init reads it (Python's `email`).
///
/// Hand-rolled: the mail crates add Date/Message-ID headers and random
/// boundaries, which would make the seed (and so the instance-id) change on
/// every render. Here the boundary is a hash of the parts, so it is stable and
/// cannot occur in them (checked anyway). Non-ASCII parts go as base64:
/// cloud-init parses the document from a str, and Python's get_payload(decode)
/// mangles non-ASCII 8bit text.
pub(super) fn multipart(parts: &[Part<'_>]) -> String {
    let mut salt = 0u32;
    let boundary = loop {
        let mut h = Sha256::new();
        h.update(salt.to_le_bytes());
        for p in parts {
            h.update((p.body.len() as u64).to_le_bytes());
            h.update(p.body.as_bytes());
        }
        let b = format!("nox-boundary-{}", &hex::encode(h.finalize())[..32]);
        if !parts.iter().any(|p| p.body.contains(&b)) {
            break b;
        }
        salt += 1;
    };
    let mut out =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    for p in parts {
        out.push_str(&format!("--{boundary}\n"));
        out.push_str(&format!(
            "Content-Type: {}; charset=\"utf-8\"\nMIME-Version: 1.0\n",
            p.content_type
        ));
        out.push_str(&format!(
            "Content-Disposition: attachment; filename=\"{}\"\n",
            p.filename
        ));
        if let Some(m) = p.merge_type {
            out.push_str(&format!("Merge-Type: {m}\n"));
        }
        if p.body.is_ascii() {
            out.push_str("Content-Transfer-Encoding: 7bit\n\n");
            out.push_str(p.body);
            if !p.body.ends_with('\n') {
                out.push('\n');
            }
        } else {
            out.push_str("Content-Transfer-Encoding: base64\n\n");
            let b64 = base64::engine::general_purpose::STANDARD.encode(p.body.as_bytes());
            for chunk in b64.as_bytes().chunks(76) {
                // base64 output is ASCII, so every chunk is valid UTF-8.
                out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
                out.push('\n');
            }
        }
    }
    out.push_str(&format!("--{boundary}--\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::seed::fixtures::*;
    use crate::guest::seed::{USER_MERGE_TYPE, render};

    #[test]
    fn combines_user_cloud_config() {
        let mut cfg = config();
        let theirs = "#cloud-config\npackages: [htop]\nruncmd:\n  - [touch, /tmp/x]\nusers:\n  - name: bob\n";
        cfg.user_data = Some(theirs.into());
        let seed = render(&cfg).unwrap();
        let head = seed.user_data.lines().next().unwrap();
        assert!(head.starts_with("Content-Type: multipart/mixed; boundary=\"nox-boundary-"));
        assert!(seed.user_data[..200].contains("\nMIME-Version: 1.0\n"));
        let parts = parts_of(&seed.user_data);
        assert_eq!(parts.len(), 2);
        // nox's part first, unmodified; no merge header (it is merged onto {}).
        assert!(parts[0].0.contains("Content-Type: text/cloud-config"));
        assert!(!parts[0].0.contains("Merge-Type"));
        let nox_only = render(&config()).unwrap().user_data;
        assert_eq!(parts[0].1, nox_only);
        // The user's part second, verbatim, with the append/merge rule.
        assert!(parts[1].0.contains("Content-Type: text/cloud-config"));
        assert!(
            parts[1]
                .0
                .contains(&format!("Merge-Type: {USER_MERGE_TYPE}"))
        );
        assert_eq!(parts[1].1, theirs);
    }

    #[test]
    fn combines_user_script_and_non_ascii() {
        let mut cfg = config();
        let script = "#!/bin/sh\necho 'grüße ✓' > /tmp/hello"; // no final newline
        cfg.user_data = Some(script.into());
        let seed = render(&cfg).unwrap();
        let parts = parts_of(&seed.user_data);
        assert_eq!(parts.len(), 2);
        assert!(parts[1].0.contains("Content-Type: text/x-shellscript"));
        assert!(parts[1].0.contains("Content-Transfer-Encoding: base64"));
        assert!(!parts[1].0.contains("Merge-Type"));
        assert_eq!(parts[1].1, script);
        assert!(seed.user_data.is_ascii());
    }

    #[test]
    fn rejects_unsupported_user_data() {
        for bad in [
            "",
            "packages: [htop]\n",
            "#cloud-config-archive\n- type: text/cloud-config\n",
            "#include\nhttp://example.invalid/x\n",
            "Content-Type: multipart/mixed\n",
            " #cloud-config\n",
        ] {
            let mut cfg = config();
            cfg.user_data = Some(bad.into());
            match render(&cfg) {
                Err(e @ SeedError::UnsupportedUserData(_)) => {
                    let msg = e.to_string();
                    assert!(msg.contains("#cloud-config") && msg.contains("#!"), "{msg}");
                    assert!(!msg.contains("htop") && !msg.contains("example"), "{msg}");
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        // CRLF files from Windows editors are fine.
        let mut cfg = config();
        cfg.user_data = Some("#cloud-config\r\npackages: [htop]\r\n".into());
        assert!(render(&cfg).is_ok());
    }
}
