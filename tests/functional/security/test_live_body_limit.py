"""The body limit against a real `fhirserver serve` (gunicorn): chunked uploads (no Content-Length)
are counted while read, refused with 413 once past the limit, and the keep-alive connection stays
usable (issue "Security fixes" item 7)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.support.live import free_port, server_env, start_server, stop_server

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("body-limit")
    port = free_port()
    env = server_env(root, root / "data", FHIRSERVER_MAX_BODY_BYTES=str(10 * MIB))
    proc = start_server(["serve", "--port", str(port), "--workers", "1", "--threads", "2"], env, root,
                        root / "serve.log", port)
    yield port
    stop_server(proc)


def whitespace_after_json(mib: int) -> Iterator[bytes]:
    yield b'{"resourceType":"Patient"}'
    for _ in range(mib * 16):
        yield b" " * (64 * 1024)


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}


def post_chunked(sock: socket.socket, chunks: Iterable[bytes]) -> Response:
    sock.sendall(b"POST /fhir/Patient HTTP/1.1\r\nHost: test\r\nContent-Type: application/fhir+json\r\n"
                 b"Transfer-Encoding: chunked\r\nAuthorization: Bearer not-a-token\r\n\r\n")
    try:
        for chunk in chunks:
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still sending
    return read_response(sock)


def read_response(sock: socket.socket) -> Response:
    sock.settimeout(30)
    raw = b""
    while b"\r\n\r\n" not in raw:
        data = sock.recv(65536)
        assert data, f"connection closed before a response: {raw[:200]!r}"
        raw += data
    resp = Response(raw)
    length = int(resp.headers.get("content-length", "0"))
    while len(resp.body) < length:
        data = sock.recv(65536)
        assert data
        resp.body += data
    return resp


def outcome(resp: Response, status: int) -> None:
    assert resp.status == status, resp.body[:300]
    assert json.loads(resp.body)["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("mib", [11, 12])
def test_chunked_body_past_the_limit_is_413_and_the_connection_stays_usable(port: int, mib: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        resp = post_chunked(sock, whitespace_after_json(mib))
        outcome(resp, 413)
        assert resp.headers.get("connection", "keep-alive").lower() != "close"
        # the next request on the same connection is read from its start: a small body, answered
        outcome(post_chunked(sock, [b'{"resourceType":"Patient"}']), 401)


def test_chunked_body_within_the_limit_is_read_whole(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        outcome(post_chunked(sock, whitespace_after_json(9)), 401)  # read whole: only the token is wrong


def test_huge_chunked_body_gets_413_and_the_server_keeps_serving(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        outcome(post_chunked(sock, whitespace_after_json(60)), 413)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        outcome(post_chunked(sock, [b'{"resourceType":"Patient"}']), 401)


def test_content_length_past_the_limit_is_413(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /fhir/Patient HTTP/1.1\r\nHost: test\r\nContent-Type: application/fhir+json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (11 * MIB))
        outcome(read_response(sock), 413)


def test_server_log_has_no_traceback(port: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    logs = list(Path(tmp_path_factory.getbasetemp()).glob("body-limit*/serve.log"))
    assert logs and all("Traceback" not in p.read_text() for p in logs)
