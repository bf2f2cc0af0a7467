"""A small, typed Python client for nox (cloud-image VMs on qemu, no libvirt).

It runs the ``nox`` binary with ``--json`` and turns what it prints into
Python objects; nothing but the standard library is used (Python >= 3.9).

    import noxvm

    vm = noxvm.create(image="debian-13", cpus=2, memory="2G")  # waits for SSH + cloud-init
    print(vm.name, vm.ssh_host, vm.ssh_port)
    for ev in noxvm.events(vm.name, follow=False):
        print(ev.time, ev.type, ev.fields)
    noxvm.delete(vm.name, force=True)

Every failure of nox is raised as :class:`NoxError`, carrying nox's own
message (its ``error: ...`` line) and exit code. Use :class:`Nox` to choose
the binary (``binary=``, default ``$NOX_BIN`` or ``nox`` on PATH), the
state directory (``home=``, i.e. ``NOX_HOME``) and the host (``host=``,
``ssh://[USER@]HOST[:PORT]``: nox runs there, ``nox --host``); the
module-level functions use a default :class:`Nox`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

__all__ = [
    "Event",
    "Nox",
    "NoxError",
    "Vm",
    "create",
    "delete",
    "events",
    "info",
    "list",
    "start",
    "stop",
]

#: The version of ``nox events --json`` lines this client reads.
EVENTS_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


class NoxError(Exception):
    """nox failed: ``message`` is what nox said (without ``error:``),
    ``returncode`` its exit code, ``argv`` the command that was run."""

    def __init__(self, message: str, returncode: Optional[int], argv: Sequence[str] = (), stderr: str = ""):
        super().__init__(message)
        self.message = message
        self.returncode = returncode
        self.argv = [str(a) for a in argv]
        self.stderr = stderr

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Vm:
    """A VM as ``nox info --json`` shows it (``raw`` has every field)."""

    name: str
    state: str
    reason: Optional[str]
    #: The guest's IPv4 address on a bridge; None with user-mode networking.
    ip: Optional[str]
    #: Where to SSH to: ``ip`` on a bridge, 127.0.0.1 with user-mode networking.
    ssh_host: Optional[str]
    ssh_port: Optional[int]
    ssh_user: str
    #: nox's private key for this VM (always authorised in the guest).
    ssh_key: str
    cpus: int
    #: Bytes.
    memory: int
    #: Bytes.
    disk: int
    image: str
    network: str
    raw: Dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Vm":
        ssh = d.get("ssh") or {}
        return cls(
            name=d["name"],
            state=d["state"],
            reason=d.get("reason"),
            ip=d.get("ip"),
            ssh_host=ssh.get("host"),
            ssh_port=d.get("ssh_port"),
            ssh_user=ssh.get("user", ""),
            ssh_key=ssh.get("identity", ""),
            cpus=d["cpus"],
            memory=d["memory"],
            disk=d["disk"],
            image=(d.get("image") or {}).get("source", ""),
            network=d.get("network", ""),
            raw=dict(d),
        )

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True)
class Event:
    """One line of ``nox events --json``: ``type`` (``created``, ``state``,
    ``ip``, ``ssh-ready``, ``cloud-init``, ``restart``, ``deleted``, ...),
    the VM, the time, and the type's own fields."""

    type: str
    vm: str
    time: datetime
    fields: Dict[str, Any]
    version: int = EVENTS_VERSION
    raw: Dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Event":
        rest = {k: v for k, v in d.items() if k not in ("v", "type", "vm", "time")}
        return cls(
            type=d["type"],
            vm=d["vm"],
            time=_parse_time(d["time"]),
            fields=rest,
            version=d.get("v", EVENTS_VERSION),
            raw=dict(d),
        )


def _parse_time(s: str) -> datetime:
    # Python < 3.11 does not read a "Z" suffix.
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    return datetime.fromisoformat(s)


def _since(since: Union[None, str, datetime]) -> Optional[str]:
    if since is None or isinstance(since, str):
        return since
    if since.tzinfo is None:
        raise ValueError("since: give an aware datetime (with a timezone)")
    return since.isoformat()


def _size(v: Union[str, int]) -> str:
    """Sizes as nox reads them: an int is bytes."""
    return f"{v}B" if isinstance(v, int) else v


class Nox:
    """A nox installation: which binary, which state directory, which host.

    ``host``: ``ssh://[USER@]HOST[:PORT]`` runs every command on that host's
    nox (``nox --host``; see docs/multi-host.md); ``""`` is this host even
    when ``$NOX_HOST`` is set; None leaves ``$NOX_HOST`` to decide. With a
    host, ``home`` is still this host's state directory (whose config.json
    may name the ssh to use); the other host uses its own."""

    def __init__(
        self,
        binary: Optional[PathLike] = None,
        home: Optional[PathLike] = None,
        env: Optional[Mapping[str, str]] = None,
        host: Optional[str] = None,
    ):
        self.binary = os.fspath(binary) if binary is not None else os.environ.get("NOX_BIN", "nox")
        self.env = dict(os.environ if env is None else env)
        self.host = host
        if home is not None:
            self.env["NOX_HOME"] = os.fspath(home)

    # -- running nox -------------------------------------------------------

    def _argv(self, args: Iterable[Any]) -> List[str]:
        # --host goes before the command's name (nox reads it only there).
        host = [] if self.host is None else [f"--host={self.host}"]
        return [self.binary, *host] + [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]

    def run(self, *args: Any) -> str:
        """Runs ``nox ARGS...``; returns its stdout, raises NoxError on failure."""
        argv = self._argv(args)
        try:
            p = subprocess.run(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                universal_newlines=True,
            )
        except OSError as e:
            raise NoxError(f"cannot run {self.binary}: {e.strerror or e}", None, argv) from e
        if p.returncode != 0:
            raise NoxError(_message(p.stderr, p.returncode), p.returncode, argv, p.stderr)
        return p.stdout

    def _json(self, *args: Any) -> Any:
        out = self.run(*args)
        try:
            return json.loads(out)
        except ValueError as e:
            raise NoxError(f"nox printed something that is not JSON: {out[:200]!r}", 0, self._argv(args)) from e

    # -- VMs ---------------------------------------------------------------

    def create(
        self,
        name: Optional[str] = None,
        image: Optional[str] = None,
        cpus: Optional[int] = None,
        memory: Union[None, str, int] = None,
        disk: Union[None, str, int] = None,
        *,
        wait: bool = True,
        start: bool = True,
        timeout: Optional[int] = None,
        network: Optional[str] = None,
        accel: Optional[str] = None,
        arch: Optional[str] = None,
        user: Optional[str] = None,
        ssh_keys: Sequence[PathLike] = (),
        user_data: Optional[PathLike] = None,
        publish: Sequence[str] = (),
        restart: Optional[str] = None,
        extra_args: Sequence[str] = (),
    ) -> Vm:
        """``nox create``: defines the VM and (unless ``start=False``)
        starts it; with ``wait`` (the default) returns once SSH answers and
        cloud-init is done. ``memory``/``disk``: ``"2G"`` or bytes. Options
        left at None take nox's defaults. Without ``name`` nox generates one.
        A failed wait leaves the VM running (as nox does): delete it if you
        do not want it."""
        args: List[Any] = ["create"]
        if name is not None:
            args.append(name)
        opts: List[Any] = [
            ("--image", image),
            ("--cpus", cpus),
            ("--memory", None if memory is None else _size(memory)),
            ("--disk", None if disk is None else _size(disk)),
            ("--network", network),
            ("--accel", accel),
            ("--arch", arch),
            ("--user", user),
            ("--user-data", user_data),
            ("--restart", restart),
            ("--timeout", timeout),
        ]
        for flag, value in opts:
            if value is not None:
                args += [flag, value]
        for k in ssh_keys:
            args += ["--ssh-key", k]
        for p in publish:
            args += ["--publish", p]
        if not start:
            args.append("--no-start")
        elif wait:
            args.append("--wait")
        args += [*extra_args]
        args.append("--json")
        return Vm.from_json(self._json(*args))

    def info(self, name: str) -> Vm:
        """``nox info NAME --json``."""
        return Vm.from_json(self._json("info", name, "--json"))

    def list(self) -> List[Vm]:
        """``nox list --json``: every VM."""
        return [Vm.from_json(d) for d in self._json("list", "--json")]

    def start(self, name: str, wait: bool = False, timeout: Optional[int] = None) -> Vm:
        """``nox start``; with ``wait``: until SSH and cloud-init are ready."""
        args: List[Any] = ["start", name]
        if wait:
            args.append("--wait")
        if timeout is not None:
            args += ["--timeout", timeout]
        self.run(*args)
        return self.info(name)

    def stop(self, name: str, force: bool = False, timeout: Optional[int] = None) -> Vm:
        """``nox stop`` (ACPI powerdown; forced after ``timeout`` seconds)."""
        args: List[Any] = ["stop", name]
        if force:
            args.append("--force")
        if timeout is not None:
            args += ["--timeout", timeout]
        self.run(*args)
        return self.info(name)

    def delete(self, name: str, force: bool = False) -> None:
        """``nox delete``; ``force`` also stops a running VM first."""
        args: List[Any] = ["delete", name]
        if force:
            args.append("--force")
        self.run(*args)

    def ssh(self, name: str, *command: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
        """Runs a command in the guest (``nox ssh NAME -- COMMAND``; host
        key pinned). With ``check``, a non-zero exit raises NoxError."""
        argv = self._argv(["ssh", name, "--", *command])
        p = subprocess.run(
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
        )
        if check and p.returncode != 0:
            raise NoxError(_message(p.stderr, p.returncode), p.returncode, argv, p.stderr)
        return p

    def events(
        self,
        name: Optional[str] = None,
        since: Union[None, str, datetime] = None,
        follow: bool = True,
    ) -> Iterator[Event]:
        """``nox events --json``: a generator of :class:`Event`, oldest
        first. ``since``: ``"10m"``, an RFC 3339 time or an aware datetime
        (the recent past first). ``follow`` (default): keep waiting for new
        events until the generator is closed (``break`` or ``.close()``
        stops nox). Events of types this client does not know are yielded
        too."""
        args: List[Any] = ["events"]
        if name is not None:
            args.append(name)
        args.append("--json")
        s = _since(since)
        if s is not None:
            args += ["--since", s]
        if follow:
            args.append("--follow")
        argv = self._argv(args)
        # stderr to a file: a pipe nobody reads could fill while following.
        with tempfile.TemporaryFile(mode="w+") as err:
            try:
                p = subprocess.Popen(
                    argv,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    universal_newlines=True,
                )
            except OSError as e:
                raise NoxError(f"cannot run {self.binary}: {e.strerror or e}", None, argv) from e
            try:
                assert p.stdout is not None
                for line in p.stdout:
                    if line.strip():
                        yield Event.from_json(json.loads(line))
                code = p.wait()
                if code != 0:
                    err.seek(0)
                    text = err.read()
                    raise NoxError(_message(text, code), code, argv, text)
            finally:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
                    try:
                        p.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                if p.stdout is not None:
                    p.stdout.close()


def _message(stderr: str, code: int) -> str:
    """nox's error line(s), without the ``error:`` prefix."""
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    for i, l in enumerate(lines):
        if l.startswith("error: "):
            return "\n".join([l[len("error: "):]] + lines[i + 1:])
    return "\n".join(lines) or f"nox exited with status {code}"


_default: Optional[Nox] = None


def _nox() -> Nox:
    global _default
    if _default is None:
        _default = Nox()
    return _default


def create(name: Optional[str] = None, **kwargs: Any) -> Vm:
    """:meth:`Nox.create` with the default binary and state directory."""
    return _nox().create(name, **kwargs)


def delete(name: str, force: bool = False) -> None:
    """:meth:`Nox.delete` with the default binary and state directory."""
    _nox().delete(name, force=force)


def info(name: str) -> Vm:
    """:meth:`Nox.info` with the default binary and state directory."""
    return _nox().info(name)


def list() -> List[Vm]:  # noqa: A001 - mirrors `nox list`
    """:meth:`Nox.list` with the default binary and state directory."""
    return _nox().list()


def start(name: str, wait: bool = False, timeout: Optional[int] = None) -> Vm:
    """:meth:`Nox.start` with the default binary and state directory."""
    return _nox().start(name, wait=wait, timeout=timeout)


def stop(name: str, force: bool = False, timeout: Optional[int] = None) -> Vm:
    """:meth:`Nox.stop` with the default binary and state directory."""
    return _nox().stop(name, force=force, timeout=timeout)


def events(
    name: Optional[str] = None,
    since: Union[None, str, datetime] = None,
    follow: bool = True,
) -> Iterator[Event]:
    """:meth:`Nox.events` with the default binary and state directory."""
    return _nox().events(name, since=since, follow=follow)
