#!/usr/bin/env python3
"""Soak test for llm-gateway: a minute of mixed traffic, then look for errors and leaks.

Usage::

    python soak.py [--duration 60] [--concurrency 64] [--json out.json] [--gateway-cmd "python gateway.py"]

It starts bench.py's fake upstream, load generator and the gateway (same pinning: gateway on
CPU 0, the rest on CPU 1), then keeps ``--concurrency`` keep-alive connections busy through the
gateway with a mix of requests:

* plain chat requests (543 B JSON answers),
* SSE streams of 201 events, read to the end and checked (event count, bytes, ``[DONE]``),
* SSE streams whose client hangs up on purpose after a random number of events (10% of all
  requests by default): the gateway must close the upstream stream and the sockets.

The upstream paces SSE events (``--sse-gap-ms``, 1 ms by default) so that a stream is still
running when its client leaves, and it closes keep-alive connections idle for more than
``--upstream-idle`` seconds (5 s: uvicorn's default, so llama.cpp's Python server's and vLLM's),
as real servers do.  That way a gateway that closes its pooled sockets when the upstream does
gets back to its starting descriptor count; one that keeps them (half-closed, CLOSE_WAIT) until
its pool is next used does not, and the report shows their TCP states.  It also exposes the
keep-alive race: a request sent on a pooled connection the upstream is closing at that moment.

Reported: requests completed, intended early disconnects, errors (any non-200, short or
malformed response, timeout or connection failure that was not an intended disconnect), the
gateway's RSS at start, after the warm-up and at the end, and its open file descriptors
before the load and after it (polled until back at the starting count, or a time limit).

Exit status: 0 when there were no errors and the descriptors came back to their start value,
1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import (
    JSON_ANSWER,
    SMALL_REQUEST,
    SSE_EXPECTED_EVENTS,
    STREAM_REQUEST,
    Harness,
    RequestKind,
    UpstreamOptions,
    fd_count,
    fd_kinds,
    parse_cpus,
    rss_kb,
)


def request_mix(stream_fraction: float, abort_fraction: float) -> list[RequestKind]:
    """Plain chat, full streams and streams abandoned mid-way, weighted by fraction of requests."""
    if not 0 <= abort_fraction <= stream_fraction <= 1:
        raise SystemExit("need 0 <= --abort-fraction <= --stream-fraction <= 1")
    return [
        RequestKind("chat", SMALL_REQUEST, sse=False, weight=1 - stream_fraction),
        RequestKind("stream", STREAM_REQUEST, sse=True, weight=stream_fraction - abort_fraction),
        # hang up after 1 .. all-but-two events: always before the stream has ended
        RequestKind("stream_abort", STREAM_REQUEST, sse=True, weight=abort_fraction,
                    abort_after=(1, SSE_EXPECTED_EVENTS - 2)),
    ]


def settle_fds(pid: int, target: int, timeout: float) -> tuple[int, float]:
    """Poll the gateway's fd count until it is back at ``target``; return (count, seconds waited)."""
    t0 = time.monotonic()
    while (n := fd_count(pid)) > target and time.monotonic() - t0 < timeout:
        time.sleep(0.25)
    return n, round(time.monotonic() - t0, 2)


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    kinds = request_mix(args.stream_fraction, args.abort_fraction)
    harness = Harness(gateway_cmd=args.gateway_cmd, workers=args.workers,
                      gateway_cpus=parse_cpus(args.gateway_cpus), aux_cpus=parse_cpus(args.aux_cpus),
                      upstream=UpstreamOptions(sse_gap=args.sse_gap_ms / 1000, idle_timeout=args.upstream_idle))
    log(f"starting fake upstream, load generator and `{args.gateway_cmd}` ...")
    with harness as h:
        time.sleep(0.5)
        pid = h.gateway_pid
        start: dict[str, Any] = {"rss_kb": rss_kb(pid), "fds": fd_count(pid), "fd_kinds": fd_kinds(pid)}
        log(f"load: {args.warmup:g} s warm-up + {args.duration:g} s at concurrency {args.concurrency} ...")
        load = h.run_load("gateway", kinds, args.concurrency, args.warmup, args.duration,
                          timeout=args.timeout, rss_every=1.0)
        after_load = {"rss_kb": rss_kb(pid), "fds": fd_count(pid), "fd_kinds": fd_kinds(pid)}
        log(f"load done; waiting up to {args.settle_timeout:g} s for the gateway's fds to return to "
            f"{start['fds']} (now {after_load['fds']}) ...")
        fds_end, waited = settle_fds(pid, start["fds"], args.settle_timeout)
        end: dict[str, Any] = {"rss_kb": rss_kb(pid), "fds": fds_end, "settle_s": waited, "fd_kinds": fd_kinds(pid)}
        if fds_end > start["fds"]:
            # Diagnostic only (does not change the verdict): a gateway whose pool drops dead
            # connections only when it is next used gets them back after one more request.
            h.run_load("gateway", kinds[:1], 1, 0, 0.2)
            end["fds_after_one_more_request"] = settle_fds(pid, start["fds"], 2.0)[0]
        upstream = h.upstream_stats()
        alive = h.gateway is not None and h.gateway.poll() is None
        log_tail = h.gateway_log_tail() if not alive else ""
    return {"gateway_file": harness.gateway_file, "start": start, "load": load, "after_load": after_load,
            "end": end, "upstream": upstream,
            "gateway_alive": alive, "gateway_log_tail": log_tail}


def kb_to_mb(kb: int) -> str:
    return f"{kb / 1024:,.1f}"


def summary(args: argparse.Namespace, r: dict[str, Any]) -> tuple[str, bool]:
    """A markdown table of the run, and whether it passed."""
    load, start, end, up = r["load"], r["start"], r["end"], r["upstream"]
    per_kind = load["per_kind"]
    timeline = load.get("rss_timeline") or []
    fds_ok = end["fds"] <= start["fds"]
    passed = load["errors"] == 0 and fds_ok and r["gateway_alive"]
    rows = [
        ("requests completed (whole run)",
         f"{load['completed_total']:,} ok: {per_kind.get('chat:ok', 0):,} chat ({len(JSON_ANSWER)} B), "
         f"{per_kind.get('stream:ok', 0):,} full streams ({SSE_EXPECTED_EVENTS} events)"),
        ("intended early disconnects", f"{load['aborted']:,}"),
        ("errors", f"**{load['errors']}** {json.dumps(load['error_kinds']) if load['errors'] else ''}"),
        ("measured window", f"{load['rps']:,.1f} req/s, p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, "
                            f"max {load['max_ms']} ms"),
        ("gateway CPU", f"{load['cpu_pct'].get('gateway', 0)} % of one core"),
        ("gateway RSS MiB: start / after warm-up / end of load / after settle",
         f"{kb_to_mb(start['rss_kb'])} / {kb_to_mb(load['gw_rss_start_kb'])} / "
         f"{kb_to_mb(load['gw_rss_end_kb'])} / {kb_to_mb(end['rss_kb'])}"
         + (f" (window min {kb_to_mb(min(timeline))}, max {kb_to_mb(max(timeline))})" if timeline else "")),
        ("gateway fds: start / right after load / after settle",
         f"{start['fds']} / {r['after_load']['fds']} / **{end['fds']}** after {end['settle_s']} s "
         f"({'back to start' if fds_ok else 'NOT back to start: ' + json.dumps(end['fd_kinds'])})"),
        *([("gateway fds after one more request (diagnostic)", str(end["fds_after_one_more_request"]))]
          if "fds_after_one_more_request" in end else []),
        ("upstream: streams started / completed / cancelled by the gateway",
         f"{up['streams_started']:,} / {up['streams_completed']:,} / {up['streams_cancelled']:,}"),
        ("upstream after settle: open connections / active streams",
         f"{up['open_connections']} / {up['active_streams']}"),
        ("gateway alive at the end", "yes" if r["gateway_alive"] else "**NO**"),
        ("result", "**PASS**" if passed else "**FAIL**"),
    ]
    lines = [f"## llm-gateway soak: `{args.gateway_cmd}` ({r['gateway_file'] or 'file unknown'}), "
             f"{args.duration:g} s at concurrency "
             f"{args.concurrency}, {args.stream_fraction:.0%} streams of which {args.abort_fraction:.0%} of all "
             f"requests hang up early", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if load.get("error_samples"):
        lines += ["", "first error answers:", *(f"- `{e}`" for e in load["error_samples"])]
    if r["gateway_log_tail"]:
        lines += ["", "gateway log tail:", "```", r["gateway_log_tail"], "```"]
    return "\n".join(lines), passed


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load after the warm-up")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of the same load before measuring")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--stream-fraction", type=float, default=0.5, help="share of requests that stream")
    ap.add_argument("--abort-fraction", type=float, default=0.1,
                    help="share of all requests whose client hangs up mid-stream")
    ap.add_argument("--sse-gap-ms", type=float, default=1.0, help="upstream pause between SSE events")
    ap.add_argument("--upstream-idle", type=float, default=5.0,
                    help="the upstream closes keep-alive connections idle this long (seconds)")
    ap.add_argument("--timeout", type=float, default=30.0, help="a request taking longer is an error")
    ap.add_argument("--settle-timeout", type=float, default=15.0,
                    help="how long to wait for the gateway's fds to come back after the load")
    ap.add_argument("--gateway-cmd", default=os.environ.get("GATEWAY_CMD", "python gateway.py"),
                    help="command to run the gateway; --host/--port are appended (env GATEWAY_CMD)")
    ap.add_argument("--workers", type=int, help="pass --workers N to the gateway")
    ap.add_argument("--gateway-cpus", default="0")
    ap.add_argument("--aux-cpus", default="1")
    ap.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    args = ap.parse_args(argv)

    result = run_soak(args)
    text, passed = summary(args, result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        log(f"JSON written to {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:   # the gateway (or a harness process) did not start
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
