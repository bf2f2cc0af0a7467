//! Text nox shows the operator: errors with their causes, and guest output
//! made safe for a terminal.

/// An error with its causes on one line (`a: b: c`).
///
/// nox's errors follow one convention: a message names its own layer only and
/// the cause sits in `source()`. The CLI prints the chain once; this is the
/// same rendering for the places that keep an error as text (state.json
/// reasons, `doctor` lines, logs). Other crates do not all follow that
/// convention (hyper repeats its cause), so a cause already said is skipped.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Guest output (the serial console) as text that cannot drive the
/// operator's terminal: every control character but newline and tab is
/// shown escaped (`\u{1b}]0;title\u{7}`), so a guest cannot retitle the
/// window, clear the screen or fake nox's own output. Invalid UTF-8 becomes
/// U+FFFD.
pub fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// JSON text with every C1 control (U+0080–U+009F) written as `\u00XX`.
/// serde_json leaves them raw, and on a terminal that reads 8-bit controls
/// U+009B is CSI: guest text in `--json` output could drive the terminal.
/// Raw characters other than ASCII appear only inside JSON strings, where
/// the escape means the same character, so the value is unchanged.
pub fn json_escape_c1(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if ('\u{80}'..='\u{9f}').contains(&c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_c1_controls_are_escaped_and_the_value_kept() {
        let v = serde_json::json!({"detail": "a\u{9b}2J\u{85}b\u{a0}é\u{1b}"});
        let raw = serde_json::to_string(&v).unwrap();
        assert!(raw.contains('\u{9b}'), "serde_json leaves C1 raw: {raw:?}");
        let safe = json_escape_c1(&raw);
        // U+00A0 (not a control) stays; ESC was already escaped by serde_json.
        assert_eq!(safe, "{\"detail\":\"a\\u009b2J\\u0085b\u{a0}é\\u001b\"}");
        assert!(!safe.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)));
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn escapes_terminal_controls_but_keeps_lines() {
        let evil = b"ok\n\x1b]0;pwned\x07\x1b[2J\r\tend\x9b1m\xff";
        let shown = printable(evil);
        assert!(
            !shown
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t')
        );
        assert_eq!(
            shown,
            "ok\n\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\r\tend\u{fffd}1m\u{fffd}"
        );
    }

    #[test]
    fn chains_causes_once() {
        let inner = std::io::Error::other("disk full");
        #[derive(Debug, thiserror::Error)]
        #[error("cannot save state")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(error_chain(&Outer(inner)), "cannot save state: disk full");
    }
}
