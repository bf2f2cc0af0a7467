//! A QMP session: the connection, the reader task that matches replies by
//! id and passes events on, and the typed commands nox sends.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::UCred;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::wire::{
    Message, Reply, encode_command, parse_greeting, parse_message, read_json_line,
    status_from_reply,
};
use super::{DEFAULT_TIMEOUT, EVENT_QUEUE, Event, Events, QmpCommand, QmpError};

/// Greeting and capability negotiation get at least this long, even when
/// waiting for the socket used up most of the connect timeout.
const HANDSHAKE_MIN: Duration = Duration::from_secs(2);
/// Pause between connection attempts while qemu creates its socket.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Default)]
pub(super) struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set by the reader on EOF; later commands fail at once with `Closed`.
    closed: bool,
}

pub(super) struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<Pending>>,
    next_id: AtomicU64,
    version: String,
    reader: AbortHandle,
}

impl Drop for Inner {
    // The last handle gone: stop reading, which also ends the event receiver.
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A QMP session. Cheap to clone; commands may run concurrently.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

pub(super) fn lock(p: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    // A poisoned lock only means another thread panicked mid-update of a map
    // of senders; the map itself is still usable.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) async fn connect_retry(path: &Path, deadline: Instant) -> Result<UnixStream, QmpError> {
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                // NotFound / ConnectionRefused are expected while qemu starts;
                // anything else is reported too once time is up.
                if Instant::now() + RETRY_INTERVAL >= deadline {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source: e,
                    });
                }
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
        }
    }
}

pub(super) async fn reader_loop(
    mut reader: BufReader<OwnedReadHalf>,
    pending: Arc<Mutex<Pending>>,
    events: mpsc::Sender<Event>,
) {
    let mut buf = Vec::new();
    let mut dropped = 0u64;
    loop {
        let v = match read_json_line(&mut reader, &mut buf).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                tracing::debug!("QMP: connection closed");
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                tracing::warn!("QMP: {e}; closing the session");
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "QMP: read failed");
                break;
            }
        };
        match parse_message(v) {
            Message::Event(ev) => {
                tracing::debug!(event = %ev.name, data = %ev.data, "QMP event");
                // Nobody listening is fine: commands still work. A full
                // queue drops the event: the reader never waits for the
                // consumer, so replies keep flowing.
                if let Err(mpsc::error::TrySendError::Full(ev)) = events.try_send(ev) {
                    dropped += 1;
                    if dropped.is_power_of_two() {
                        tracing::warn!(
                            "QMP: {dropped} event(s) dropped ({EVENT_QUEUE} already queued), \
                             the latest {}",
                            ev.name
                        );
                    }
                }
            }
            Message::Reply { id, result } => {
                let waiter = id.and_then(|id| lock(&pending).waiters.remove(&id));
                match waiter {
                    // The caller may have timed out meanwhile; nothing to do.
                    Some(tx) => drop(tx.send(result)),
                    None => tracing::warn!(?id, "QMP: reply matches no pending command"),
                }
            }
            Message::Other(v) => tracing::warn!(msg = %v, "QMP: unexpected message"),
        }
    }
    let mut p = lock(&pending);
    p.closed = true;
    // Dropping the senders wakes every waiting command with `Closed`.
    p.waiters.clear();
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until `timeout` while
    /// qemu creates it, reads the greeting and negotiates capabilities.
    ///
    /// The receiver yields every event; it ends (`None`) when the connection
    /// closes, i.e. when qemu exited, or when the last `Qmp` clone is dropped.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<(Qmp, Events), QmpError> {
        Qmp::connect_checked(path, timeout, |_| Ok::<_, std::convert::Infallible>(())).await
    }

    /// [`Qmp::connect`], but nothing is read or sent before `check` has
    /// accepted the peer's credentials (`SO_PEERCRED`): a socket found by
    /// path may not be the one it should be.
    pub async fn connect_checked<E: std::fmt::Display>(
        path: &Path,
        timeout: Duration,
        check: impl Fn(&UCred) -> Result<(), E>,
    ) -> Result<(Qmp, Events), QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = connect_retry(path, deadline).await?;
        let peer = |reason: String| QmpError::Peer {
            path: path.to_path_buf(),
            reason,
        };
        let cred = stream
            .peer_cred()
            .map_err(|e| peer(format!("cannot read its credentials: {e}")))?;
        check(&cred).map_err(|why| peer(why.to_string()))?;
        Qmp::handshake(stream, path, deadline).await
    }

    /// A session on a connected stream (one end of a socketpair whose other
    /// end qemu inherited): nothing to find by path, nobody else to reach.
    pub async fn from_stream(
        stream: UnixStream,
        label: &Path,
        timeout: Duration,
    ) -> Result<(Qmp, Events), QmpError> {
        Qmp::handshake(stream, label, Instant::now() + timeout).await
    }

    async fn handshake(
        stream: UnixStream,
        path: &Path,
        deadline: Instant,
    ) -> Result<(Qmp, Events), QmpError> {
        let handshake = deadline
            .saturating_duration_since(Instant::now())
            .max(HANDSHAKE_MIN);
        let greeting_err = |reason: String| QmpError::Greeting {
            path: path.to_path_buf(),
            reason,
        };

        let (rd, wr) = stream.into_split();
        let mut reader = BufReader::new(rd);
        let mut buf = Vec::new();
        let greeting = tokio::time::timeout(handshake, read_json_line(&mut reader, &mut buf))
            .await
            .map_err(|_| greeting_err(format!("none within {handshake:?}")))?
            .map_err(|e| greeting_err(e.to_string()))?
            .ok_or_else(|| greeting_err("connection closed".into()))?;
        let version = parse_greeting(&greeting)
            .ok_or_else(|| greeting_err(format!("not a QMP greeting: {greeting}")))?;

        let pending = Arc::new(Mutex::new(Pending::default()));
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let task = tokio::spawn(reader_loop(reader, pending.clone(), tx));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                writer: tokio::sync::Mutex::new(wr),
                pending,
                next_id: AtomicU64::new(1),
                version,
                reader: task.abort_handle(),
            }),
        };
        qmp.execute_timeout(qapi::qmp::qmp_capabilities { enable: None }, handshake)
            .await?;
        tracing::debug!(path = %path.display(), version = %qmp.inner.version, "QMP ready");
        Ok((qmp, rx))
    }

    /// QEMU's version from the greeting, e.g. `"10.0.2"`.
    pub fn greeting_version(&self) -> String {
        self.inner.version.clone()
    }

    /// Runs a typed command with the [`DEFAULT_TIMEOUT`].
    pub async fn execute<C: QmpCommand>(&self, cmd: C) -> Result<C::Ok, QmpError> {
        self.execute_timeout(cmd, DEFAULT_TIMEOUT).await
    }

    /// Runs a typed command; fails with `Timeout` if no reply within `t`.
    pub async fn execute_timeout<C: QmpCommand>(
        &self,
        cmd: C,
        t: Duration,
    ) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(&cmd).map_err(|source| QmpError::Encode {
            command: C::NAME.into(),
            source,
        })?;
        let ret = self.execute_raw(C::NAME, args, t).await?;
        serde_json::from_value(ret).map_err(|source| QmpError::Decode {
            command: C::NAME.into(),
            source,
        })
    }

    /// Runs a command by name with raw JSON arguments (`{}` or `null` for
    /// none) and returns the raw `return` value. For commands or replies that
    /// qapi's QEMU 9.1 schema does not describe.
    pub async fn execute_raw(
        &self,
        name: &str,
        args: Value,
        t: Duration,
    ) -> Result<Value, QmpError> {
        self.exchange(name, args, None, t).await
    }

    /// Hands qemu a descriptor (`SCM_RIGHTS`, sent with the command) under
    /// `fdname`, for commands that take one (`migrate` to `fd:NAME`): qemu
    /// gets an open file instead of a path it would open itself.
    pub async fn send_fd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let args = serde_json::json!({ "fdname": fdname });
        self.exchange("getfd", args, Some(fd), DEFAULT_TIMEOUT)
            .await
            .map(drop)
    }

    /// Adds a descriptor (`SCM_RIGHTS`, sent with the command) to a new fd
    /// set, tagged `opaque`, and returns the set's id: qemu opens
    /// `/dev/fdset/ID` as a dup of it (a block file it could not open by
    /// path in its jail).
    pub async fn add_fd(&self, opaque: &str, fd: BorrowedFd<'_>) -> Result<u64, QmpError> {
        let args = serde_json::json!({ "opaque": opaque });
        let ret = self
            .exchange("add-fd", args, Some(fd), DEFAULT_TIMEOUT)
            .await?;
        ret.get("fdset-id")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Command {
                command: "add-fd".into(),
                class: "nox".into(),
                desc: format!("no fdset-id in the reply {ret}"),
            })
    }

    async fn exchange(
        &self,
        name: &str,
        args: Value,
        fd: Option<BorrowedFd<'_>>,
        t: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = || QmpError::Closed {
            command: name.into(),
        };
        let mut line = encode_command(name, &args, id).map_err(|source| QmpError::Encode {
            command: name.into(),
            source,
        })?;
        line.push(b'\n');

        let rx = {
            let mut p = lock(&self.inner.pending);
            if p.closed {
                return Err(closed());
            }
            let (tx, rx) = oneshot::channel();
            p.waiters.insert(id, tx);
            rx
        };
        // Removes the waiter on every exit path (timeout, write error, caller
        // dropping the future) so the map cannot grow.
        let _guard = WaiterGuard {
            pending: &self.inner.pending,
            id,
        };

        let exchange = async {
            {
                let mut w = self.inner.writer.lock().await;
                tracing::debug!(command = name, id, "QMP ->");
                let write = async {
                    let mut rest = &line[..];
                    if let Some(fd) = fd {
                        let sent = send_with_fd(w.as_ref(), rest, fd).await?;
                        rest = &rest[sent..];
                    }
                    w.write_all(rest).await?;
                    w.flush().await
                };
                if let Err(source) = write.await {
                    // A peer that hung up shows as EPIPE here; report it as
                    // closed when the reader already saw EOF.
                    if lock(&self.inner.pending).closed {
                        return Err(closed());
                    }
                    return Err(QmpError::Io {
                        command: name.into(),
                        source,
                    });
                }
            }
            rx.await.map_err(|_| closed())
        };
        let reply = tokio::time::timeout(t, exchange)
            .await
            .map_err(|_| QmpError::Timeout {
                command: name.into(),
                after: t,
            })??;
        reply.map_err(|(class, desc)| QmpError::Command {
            command: name.into(),
            class,
            desc,
        })
    }

    /// The run state as QEMU names it: `"prelaunch"`, `"running"`, `"paused"`,
    /// `"internal-error"`, `"guest-panicked"`, `"shutdown"`, ... Read from the
    /// raw reply, so states newer than qapi's schema still come through.
    pub async fn query_status(&self) -> Result<String, QmpError> {
        let ret = self
            .execute_raw(
                <qapi::qmp::query_status as qapi::Command>::NAME,
                Value::Null,
                DEFAULT_TIMEOUT,
            )
            .await?;
        status_from_reply(ret).map_err(|source| QmpError::Decode {
            command: "query-status".into(),
            source,
        })
    }

    /// Asks the guest to power off (ACPI). The guest may ignore it.
    pub async fn powerdown(&self) -> Result<(), QmpError> {
        self.execute(qapi::qmp::system_powerdown {}).await.map(drop)
    }

    /// Presses the ACPI power button, and again every `every`, until `done`
    /// completes (its output) or `within` has passed (`None`). One press is
    /// not enough: the button is an edge, and a guest still booting (under
    /// load its sshd can answer before systemd-logind listens) loses it.
    /// A guest already shutting down ignores the later presses.
    pub async fn powerdown_until<F: std::future::Future>(
        &self,
        done: F,
        within: Duration,
        every: Duration,
    ) -> Option<F::Output> {
        let deadline = tokio::time::Instant::now() + within;
        tokio::pin!(done);
        loop {
            // Bounded: a qemu that does not answer must not eat the wait.
            let press = tokio::time::timeout(every, self.powerdown());
            tokio::select! {
                out = &mut done => return Some(out),
                _ = press => {}
            }
            let next = (tokio::time::Instant::now() + every).min(deadline);
            tokio::select! {
                out = &mut done => return Some(out),
                _ = tokio::time::sleep_until(next) => {}
            }
            if next >= deadline {
                return None;
            }
        }
    }

    /// Makes qemu exit. QEMU may close the connection before its reply
    /// arrives; that counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(qapi::qmp::quit {}).await {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(QmpError::Io { source, .. })
                if matches!(
                    source.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Sends the start of `data` with `fd` attached; returns how much was sent.
pub(super) async fn send_with_fd(
    s: &UnixStream,
    data: &[u8],
    fd: BorrowedFd<'_>,
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [fd.as_raw_fd()];
    loop {
        s.writable().await?;
        let sent = s.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<()>(
                s.as_raw_fd(),
                &[io::IoSlice::new(data)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

pub(super) struct WaiterGuard<'a> {
    pending: &'a Mutex<Pending>,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        lock(self.pending).waiters.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::qmp::MAX_LINE;
    use serde_json::json;
    use std::path::PathBuf;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    // --- a scripted fake QMP server on a Unix socket ---

    struct FakeConn {
        lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
        w: tokio::net::unix::OwnedWriteHalf,
    }

    impl FakeConn {
        async fn recv(&mut self) -> Value {
            let l = self
                .lines
                .next_line()
                .await
                .unwrap()
                .expect("client hung up");
            serde_json::from_str(&l).unwrap()
        }
        async fn send(&mut self, v: Value) {
            let mut s = v.to_string();
            s.push('\n');
            self.w.write_all(s.as_bytes()).await.unwrap();
        }
        /// Receives one command (asserting its name), returns its id.
        async fn expect(&mut self, name: &str) -> Value {
            let c = self.recv().await;
            assert_eq!(c["execute"], name, "command: {c}");
            c["id"].clone()
        }
    }

    /// Listens in a temp dir, accepts one client, sends the greeting and
    /// answers qmp_capabilities, then hands the connection to `script`.
    async fn fake_server<F, Fut>(script: F) -> (tempfile::TempDir, PathBuf)
    where
        F: FnOnce(FakeConn) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, w) = s.into_split();
            let mut c = FakeConn {
                lines: BufReader::new(r).lines(),
                w,
            };
            c.send(
                json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 99},
                "package": ""}, "capabilities": ["oob"]}}),
            )
            .await;
            let id = c.expect("qmp_capabilities").await;
            c.send(json!({"return": {}, "id": id})).await;
            script(c).await;
        });
        (dir, path)
    }

    fn status_reply(id: Value, status: &str) -> Value {
        json!({"return": {"running": status == "running", "status": status}, "id": id})
    }

    #[tokio::test]
    async fn unknown_event_passes_through_and_session_keeps_working() {
        let (_dir, path) = fake_server(|mut c| async move {
            let id = c.expect("query-status").await;
            c.send(
                json!({"event": "NOX_TEST_EVENT", "data": {"reason": "testing", "x": [1, 2]},
                "timestamp": {"seconds": 5, "microseconds": 6}}),
            )
            .await;
            c.send(status_reply(id, "running")).await;
            let id = c.expect("query-status").await;
            c.send(status_reply(id, "paused")).await;
        })
        .await;
        let (qmp, mut events) = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.greeting_version(), "99.2.0");
        let st = qmp.execute(qapi::qmp::query_status {}).await.unwrap();
        assert!(st.running);
        let ev = events.recv().await.unwrap();
        assert_eq!(ev.name, "NOX_TEST_EVENT");
        assert_eq!(ev.data, json!({"reason": "testing", "x": [1, 2]}));
        assert_eq!(ev.reason(), Some("testing"));
        assert_eq!(ev.timestamp, Some((5, 6)));
        assert_eq!(qmp.query_status().await.unwrap(), "paused");
        // The server script ended and closed the socket: the receiver ends.
        assert!(events.recv().await.is_none());
        assert!(matches!(
            qmp.query_status().await,
            Err(QmpError::Closed { .. })
        ));
    }

    #[tokio::test]
    async fn command_timeout_names_command() {
        let (_dir, path) = fake_server(|mut c| async move {
            c.expect("query-status").await;
            // Never answer; keep the connection open until the client is done.
            let _ = c.lines.next_line().await;
        })
        .await;
        let (qmp, _events) = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let t0 = std::time::Instant::now();
        let err = qmp
            .execute_timeout(qapi::qmp::query_status {}, Duration::from_millis(300))
            .await
            .unwrap_err();
        let took = t0.elapsed();
        match &err {
            QmpError::Timeout { command, after } => {
                assert_eq!(command, "query-status");
                assert_eq!(*after, Duration::from_millis(300));
            }
            e => panic!("expected timeout, got {e}"),
        }
        assert!(err.to_string().contains("query-status"), "{err}");
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2));
        // The waiter was cleaned up.
        assert!(lock(&qmp.inner.pending).waiters.is_empty());
    }

    #[tokio::test]
    async fn out_of_order_replies_are_matched_by_id() {
        let (_dir, path) = fake_server(|mut c| async move {
            let mut ids = HashMap::new();
            for _ in 0..2 {
                let cmd = c.recv().await;
                ids.insert(
                    cmd["execute"].as_str().unwrap().to_string(),
                    cmd["id"].clone(),
                );
            }
            // Answer the later command first.
            c.send(json!({"return": {"name": "vm0"}, "id": ids["query-name"]}))
                .await;
            c.send(status_reply(ids["query-status"].clone(), "paused"))
                .await;
            let _ = c.lines.next_line().await;
        })
        .await;
        let (qmp, _events) = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let (st, name) = tokio::join!(
            qmp.execute(qapi::qmp::query_status {}),
            qmp.execute(qapi::qmp::query_name {})
        );
        assert!(!st.unwrap().running);
        assert_eq!(name.unwrap().name.as_deref(), Some("vm0"));
    }

    #[tokio::test]
    async fn error_reply_gives_class_and_desc() {
        let (_dir, path) = fake_server(|mut c| async move {
            let id = c.expect("cont").await;
            c.send(json!({"error": {"class": "SomeNewClass", "desc": "boom"}, "id": id}))
                .await;
            let id = c.expect("query-status").await;
            c.send(status_reply(id, "some-future-state")).await;
            let id = c.expect("query-status").await;
            c.send(status_reply(id, "some-future-state")).await;
            let _ = c.lines.next_line().await;
        })
        .await;
        let (qmp, _events) = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        match qmp.execute(qapi::qmp::cont {}).await {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(
                    (command.as_str(), class.as_str(), desc.as_str()),
                    ("cont", "SomeNewClass", "boom")
                );
            }
            r => panic!("expected command error, got {:?}", r.map(drop)),
        }
        // A run state qapi's enum lacks: the typed decode fails, the helper works.
        assert!(matches!(
            qmp.execute(qapi::qmp::query_status {}).await,
            Err(QmpError::Decode { .. })
        ));
        assert_eq!(qmp.query_status().await.unwrap(), "some-future-state");
    }

    #[tokio::test]
    async fn quit_treats_hangup_as_success() {
        let (_dir, path) = fake_server(|mut c| async move {
            c.expect("quit").await;
            // Hang up without replying, as a quitting qemu may.
        })
        .await;
        let (qmp, mut events) = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        qmp.quit().await.unwrap();
        assert!(events.recv().await.is_none());
    }

    #[tokio::test]
    async fn connect_to_missing_path_fails_after_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("never.sock");
        let t0 = std::time::Instant::now();
        let err = match Qmp::connect(&path, Duration::from_millis(300)).await {
            Err(e) => e,
            Ok(_) => panic!("connected to nothing"),
        };
        let took = t0.elapsed();
        assert!(
            matches!(&err, QmpError::Connect { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(err.to_string().contains("never.sock"), "{err}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    /// A qemu sending a line without end: the session ends once the line
    /// passes MAX_LINE, with no more than that buffered.
    #[tokio::test]
    async fn an_over_long_line_ends_the_session() {
        let (_dir, path) = fake_server(|mut c| async move {
            let id = c.expect("query-status").await;
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..(MAX_LINE >> 20) + 2 {
                if c.w.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            // Too late: the reader gave up before this reply.
            let _ = c.w.write_all(b"\n").await;
            c.send(status_reply(id, "running")).await;
            let _ = c.lines.next_line().await;
        })
        .await;
        let (qmp, mut events) = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let r = qmp.query_status().await;
        assert!(matches!(r, Err(QmpError::Closed { .. })), "{r:?}");
        assert!(events.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_line_of_exactly_max_line_is_read() {
        let mut data = vec![b' '; MAX_LINE - 2];
        data[0] = b'{';
        data[MAX_LINE - 3] = b'}';
        data.push(b'\n');
        let mut r = BufReader::new(&data[..]);
        let mut buf = vec![];
        let v = read_json_line(&mut r, &mut buf).await.unwrap();
        assert_eq!(v, Some(json!({})));
        let mut long = vec![b' '; MAX_LINE + 1];
        long.push(b'\n');
        let mut r = BufReader::new(&long[..]);
        let e = read_json_line(&mut r, &mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(buf.len() <= MAX_LINE + 1);
    }

    /// A flood of events nobody consumes: at most EVENT_QUEUE wait, the rest
    /// are dropped, and replies still arrive.
    #[tokio::test]
    async fn an_event_flood_is_bounded_and_replies_still_come() {
        let (_dir, path) = fake_server(|mut c| async move {
            for i in 0..EVENT_QUEUE * 4 {
                c.send(json!({"event": "RTC_CHANGE", "data": {"offset": i}}))
                    .await;
            }
            let id = c.expect("query-status").await;
            c.send(status_reply(id, "running")).await;
            let _ = c.lines.next_line().await;
        })
        .await;
        let (qmp, mut events) = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.query_status().await.unwrap(), "running");
        let mut n = 0;
        while let Ok(Some(ev)) =
            tokio::time::timeout(Duration::from_millis(200), events.recv()).await
        {
            // The oldest are kept: the queue was full when the rest came.
            assert_eq!(ev.data["offset"], n);
            n += 1;
        }
        assert_eq!(n, EVENT_QUEUE);
    }

    /// A descriptor handed over with `getfd` arrives with the command.
    #[tokio::test]
    async fn send_fd_passes_a_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
            use std::io::Write;
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}}}}\n")
                .unwrap();
            let mut got_fd = None;
            let mut text = vec![];
            let mut answered = 0;
            // qmp_capabilities, then getfd with the descriptor.
            while answered < 2 {
                let mut buf = [0u8; 4096];
                let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let msg =
                    recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
                        .unwrap();
                for c in msg.cmsgs().unwrap() {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        got_fd = fds.first().copied();
                    }
                }
                let n = msg.bytes;
                assert!(n > 0, "client hung up");
                text.extend_from_slice(&buf[..n]);
                while let Some(nl) = text.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = text.drain(..=nl).collect();
                    let v: Value = serde_json::from_slice(&line).unwrap();
                    let reply = format!("{{\"return\": {{}}, \"id\": {}}}\n", v["id"]);
                    s.write_all(reply.as_bytes()).unwrap();
                    answered += 1;
                }
            }
            let fd = got_fd.expect("a descriptor came with getfd");
            // SAFETY: received just now, owned by nobody else.
            let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            f.write_all(b"through the fd").unwrap();
        });
        let (qmp, _events) = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        qmp.send_fd("x", std::os::fd::AsFd::as_fd(&theirs))
            .await
            .unwrap();
        drop(theirs);
        server.join().unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut ours, &mut got).unwrap();
        assert_eq!(got, "through the fd");
    }

    #[tokio::test]
    async fn not_a_qmp_server_gives_greeting_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"hello\": 1}\n").await.unwrap();
            let _ = s.read_u8().await;
        });
        let err = match Qmp::connect(&path, Duration::from_secs(2)).await {
            Err(e) => e,
            Ok(_) => panic!("accepted a non-QMP greeting"),
        };
        assert!(matches!(err, QmpError::Greeting { .. }), "{err}");
    }
}
