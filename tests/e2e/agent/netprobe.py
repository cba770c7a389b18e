"""Network probes run inside a namespace (``ip netns exec NS python -m tests.e2e.agent.netprobe``).

serve PORT                  echo server on every address, prints "ready"
probe [--source IP] T...    TCP connect to each HOST:PORT, prints {"HOST:PORT": true|false}
session --source IP T       connect, echo once, print "connected"; on each stdin line send
                            again and print "echo" or "cut: <why>"
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading


def _serve(port: int) -> None:
    # Dual stack where the namespace has IPv6 (allowlist v2 tests reach an IPv6 RMM).
    if socket.has_dualstack_ipv6():
        server = socket.create_server(
            ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=False
        )
    else:
        server = socket.create_server(("0.0.0.0", port), reuse_port=False)
    server.listen(64)
    print("ready", flush=True)

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                return

    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def _connect(target: str, source: str | None, timeout: float) -> socket.socket:
    host, port = target.rsplit(":", 1)
    return socket.create_connection(
        (host.strip("[]"), int(port)),
        timeout=timeout,
        source_address=(source, 0) if source else None,
    )


def _probe(targets: list[str], source: str | None, timeout: float) -> None:
    results: dict[str, bool] = {}
    for target in targets:
        try:
            _connect(target, source, timeout).close()
            results[target] = True
        except OSError:
            results[target] = False
    print(json.dumps(results), flush=True)


def _session(target: str, source: str | None, timeout: float) -> None:
    conn = _connect(target, source, timeout)
    conn.settimeout(timeout)
    conn.sendall(b"hello\n")
    conn.recv(100)
    print("connected", flush=True)
    for _ in sys.stdin:
        try:
            conn.sendall(b"again\n")
            data = conn.recv(100)
            print("echo" if data else "cut: closed", flush=True)
        except OSError as exc:
            print(f"cut: {exc!r}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("port", type=int)
    for name in ("probe", "session"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--source")
        cmd.add_argument("--timeout", type=float, default=1.0)
        cmd.add_argument("targets", nargs="+")
    args = parser.parse_args()
    if args.command == "serve":
        _serve(args.port)
    elif args.command == "probe":
        _probe(args.targets, args.source, args.timeout)
    else:
        _session(args.targets[0], args.source, args.timeout)


if __name__ == "__main__":
    main()
