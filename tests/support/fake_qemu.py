#!/usr/bin/python3
"""A stand-in for qemu-system-*: serves QMP on the argv's chardev sockets and
nothing else. For tests of nox's control paths at a scale real guests would
not fit on a CI machine (nox's config.json "binaries" points at a copy).

Answers qmp_capabilities, cont, query-status (running); system_powerdown
emits POWERDOWN then SHUTDOWN (guest-shutdown) and exits 0; quit emits
SHUTDOWN (host-qmp-quit) and exits 0. Disk hotplug: add-fd returns a new
fd set (kept for query-fdsets, dropped by remove-fd), qom-list and qom-get
parent_bus answer from the argv's -device ids and buses, device_add and
device_del change them (device_del emits DEVICE_DELETED). Other commands: an
empty return.

A VM named dies-at-start*: like a qemu that fails after making its sockets
(e.g. a kernel file it cannot open), it accepts the first QMP connection,
writes an error to stderr, resets the connection before any greeting and
exits 1 a moment later."""

import json
import os
import select
import socket
import sys


def chardev_paths(argv):
    """(path, is_serial, logfile) of every -chardev socket."""
    out = []
    for i, a in enumerate(argv[:-1]):
        if a != "-chardev" or not argv[i + 1].startswith("socket,"):
            continue
        opts = dict(
            kv.split("=", 1) for kv in argv[i + 1].split(",")[1:] if "=" in kv
        )
        out.append((opts, opts.get("id") == "serial0", opts.get("logfile")))
    return out


def fdsets(argv):
    """fdset number -> fd, from -add-fd fd=N,set=S."""
    out = {}
    for i, a in enumerate(argv[:-1]):
        if a == "-add-fd":
            opts = dict(kv.split("=", 1) for kv in argv[i + 1].split(",") if "=" in kv)
            out[opts.get("set")] = int(opts["fd"])
    return out


def peripherals(argv):
    """id -> bus of every -device with an id (the root bus by default)."""
    out = {}
    for i, a in enumerate(argv[:-1]):
        if a == "-device":
            opts = dict(kv.split("=", 1) for kv in argv[i + 1].split(",") if "=" in kv)
            if "id" in opts:
                out[opts["id"]] = opts.get("bus", "pcie.0")
    return out


def write_log(logfile, sets):
    """A logfile is a path, or /dev/fdset/S (a descriptor nox passed)."""
    if logfile.startswith("/dev/fdset/"):
        fd = sets.get(logfile.rsplit("/", 1)[1])
        if fd is not None:
            os.write(fd, b"fake qemu\n")
        return
    with open(logfile, "w") as log:
        log.write("fake qemu\n")


def greet(c):
    send(c, {"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
                                 "package": ""}, "capabilities": []}})


def send(conn, obj):
    conn.sendall((json.dumps(obj) + "\r\n").encode())


def vm_name(argv):
    for i, a in enumerate(argv[:-1]):
        if a == "-name":
            return argv[i + 1].split(",")[0]
    return ""


def die_at_start(conn):
    sys.stderr.write(
        "qemu-system-x86_64: could not open kernel file '/fake/k': No such file or directory\n"
    )
    sys.stderr.flush()
    # RST, not a clean close: what the supervisor saw from a real qemu.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()
    select.select([], [], [], 0.3)
    os._exit(1)


def main():
    dies = vm_name(sys.argv).startswith("dies-at-start")
    listeners = {}
    conns = {}
    sets = fdsets(sys.argv)
    added = {}
    devices = peripherals(sys.argv)
    for opts, serial, logfile in chardev_paths(sys.argv):
        if "fd" in opts:
            # nox's descriptors: a listening socket (server=on) or, for the
            # supervisor's QMP, one end of a connected socketpair.
            s = socket.socket(fileno=int(opts["fd"]))
            if opts.get("server") != "on":
                if dies:
                    die_at_start(s)
                conns[s] = b""
                greet(s)
                continue
            # As qemu does: listen() again, so a client's SO_PEERCRED
            # names this process (nox checks it: crate::rundir).
            s.listen(4)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(opts["path"])
            s.listen(4)
        listeners[s] = serial
        if logfile:
            write_log(logfile, sets)
    while True:
        ready, _, _ = select.select(list(listeners) + list(conns), [], [])
        for r in ready:
            if r in listeners:
                c, _ = r.accept()
                if listeners[r]:
                    c.close()
                    continue
                if dies:
                    die_at_start(c)
                conns[c] = b""
                greet(c)
                continue
            data = r.recv(65536)
            if not data:
                del conns[r]
                r.close()
                continue
            conns[r] += data
            while b"\n" in conns[r]:
                line, conns[r] = conns[r].split(b"\n", 1)
                if not line.strip():
                    continue
                cmd = json.loads(line)
                name, cid = cmd.get("execute"), cmd.get("id")
                ret = {}
                args = cmd.get("arguments") or {}
                if name == "query-status":
                    ret = {"status": "running", "running": True, "singlestep": False}
                elif name == "add-fd":
                    fdset = 10 + len(added)
                    added[fdset] = args.get("opaque", "")
                    ret = {"fdset-id": fdset, "fd": 100 + fdset}
                elif name == "query-fdsets":
                    ret = [{"fdset-id": k, "fds": [{"fd": 100 + k, "opaque": v}]}
                           for k, v in added.items()]
                elif name == "remove-fd":
                    added.pop(args.get("fdset-id"), None)
                elif name == "qom-list":
                    ret = [{"name": d, "type": "child<device>"} for d in devices]
                elif name == "qom-get":
                    d = args.get("path", "").rsplit("/", 1)[-1]
                    bus = devices.get(d, "pcie.0")
                    ret = f"/machine/peripheral/{bus}/{bus}"
                elif name == "device_add":
                    devices[args.get("id")] = args.get("bus", "pcie.0")
                elif name == "device_del":
                    devices.pop(args.get("id"), None)
                reply = {"return": ret}
                if cid is not None:
                    reply["id"] = cid
                send(r, reply)
                ts = {"seconds": 0, "microseconds": 0}
                if name == "device_del":
                    send(r, {"event": "DEVICE_DELETED", "timestamp": ts,
                             "data": {"device": args.get("id"), "path": "/x"}})
                if name in ("system_powerdown", "quit"):
                    events = [("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
                    if name == "system_powerdown":
                        events = [("POWERDOWN", {}),
                                  ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})]
                    for c in conns:
                        for ev, data in events:
                            try:
                                send(c, {"event": ev, "data": data, "timestamp": ts})
                            except OSError:
                                pass
                    os._exit(0)


if __name__ == "__main__":
    main()
