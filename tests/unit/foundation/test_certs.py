"""The dev/test certificate authority issues certificates a TLS handshake accepts."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from shared.infra.certs import issue_cert, make_ca

pytestmark = pytest.mark.unit


def test_issued_certificate_passes_a_verified_handshake_and_a_foreign_ca_does_not(
    tmp_path: Path,
) -> None:
    ca = make_ca(tmp_path / "ca")
    server = issue_cert(ca, tmp_path / "server", "server")
    assert oct(server.key.stat().st_mode & 0o777) == "0o600"
    foreign = make_ca(tmp_path / "other", common_name="someone else")

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert, server.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_twice() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=accept_twice, daemon=True)
    thread.start()
    good = ssl.create_default_context(cafile=str(ca.cert))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        good.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() is not None
        tls.sendall(b"x")
    bad = ssl.create_default_context(cafile=str(foreign.cert))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        bad.wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(timeout=5)
    listener.close()
