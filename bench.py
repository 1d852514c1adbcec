#!/usr/bin/env python3
"""Benchmark for llm-gateway: how much the gateway costs, measured on loopback.

Usage::

    python bench.py [--quick] [--json out.json] [--duration S] [--gateway-cmd "python gateway.py"]
                    [--only small_c64,servers3_c64,chain_dead_first_c64]

What runs (all on 127.0.0.1, nothing leaves the machine):

* a **fake upstream**: an OpenAI-compatible ``/v1/chat/completions`` written as a
  raw asyncio Protocol on uvloop with httptools parsing and canned responses.  A
  plain request gets a 543 B ``chat.completion`` JSON; ``"stream": true`` gets an
  SSE stream of 200 ``data: {...}`` events plus ``data: [DONE]``, each written
  with its own ``transport.write`` (one chunk of HTTP chunked encoding each), or
  all in one write for the "written at once" scenario (as a server sends a file).
  It listens on three ports (one process, one set of counters, kept per port too) and
  answers ``GET /v1/models`` with ``gpt-bench``: the three servers of one backend.
* a **load generator** built the same way: keep-alive connections, one
  request in flight per connection, pre-built request bytes.  It checks every
  response (status 200, exact body length; for SSE the number of events, the
  byte count and the final ``[DONE]``) and counts anything else as an error.
* the **gateway** under test (``python gateway.py`` by default), pointed at the
  fake upstream through ``BACKENDS=fake=http://127.0.0.1:<port>/v1``.  With
  ``--gateway-cmd nginx``, nginx ``proxy_pass`` (one worker, or ``--workers``) stands in its place:
  the reference for what relaying alone costs on the machine at hand.
* the **routing scenarios**, after the others, each on a gateway restarted with its own
  environment (the default gateway is started again after them): ``servers3_c64``, the
  small_c64 load with ``BACKENDS=fake=<port1>|<port2>|<port3>`` (the report gives how the
  requests split over the three ports), and ``chain_dead_first_c64``, the same load sent to
  an alias ``fake:gpt-bench=dead:gpt-bench|fake:gpt-bench`` whose first target is a port
  nobody listens on, so every request meets a refused connection before it is answered.
  They are reported beside small_c64's gateway row, the same requests with no routing.

The fake upstream and the load generator are separate processes pinned to CPU 1;
the gateway is pinned to CPU 0 (``--gateway-cpus``), so its throughput is what
one core of gateway buys.

How to read the output:

* **Direct capacity** is the load generator hitting the fake upstream with no
  gateway in between.  It should be well above (>= 5x) the gateway's figure,
  otherwise the harness, not the gateway, is what is being measured.
* Every scenario is run **direct** and **through the gateway**, each with a
  warm-up followed by a measured window.  ``req/s`` counts requests completed in
  the window; p50/p99 are per-request latencies (for SSE: until the whole stream
  has arrived).  ``gw CPU µs/req`` is the utime+stime the gateway's processes
  (all of them, if it runs workers) used during the window, divided by the
  requests completed: the cost of one request, independent of how busy the
  core was.  ``gw CPU %`` near 100 means the gateway core was saturated.
  ``aux CPU %`` is the load generator plus the fake upstream on CPU 1: if it
  approaches 100 the harness is close to being the bottleneck.  ``other CPU %``
  is everything else that kept the machine busy (other processes, kernel time
  not charged to ours); when it is high the window's req/s and latencies are
  disturbed, while CPU µs/req holds up better.
* ``gw peak RSS`` is the gateway's peak resident memory during the window
  (VmHWM after resetting it through ``/proc/<pid>/clear_refs``, or sampled VmRSS).
* ``gw req/s per core (est.)`` is 1e6 / ``gw CPU µs/req``: what one fully busy
  core of gateway would do.  It is the figure to use where a row is flagged
  HARNESS-BOUND (direct under 2x the gateway, or gateway CPU below 90% while
  the load generator + upstream use 85% of CPU 1 or more): with one write,
  hence one TCP segment, per SSE event, the harness pays about as much kernel
  time per event as the gateway, so no single core can out-run a fast gateway
  5x there (``--sse-events-per-write`` trades that realism for headroom).
* **Added latency** (concurrency 1) is gateway minus direct at p50 and p99.
* **Memory per open stream**: RSS at rest, then with N slow SSE streams held
  open through the gateway at once; the difference divided by N.  It also checks
  whether the gateway closes its upstream streams once the clients hang up.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import http.client
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import uvloop

HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --------------------------------------------------------------------------
# Canned payloads
# --------------------------------------------------------------------------

JSON_ANSWER_SIZE = 543
SSE_DATA_EVENTS = 200
SLOW_MARKER = "BENCH_SLOW_STREAM"  # in a request body: the upstream streams slowly
AT_ONCE_MARKER = "BENCH_SSE_AT_ONCE"  # in a request body: the upstream writes its whole stream at once


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _chat_answer(size: int = JSON_ANSWER_SIZE) -> bytes:
    """A realistic ``chat.completion`` body padded to exactly ``size`` bytes."""
    answer: dict[str, Any] = {
        "id": "chatcmpl-bench0123456789abcdefghijklmn",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-bench",
        "system_fingerprint": "fp_bench01",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 42, "completion_tokens": 64, "total_tokens": 106},
    }
    pad = size - len(_compact(answer))
    answer["choices"][0]["message"]["content"] = ("The quick brown fox jumps over the lazy dog. " * 20)[:pad]
    body = _compact(answer)
    assert len(body) == size, len(body)
    return body


def _sse_events(n: int = SSE_DATA_EVENTS) -> list[bytes]:
    """``n`` chat.completion.chunk events followed by ``data: [DONE]``."""
    events = []
    for i in range(n):
        chunk = {
            "id": "chatcmpl-bench0123456789abcdefghijklmn",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-bench",
            "choices": [{"index": 0, "delta": {"content": f"tok{i:03d} "}, "finish_reason": None}],
        }
        events.append(b"data: " + _compact(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _chat_request(stream: bool = False, content: str | None = None, size: int = 300) -> bytes:
    """A chat request body; without ``content`` it is padded to about ``size`` bytes."""
    req: dict[str, Any] = {"model": "fake:gpt-bench", "stream": stream, "temperature": 0.7, "max_tokens": 64,
                           "messages": [{"role": "system", "content": "You are a concise assistant."},
                                        {"role": "user", "content": content or ""}]}
    if content is None:
        pad = size - len(_compact(req))
        req["messages"][1]["content"] = ("Please summarise the benchmark results in one line. " * 10)[:max(pad, 1)]
    return _compact(req)


def _big_request(size: int = 1 << 20) -> bytes:
    """A non-streaming chat request of exactly ``size`` bytes (one huge user message)."""
    empty = len(_chat_request(content="x"))
    body = _chat_request(content="x" * (size - empty + 1))
    assert len(body) == size, len(body)
    return body


JSON_ANSWER = _chat_answer()
SSE_EVENTS = _sse_events()
SSE_EXPECTED_EVENTS = len(SSE_EVENTS)              # 201, [DONE] included
SSE_BODY_LEN = sum(map(len, SSE_EVENTS))
SSE_DONE = SSE_EVENTS[-1]

SMALL_REQUEST = _chat_request()
STREAM_REQUEST = _chat_request(stream=True)
SLOW_STREAM_REQUEST = _chat_request(stream=True, content=f"{SLOW_MARKER} hold this stream open")
AT_ONCE_STREAM_REQUEST = _chat_request(stream=True, content=f"{AT_ONCE_MARKER} the whole answer in one write")
BIG_REQUEST = _big_request()

_MODELS_ANSWER = _compact({"object": "list", "data": [
    {"id": "gpt-bench", "object": "model", "created": 1700000000, "owned_by": "bench"}]})
_JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(JSON_ANSWER)) + JSON_ANSWER
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")
_SSE_FRAMES = [b"%x\r\n%s\r\n" % (len(ev), ev) for ev in SSE_EVENTS]   # one chunked frame per event
_CHUNKED_END = b"0\r\n\r\n"
_SLOW_MARKER_B = SLOW_MARKER.encode()
_AT_ONCE_MARKER_B = AT_ONCE_MARKER.encode()
_BODY_EDGE = 1024


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------

def pin_to_cpus(cpus: set[int] | None, pid: int = 0) -> bool:
    """Pin ``pid`` (0 = self) to ``cpus``; False where the OS does not allow it."""
    if not cpus:
        return False
    try:
        os.sched_setaffinity(pid, cpus)
        return True
    except (OSError, AttributeError):
        return False


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (uvicorn workers are children)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read(f"/proc/{name}/stat")
            if stat:
                children[int(stat.rsplit(b")", 1)[1].split()[1])].append(int(name))
    tree, i = [root], 0
    while i < len(tree):
        tree.extend(children.get(tree[i], ()))
        i += 1
    return [p for p in tree if os.path.exists(f"/proc/{p}")]


def cpu_seconds(pids: list[int]) -> float:
    """Sum of utime+stime of ``pids`` in seconds."""
    ticks = 0
    for pid in pids:
        stat = _read(f"/proc/{pid}/stat")
        if stat:
            fields = stat.rsplit(b")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15)
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy (user, nice, system, irq, softirq, steal) since boot."""
    for line in (_read("/proc/stat") or b"").splitlines():
        if line.startswith(b"cpu "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / CLK_TCK
    return 0.0


def status_kb(pids: list[int], key: str) -> int:
    """Sum of a ``/proc/<pid>/status`` field in kB, e.g. VmRSS or VmHWM."""
    total, prefix = 0, key.encode() + b":"
    for pid in pids:
        for line in (_read(f"/proc/{pid}/status") or b"").splitlines():
            if line.startswith(prefix):
                total += int(line.split()[1])
    return total


def rss_kb(root: int) -> int:
    return status_kb(process_tree(root), "VmRSS")


def reset_peak_rss(pids: list[int]) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs write access to clear_refs)."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def fd_count(root: int) -> int:
    """Open file descriptors over the whole process tree."""
    total = 0
    for pid in process_tree(root):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
               "0B": "CLOSING"}


def tcp_states_by_inode() -> dict[str, str]:
    """Socket inode -> TCP state name, from /proc/net/tcp{,6}."""
    states = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in (_read(table) or b"").decode().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9:
                states[cols[9]] = _TCP_STATES.get(cols[3], cols[3])
    return states


def fd_kinds(root: int) -> dict[str, int]:
    """Open fds by kind (socket:ESTABLISHED, socket:CLOSE_WAIT, pipe, file...) to explain a difference."""
    kinds: collections.Counter[str] = collections.Counter()
    tcp = tcp_states_by_inode()
    for pid in process_tree(root):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/"):
                kinds["file"] += 1
            elif target.startswith("anon_inode:"):
                kinds[target] += 1
            elif target.startswith("socket:["):
                kinds["socket:" + tcp.get(target[8:-1], "other")] += 1
            else:
                kinds[target.split(":")[0]] += 1        # pipe:[123] -> pipe
    return dict(sorted(kinds.items()))


# --------------------------------------------------------------------------
# Fake upstream
# --------------------------------------------------------------------------

class _UpstreamStats:
    def __init__(self, listeners: int = 1) -> None:
        self.requests = 0
        # per listening port: the split of the load over the servers of a several-server backend
        self.requests_by_listener = [0] * listeners
        self.connections_by_listener = [0] * listeners
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_cancelled = 0   # peer closed the connection before the stream ended
        self.connections_total = 0
        self.idle_closed = 0


@dataclass
class UpstreamOptions:
    """How the fake upstream behaves."""
    sse_gap: float = 0.0              # seconds between SSE writes; 0 = back to back
    events_per_write: int = 1         # SSE events per write (1 = each event its own send())
    slow_gap: float = 1.0             # seconds between events of a SLOW_MARKER stream
    idle_timeout: float | None = None  # close keep-alive connections idle this long; None = never
    # ports served by the one upstream process: the first is "the" upstream, all of them together
    # the servers of a several-server backend (servers3_c64); they share the process, hence its CPU
    listeners: int = 3

    def frames(self) -> list[bytes]:
        """The SSE body as written: one chunked-encoding frame per write."""
        n = max(1, self.events_per_write)
        return [b"".join(_SSE_FRAMES[i:i + n]) for i in range(0, len(_SSE_FRAMES), n)]


class FakeUpstream:
    """The server side: a set of connections plus the knobs shared by them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, options: UpstreamOptions) -> None:
        self.loop = loop
        self.options = options
        self.sse_frames = options.frames()
        self.idle_timeout = options.idle_timeout
        self.conns: set[_UpstreamConn] = set()
        self.stats = _UpstreamStats(options.listeners)

    def stats_json(self, exclude: _UpstreamConn) -> bytes:
        data = dict(vars(self.stats))
        data["open_connections"] = len(self.conns) - (exclude in self.conns)
        data["active_streams"] = sum(c.stream_pos is not None for c in self.conns)
        return _compact(data)

    async def sweep_idle(self) -> None:
        """Close keep-alive connections idle for longer than ``idle_timeout`` (as real servers do)."""
        assert self.idle_timeout
        while True:
            await asyncio.sleep(min(0.5, self.idle_timeout / 2))
            deadline = self.loop.time() - self.idle_timeout
            for conn in list(self.conns):
                if conn.stream_pos is None and conn.last_active < deadline:
                    self.stats.idle_closed += 1
                    conn.transport.close()


class _UpstreamConn(asyncio.Protocol):
    """One upstream connection: parse requests, answer with canned bytes."""

    def __init__(self, server: FakeUpstream, listener: int = 0) -> None:
        self.server = server
        self.listener = listener    # which of the upstream's ports this connection came in on
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.head = b""         # first and last bytes of the request body: enough to classify it
        self.tail = b""
        self.stream_pos: int | None = None     # next SSE frame to write, None when not streaming
        self.stream_frames: list[bytes] = []
        self.stream_gap = 0.0
        self.handle: asyncio.Handle | None = None
        self.paused = False
        self.close_after = False
        self.last_active = self.loop.time()

    # asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.conns.add(self)
        self.server.stats.connections_total += 1
        self.server.stats.connections_by_listener[self.listener] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        if self.stream_pos is not None:
            self.server.stats.streams_cancelled += 1
            self.stream_pos = None
        if self.handle:
            self.handle.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.stream_pos is not None and self.handle is None:
            self.handle = self.loop.call_soon(self._stream_step)

    # httptools callbacks -----------------------------------------------------
    def on_message_begin(self) -> None:
        self.head = self.tail = self.url = b""
        self.last_active = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        # Keep only the edges: storing and scanning a 1 MiB body would make the upstream, not the
        # gateway, the bottleneck.  "stream" and SLOW_MARKER sit near the start of our requests.
        if len(self.head) < _BODY_EDGE:
            self.head += body[:_BODY_EDGE - len(self.head)]
        self.tail = (self.tail + body[-_BODY_EDGE:])[-_BODY_EDGE:]

    def on_message_complete(self) -> None:
        self.close_after = not self.parser.should_keep_alive()
        if self.parser.get_method() == b"GET":
            # GET /v1/models is a real model list: a gateway with several servers per backend asks
            # each for its models and routes by them.  Any other GET is the harness's /_stats.
            payload = _MODELS_ANSWER if self.url == b"/v1/models" else self.server.stats_json(exclude=self)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            self._maybe_close()
            return
        edges = self.head + self.tail
        self.server.stats.requests += 1
        self.server.stats.requests_by_listener[self.listener] += 1
        if _SLOW_MARKER_B in edges:
            self._start_stream(_SSE_FRAMES, self.server.options.slow_gap)
        elif _AT_ONCE_MARKER_B in edges:
            self._start_stream([b"".join(_SSE_FRAMES)], 0.0)
        elif b'"stream":true' in edges or b'"stream": true' in edges:
            self._start_stream(self.server.sse_frames, self.server.options.sse_gap)
        else:
            self.transport.write(_JSON_RESPONSE)
            self._maybe_close()

    # SSE ----------------------------------------------------------------------
    def _start_stream(self, frames: list[bytes], gap: float) -> None:
        self.server.stats.streams_started += 1
        self.transport.write(_SSE_HEAD)
        self.stream_pos, self.stream_frames, self.stream_gap = 0, frames, gap
        self._stream_step()

    def _stream_step(self) -> None:
        """Write the next frame and come back after the gap; with no gap, write them all now.

        Without a gap every frame is still its own ``write`` (its own send() and TCP segment),
        but back to back: yielding to the loop between frames would double the harness's cost
        per stream, while a gateway slower than the upstream reads the same coalesced bytes.
        """
        self.handle = None
        if self.stream_pos is None or self.paused:
            return
        frames = self.stream_frames
        while True:
            self.transport.write(frames[self.stream_pos])
            self.stream_pos += 1
            if self.stream_pos == len(frames):
                break
            if self.stream_gap:
                self.handle = self.loop.call_later(self.stream_gap, self._stream_step)
                return
            if self.paused:          # resume_writing() picks up from here
                return
        self.transport.write(_CHUNKED_END)
        self.stream_pos = None
        self.last_active = self.loop.time()
        self.server.stats.streams_completed += 1
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.close_after:
            self.transport.close()


def upstream_main(conn: multiprocessing.connection.Connection, cpus: set[int] | None,
                  options: UpstreamOptions) -> None:
    """Process entry point: serve on ``options.listeners`` ephemeral ports, report them (a list)
    through ``conn``, run forever.

    The ports share one ``FakeUpstream`` (one set of connections, one ``/_stats``, on any port),
    which counts requests and connections per port: several servers of one backend, as the
    gateway sees them, without a process (and a core) for each.
    """
    pin_to_cpus(cpus)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides when we stop
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    server = FakeUpstream(loop, options)
    ports = []
    for i in range(max(1, options.listeners)):
        srv = loop.run_until_complete(
            loop.create_server(lambda i=i: _UpstreamConn(server, i), HOST, 0, backlog=4096))  # type: ignore[misc]
        ports.append(srv.sockets[0].getsockname()[1])
    if options.idle_timeout:
        loop.create_task(server.sweep_idle())
    conn.send(ports)
    loop.run_forever()


# --------------------------------------------------------------------------
# Load generator
# --------------------------------------------------------------------------

@dataclass
class RequestKind:
    """One kind of request in a load mix."""
    name: str
    body: bytes
    sse: bool
    weight: float = 1.0
    # (min, max) SSE events after which the client hangs up on purpose; None = read it all
    abort_after: tuple[int, int] | None = None


@dataclass
class LoadSpec:
    """A load run: ``concurrency`` connections, each with one request in flight at a time."""
    port: int
    kinds: list[RequestKind]
    concurrency: int
    warmup: float
    duration: float
    # role -> root pid; CPU and (for "gateway") memory are sampled over the measured window
    watch: dict[str, int] = field(default_factory=dict)
    timeout: float = 30.0            # a request taking longer is an error ("timeout")
    path: str = "/v1/chat/completions"
    rss_every: float = 0.25          # seconds between RSS samples of the gateway


def build_request(port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: */*\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class _Client(asyncio.Protocol):
    """A keep-alive client connection; ``request()`` sends one request and awaits its outcome."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.waiter: asyncio.Future[str] | None = None
        self.first_event: asyncio.Future[None] | None = None
        self.started = 0.0
        self._reset(None)

    def _reset(self, kind: RequestKind | None) -> None:
        self.kind = kind
        self.status = 0
        self.nbytes = 0
        self.events = 0
        self.tail = b""
        self.abort_at = 0
        self.error_body = b""    # start of a non-200 answer, for the report

    def request(self, kind: RequestKind, wire: bytes) -> asyncio.Future[str]:
        self._reset(kind)
        if kind.abort_after:
            self.abort_at = random.randint(*kind.abort_after)
        self.waiter = self.loop.create_future()
        self.started = time.perf_counter()
        assert self.transport is not None
        self.transport.write(wire)
        return self.waiter

    def finish(self, outcome: str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    def close(self, abort: bool = False) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort() if abort else self.transport.close()
        self.closed = True

    # asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None:
            self.finish("short_body" if self.status else "conn_lost")

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.finish("bad_http")
            self.close(abort=True)

    # httptools callbacks ----------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.nbytes += len(body)
        if self.status != 200 and len(self.error_body) < 300:
            self.error_body += body[:300]
        if self.kind is None or not self.kind.sse:
            return
        # count "\n\n" event terminators, including one split across two reads
        n = body.count(b"\n\n") + (self.tail[-1:] == b"\n" and body[:1] == b"\n")
        self.tail = (self.tail + body[-16:])[-16:]
        if n and not self.events and self.first_event is not None and not self.first_event.done():
            self.first_event.set_result(None)
        self.events += n
        if self.abort_at and self.events >= self.abort_at and self.waiter is not None:
            self.finish("aborted")
            self.close()

    def on_message_complete(self) -> None:
        if self.waiter is None:
            return
        kind = self.kind
        assert kind is not None
        if self.status != 200:
            outcome = f"http_{self.status}"
        elif kind.sse:
            ok = (self.events == SSE_EXPECTED_EVENTS and self.nbytes == SSE_BODY_LEN
                  and self.tail.endswith(SSE_DONE))
            outcome = "ok" if ok else ("short_body" if self.nbytes < SSE_BODY_LEN else "body_mismatch")
        else:
            n = len(JSON_ANSWER)
            outcome = "ok" if self.nbytes == n else ("short_body" if self.nbytes < n else "body_mismatch")
        if not self.parser.should_keep_alive():
            self.close()
        self.finish(outcome)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


class _Watch:
    """CPU (and, for the gateway, memory) of watched process trees over a measured window."""

    def __init__(self, watch: dict[str, int]) -> None:
        self.roots = dict(watch)
        self.trees = {role: process_tree(pid) for role, pid in self.roots.items()}
        self.cpu0 = {role: cpu_seconds(pids) for role, pids in self.trees.items()}
        self.busy0 = machine_busy_seconds()
        gw = self.trees.get("gateway", [])
        self.peak_reset = bool(gw) and reset_peak_rss(gw)
        self.rss_start = status_kb(gw, "VmRSS") if gw else 0
        self.rss_max = self.rss_start
        self.timeline: list[int] = []

    def sample_rss(self) -> None:
        if "gateway" in self.trees:
            rss = status_kb(self.trees["gateway"], "VmRSS")
            self.rss_max = max(self.rss_max, rss)
            self.timeline.append(rss)

    def finish(self, elapsed: float) -> dict[str, Any]:
        out: dict[str, Any] = {"cpu_s": {}, "cpu_pct": {}}
        for role, pids in self.trees.items():
            pids = sorted(set(pids) | set(process_tree(self.roots[role])))
            used = cpu_seconds(pids) - self.cpu0[role]
            out["cpu_s"][role] = round(used, 3)
            out["cpu_pct"][role] = round(100 * used / elapsed, 1)
        # Whatever else kept the machine busy (other processes, and kernel softirq work that is not
        # charged to ours): high values mean the figures of this window are disturbed.
        other = machine_busy_seconds() - self.busy0 - sum(out["cpu_s"].values())
        out["other_cpu_pct"] = round(max(0.0, 100 * other / elapsed), 1)
        gw = self.trees.get("gateway")
        if gw:
            self.sample_rss()
            hwm = status_kb(gw, "VmHWM") if self.peak_reset else 0
            out.update(gw_rss_start_kb=self.rss_start, gw_rss_end_kb=self.timeline[-1],
                       gw_peak_rss_kb=max(hwm, self.rss_max), gw_workers=len(gw), rss_timeline=self.timeline)
        return out


class LoadGen:
    """Runs load specs inside the load-generator process (see ``loadgen_main``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.held: list[_Client] = []

    async def _connect(self, port: int) -> _Client:
        _, client = await self.loop.create_connection(lambda: _Client(self.loop), HOST, port)
        return client

    async def run(self, spec: LoadSpec) -> dict[str, Any]:
        """Warm up, then measure for ``spec.duration`` seconds; return counts, latencies, CPU, RSS."""
        wires = [build_request(spec.port, spec.path, k.body) for k in spec.kinds]
        weights = [k.weight for k in spec.kinds]
        state = _RunState()
        clients: list[_Client | None] = [None] * spec.concurrency

        async def slot(i: int) -> None:
            while state.running:
                client = clients[i]
                if client is None or client.closed:
                    try:
                        client = clients[i] = await self._connect(spec.port)
                    except OSError:
                        state.count_outcome("connect_error", None)
                        await asyncio.sleep(0.05)
                        continue
                k = 0 if len(wires) == 1 else random.choices(range(len(wires)), weights)[0]
                outcome = await client.request(spec.kinds[k], wires[k])
                state.record(spec.kinds[k].name, outcome, time.perf_counter() - client.started)
                if outcome.startswith("http_"):
                    state.sample_error(outcome, client.error_body)
                if outcome not in ("ok",):
                    client.close(abort=outcome != "aborted")
                    clients[i] = None

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(0.25)
                now = time.perf_counter()
                for c in clients:
                    if c is not None and c.waiter is not None and now - c.started > spec.timeout:
                        c.finish("timeout")
                        c.close(abort=True)

        tasks = [self.loop.create_task(slot(i)) for i in range(spec.concurrency)]
        dog = self.loop.create_task(watchdog())
        await asyncio.sleep(spec.warmup)

        watch = _Watch(spec.watch)
        state.start_window()
        end = time.perf_counter() + spec.duration
        while (left := end - time.perf_counter()) > 0:
            await asyncio.sleep(min(spec.rss_every, left))
            watch.sample_rss()
        elapsed = state.end_window()
        usage = watch.finish(elapsed)

        state.running = False                                   # drain: let in-flight requests finish
        _, pending = await asyncio.wait(tasks, timeout=min(spec.timeout, 10.0) + 1)
        for c in clients:
            if c is not None and c.waiter is not None:
                c.finish("unfinished")
            if c is not None:
                c.close(abort=True)
        if pending:
            await asyncio.wait(pending, timeout=1)
        dog.cancel()
        return state.summary(elapsed) | usage | {"concurrency": spec.concurrency}

    async def hold(self, port: int, n: int, timeout: float = 15.0) -> dict[str, Any]:
        """Open ``n`` slow SSE streams and wait until each has delivered its first event."""
        kind = RequestKind("slow", SLOW_STREAM_REQUEST, sse=True)
        wire = build_request(port, "/v1/chat/completions", kind.body)
        sem = asyncio.Semaphore(32)

        async def one() -> _Client:
            async with sem:
                client = await self._connect(port)
                try:
                    client.first_event = self.loop.create_future()
                    client.request(kind, wire)
                    await asyncio.wait_for(client.first_event, timeout)
                except BaseException:
                    client.close(abort=True)
                    raise
                return client

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        self.held = [r for r in results if isinstance(r, _Client)]
        errors = collections.Counter(type(r).__name__ for r in results if not isinstance(r, _Client))
        return {"opened": len(self.held), "failed": n - len(self.held), "errors": dict(errors),
                "open_s": round(time.perf_counter() - t0, 3)}

    async def release(self, _: Any = None) -> dict[str, Any]:
        """Hang up on all streams opened by ``hold``."""
        for c in self.held:
            c.close()
        n, self.held = len(self.held), []
        await asyncio.sleep(0.05)
        return {"closed": n}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class _RunState:
    """Counters for one run; only requests completing inside the window make the figures."""

    def __init__(self) -> None:
        self.running = True
        self.measuring = False
        self.window_start = 0.0
        self.latencies: list[float] = []
        self.outcomes: collections.Counter[str] = collections.Counter()      # whole run
        self.per_kind: collections.Counter[str] = collections.Counter()      # whole run, "kind:outcome"
        self.window_ok = 0
        self.error_samples: list[str] = []

    def sample_error(self, outcome: str, body: bytes) -> None:
        """Keep the first few error answers: their bodies say what went wrong."""
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{outcome}: {body[:300].decode(errors='replace')}")

    def start_window(self) -> None:
        self.measuring, self.window_start = True, time.perf_counter()

    def end_window(self) -> float:
        self.measuring = False
        return time.perf_counter() - self.window_start

    def count_outcome(self, outcome: str, kind: str | None) -> None:
        self.outcomes[outcome] += 1
        if kind:
            self.per_kind[f"{kind}:{outcome}"] += 1

    def record(self, kind: str, outcome: str, latency: float) -> None:
        self.count_outcome(outcome, kind)
        if self.measuring and outcome == "ok":
            self.window_ok += 1
            self.latencies.append(latency)

    def summary(self, elapsed: float) -> dict[str, Any]:
        lat = sorted(self.latencies)
        errors = {k: v for k, v in self.outcomes.items() if k not in ("ok", "aborted")}
        return {
            "window_s": round(elapsed, 3),
            "requests": self.window_ok,
            "rps": round(self.window_ok / elapsed, 1),
            "p50_ms": _ms(percentile(lat, 50)), "p90_ms": _ms(percentile(lat, 90)),
            "p99_ms": _ms(percentile(lat, 99)), "max_ms": _ms(lat[-1]) if lat else None,
            "mean_ms": _ms(sum(lat) / len(lat)) if lat else None,
            "completed_total": self.outcomes["ok"],
            "aborted": self.outcomes["aborted"],
            "errors": sum(errors.values()),
            "error_kinds": errors,
            "error_samples": self.error_samples,
            "per_kind": dict(self.per_kind),
        }


def loadgen_main(conn: multiprocessing.connection.Connection, cpus: set[int] | None) -> None:
    """Process entry point: execute ``(method, arg)`` commands from ``conn`` until ``stop``."""
    pin_to_cpus(cpus)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    gen = LoadGen(loop)
    while True:
        method, kwargs = conn.recv()
        if method == "stop":
            break
        try:
            conn.send(("ok", loop.run_until_complete(getattr(gen, method)(**kwargs))))
        except Exception:  # report to the parent instead of dying silently
            conn.send(("error", traceback.format_exc()))


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def parse_cpus(text: str) -> set[int] | None:
    """'0' or '0,1' -> {0} / {0, 1}; '' or 'none' -> no pinning."""
    if not text or text.lower() == "none":
        return None
    return {int(c) for c in text.split(",")}


def gateway_argv(cmd: str) -> list[str]:
    """Split the gateway command; a leading ``python`` means this interpreter (the venv's)."""
    argv = shlex.split(cmd)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


NGINX_CONF = """\
worker_processes {workers};
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream fake {{ server {upstream}; keepalive 256; }}
  server {{
    listen {host}:{port} backlog=4096;
    client_max_body_size 32m; client_body_buffer_size 2m;
    location = /health {{ return 200 "ok"; }}
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def nginx_argv(workdir: Path, port: int, upstream_port: int, workers: int) -> list[str]:
    """nginx as the thing measured: proxy_pass with keep-alive upstream connections, the body held
    in memory and the answer passed on as it arrives (the reference, ``--gateway-cmd nginx``)."""
    if shutil.which("nginx") is None:
        raise RuntimeError("--gateway-cmd nginx needs nginx on PATH (Debian: apt install nginx-light)")
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, upstream=f"{HOST}:{upstream_port}", host=HOST, port=port,
                                      workers=workers))
    return ["nginx", "-e", "stderr", "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"]


def gateway_fingerprint(cmd: str, cwd: Path = HERE) -> str | None:
    """sha256 prefix of the first ``.py`` file in the gateway command: which version was measured."""
    for arg in gateway_argv(cmd)[1:]:
        path = cwd / arg
        if arg.endswith(".py") and path.is_file():
            return f"{arg} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    return None


class Harness:
    """Fake upstream + load generator (CPU 1) + gateway (CPU 0); stops everything it started."""

    def __init__(self, gateway_cmd: str = "python gateway.py", workers: int | None = None,
                 gateway_cpus: set[int] | None = None, aux_cpus: set[int] | None = None,
                 upstream: UpstreamOptions | None = None, log_level: str = "warning", cwd: Path = HERE) -> None:
        self.gateway_cmd, self.workers, self.cwd, self.log_level = gateway_cmd, workers, cwd, log_level
        self.all_cpus = os.sched_getaffinity(0)
        many = len(self.all_cpus) >= 2
        self.gateway_cpus = gateway_cpus if many else None
        self.aux_cpus = aux_cpus if many else None
        self.upstream_options = upstream or UpstreamOptions()
        self.gateway_file: str | None = None
        self.ctx = multiprocessing.get_context("fork")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.gateway_log = self.workdir / "gateway.log"
        self.upstream_ports: list[int] = []   # every port of the fake upstream; the first is "the" upstream
        self.gateway_port = 0
        self.gateway_extra_env: dict[str, str] = {}
        self._lg: multiprocessing.connection.Connection | None = None
        self.pinned = {"aux": False, "gateway": False}

    # lifecycle ------------------------------------------------------------------
    def __enter__(self) -> Harness:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        self.pinned["aux"] = pin_to_cpus(self.aux_cpus)   # this orchestrating process too
        self.start_upstream()
        self.start_loadgen()
        self.start_gateway()

    def start_upstream(self) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=upstream_main, name="fake-upstream", daemon=True,
                                args=(child, self.aux_cpus, self.upstream_options))
        proc.start()
        self.procs.append(proc)
        if not parent.poll(10):
            raise RuntimeError("fake upstream did not start")
        self.upstream_ports = parent.recv()

    def start_loadgen(self) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=loadgen_main, name="loadgen", daemon=True, args=(child, self.aux_cpus))
        proc.start()
        self.procs.append(proc)
        self._lg = parent

    def start_gateway(self, timeout: float = 30.0, extra_env: dict[str, str] | None = None) -> None:
        """Start the gateway on a fresh port and wait for its /health.

        ``extra_env`` is laid over the usual environment (``BACKENDS=fake=<upstream>``,
        ``DEFAULT_BACKEND``, ``LOG_LEVEL``): the routing scenarios run a gateway of their own,
        configured with several servers or an alias chain, and the default one comes back after.
        """
        if self.gateway is not None and self.gateway.poll() is None:
            raise RuntimeError("start_gateway: a gateway is still running; stop_gateway() first")
        self.gateway_port = free_port()
        self.gateway_file = gateway_fingerprint(self.gateway_cmd, self.cwd)
        if self.gateway_cmd == "nginx":
            argv = nginx_argv(self.workdir, self.gateway_port, self.upstream_port, self.workers or 1)
        else:
            argv = gateway_argv(self.gateway_cmd) + ["--host", HOST, "--port", str(self.gateway_port)]
            if self.workers:
                argv += ["--workers", str(self.workers)]
        self.gateway_extra_env = dict(extra_env or {})
        env = dict(os.environ, BACKENDS=f"fake={self.upstream_url}", DEFAULT_BACKEND="fake",
                   LOG_LEVEL=self.log_level) | self.gateway_extra_env
        cpus = self.gateway_cpus or self.all_cpus     # not the aux CPUs this process is pinned to
        with open(self.gateway_log, "wb") as log:
            self.gateway = subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=lambda: pin_to_cpus(cpus))
        self.pinned["gateway"] = bool(self.gateway_cpus) and os.sched_getaffinity(self.gateway.pid) == cpus
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gateway.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.gateway.returncode}:\n{self.gateway_log_tail()}")
            try:
                status, _ = http_get(self.gateway_port, "/health", timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not healthy after {timeout}s:\n{self.gateway_log_tail()}")

    def stop_gateway(self) -> None:
        """SIGTERM the gateway's process group (we made it a session leader), then SIGKILL leftovers."""
        if self.gateway is None:
            return
        pgid = self.gateway.pid
        try:
            if self.gateway.poll() is None:
                os.killpg(pgid, signal.SIGTERM)
                self.gateway.wait(10)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            self.gateway = None
            return
        try:                        # a gateway that did not stop, or workers left behind in the group
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.gateway.wait(5)
        self.gateway = None

    def restart_gateway(self, extra_env: dict[str, str] | None = None) -> None:
        """Stop the running gateway and start a fresh one with ``extra_env`` (None: the default one)."""
        self.stop_gateway()
        self.start_gateway(extra_env=extra_env)

    def stop(self) -> None:
        self.stop_gateway()
        if self._lg is not None:
            try:
                self._lg.send(("stop", {}))
            except OSError:
                pass
        for proc in self.procs:     # the load generator stops on "stop"; the upstream runs until told
            if proc.name == "fake-upstream":
                proc.terminate()
            proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        self.procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # helpers ----------------------------------------------------------------------
    @property
    def upstream_port(self) -> int:
        return self.upstream_ports[0]

    @property
    def upstream_url(self) -> str:
        return f"http://{HOST}:{self.upstream_port}/v1"

    @property
    def upstream_urls(self) -> list[str]:
        """The ``/v1`` URL of every port of the fake upstream: servers of one backend."""
        return [f"http://{HOST}:{port}/v1" for port in self.upstream_ports]

    @property
    def gateway_pid(self) -> int:
        assert self.gateway is not None
        return self.gateway.pid

    def gateway_log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.gateway_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def loadgen(self, method: str, **kwargs: Any) -> Any:
        """Call a ``LoadGen`` method in the load-generator process and return its result."""
        assert self._lg is not None
        self._lg.send((method, kwargs))
        status, result = self._lg.recv()
        if status != "ok":
            raise RuntimeError(f"load generator failed:\n{result}")
        return result

    def upstream_stats(self) -> dict[str, Any]:
        return json.loads(http_get(self.upstream_port, "/_stats")[1])

    def watch(self) -> dict[str, int]:
        upstream, loadgen = (p.pid for p in self.procs)
        assert upstream and loadgen
        return {"gateway": self.gateway_pid, "upstream": upstream, "loadgen": loadgen}

    def run_load(self, target: str, kinds: list[RequestKind], concurrency: int, warmup: float,
                 duration: float, **options: Any) -> dict[str, Any]:
        """One warm-up + measured window against ``target`` ('direct' or 'gateway').

        ``options`` are further ``LoadSpec`` fields (timeout, rss_every).
        """
        port = self.gateway_port if target == "gateway" else self.upstream_port
        spec = LoadSpec(port=port, kinds=kinds, concurrency=concurrency, warmup=warmup,
                        duration=duration, watch=self.watch(), **options)
        return self.loadgen("run", spec=spec)


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------

@dataclass
class Scenario:
    key: str
    title: str
    kind: RequestKind
    concurrency: int


SCENARIOS = [
    Scenario("small_c64", f"small chat ({len(SMALL_REQUEST)} B -> {len(JSON_ANSWER)} B)",
             RequestKind("small", SMALL_REQUEST, sse=False), 64),
    Scenario("small_c1", "small chat, concurrency 1 (latency)", RequestKind("small", SMALL_REQUEST, sse=False), 1),
    Scenario("sse_c64", f"SSE stream, {SSE_EXPECTED_EVENTS} events / {SSE_BODY_LEN} B",
             RequestKind("sse", STREAM_REQUEST, sse=True), 64),
    Scenario("sse_at_once_c64", "the same SSE stream, written by the upstream in one write",
             RequestKind("sse_at_once", AT_ONCE_STREAM_REQUEST, sse=True), 64),
    Scenario("big_c8", f"1 MiB request body ({len(BIG_REQUEST)} B)", RequestKind("big", BIG_REQUEST, sse=False), 8),
]


def add_gateway_cost(res: dict[str, Any]) -> None:
    """Add the gateway's CPU µs per request, and what one busy core would do at that cost."""
    if res["requests"]:
        res["gw_cpu_us_per_req"] = round(res["cpu_s"]["gateway"] * 1e6 / res["requests"], 1)
        if res["gw_cpu_us_per_req"]:
            res["gw_rps_per_core_est"] = round(1e6 / res["gw_cpu_us_per_req"], 1)


def run_scenarios(h: Harness, warmup: float, duration: float, log: Callable[[str], None],
                  only: set[str] | None = None) -> dict[str, Any]:
    """Each scenario of ``SCENARIOS`` (those in ``only``, when given) direct, then through the gateway."""
    results: dict[str, Any] = {}
    for sc in SCENARIOS:
        if only is not None and sc.key not in only:
            continue
        results[sc.key] = {"title": sc.title, "concurrency": sc.concurrency}
        for target in ("direct", "gateway"):
            log(f"  {sc.key:15} {target:8} c={sc.concurrency} ...")
            res = h.run_load(target, [sc.kind], sc.concurrency, warmup, duration)
            if target == "gateway":
                add_gateway_cost(res)
            results[sc.key][target] = res
            log(f"      {res['rps']:>10,.1f} req/s  p50 {res['p50_ms']} ms  p99 {res['p99_ms']} ms"
                f"  errors {res['errors']}")
        d, g = results[sc.key]["direct"], results[sc.key]["gateway"]
        ratio = round(d["rps"] / g["rps"], 1) if g["rps"] else None
        results[sc.key]["direct_over_gateway"] = ratio
        g["harness_bound"] = is_harness_bound(g, ratio)
    return results


# Routing (CONTRACT sections 8 and 9): the small_c64 load through a gateway of its own, configured with
# several servers for its backend or with an alias whose chain starts at a dead backend.  Direct is
# not run again: the load generator and the fake upstream do exactly what they do in small_c64, so
# small_c64's direct figure (and its gateway figure, for comparison) is the reference.

@dataclass
class RoutingScenario:
    key: str
    title: str
    concurrency: int
    # the gateway's extra environment, given the harness (its upstream ports) and a port nobody listens on
    env: Callable[[Harness, int], dict[str, str]]


def _servers3_env(h: Harness, _dead_port: int) -> dict[str, str]:
    if len(h.upstream_urls) < 3:
        raise RuntimeError("servers3_c64 needs a fake upstream with 3 listeners (UpstreamOptions.listeners)")
    return {"BACKENDS": "fake=" + "|".join(h.upstream_urls[:3])}


def _chain_dead_first_env(h: Harness, dead_port: int) -> dict[str, str]:
    return {"BACKENDS": f"fake={h.upstream_url},dead=http://{HOST}:{dead_port}/v1",
            "ALIASES": "fake:gpt-bench=dead:gpt-bench|fake:gpt-bench"}


SMALL_KIND = RequestKind("small", SMALL_REQUEST, sse=False)

ROUTING_SCENARIOS = [
    RoutingScenario("servers3_c64", "small chat, backend `fake` with 3 servers (`BACKENDS=fake=u1|u2|u3`)",
                    64, _servers3_env),
    RoutingScenario("chain_dead_first_c64", "small chat, alias chain `dead:gpt-bench|fake:gpt-bench`, "
                    "first target refuses connections", 64, _chain_dead_first_env),
]
MIN_FAIR_SHARE = 0.5   # servers3: each server must get at least this fraction of an even share
SECTION_NAMES = [sc.key for sc in SCENARIOS] + [sc.key for sc in ROUTING_SCENARIOS] + ["memory"]


def port_refuses(port: int) -> bool:
    """True when a TCP connect to ``port`` is refused (nobody listens): the dead backend stays dead."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def probe_chat(port: int, body: bytes = SMALL_REQUEST, timeout: float = 10.0) -> dict[str, Any]:
    """One chat request, outside the measured load: who answered it (``x-gateway-backend`` and
    ``x-gateway-model``), which says the gateway routes the way the scenario means."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return {"status": resp.status, "bytes": len(data), "backend": resp.getheader("x-gateway-backend"),
                "model": resp.getheader("x-gateway-model")}
    except OSError as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def _listener_counts(stats: dict[str, Any], key: str, n: int) -> list[int]:
    return list(stats.get(key, [0] * n))[:n]


def run_routing_scenario(h: Harness, sc: RoutingScenario, warmup: float, duration: float,
                         log: Callable[[str], None]) -> dict[str, Any]:
    """Restart the gateway with the scenario's environment, check one request routes as meant, run
    the load, and count what each upstream port received meanwhile (warm-up and drain included:
    the load generator's window is not visible from here, and the split is a ratio)."""
    dead_port = free_port()          # bound then closed: nobody listens there
    env = sc.env(h, dead_port)
    out: dict[str, Any] = {"title": sc.title, "concurrency": sc.concurrency, "gateway_env": env}
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    log(f"  {sc.key:15} gateway  c={sc.concurrency} (gateway restarted with {shown}) ...")
    h.restart_gateway(extra_env=env)
    n = len(h.upstream_ports)
    before = h.upstream_stats()
    out["probe"] = probe_chat(h.gateway_port)
    res = h.run_load("gateway", [SMALL_KIND], sc.concurrency, warmup, duration)
    add_gateway_cost(res)
    after = h.upstream_stats()
    out["gateway_alive"] = h.gateway is not None and h.gateway.poll() is None
    if not out["gateway_alive"] or res["errors"]:   # its log is gone once the next gateway starts
        out["gateway_log_tail"] = h.gateway_log_tail(40)
    checks: list[str] = []          # what is wrong; empty = the scenario measured what it means to
    probe = out["probe"]
    if probe.get("status") != 200 or probe.get("backend") != "fake":
        checks.append(f"probe request not answered 200 by backend fake: {probe}")
    if sc.key == "servers3_c64":
        reqs = [b - a for a, b in zip(_listener_counts(before, "requests_by_listener", n),
                                      _listener_counts(after, "requests_by_listener", n))][:3]
        conns = [b - a for a, b in zip(_listener_counts(before, "connections_by_listener", n),
                                       _listener_counts(after, "connections_by_listener", n))][:3]
        total = sum(reqs)
        shares = [round(r / total, 3) if total else 0.0 for r in reqs]
        out["split"] = {"ports": h.upstream_ports[:3], "requests": reqs, "shares": shares, "new_connections": conns}
        if not total or min(shares) < MIN_FAIR_SHARE / len(reqs):
            checks.append(f"load not spread over the 3 servers: requests {reqs}")
    elif sc.key == "chain_dead_first_c64":
        out["dead_port"] = dead_port
        out["dead_port_refuses_after"] = port_refuses(dead_port)
        out["upstream_requests"] = after["requests"] - before["requests"]
        if not out["dead_port_refuses_after"]:
            checks.append(f"port {dead_port} of the dead backend accepted a connection: something listens there")
    if not out["gateway_alive"]:
        checks.append("the gateway died during the run")
    out["checks_failed"] = checks
    out["gateway"] = res
    log(f"      {res['rps']:>10,.1f} req/s  p50 {res['p50_ms']} ms  p99 {res['p99_ms']} ms"
        f"  gw {res.get('gw_cpu_us_per_req')} µs/req  errors {res['errors']}"
        + (f"  split {out['split']['requests']}" if "split" in out else "")
        + (f"  CHECK FAILED: {'; '.join(checks)}" if checks else ""))
    return out


def run_routing_scenarios(h: Harness, warmup: float, duration: float, log: Callable[[str], None],
                          only: set[str] | None = None, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each of ``ROUTING_SCENARIOS`` (those in ``only``) on a gateway of its own; the default gateway
    is started again afterwards, whatever happened, so the harness is left as it was found.

    ``reference`` is small_c64's result: its direct figure gives the direct/gateway ratio (and the
    HARNESS-BOUND flag), its gateway figure the comparison.
    """
    results: dict[str, Any] = {}
    todo = [sc for sc in ROUTING_SCENARIOS if only is None or sc.key in only]
    if not todo:
        return results
    if h.gateway_cmd == "nginx":
        log("  routing scenarios skipped: they configure the gateway itself, not nginx")
        return results
    try:
        for sc in todo:
            try:
                out = run_routing_scenario(h, sc, warmup, duration, log)
            except RuntimeError as exc:     # its gateway did not start (a setting it refuses, ...)
                log(f"      FAILED: {exc}")
                results[sc.key] = {"title": sc.title, "concurrency": sc.concurrency, "error": str(exc)}
                continue
            g = out["gateway"]
            ratio = None
            if reference:
                d, base = reference["direct"], reference["gateway"]
                ratio = round(d["rps"] / g["rps"], 1) if g["rps"] else None
                # with errors the CPU went partly to failed requests: no per-request cost to compare
                if base.get("gw_cpu_us_per_req") and g.get("gw_cpu_us_per_req") and not g["errors"]:
                    out["vs_small_c64"] = {
                        "gw_cpu_us_per_req_delta": round(g["gw_cpu_us_per_req"] - base["gw_cpu_us_per_req"], 1),
                        "gw_cpu_ratio": round(g["gw_cpu_us_per_req"] / base["gw_cpu_us_per_req"], 3),
                        "rps_ratio": round(g["rps"] / base["rps"], 3) if base["rps"] else None}
            out["direct_over_gateway"] = ratio
            g["harness_bound"] = is_harness_bound(g, ratio)
            results[sc.key] = out
    finally:
        log("  restarting the default gateway ...")
        h.restart_gateway()
    return results


def _wait_upstream_streams_closed(h: Harness, timeout: float) -> int:
    """Poll the fake upstream until no stream is active; return how many are still active."""
    deadline = time.monotonic() + timeout
    while (left := h.upstream_stats()["active_streams"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def is_harness_bound(res: dict[str, Any], direct_over_gateway: float | None) -> bool:
    """The harness can hardly go faster than the gateway did: direct was under 2x the gateway's
    throughput, or the gateway had CPU to spare while the load generator + upstream were busy."""
    aux = res["cpu_pct"].get("loadgen", 0) + res["cpu_pct"].get("upstream", 0)
    return (direct_over_gateway is not None and direct_over_gateway < 2) or \
        (res["cpu_pct"].get("gateway", 0) < 90 and aux >= 85)


def measure_open_streams(h: Harness, n: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Gateway RSS with ``n`` slow streams open through it, and whether upstream streams end after.

    Run on a fresh gateway: after the heavy scenarios the heap holds freed memory that new streams
    would reuse, hiding their cost.  A light warm-up (a few requests and streams) first loads the
    code paths and the connection pool.
    """
    log(f"  memory: warm-up, then {n} slow streams held open through the gateway ...")
    h.run_load("gateway", [SCENARIOS[0].kind, SCENARIOS[2].kind], concurrency=4, warmup=0, duration=0.5)
    h.loadgen("hold", port=h.gateway_port, n=min(8, n))
    h.loadgen("release")
    _wait_upstream_streams_closed(h, 5.0)
    time.sleep(0.5)
    before_kb = rss_kb(h.gateway_pid)
    fds_before = fd_count(h.gateway_pid)
    held = h.loadgen("hold", port=h.gateway_port, n=n)
    with_kb = 0
    for _ in range(5):                     # let allocations settle, keep the highest reading
        time.sleep(0.3)
        with_kb = max(with_kb, rss_kb(h.gateway_pid))
    fds_open = fd_count(h.gateway_pid)
    upstream_open = h.upstream_stats()["active_streams"]
    h.loadgen("release")
    left = _wait_upstream_streams_closed(h, 5.0)   # a gateway that notices the client leaving stops upstream
    time.sleep(0.5)
    opened = held["opened"]
    return {
        "streams": n, "opened": opened, "open_errors": held["errors"], "open_s": held["open_s"],
        "rss_before_kb": before_kb, "rss_with_streams_kb": with_kb,
        "kb_per_stream": round((with_kb - before_kb) / opened, 1) if opened else None,
        "fds_before": fds_before, "fds_with_streams": fds_open,
        "upstream_streams_open": upstream_open, "upstream_streams_left_5s_after_hangup": left,
        "rss_after_release_kb": rss_kb(h.gateway_pid), "fds_after_release": fd_count(h.gateway_pid),
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

OTHER_CPU_WARN = 15.0   # % of one core used by others in a window before the report warns

def _f(v: Any, digits: int = 1) -> str:
    """Format a number for the table; None/NaN as '-'."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, (int, float)):
        return f"{v:,.{digits}f}"
    return str(v)


def _mb(kb: Any) -> str:
    return "-" if not kb else f"{kb / 1024:,.1f}"


def markdown_report(report: dict[str, Any]) -> str:
    meta, sc = report["meta"], report["scenarios"]
    lines = [
        "## llm-gateway benchmark", "",
        f"- gateway: `{meta['gateway_cmd']}` ({meta['gateway_file'] or 'file unknown'}), "
        f"workers={meta['workers'] or 'default'}, "
        f"CPUs {meta['gateway_cpus'] or 'any'} (pinned: {meta['pinned']['gateway']}); "
        f"fake upstream + load generator on CPUs {meta['aux_cpus'] or 'any'} (pinned: {meta['pinned']['aux']})",
        f"- each run: {meta['warmup_s']} s warm-up, then a {meta['duration_s']} s measured window; "
        f"upstream SSE: {meta['sse_events_per_write']} event(s) per write, {meta['sse_gap_ms']} ms between writes "
        "(0 = back to back)",
        f"- {meta['cpu_model']}, {meta['cpus']} CPUs, Python {meta['python']}, {meta['date']}", "",
    ]
    if meta.get("only"):
        lines += [f"- only: {', '.join(meta['only'])} (`--only`); the other scenarios and sections were not run", ""]
    cap = report.get("direct_capacity")
    if cap:
        verdict = "OK, the gateway is the bottleneck" if cap["ratio"] and cap["ratio"] >= 5 else \
            "WARNING: below 5x, the harness may limit the gateway figures"
        lines += ["### Direct capacity (load generator -> fake upstream, no gateway)", "",
                  f"small chat at concurrency 64: **{_f(cap['direct_rps'])} req/s** direct vs "
                  f"{_f(cap['gateway_rps'])} req/s through the gateway = **{_f(cap['ratio'])}x** ({verdict})", ""]
    if sc:
        lines += _scenario_table(sc)
    if report.get("routing"):
        lines += _routing_section(report["routing"], sc.get("small_c64"))

    lat = report.get("latency_c1")
    if lat:
        lines += ["### Added latency at concurrency 1", "",
                  "| | p50 ms | p99 ms |", "|---|--:|--:|",
                  f"| direct | {_f(lat['direct_p50_ms'], 3)} | {_f(lat['direct_p99_ms'], 3)} |",
                  f"| through gateway | {_f(lat['gateway_p50_ms'], 3)} | {_f(lat['gateway_p99_ms'], 3)} |",
                  f"| **added by gateway** | **{_f(lat['added_p50_ms'], 3)}** | **{_f(lat['added_p99_ms'], 3)}** |",
                  ""]

    mem = report["memory"]
    st = mem.get("open_streams")
    lines += ["### Memory", "", "| gateway RSS | MiB |", "|---|--:|",
              f"| at rest (after start, before any load) | {_mb(mem['rss_at_rest_kb'])} |"]
    if st:
        lines += [f"| after a light warm-up (a few requests and streams) | {_mb(st['rss_before_kb'])} |",
                  f"| with {st['opened']}/{st['streams']} slow streams open | {_mb(st['rss_with_streams_kb'])} |",
                  f"| after those clients hung up | {_mb(st['rss_after_release_kb'])} |"]
    lines += [f"| at the end, after all scenarios | {_mb(mem['rss_after_scenarios_kb'])} |", ""]
    if st:
        lines += [f"**{_f(st['kb_per_stream'])} KB per open stream**; gateway fds {st['fds_before']} -> "
                  f"{st['fds_with_streams']} with streams -> {st['fds_after_release']} after hang-up; "
                  f"upstream streams open {st['upstream_streams_open']}, still open 5 s after the clients "
                  f"hung up: {st['upstream_streams_left_5s_after_hangup']}"
                  + (" (the gateway does not cancel upstream requests of departed clients)"
                     if st["upstream_streams_left_5s_after_hangup"] else ""), ""]
    return "\n".join(lines)


def _row_cells(r: dict[str, Any]) -> str:
    """The figures of one run, as table cells from req/s to errors (see the table heads)."""
    aux = r["cpu_pct"].get("loadgen", 0) + r["cpu_pct"].get("upstream", 0)
    return (f"{_f(r['rps'])} | {_f(r['p50_ms'], 3)} | {_f(r['p99_ms'], 3)} | {_f(r.get('gw_cpu_us_per_req'))} | "
            f"{_f(r.get('gw_rps_per_core_est'))} | {_f(r['cpu_pct'].get('gateway'))} | "
            f"{_mb(r.get('gw_peak_rss_kb'))} | {_f(aux)} | {_f(r.get('other_cpu_pct'))} | "
            f"{r['errors']}{' ' + json.dumps(r['error_kinds']) if r['errors'] else ''}")


def _routing_section(routing: dict[str, Any], small: dict[str, Any] | None) -> list[str]:
    """The routing scenarios beside small_c64's gateway row: what several servers, or a chain whose
    first target is dead, cost the gateway per request over the plain case."""
    lines = ["### Routing: several servers, and a fallback chain whose first target is dead", "",
             "Each on a gateway restarted with its own environment; the same small chat as small_c64, whose "
             "gateway row (one server, no alias) is the reference. Direct is small_c64's.", "",
             "| scenario | conc | req/s | p50 ms | p99 ms | gw CPU µs/req | gw req/s per core (est.) | gw CPU % | "
             "gw peak RSS MiB | aux CPU % | other CPU % | errors | gw CPU µs/req vs small_c64 | req/s vs small_c64 |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    if small:
        lines.append(f"| small_c64 (reference: 1 server, no alias) | {small['concurrency']} | "
                     f"{_row_cells(small['gateway'])} | - | - |")
    notes: list[str] = []
    for key, s in routing.items():
        if "error" in s:
            lines.append(f"| {key} | {s['concurrency']} | did not run: see below |" + " |" * 11)
            notes.append(f"{key}: FAILED: {s['error'].splitlines()[0]}")
            continue
        vs = s.get("vs_small_c64")
        delta = f"{vs['gw_cpu_us_per_req_delta']:+,.1f} ({(vs['gw_cpu_ratio'] - 1) * 100:+.0f}%)" if vs else "-"
        rps = f"{vs['rps_ratio']:.2f}x" if vs and vs["rps_ratio"] else "-"
        lines.append(f"| {key} | {s['concurrency']} | {_row_cells(s['gateway'])} | {delta} | {rps} |")
        if "split" in s:
            sp = s["split"]
            notes.append(f"{key}: requests per server (ports {', '.join(map(str, sp['ports']))}; warm-up included) "
                         f"**{' / '.join(f'{r:,}' for r in sp['requests'])}** = "
                         f"{' / '.join(f'{x * 100:.1f}%' for x in sp['shares'])}; new upstream connections "
                         f"{' / '.join(map(str, sp['new_connections']))}")
        if "dead_port" in s:
            notes.append(f"{key}: first target `dead` at port {s['dead_port']} (nobody listens; still refusing "
                         f"after the run: {s['dead_port_refuses_after']}); {s['upstream_requests']:,} requests "
                         "reached the fake upstream (its second target)")
        p = s.get("probe", {})
        notes.append(f"{key}: probe request answered {p.get('status')} by x-gateway-backend={p.get('backend')}, "
                     f"x-gateway-model={p.get('model')}")
        for failed in s.get("checks_failed", []):
            notes.append(f"{key}: CHECK FAILED: {failed}")
        if s["gateway"].get("harness_bound"):
            notes.append(f"{key}: HARNESS-BOUND (see above): use gw req/s per core (est.)")
        if s["gateway"]["errors"]:
            notes.append(f"{key}: {s['gateway']['errors']:,} errors: its CPU µs/req divides the gateway's CPU by the "
                         "successful requests only, so it is not the cost of a request")
        notes += [f"{key}: error answer `{e}`" for e in dict.fromkeys(s["gateway"].get("error_samples", []))]
    lines += ["", *(f"- {n}" for n in notes), ""]
    return lines


def _scenario_table(sc: dict[str, Any]) -> list[str]:
    """The direct/gateway table of ``SCENARIOS`` and the warnings that go with it."""
    lines = ["### Throughput, latency and cost per scenario", "",
             "| scenario | path | conc | req/s | p50 ms | p99 ms | gw CPU µs/req | gw req/s per core (est.) | "
             "gw CPU % | gw peak RSS MiB | aux CPU % | other CPU % | errors |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for s in sc.values():
        for target in ("direct", "gateway"):
            lines.append(f"| {s['title'] if target == 'direct' else ''} | {target} | {s['concurrency']} | "
                         f"{_row_cells(s[target])} |")
    lines.append("")
    ratios = ", ".join(f"{k} {_f(s['direct_over_gateway'])}x" for k, s in sc.items())
    lines += [f"direct / gateway throughput: {ratios}", ""]
    bound = [k for k, s in sc.items() if s["gateway"].get("harness_bound")]
    if bound:
        lines += [f"HARNESS-BOUND: {', '.join(bound)}: direct capacity under 2x the gateway's, or the gateway "
                  "had CPU to spare while the load generator + fake upstream were busy: req/s there is (close to) "
                  "the harness's limit, not the gateway's; 'gw req/s per core (est.)' = 1e6 / CPU µs per request "
                  "is the gateway's own figure.", ""]
    under = [f"{k} {_f(s['direct_over_gateway'])}x" for k, s in sc.items()
             if k not in bound and s["direct_over_gateway"] is not None and s["direct_over_gateway"] < 5]
    if under:
        lines += [f"HARNESS UNDER 5x: {', '.join(under)}: the harness is less than 5x faster than the gateway "
                  "there, so its req/s and latencies are partly the harness's; CPU µs per request is the "
                  "gateway's own.", ""]
    samples = [e for s in sc.values() for t in ("direct", "gateway") for e in s[t].get("error_samples", [])]
    if samples:
        lines += ["first error answers:", *(f"- `{e}`" for e in samples[:5]), ""]
    busiest = max(s[t].get("other_cpu_pct", 0) for s in sc.values() for t in ("direct", "gateway"))
    if busiest > OTHER_CPU_WARN:
        lines += [f"WARNING: up to {busiest:.0f}% of a core went to other work during a window (other "
                  "processes on this machine or kernel time not charged to ours): req/s and latency may be "
                  "low and noisy; CPU µs/req is less affected.", ""]
    sse = sc.get("sse_c64")
    if sse:
        g = sse["gateway"]
        rate = "the harness's rate, see HARNESS-BOUND" if g.get("harness_bound") else "the gateway's rate"
        lines += [f"SSE through the gateway: {_f(g['rps'])} streams/s = "
                  f"{_f(g['rps'] * SSE_EXPECTED_EVENTS, 0)} events/s ({rate}); every stream checked for "
                  f"{SSE_EXPECTED_EVENTS} events, {SSE_BODY_LEN} B and the final [DONE].", ""]
    return lines


def _cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or b"").decode().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short windows (about 45 s in all)")
    ap.add_argument("--duration", type=float, help="measured window per run, seconds (default 10, quick 3)")
    ap.add_argument("--warmup", type=float, help="warm-up per run, seconds (default 2, quick 1)")
    ap.add_argument("--json", metavar="FILE", help="write the JSON report here instead of stdout")
    ap.add_argument("--gateway-cmd", default=os.environ.get("GATEWAY_CMD", "python gateway.py"),
                    help="command to run the gateway; --host/--port are appended (env GATEWAY_CMD); "
                         "'nginx' measures nginx proxy_pass instead, the reference (nginx on PATH)")
    ap.add_argument("--workers", type=int, help="pass --workers N to the gateway (default: not passed, 1)")
    ap.add_argument("--gateway-cpus", default="0", help="CPUs for the gateway, e.g. 0 or 0,1; 'none' = no pin")
    ap.add_argument("--aux-cpus", default="1", help="CPUs for fake upstream + load generator")
    ap.add_argument("--streams", type=int, default=200, help="slow streams held open for memory per stream")
    ap.add_argument("--sse-gap-ms", type=float, default=0.0,
                    help="pause between upstream SSE writes (default 0: back to back)")
    ap.add_argument("--sse-events-per-write", type=int, default=1,
                    help="SSE events per upstream write (default 1: each event its own send and TCP segment; "
                         "more gives the harness headroom over a fast gateway, but fewer, larger reads)")
    ap.add_argument("--only", metavar="SCENARIO[,SCENARIO]",
                    help="run only these, e.g. small_c64,servers3_c64,chain_dead_first_c64; names: "
                         + ", ".join(SECTION_NAMES) + " (memory = the open-streams measurement)")
    ap.add_argument("--log-level", default="warning",
                    help="the gateway's LOG_LEVEL (default warning; info writes one access line per request)")
    args = ap.parse_args(argv)
    only: set[str] | None = None
    if args.only:
        only = {name.strip() for name in args.only.split(",") if name.strip()}
        if unknown := only - set(SECTION_NAMES):
            ap.error(f"--only: unknown {', '.join(sorted(unknown))}; known: {', '.join(SECTION_NAMES)}")
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    harness = Harness(gateway_cmd=args.gateway_cmd, workers=args.workers,
                      gateway_cpus=parse_cpus(args.gateway_cpus), aux_cpus=parse_cpus(args.aux_cpus),
                      upstream=UpstreamOptions(sse_gap=args.sse_gap_ms / 1000,
                                               events_per_write=args.sse_events_per_write),
                      log_level=args.log_level)
    t0 = time.monotonic()
    log(f"starting fake upstream, load generator and `{args.gateway_cmd}` ...")
    with harness as h:
        time.sleep(0.5)
        rest_kb = rss_kb(h.gateway_pid)
        rest_fds = fd_count(h.gateway_pid)
        streams = measure_open_streams(h, args.streams, log) if only is None or "memory" in only else None
        scenarios = run_scenarios(h, warmup, duration, log, only)
        end_kb = rss_kb(h.gateway_pid)
        gateway_alive = h.gateway is not None and h.gateway.poll() is None
        log_tail = h.gateway_log_tail()      # before a routing scenario's gateway writes its own log
        routing = run_routing_scenarios(h, warmup, duration, log, only, scenarios.get("small_c64"))
        upstream = h.upstream_stats()
    small = scenarios.get("small_c64")
    c1 = scenarios.get("small_c1")
    report = {
        "meta": {
            "gateway_cmd": args.gateway_cmd, "gateway_file": harness.gateway_file,
            "only": sorted(only) if only else None,
            "workers": args.workers, "log_level": args.log_level,
            "gateway_cpus": args.gateway_cpus, "aux_cpus": args.aux_cpus, "pinned": harness.pinned,
            "warmup_s": warmup, "duration_s": duration, "sse_gap_ms": args.sse_gap_ms,
            "sse_events_per_write": args.sse_events_per_write,
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "elapsed_s": round(time.monotonic() - t0, 1),
            "request_bytes": {"small": len(SMALL_REQUEST), "stream": len(STREAM_REQUEST), "big": len(BIG_REQUEST)},
            "response_bytes": {"json": len(JSON_ANSWER), "sse": SSE_BODY_LEN, "sse_events": SSE_EXPECTED_EVENTS},
        },
        "direct_capacity": {"direct_rps": small["direct"]["rps"], "gateway_rps": small["gateway"]["rps"],
                            "ratio": small["direct_over_gateway"]} if small else None,
        "scenarios": scenarios,
        "routing": routing,
        "latency_c1": {
            "direct_p50_ms": c1["direct"]["p50_ms"], "direct_p99_ms": c1["direct"]["p99_ms"],
            "gateway_p50_ms": c1["gateway"]["p50_ms"], "gateway_p99_ms": c1["gateway"]["p99_ms"],
            "added_p50_ms": round(c1["gateway"]["p50_ms"] - c1["direct"]["p50_ms"], 3),
            "added_p99_ms": round(c1["gateway"]["p99_ms"] - c1["direct"]["p99_ms"], 3),
        } if c1 else None,
        "memory": {"rss_at_rest_kb": rest_kb, "fds_at_rest": rest_fds, "open_streams": streams,
                   "rss_after_scenarios_kb": end_kb},
        "upstream_stats": upstream,
        "gateway_alive_at_end": gateway_alive,
    }
    for run in [s[t] for s in scenarios.values() for t in ("direct", "gateway")] + \
            [s["gateway"] for s in routing.values() if "gateway" in s]:      # keep the JSON readable
        run.pop("per_kind", None)
        run.pop("rss_timeline", None)
    print(markdown_report(report))
    if not gateway_alive:
        print(f"\nWARNING: the gateway died during the run; log tail:\n{log_tail}")
    for key, s in routing.items():
        if s.get("gateway_log_tail"):
            print(f"\n{key}: errors or a dead gateway; the tail of its gateway's log:\n{s['gateway_log_tail']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"JSON report written to {args.json}")
    else:
        print("\n### JSON\n\n```json\n" + json.dumps(report, indent=2) + "\n```")
    total_errors = sum(s[t]["errors"] for s in scenarios.values() for t in ("direct", "gateway")) + \
        sum(s["gateway"]["errors"] for s in routing.values() if "gateway" in s)
    # a routing scenario that did not run, or did not route as meant (load not spread, ...), fails the run
    routing_failed = [k for k, s in routing.items() if "error" in s or s.get("checks_failed")]
    return 1 if total_errors or not gateway_alive or routing_failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:   # the gateway (or a harness process) did not start
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
