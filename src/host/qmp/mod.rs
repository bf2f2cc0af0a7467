//! QMP session: qapi's typed commands over a small transport of our own.
//!
//! qapi 0.15's own async stream is built on QEMU 9.1's schema and drops the
//! whole connection on any event it does not know (QEMU 10 emits such events),
//! so we only borrow its command structs (`qapi::qmp::*`) and their `Ok` types.
//! The transport here is newline-delimited JSON on a Unix socket: commands
//! carry a numeric `id`, a reader task matches replies by that id, and every
//! event is passed on raw (name, data, timestamp). The event receiver ends when
//! the connection closes, which is how a supervisor learns that qemu exited.
//!
//! qemu is jailed because it is assumed compromised, so what is read from it
//! is bounded: a line longer than [`MAX_LINE`] ends the session, and at most
//! [`EVENT_QUEUE`] events wait for their consumer (more are dropped, counted).
//! A socket found by path is spoken to only once its peer's credentials
//! passed the caller's check ([`Qmp::connect_checked`]).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

pub use qapi::qmp::QmpCommand;

/// Timeout used by [`Qmp::execute`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a stop presses the ACPI power button again while the guest has
/// not powered off ([`Qmp::powerdown_until`]).
pub const POWERDOWN_REPEAT: Duration = Duration::from_secs(10);
/// The longest line read from qemu (a reply or an event), newline
/// excluded. nox's replies are small (query-status, query-migrate, the block
/// nodes of a snapshot); a longer line ends the session instead of growing a
/// root process's buffer without end.
pub const MAX_LINE: usize = 4 << 20;
/// Events waiting for their consumer. A guest can make qemu emit events
/// faster than they are handled; past this many, new ones are dropped
/// (counted in the log) rather than queued without end. Replies are never
/// dropped: they go to their waiting command, not to this queue.
pub const EVENT_QUEUE: usize = 256;

/// The event stream of a session; ends when the connection closes.
pub type Events = mpsc::Receiver<Event>;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("QMP greeting from {path}: {reason}")]
    Greeting { path: PathBuf, reason: String },
    #[error("QMP socket {path}: refused to speak to its peer: {reason}")]
    Peer { path: PathBuf, reason: String },
    #[error("QMP {command}: i/o error")]
    Io { command: String, source: io::Error },
    #[error("QMP {command}: connection closed")]
    Closed { command: String },
    #[error("QMP {command}: no reply after {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP {command}: cannot encode the arguments")]
    Encode {
        command: String,
        source: serde_json::Error,
    },
    #[error("QMP {command}: cannot decode the reply")]
    Decode {
        command: String,
        source: serde_json::Error,
    },
}

impl QmpError {
    /// The QMP command this error is about (`None` for connect/greeting errors).
    pub fn command(&self) -> Option<&str> {
        match self {
            QmpError::Connect { .. } | QmpError::Greeting { .. } | QmpError::Peer { .. } => None,
            QmpError::Io { command, .. }
            | QmpError::Closed { command }
            | QmpError::Timeout { command, .. }
            | QmpError::Command { command, .. }
            | QmpError::Encode { command, .. }
            | QmpError::Decode { command, .. } => Some(command),
        }
    }
}

/// An asynchronous QMP event, kept as raw JSON so that events unknown to
/// qapi's schema pass through untouched.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    /// The event's `data` member; an empty object when QEMU sent none.
    pub data: Value,
    /// `(seconds, microseconds)` since the epoch, as QEMU stamped it.
    pub timestamp: Option<(i64, i64)>,
}

impl Event {
    /// `data.reason`, e.g. `"guest-shutdown"` for SHUTDOWN or `"host-qmp-quit"`.
    pub fn reason(&self) -> Option<&str> {
        self.data.get("reason").and_then(Value::as_str)
    }

    /// Decodes the data into qapi's typed event struct when the name matches,
    /// e.g. `ev.decode::<qapi::qmp::SHUTDOWN>()`. `None` if the name differs or
    /// the data does not fit the (QEMU 9.1) schema.
    pub fn decode<E: qapi::Event>(&self) -> Option<E> {
        if self.name != E::NAME {
            return None;
        }
        serde_json::from_value(self.data.clone()).ok()
    }
}

mod session;
mod wire;

pub use session::Qmp;
