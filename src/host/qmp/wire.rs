//! The QMP wire format, pure: one JSON message per line, what a line from
//! qemu means (reply, event, greeting) and how a command is encoded.

use std::io;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

use super::{Event, MAX_LINE};

/// What the reader task found in one line from QEMU.
#[derive(Debug, PartialEq)]
pub(super) enum Message {
    Event(Event),
    /// A reply: `Ok(return value)` or `Err((class, desc))`.
    Reply {
        id: Option<u64>,
        result: Result<Value, (String, String)>,
    },
    /// Valid JSON that is neither (e.g. a second greeting); logged and ignored.
    Other(Value),
}

pub(super) type Reply = Result<Value, (String, String)>;

pub(super) fn parse_message(v: Value) -> Message {
    let Value::Object(mut obj) = v else {
        return Message::Other(v);
    };
    if let Some(Value::String(name)) = obj.get("event") {
        let name = name.clone();
        let data = match obj.remove("data") {
            Some(d) => d,
            None => Value::Object(Default::default()),
        };
        let timestamp = obj.get("timestamp").and_then(|t| {
            Some((
                t.get("seconds")?.as_i64()?,
                t.get("microseconds")?.as_i64()?,
            ))
        });
        return Message::Event(Event {
            name,
            data,
            timestamp,
        });
    }
    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(ret) = obj.remove("return") {
        return Message::Reply {
            id,
            result: Ok(ret),
        };
    }
    if let Some(err) = obj.get("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        return Message::Reply {
            id,
            result: Err((field("class"), field("desc"))),
        };
    }
    Message::Other(Value::Object(obj))
}

/// Builds one command line (without the trailing newline).
pub(super) fn encode_command(
    name: &str,
    args: &Value,
    id: u64,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut msg = serde_json::Map::new();
    msg.insert("execute".into(), Value::String(name.into()));
    // Commands without members serialize to `{}`; QEMU accepts that, but leave
    // it out so the wire looks like what QEMU's own docs show.
    let empty = matches!(args, Value::Object(m) if m.is_empty()) || args.is_null();
    if !empty {
        msg.insert("arguments".into(), args.clone());
    }
    msg.insert("id".into(), Value::from(id));
    serde_json::to_vec(&Value::Object(msg))
}

/// `"10.0.2"` from a greeting line.
pub(super) fn parse_greeting(v: &Value) -> Option<String> {
    let q = v.get("QMP")?.get("version")?.get("qemu")?;
    let n = |k: &str| q.get(k).and_then(Value::as_u64);
    Some(format!("{}.{}.{}", n("major")?, n("minor")?, n("micro")?))
}

/// Reads the next JSON line (blank and non-JSON lines are skipped), at
/// most [`MAX_LINE`] bytes of it: a longer line is an `InvalidData` error.
pub(super) async fn read_json_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Value>> {
    loop {
        buf.clear();
        let limit = MAX_LINE as u64 + 1;
        if (&mut *reader).take(limit).read_until(b'\n', buf).await? == 0 {
            return Ok(None);
        }
        if buf.len() > MAX_LINE && buf.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("qemu sent a line longer than {MAX_LINE} bytes"),
            ));
        }
        let line = buf.trim_ascii();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice(line) {
            Ok(v) => return Ok(Some(v)),
            Err(e) => {
                let shown = &line[..line.len().min(200)];
                tracing::warn!(error = %e, line = %String::from_utf8_lossy(shown), "QMP: skipping non-JSON line")
            }
        }
    }
}

pub(super) fn status_from_reply(ret: Value) -> Result<String, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Raw {
        status: String,
    }
    serde_json::from_value::<Raw>(ret).map(|r| r.status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_event_with_timestamp_and_reason() {
        let m = parse_message(json!({"event": "SHUTDOWN",
            "data": {"guest": true, "reason": "guest-shutdown"},
            "timestamp": {"seconds": 1700000000, "microseconds": 42}}));
        let Message::Event(ev) = m else {
            panic!("not an event: {m:?}")
        };
        assert_eq!(ev.name, "SHUTDOWN");
        assert_eq!(ev.reason(), Some("guest-shutdown"));
        assert_eq!(ev.timestamp, Some((1700000000, 42)));
        let typed = ev.decode::<qapi::qmp::SHUTDOWN>().expect("typed SHUTDOWN");
        assert!(typed.guest);
        assert!(ev.decode::<qapi::qmp::STOP>().is_none());
    }

    #[test]
    fn event_without_data_gets_empty_object() {
        let Message::Event(ev) = parse_message(json!({"event": "STOP"})) else {
            panic!()
        };
        assert_eq!(ev.data, json!({}));
        assert_eq!(ev.timestamp, None);
        assert_eq!(ev.reason(), None);
        assert!(ev.decode::<qapi::qmp::STOP>().is_some());
    }

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse_message(json!({"return": {}, "id": 7})),
            Message::Reply {
                id: Some(7),
                result: Ok(json!({}))
            }
        );
        assert_eq!(
            parse_message(json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": 3})),
            Message::Reply {
                id: Some(3),
                result: Err(("CommandNotFound".into(), "nope".into()))
            }
        );
        // Replies QEMU sends without an id (e.g. to a malformed command).
        assert!(matches!(
            parse_message(json!({"error": {"class": "GenericError", "desc": "x"}})),
            Message::Reply { id: None, .. }
        ));
        assert!(matches!(parse_message(json!([1])), Message::Other(_)));
    }

    #[test]
    fn encodes_commands() {
        let line = encode_command("query-status", &json!({}), 5).unwrap();
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v, json!({"execute": "query-status", "id": 5}));
        let args = serde_json::to_value(qapi::qmp::qmp_capabilities {
            enable: Some(vec![qapi::qmp::QMPCapability::oob]),
        })
        .unwrap();
        let line = encode_command("qmp_capabilities", &args, 1).unwrap();
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1})
        );
    }

    #[test]
    fn greeting_version() {
        let g = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "Debian 1:10.0.2+ds-1"}, "capabilities": ["oob"]}});
        assert_eq!(parse_greeting(&g).as_deref(), Some("10.0.2"));
        assert_eq!(parse_greeting(&json!({"return": {}})), None);
    }

    #[test]
    fn status_accepts_unknown_run_state() {
        let r = json!({"running": false, "status": "some-future-state"});
        assert_eq!(status_from_reply(r).unwrap(), "some-future-state");
        assert!(status_from_reply(json!({})).is_err());
    }
}
