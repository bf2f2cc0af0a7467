#!/usr/bin/env python3
"""Static file server on 127.0.0.1 for nox's download tests and benchmark.

Prints the port on the first line of stdout, then serves --dir until killed.
  --no-range        ignore Range headers (always 200 with the whole file)
  --cut PATH:BYTES  the first GET of PATH sends BYTES of body, then drops the connection
  --delay SECONDS   wait before answering each GET (lets concurrent clients overlap)
  --log FILE        one line per request: "GET <path> <range-or-> <status>"
  --no-length       send bodies without Content-Length (end marked by closing the connection)
"""
import argparse
import http.server
import os
import socket
import sys
import threading

ARGS = None
LOCK = threading.Lock()
CUT_DONE = set()


def log(line):
    if ARGS.log:
        with LOCK, open(ARGS.log, "a") as f:
            f.write(line + "\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        if ARGS.delay:
            threading.Event().wait(ARGS.delay)
        rel = self.path.split("?", 1)[0].lstrip("/")
        full = os.path.realpath(os.path.join(ARGS.dir, rel))
        rng = self.headers.get("Range")
        root = os.path.realpath(ARGS.dir)
        if (full == root or full.startswith(root + os.sep)) and os.path.isdir(full):
            # A directory index, as Apache/nginx autoindex list them.
            names = sorted(os.listdir(full))
            body = "".join(
                f'<a href="{n}/">{n}/</a>\n' if os.path.isdir(os.path.join(full, n))
                else f'<a href="{n}">{n}</a>\n'
                for n in names
            ).encode()
            log(f"GET {self.path} - 200")
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if not full.startswith(root + os.sep) or not os.path.isfile(full):
            log(f"GET {self.path} {rng or '-'} 404")
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = os.path.getsize(full)
        start, end, status = 0, size - 1, 200
        if rng and not ARGS.no_range and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else 0
            end = min(int(b), size - 1) if b else size - 1
            status = 206
            if start >= size:
                log(f"GET {self.path} {rng} 416")
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        length = end - start + 1
        log(f"GET {self.path} {rng or '-'} {status}")
        self.send_response(status)
        if ARGS.no_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "none" if ARGS.no_range else "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        self.wfile.flush()
        cut = None
        if ARGS.cut:
            cpath, _, cbytes = ARGS.cut.rpartition(":")
            with LOCK:
                if cpath.lstrip("/") == rel and rel not in CUT_DONE:
                    CUT_DONE.add(rel)
                    cut = int(cbytes)
        with open(full, "rb") as f:
            if cut is not None:
                f.seek(start)
                self.wfile.write(f.read(min(cut, length)))
                self.wfile.flush()
                # Drop the connection mid-body (RST, not a clean close).
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                self.close_connection = True
                self.connection.close()
                return
            self.connection.sendfile(f, start, length)


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--no-range", action="store_true")
    p.add_argument("--cut")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--log")
    p.add_argument("--no-length", action="store_true")
    ARGS = p.parse_args()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    print(srv.server_address[1], flush=True)
    sys.stdout.close()
    srv.serve_forever()


if __name__ == "__main__":
    main()
