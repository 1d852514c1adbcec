"""llm-gateway: an OpenAI-compatible gateway that routes by model prefix.

Clients point `OPENAI_BASE_URL` at this server and choose a backend with a prefix on the model
name: `ollama:qwen2.5` goes to Ollama's `/v1` API, `openai:gpt-4.1-mini` to api.openai.com, and
any backend named in `BACKENDS` the same way. The gateway rewrites the model name, fills optional
defaults, and streams the upstream's answer back byte for byte, as soon as each chunk arrives.

The file reads top to bottom: settings, errors, routing, the request going up, the upstream
connection, the answer coming back, the app, the client connection, the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import ctypes
import enum
import functools
import gc
import hashlib
import hmac
import logging
import os
import random
import re
import secrets
import shutil
import ssl
import sys
import tempfile
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote, unquote_to_bytes, urlsplit

import httptools
import httpx
import msgspec
import prometheus_client
import prometheus_client.metrics_core
import prometheus_client.multiprocess
import uvicorn
from dotenv import load_dotenv
from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

logger = logging.getLogger("llm_gateway")
T = TypeVar("T")
JSON_DECODER = msgspec.json.Decoder()  # strict RFC 8259; integers keep every digit, beyond 64 bits too
JSON_ENCODER = msgspec.json.Encoder()

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

MiB = 1024 * 1024


class ConfigError(ValueError):
    """A setting in the environment that the gateway cannot use."""


MAX_CHAIN = 8  # targets in one fallback chain


class Server:
    """One server of a backend, by its `/v1` base URL, and what this gateway process knows of it:
    requests in flight, failures in a row and until when it is ejected, the models it lists (None
    while unknown: then it serves every model), and when it last served each model."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.safe_url = public_url(url)  # without credentials or query, fit for logs and error messages
        self.in_flight = 0
        self.failures = 0
        self.ejected_until = 0.0
        self.on_trial = False  # its cooldown is over, and one request is trying it again
        self.models: frozenset[str] | None = None
        self.served: dict[str, float] = {}


@dataclass(frozen=True)
class Backend:
    """An OpenAI-compatible upstream: its name (the model prefix), its servers (one or more `/v1`
    base URLs that serve the same models), its key."""

    name: str
    servers: tuple[Server, ...]
    api_key: str | None

    @property
    def safe_url(self) -> str:
        """The servers' URLs without credentials or query, fit for logs and error messages."""
        return "|".join(server.safe_url for server in self.servers)


@dataclass(frozen=True)
class Settings:
    backends: dict[str, Backend]
    default_backend: str | None
    default_temperature: float | None
    default_max_tokens: int | None
    connect_timeout: float
    read_timeout: float
    models_timeout: float
    max_connections: int
    max_body_bytes: int
    shutdown_timeout: float
    gateway_api_keys: tuple[bytes, ...]
    gateway_id: str
    log_level: str
    aliases: dict[str, tuple[str, ...]]  # exact model name -> its targets, a fallback chain
    cors_origins: tuple[str, ...]
    alias_patterns: tuple[tuple[str, tuple[str, ...]], ...] = ()  # name prefix -> targets, longest first

    @functools.cached_property
    def via(self) -> bytes:
        """This gateway's entry in the `Via` header of every upstream request."""
        return f"1.1 llm-gateway-{self.gateway_id}".encode()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read every setting from `env`; `.env.example` documents each one."""
        backends = {
            "ollama": _backend(env, "ollama", env.get("OLLAMA_BASE_URL") or "http://localhost:11434"),
            "openai": _backend(env, "openai", env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"),
        }
        for name, url in _parse_backends(env.get("BACKENDS", "")):
            backends[name] = _backend(env, name, url)
        if env.get("ECHO_BACKEND", "on").strip().lower() not in ("off", "0", "false", "no"):
            backends.setdefault("echo", Backend("echo", (Server(ECHO_URL),), None))
        default = env.get("DEFAULT_BACKEND", "openai").strip() or None
        if default is not None and default not in backends:
            raise ConfigError(f"DEFAULT_BACKEND={default!r} is not a backend; choose one of {', '.join(backends)}")
        aliases = _parse_aliases(env.get("ALIASES", ""), backends, default)
        return cls(
            backends=backends,
            default_backend=default,
            default_temperature=_number(env, "DEFAULT_TEMPERATURE", None, float, zero_ok=True),
            default_max_tokens=_number(env, "DEFAULT_MAX_TOKENS", None, int),
            connect_timeout=_number(env, "CONNECT_TIMEOUT", 10.0, float),
            read_timeout=_number(env, "READ_TIMEOUT", 600.0, float),
            models_timeout=_number(env, "MODELS_TIMEOUT", 5.0, float),
            max_connections=_number(env, "MAX_CONNECTIONS", 1000, int),
            max_body_bytes=_number(env, "MAX_BODY_BYTES", 32 * MiB, int),
            shutdown_timeout=_number(env, "SHUTDOWN_TIMEOUT", 8.0, float),
            gateway_api_keys=tuple(k.strip().encode() for k in env.get("GATEWAY_API_KEYS", "").split(",") if k.strip()),
            gateway_id=_gateway_id(env.get("GATEWAY_ID", "").strip() or secrets.token_hex(6)),
            log_level=_log_level(env.get("LOG_LEVEL") or "info"),
            cors_origins=tuple(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip()),
            aliases={name: chain for name, chain in aliases if not name.endswith("*")},
            alias_patterns=tuple(sorted(
                ((name[:-1], chain) for name, chain in aliases if name.endswith("*")), key=lambda p: -len(p[0])
            )),
        )


def with_v1(url: str) -> str:
    """Ollama serves its OpenAI-compatible API under `/v1`; accept the URL with or without it."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def public_url(url: str) -> str:
    """`url` without user info or query string, so that no secret reaches a log or a client."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _backend(env: Mapping[str, str], name: str, urls: str) -> Backend:
    """A backend and its servers: `urls` holds one base URL, or several separated by `|`."""
    key_name = re.sub(r"[-.]", "_", name.upper()) + "_API_KEY"
    key = env.get(key_name, "").strip() or None
    servers = []
    for url in (url.strip() for url in urls.split("|")):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            shown = public_url(url) if parts.scheme in ("http", "https") else url.rpartition("@")[2]  # no password
            raise ConfigError(
                f"backend {name!r} needs an http:// or https:// URL without query or fragment, like "
                f"http://localhost:8000/v1 (several servers: separated by '|'); got {shown!r}"
            )
        if key and (parts.username or parts.password):
            raise ConfigError(f"backend {name!r} has a user and password in its URL and {key_name} too; keep one of them")
        servers.append(Server(with_v1(url) if name == "ollama" else url.rstrip("/")))
    return Backend(name=name, servers=tuple(servers), api_key=key)


def _parse_aliases(
    spec: str, backends: Mapping[str, Backend], default: str | None
) -> list[tuple[str, tuple[str, ...]]]:
    """`ALIASES="name=target,name2=target2|target3"`: each name with its targets, checked now, so that
    an alias that could never be routed stops the gateway at start."""
    aliases = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, targets = item.partition("=")
        name, chain = name.strip(), tuple(target.strip() for target in targets.split("|"))
        if not sep or not name or "*" in name[:-1] or not all(chain) or len(chain) > MAX_CHAIN:
            raise ConfigError(
                f"ALIASES entries look like name=backend:model, or name=backend:model|backend:model (at most "
                f"{MAX_CHAIN}), with '*' only at the end of a name; got {item!r}"
            )
        for target in chain:
            try:
                split_model(target, backends, default)
            except GatewayError as exc:
                raise ConfigError(f"ALIASES entry {item!r}: {exc.message}") from None
        aliases.append((name, chain))
    return aliases


def _parse_backends(spec: str) -> Iterable[tuple[str, str]]:
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, url = item.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(
                f"BACKENDS entries look like name=url (name of letters, digits, '_', '-', '.'), got {item!r}"
            )
        yield name, url.strip()


def _gateway_id(name: str) -> str:
    """`name`, checked: it names this gateway in `Via`, where a comma or a space would split it."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"GATEWAY_ID may hold letters, digits, '_', '-' and '.' only, got {name!r}")
    return name


def _log_level(name: str) -> str:
    if name.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL must be debug, info, warning, error or critical, got {name!r}")
    return name.upper()


def _number(env: Mapping[str, str], name: str, default: Any, kind: type, zero_ok: bool = False) -> Any:
    """A number setting; zero only where it means something (a temperature), never a timeout of 0."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a {kind.__name__}, got {raw!r}") from None
    if not (value >= 0 if zero_ok else value > 0):  # NaN fails both
        raise ConfigError(f"{name} must be {'zero or more' if zero_ok else 'more than zero'}, got {raw!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Errors: everything the gateway answers itself is shaped like OpenAI's errors
# ---------------------------------------------------------------------------------------------


class GatewayError(Exception):
    """An error answered by the gateway itself, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def response(self) -> Response:
        if self.status == 499:  # the client is gone: nothing is sent, and the log counts no bytes
            return Response(status_code=499)
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return Response(JSON_ENCODER.encode(body), self.status, self.headers, media_type="application/json")


# ---------------------------------------------------------------------------------------------
# Routing: which backend gets a model, and where the request goes
# ---------------------------------------------------------------------------------------------

MAX_MODEL_NAME = 1024

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(value: str) -> str:
    """`value` with control characters escaped, so that no client can forge a log line."""
    return _CONTROL_CHARS.sub(lambda m: m.group().encode("unicode_escape").decode(), value)


def route_model(model: str, settings: Settings) -> tuple[Backend, str]:
    """Split `model` at its first colon when the part before it names a backend.

    `ollama:qwen2.5:7b` -> (ollama, `qwen2.5:7b`); a name without a known prefix goes whole to the
    default backend, so clients that send `gpt-4o-mini` keep working.
    """
    return split_model(model, settings.backends, settings.default_backend)


def split_model(model: str, backends: Mapping[str, Backend], default: str | None) -> tuple[Backend, str]:
    if len(model) > MAX_MODEL_NAME or _CONTROL_CHARS.search(model):
        raise GatewayError(
            400, f"model must be at most {MAX_MODEL_NAME} printable characters, like 'ollama:qwen2.5'", param="model"
        )
    prefix, colon, rest = model.partition(":")
    backend = backends.get(prefix) if colon else None
    if backend is None:
        if default is None:
            raise GatewayError(
                400, f"model {model!r} does not start with a backend prefix; use one of: {_choices(backends)}",
                param="model", code="model_not_found",
            )
        backend, rest = backends[default], model
    if not rest:
        raise GatewayError(400, f"model {model!r} names no model; send one, like {_choices(backends)}", param="model")
    return backend, rest


def _choices(backends: Mapping[str, Backend]) -> str:
    return ", ".join(f"'{name}:<model>'" for name in backends)


class Target(NamedTuple):
    """Where one attempt at a request goes: a backend, the model as that backend knows it, and
    the name it was routed by (`ollama:qwen2.5`), which `x-gateway-model` reports."""

    backend: Backend
    model: str
    name: str


def route(model: str, settings: Settings) -> list[Target]:
    """The targets of a request for `model`, in the order they are tried: an alias's chain, a chain
    the client sent (`openai:gpt-4.1-mini|ollama:qwen2.5`), or the model alone. An alias's targets
    are not looked up again, so aliases never loop."""
    chain = settings.aliases.get(model) or (_pattern_alias(model, settings) if settings.alias_patterns else None)
    if chain is None:
        chain = model.split("|") if "|" in model else (model,)
        if len(chain) > MAX_CHAIN:
            raise GatewayError(400, f"a fallback chain may hold at most {MAX_CHAIN} models; send fewer", param="model")
    targets = []
    for name in chain:
        backend, upstream_model = route_model(name, settings)
        targets.append(Target(backend, upstream_model, f"{backend.name}:{upstream_model}"))
    return targets


def _pattern_alias(model: str, settings: Settings) -> tuple[str, ...] | None:
    for prefix, chain in settings.alias_patterns:  # longest first
        if model.startswith(prefix):
            return chain
    return None


# Passive health: a server that failed is left out for a cooldown that grows with each failure in a row.
COOLDOWN_FIRST, COOLDOWN_MAX = 5.0, 60.0


def pick_server(backend: Backend, model: str, tried: set[Server], now: float) -> Server | None:
    """The server of `backend` for a request for `model`, among those this request has not tried:
    a server back from its cooldown first, for one request to try it again; else, of the servers
    not ejected that serve the model (or all not ejected, when none lists it), the one with the
    fewest requests in flight, then the one that served the model last, its weights likely still
    loaded. When every one is ejected, the one whose cooldown ends first."""
    servers = backend.servers
    if len(servers) == 1:
        return None if servers[0] in tried else servers[0]
    fresh = [server for server in servers if server not in tried]
    if not fresh:
        return None
    ready = [server for server in fresh if server.ejected_until <= now and not server.on_trial]
    if not ready:
        return min(fresh, key=lambda server: server.ejected_until)
    if returning := [server for server in ready if server.failures]:
        return returning[0]
    serving = [server for server in ready if server.models is None or model in server.models] or ready
    return min(serving, key=lambda server: (server.in_flight, -server.served.get(model, -1.0)))


def eject(server: Server, now: float) -> None:
    """Leave `server` out for a cooldown: near 5 s after one failure, doubling with each more, at most 60 s."""
    server.failures += 1
    cooldown = COOLDOWN_FIRST * 2 ** min(server.failures - 1, 16)  # a dead server fails for ever
    cooldown *= random.uniform(0.9, 1.1)  # servers ejected together come back apart
    server.ejected_until = now + min(cooldown, COOLDOWN_MAX)
    server.on_trial = False


_DOT_SEGMENT = re.compile(rb"(?:^|/)(?:\.|%2e){1,2}(?:/|$)", re.IGNORECASE)
_UNSAFE_IN_PATH = re.compile(rb"%2f|%5c|%00|\\|\x00", re.IGNORECASE)


def upstream_path(raw_path: bytes) -> str:
    """The part of the request path after `/v1`, refused if it could leave the backend's `/v1`.

    Routing matched the decoded path; the raw one is what goes upstream, so it must begin with
    `/v1/` as written: `/v%31/chat/completions` would otherwise reach `<base>31/chat/completions`.
    """
    if not raw_path.startswith(b"/v1/") or _DOT_SEGMENT.search(raw_path) or _UNSAFE_IN_PATH.search(raw_path):
        raise invalid_path()
    return raw_path[3:].decode("latin-1")


def invalid_path() -> GatewayError:
    return GatewayError(
        400, "the request path must begin with '/v1/' as written, not percent-encoded, and may not contain "
        "'.' or '..' segments, encoded slashes or NUL bytes", code="invalid_path",
    )


# ---------------------------------------------------------------------------------------------
# The request going up: body, defaults, headers
# ---------------------------------------------------------------------------------------------

TEXT_GENERATION_PATHS = frozenset({"/chat/completions", "/completions"})


# The gateway routes by a model; what names none is the backend's business alone.
WITHOUT_A_MODEL = "requests without a model (stored responses, files, batches) go to the backend directly"
CLIENT_TIMEOUT = 60.0  # seconds for a request head to arrive, and of silence within a body, as nginx
BODY_FAILED = "body_failed"  # in a request's state: why its body cannot be read (ClientConnection, below)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes. The client
    connection, which sees every read, wakes the request with an error in its state (BODY_FAILED)
    when the body stops arriving for CLIENT_TIMEOUT (408) or its framing is broken (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    state = request.scope["state"]
    while (message := await request.receive())["type"] == "http.request":
        if BODY_FAILED in state:
            raise state[BODY_FAILED]
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
    request.state.outcome = "client disconnected"
    raise GatewayError(499, "the client went away before sending the whole body")


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"request body is larger than {limit} bytes (MAX_BODY_BYTES); send a smaller one", code="request_too_large"
    )


def parse_payload(body: bytes) -> dict[str, Any]:
    """The JSON object of a request, strictly per RFC 8259: no NaN, no numbers that overflow a
    double, no invalid UTF-8, no nesting deeper than Python's recursion limit (about 950 levels
    here). A name given twice keeps its last value, as with OpenAI and Ollama; the body is
    re-serialised, so the backend sees the one `model` the gateway routed by."""
    if not body:
        raise GatewayError(
            400, f"request body is empty; send a JSON object with a 'model' and Content-Type: application/json "
            f"({WITHOUT_A_MODEL})"
        )
    try:
        payload = JSON_DECODER.decode(body)
    except ValueError as exc:  # msgspec.DecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise GatewayError(
            400, f"request body is not valid JSON ({_why_not_json(body, exc)}); send a JSON object with "
            "Content-Type: application/json"
        ) from None
    except RecursionError:
        raise too_deep() from None
    if not isinstance(payload, dict):
        raise GatewayError(400, "request body must be a JSON object, like {\"model\": ..., ...}")
    if not isinstance(payload.get("model"), str):
        raise GatewayError(
            400, f"request body needs a string 'model', like \"ollama:qwen2.5\" ({WITHOUT_A_MODEL})", param="model"
        )
    return payload


_LONE_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _why_not_json(body: bytes, exc: ValueError) -> str:
    """The parser's reason, but for a string cut inside a UTF-16 surrogate pair (a JavaScript
    client cutting a string inside an emoji): the parser calls that a truncated input."""
    if "truncated" in str(exc) and (lone := _LONE_HIGH_SURROGATE.search(body)):
        return (
            f"a string holds {lone.group().decode()} without the low surrogate that must follow it (byte "
            f"{lone.start()}); send whole characters"
        )
    return str(exc)


def serialize(payload: dict[str, Any]) -> bytes:
    """The rewritten request body, compact JSON."""
    try:
        return JSON_ENCODER.encode(payload)
    except RecursionError:  # a body nested just below the parser's limit, written from a deeper stack
        raise too_deep() from None


def too_deep() -> GatewayError:
    return GatewayError(400, "request body nests too deep; flatten it")


def fill_defaults(payload: dict[str, Any], backend: Backend, path: str, settings: Settings) -> None:
    """Add DEFAULT_TEMPERATURE / DEFAULT_MAX_TOKENS to a text generation request that leaves them out.

    The token limit goes in the field the backend honours: Ollama ignores `max_completion_tokens`,
    while OpenAI's reasoning models reject `max_tokens` in chat. So a client's own
    `max_completion_tokens` goes to Ollama as `max_tokens` too: it would generate without limit.
    """
    if path not in TEXT_GENERATION_PATHS:
        return
    if backend.name == "ollama" and "max_completion_tokens" in payload and "max_tokens" not in payload:
        payload["max_tokens"] = payload.pop("max_completion_tokens")
    if settings.default_temperature is not None and "temperature" not in payload:
        payload["temperature"] = settings.default_temperature
    if settings.default_max_tokens is not None and not ({"max_tokens", "max_completion_tokens"} & payload.keys()):
        field = "max_completion_tokens" if backend.name == "openai" and path == "/chat/completions" else "max_tokens"
        payload[field] = settings.default_max_tokens


# Hop-by-hop headers (RFC 9110 7.6.1) never cross the gateway; the others listed never go upstream.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"trailer", b"proxy-connection"}
)
# The gateway writes its own `Content-Type`, `Content-Length` and `Via`; credentials are its to choose.
NOT_FORWARDED_UP = HOP_BY_HOP | {
    b"host", b"content-length", b"content-type", b"via", b"cookie", b"authorization", b"x-api-key", b"api-key",
    b"expect",  # the body goes up whole, at once
}
# They name the account a key belongs to, so they go up only with the client's own key.
NOT_FORWARDED_UP_WITHOUT_CLIENT_KEY = NOT_FORWARDED_UP | {b"openai-organization", b"openai-project"}
# The gateway's server writes its own `Date` and `Server`, as nginx does in front of an upstream.
NOT_FORWARDED_DOWN = HOP_BY_HOP | {b"set-cookie", b"date", b"server"}
# A relayed answer: the gateway says itself whether a proxy in front may buffer it; a 204 or 304
# has no body, and a length would promise one.
NOT_RELAYED = NOT_FORWARDED_DOWN | {b"x-accel-buffering"}
NOT_RELAYED_WITHOUT_BODY = NOT_RELAYED | {b"content-length"}


def _connection_named(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers named by `Connection`, which are hop-by-hop too."""
    return {
        token.strip().lower() for name, value in headers if name.lower() == b"connection" for token in value.split(b",")
    }


def filter_headers(headers: list[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    named = _connection_named(headers)
    return [
        (name, value)
        for name, value in headers
        if (low := name.lower()) not in dropped and low not in named and not low.startswith(b"proxy-")
    ]


def upstream_headers(request: Request, backend: Backend, settings: Settings) -> list[tuple[bytes, bytes]]:
    """The client's end-to-end headers, the backend's credential, and this gateway's `Via` entry."""
    raw = request.scope["headers"]
    client_key = None if backend.api_key or settings.gateway_api_keys else request.headers.get("authorization")
    headers = filter_headers(raw, NOT_FORWARDED_UP if client_key else NOT_FORWARDED_UP_WITHOUT_CLIENT_KEY)
    if backend.api_key:
        headers.append((b"authorization", b"Bearer " + backend.api_key.encode()))
    elif client_key:
        headers.append((b"authorization", client_key.encode("latin-1")))
    earlier = [value for name, value in raw if name == b"via"]
    headers.append((b"via", b", ".join([*earlier, settings.via])))
    return headers


# ---------------------------------------------------------------------------------------------
# The upstream connection: HTTP/1.1 on asyncio and httptools, under the shared httpx client
# ---------------------------------------------------------------------------------------------

HIGH_WATER = 256 * 1024  # body bytes held for a slow client before reading from the upstream pauses
MAX_RESPONSE_HEAD = 100 * 1024  # bytes of status line and header fields (and of trailers), as httpx allows
MAX_RESPONSE_FIELDS = 256  # header fields in a response head, and trailer fields after its body


class Phase(enum.Enum):
    """Where an upstream connection stands. Whether it may carry another request is decided by its
    phase alone (`UpstreamConnection.reusable`)."""

    IDLE = "idle"  # in the pool, or new: no request on it
    SENDING = "sending"  # a request went out; its response head has not come back
    RECEIVING = "receiving"  # the response head came; its body is arriving
    PAUSED = "paused"  # receiving, but not reading: the client is behind by HIGH_WATER bytes
    DONE = "done"  # the response ended, reading resumed
    BROKEN = "broken"  # lost, malformed, timed out or talking out of turn: closed, never reused


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a backend, carrying one request at a time.

    The response head arrives as a future; body chunks gather in a buffer that the reader empties,
    and reading from the socket pauses while that buffer is full, so a slow client slows the
    backend down instead of filling the gateway's memory. One watchdog timer per connection,
    not one per chunk, enforces the read timeout: the longest silence while the gateway waits.
    What httptools holds while a head or a trailer arrives is bounded: the bytes of an unfinished
    head, or read without the parser making progress, may not pass MAX_RESPONSE_HEAD.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> None:
        self.loop, self.key = loop, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)  # `6 ;x=1`: RFC 9112 7.1.1
        self.phase = Phase.IDLE
        self.writable: asyncio.Future[None] | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        self.heard = 0.0  # when the upstream last sent something, or the gateway began to wait
        self.idle_since = 0.0  # when it last went back to the pool
        self.reset()

    def reset(self) -> None:
        """Get ready for the next request on this connection."""
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.headers: list[tuple[bytes, bytes]] = []
        self.field_bytes = 0  # of the head, then of the trailers
        self.fields = 0
        self.framed = False  # Content-Length or chunked; otherwise the body ends with the connection
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.keep_alive = False
        self.received_any = False
        self.progressed = False  # the parser handed over a piece of the response in the current read
        self.held = 0  # bytes httptools may be holding: of an unfinished head, or read since it last did
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry another request: its response ended, both ends keep it
        alive, and the whole request went out (an upstream may answer before reading all of it)."""
        return (
            self.phase is Phase.DONE and self.keep_alive and self.transport is not None
            and self.transport.get_write_buffer_size() == 0
        )

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.phase not in (Phase.SENDING, Phase.RECEIVING, Phase.PAUSED):  # nothing was asked
            self.break_off(httpx.RemoteProtocolError("the upstream sent bytes nobody asked for"))
            return
        self.received_any = True
        self.heard = self.loop.time()
        self.progressed = False
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # no protocol switch either
            cause = exc.__context__ or exc  # a callback's own error, when one of them raised it
            reason = str(cause) or type(cause).__name__
            self.break_off(httpx.RemoteProtocolError(f"malformed response from the upstream: {reason}"))
            return
        if not self.head.done():
            self.held += len(data)
        else:
            self.held = 0 if self.progressed else self.held + len(data)
        if self.held > MAX_RESPONSE_HEAD:  # a head that does not end, or one endless trailer field
            part = "trailers are" if self.head.done() else "head is"
            self.break_off(httpx.RemoteProtocolError(f"the upstream's response {part} over {MAX_RESPONSE_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.phase in (Phase.RECEIVING, Phase.PAUSED) and exc is None and not self.framed:
            self.on_message_complete()  # a body without length or chunks ends when the upstream closes
        self.break_off(httpx.RemoteProtocolError("the upstream closed the connection before its response ended"))
        self.resume_writing()

    def pause_writing(self) -> None:
        self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.phase is Phase.DONE:  # a second response, never asked for: it stops here, with its connection
            raise httptools.HttpParserError("a response the gateway did not ask for")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        self.field_bytes += len(name) + len(value) + 4
        if self.field_bytes > MAX_RESPONSE_HEAD or self.fields > MAX_RESPONSE_FIELDS:
            part = "trailers" if self.head.done() else "head"
            raise httptools.HttpParserError(
                f"its response {part} has over {MAX_RESPONSE_FIELDS} fields or {MAX_RESPONSE_HEAD} bytes"
            )
        if self.head.done():  # a trailer field after a chunked body: not a header of the response
            self.progressed = True
            return
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"transfer-encoding" and value.strip().lower() != b"chunked":  # gzip, or a misspelling
            raise httptools.HttpParserError(f"transfer coding {value[:40]!r} cannot be relayed, only chunked")
        if lower == b"content-length" or lower == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise httptools.HttpParserError(f"status {status} is not an HTTP status")
        self.field_bytes = self.fields = 0  # a 1xx head's fields, or the final head's: what follows counts anew
        if status < 200:  # 100 Continue and the like: the real head follows
            self.headers, self.framed = [], False
            return
        self.keep_alive = self.parser.should_keep_alive()  # only known while the head is fresh
        self.phase = Phase.RECEIVING
        self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.progressed = True
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.phase is Phase.RECEIVING and self.transport:
            self.transport.pause_reading()
            self.phase = Phase.PAUSED
        self.wake()

    def on_chunk_header(self) -> None:
        self.progressed = True

    on_chunk_complete = on_chunk_header

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return
        if self.phase is Phase.PAUSED and self.transport:  # whatever comes now is out of turn, and must be seen
            self.transport.resume_reading()
        self.phase = Phase.DONE
        self.disarm()
        self.wake()

    # What the transport asks of a connection

    async def exchange(self, head: bytes, body: bytes, timeouts: Mapping[str, float | None]) -> None:
        """Send a request and wait for the head of its response."""
        assert self.transport and self.phase is Phase.IDLE
        self.phase = Phase.SENDING
        if len(body) > 65536:
            self.transport.write(head)  # no copy of a large body just to glue the head on
            self.transport.write(body)
        else:
            self.transport.write(head + body)
        if self.writable:
            await self.drained(timeouts.get("write"))
        await self.wait(self.head, timeouts.get("read"))

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        """The body bytes that have arrived, waiting for some; None at the end of the body."""
        if not self.chunks and self.phase in (Phase.RECEIVING, Phase.PAUSED):
            self.waiter = self.loop.create_future()
            await self.wait(self.waiter, timeout)
        if self.chunks:
            chunk = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
            self.chunks, self.buffered = [], 0
            if self.phase is Phase.PAUSED and self.transport:
                self.transport.resume_reading()
                self.phase = Phase.RECEIVING
            return chunk
        if self.error is not None:
            raise self.error
        return None

    async def wait(self, future: asyncio.Future[None], timeout: float | None) -> None:
        """Wait for the upstream, at most `timeout` seconds of silence."""
        self.heard = self.loop.time()
        if timeout is not None and self.watchdog is None:
            self.watchdog = self.loop.call_later(timeout, self.check_silence, timeout)
        await future

    def check_silence(self, timeout: float) -> None:
        """The watchdog: fail a wait that has heard nothing for `timeout` seconds, else look again later."""
        silent_for = self.loop.time() - self.heard
        waiting = not self.head.done() or (self.waiter is not None and not self.waiter.done())
        if waiting and silent_for >= timeout:
            self.watchdog = None
            self.break_off(httpx.ReadTimeout(
                "the upstream went silent mid-response" if self.head.done() else "the upstream did not answer in time"
            ))
            return
        # Not waiting (a slow client holds the stream back): the upstream is not to blame yet.
        next_look = timeout - silent_for if waiting else timeout
        self.watchdog = self.loop.call_later(next_look, self.check_silence, timeout)

    async def drained(self, timeout: float | None) -> None:
        """Wait until the upstream has taken the request body or answered early (a 413, a 401, ...),
        at most `timeout` seconds."""
        assert self.writable
        writable = self.writable  # resume_writing() lets go of it once drained
        await asyncio.wait((writable, self.head), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not writable.done() and not self.head.done():
            raise httpx.WriteTimeout("the upstream took too long to read the request")

    def disarm(self) -> None:
        if self.watchdog:
            self.watchdog.cancel()
            self.watchdog = None

    def break_off(self, error: Exception) -> None:
        """The connection is done for: close it, and fail the request on it unless its response ended."""
        if self.phase in (Phase.SENDING, Phase.RECEIVING, Phase.PAUSED):
            self.error = error
            if not self.head.done():
                self.head.set_exception(error)
                self.head.exception()  # marked as seen: nobody may be waiting for an idle connection's head
        self.close()
        self.wake()

    def wake(self) -> None:
        if self.waiter and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        self.phase = Phase.BROKEN
        self.disarm()
        if self.transport:
            self.transport.close()


class UpstreamBody(httpx.AsyncByteStream):
    """A response body read straight off its connection, which goes back to the pool at the end."""

    def __init__(self, connection: UpstreamConnection, pool: Http11Transport, timeout: float | None) -> None:
        self.connection, self.pool, self.timeout = connection, pool, timeout
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.connection.next_chunk(self.timeout)) is not None:
            yield chunk

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.release(self.connection)


STALE_WINDOW = 0.1  # seconds: how soon a pooled connection the upstream was closing fails a request
KEEPALIVE_EXPIRY = 2.0  # seconds an idle upstream connection is kept: well within uvicorn's 5 s, llama.cpp's 5 s
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Http11Transport(httpx.AsyncBaseTransport):
    """The httpx transport for plain-http backends (Ollama, vLLM, llama.cpp, LM Studio).

    httpx's own connection pool costs several times more CPU per request, growing with the number
    of connections; this one keeps idle connections per host in a list and admits
    `max_connections` requests at once.

    A request is never sent twice when the backend may have read it: an LLM request sent twice is
    paid twice. Only an idempotent one (a GET, or a request with `Idempotency-Key`) that meets a
    pooled connection the upstream was closing as it came (lost within `STALE_WINDOW`, before a
    byte of answer) is sent once more on a fresh connection: neither a close nor a reset tells
    whether the backend read the request first. The race is avoided where it starts instead:
    servers built on uvicorn or cpp-httplib close idle connections after 5 s, and an idle
    connection is kept for less (`KEEPALIVE_EXPIRY`), which also keeps off connections a firewall
    or NAT on the way may have forgotten.
    """

    def __init__(self, max_connections: int, keepalive_expiry: float) -> None:
        self.slots = asyncio.Semaphore(max_connections)
        self.keepalive_expiry = keepalive_expiry
        self.idle: dict[tuple[str, int], deque[UpstreamConnection]] = {}  # oldest first

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        await self.take_slot(timeouts.get("pool"))
        try:
            connection = await self.exchange(request, _request_head(request), await request.aread(), timeouts)
        except BaseException:
            self.slots.release()
            raise
        return httpx.Response(
            connection.parser.get_status_code(), headers=connection.headers,
            stream=UpstreamBody(connection, self, timeouts.get("read")), extensions={"http_version": b"HTTP/1.1"},
        )

    async def take_slot(self, timeout: float | None) -> None:
        if not self.slots.locked():
            await self.slots.acquire()  # returns at once: no task, no timer on the common path
            return
        try:
            await asyncio.wait_for(self.slots.acquire(), timeout)
        except TimeoutError:
            raise httpx.PoolTimeout("all upstream connections are busy") from None

    async def exchange(
        self, request: httpx.Request, head: bytes, body: bytes, timeouts: Mapping[str, float | None]
    ) -> UpstreamConnection:
        key = (request.url.host, request.url.port or 80)
        connection = self.checkout(key)
        if connection is not None:
            sent = connection.loop.time()
            try:
                await connection.exchange(head, body, timeouts)
                return connection
            except httpx.RemoteProtocolError:
                connection.close()
                if connection.received_any or connection.loop.time() - sent > STALE_WINDOW:
                    raise
                if not _may_send_again(request):
                    raise httpx.RemoteProtocolError(
                        "the upstream closed a kept-alive connection as the request went out, and it was not sent "
                        "again: the backend may have begun on it (a request with Idempotency-Key is sent again)"
                    ) from None
            except BaseException:
                connection.close()
                raise
        connection = await self.connect(key, timeouts.get("connect"))
        try:
            await connection.exchange(head, body, timeouts)
        except BaseException:
            connection.close()
            raise
        return connection

    def checkout(self, key: tuple[str, int]) -> UpstreamConnection | None:
        """The most recently used live connection to `key`; expired ones, oldest first, are closed."""
        idle = self.idle.get(key)
        if not idle:
            return None
        expired = idle[0].loop.time() - self.keepalive_expiry
        while idle and (idle[0].phase is not Phase.IDLE or idle[0].idle_since < expired):
            idle.popleft().close()
        while idle:
            connection = idle.pop()
            if connection.phase is Phase.IDLE:
                return connection
        return None

    async def connect(self, key: tuple[str, int], timeout: float | None) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(loop, key), *key), timeout
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} took too long") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return connection

    def release(self, connection: UpstreamConnection) -> None:
        """Called once per request when its body is closed, read to the end or not."""
        self.slots.release()
        if connection.reusable:
            connection.reset()
            connection.phase = Phase.IDLE
            connection.idle_since = connection.loop.time()
            self.idle.setdefault(connection.key, deque()).append(connection)
        else:
            connection.close()  # mid-body: closing it is what tells the backend to stop

    async def aclose(self) -> None:
        for connections in self.idle.values():
            for connection in connections:
                connection.close()
        self.idle.clear()


def _may_send_again(request: httpx.Request) -> bool:
    return request.method in IDEMPOTENT_METHODS or "idempotency-key" in request.headers


def _request_head(request: httpx.Request) -> bytes:
    target = request.extensions.get("target", request.url.raw_path)
    lines = [request.method.encode(), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)


# ---------------------------------------------------------------------------------------------
# The echo backend: a model on every machine, answered by the gateway itself
# ---------------------------------------------------------------------------------------------

ECHO_URL = "echo://gateway/v1"  # served by EchoTransport, mounted on the shared client
ECHO_PAUSE = 0.02  # seconds between two words of an echo stream, so that it streams as a model would


class EchoTransport(httpx.AsyncBaseTransport):
    """The built-in `echo` backend: chat and text completions answered with the last user message
    (or the prompt), as JSON or, with `"stream": true`, as server-sent events word by word, each
    with a `usage` object. The gateway, its page and any client can be tried with no LLM at all,
    and client authors get a fixed, offline fake."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/v1")
        if request.method == "GET" and path == "/models":
            return echo_json(200, {"object": "list", "data": [{"id": "echo", "object": "model", "created": 0,
                                                               "owned_by": "llm-gateway"}]})
        if request.method == "GET" and path.startswith("/models/"):
            return echo_json(200, {"id": unquote_to_bytes(path[8:]).decode("utf-8", "replace"), "object": "model",
                                   "created": 0, "owned_by": "llm-gateway"})
        if request.method != "POST" or path not in TEXT_GENERATION_PATHS:
            return echo_json(404, {"error": {"message": "the echo backend answers chat and text completions only",
                                             "type": "invalid_request_error", "param": None, "code": "unknown_url"}})
        payload = JSON_DECODER.decode(await request.aread())
        chat = path == "/chat/completions"
        text = _last_user_text(payload.get("messages")) if chat else _prompt_text(payload.get("prompt"))
        words = text.split()
        usage = {"prompt_tokens": len(_all_text(payload).split()), "completion_tokens": len(words)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        model, created = str(payload.get("model", "echo")), int(time.time())
        if payload.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=EchoStream(words, model, created, chat, usage))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": "stop"}
            return echo_json(200, {"id": "chatcmpl-echo", "object": "chat.completion", "created": created,
                                   "model": model, "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": " ".join(words), "logprobs": None, "finish_reason": "stop"}
        return echo_json(200, {"id": "cmpl-echo", "object": "text_completion", "created": created, "model": model,
                               "choices": [choice], "usage": usage})


def echo_json(status: int, body: dict[str, Any]) -> httpx.Response:
    content = JSON_ENCODER.encode(body)
    headers = {"content-type": "application/json", "content-length": str(len(content))}
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content))  # unread, like an upstream's


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _last_user_text(messages: Any) -> str:
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"] if isinstance(messages, list) else []
    return _text_of(users[-1].get("content")) if users else ""


def _prompt_text(prompt: Any) -> str:
    """A text completion's prompt: a string, or the first of a list of them (token ids echo nothing)."""
    first = prompt[0] if isinstance(prompt, list) and prompt else prompt
    return first if isinstance(first, str) else ""


def _all_text(payload: dict[str, Any]) -> str:
    messages = payload.get("messages")
    if isinstance(messages, list):
        return " ".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
    return _prompt_text(payload.get("prompt"))


class EchoStream(httpx.AsyncByteStream):
    """An echo answer as OpenAI's server-sent events: a chunk per word, then the usage, then [DONE]."""

    def __init__(self, words: list[str], model: str, created: int, chat: bool, usage: dict[str, int]) -> None:
        self.words, self.model, self.created, self.chat, self.usage = words, model, created, chat, usage

    def event(self, text: str | None, finish: str | None = None, first: bool = False) -> bytes:
        """One event: a piece of text, or (None) the last one, which has no choices and the usage."""
        if text is None:
            choices: list[dict[str, Any]] = []
        elif self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": text, "finish_reason": finish}]
        kind = ("chatcmpl-echo", "chat.completion.chunk") if self.chat else ("cmpl-echo", "text_completion")
        body = {"id": kind[0], "object": kind[1], "created": self.created, "model": self.model, "choices": choices}
        if text is None:
            body["usage"] = self.usage
        return b"data: " + JSON_ENCODER.encode(body) + b"\n\n"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.chat:
            yield self.event("", first=True)
        for n, word in enumerate(self.words):
            await asyncio.sleep(ECHO_PAUSE)
            yield self.event(word if n == 0 else " " + word)
        yield self.event("", "stop")
        yield self.event(None)
        yield b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The answer coming back: streamed chunk by chunk, with the client's disconnect watched throughout
# ---------------------------------------------------------------------------------------------


def client_headers(response: httpx.Response, target: Target) -> list[tuple[bytes, bytes]]:
    bodiless = response.status_code in (204, 304)
    headers = filter_headers(response.headers.raw, NOT_RELAYED_WITHOUT_BODY if bodiless else NOT_RELAYED)
    headers.append((b"x-gateway-backend", target.backend.name.encode()))
    headers.append((b"x-gateway-model", target.name.encode()))
    content_type = response.headers.get("content-type", "")
    if "content-length" not in response.headers or content_type.startswith("text/event-stream"):
        headers.append((b"x-accel-buffering", b"no"))
    return headers


class NoCookies(httpx.Cookies):
    """A cookie store that keeps nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass


class UpstreamClient(httpx.AsyncClient):
    """The shared upstream client: plain-http backends through `plain_http`, directly, and no cookies.

    httpx would send a plain-http URL through a proxy from the environment, and a host named in
    `NO_PROXY` through its own default transport, ahead of any mount; backends on plain http are
    local or on the next machine, and always take the lean transport. An upstream's cookies belong
    to the gateway's clients, not to the gateway (their `Set-Cookie` is not passed back either),
    and reading each response's for a cookie jar costs 23 µs.
    """

    def __init__(self, plain_http: httpx.AsyncBaseTransport, **kwargs: Any) -> None:
        # mounted, so httpx opens and closes them
        super().__init__(mounts={"http://": plain_http, "echo://": EchoTransport()}, **kwargs)
        self.plain_http = plain_http
        self.no_cookies = NoCookies()

    def _transport_for_url(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        return self.plain_http if url.scheme == "http" else super()._transport_for_url(url)

    @property
    def cookies(self) -> httpx.Cookies:
        return self.no_cookies


def upstream_failure(exc: Exception, backend: Backend, url: httpx.URL) -> GatewayError:
    """The 502/504 for an upstream that could not be reached, did not answer in time, or broke off."""
    where = f"backend '{backend.name}' at {public_url(str(url))}"
    headers = {"x-gateway-backend": backend.name}
    if isinstance(exc, httpx.PoolTimeout):
        return GatewayError(
            503, "all upstream connections are busy; try again, or raise MAX_CONNECTIONS", type="server_error",
            code="gateway_busy", headers=headers,
        )
    if isinstance(exc, httpx.TimeoutException):
        return GatewayError(
            504, f"{where} did not answer in time ({type(exc).__name__}); check that it is up, or raise "
            "CONNECT_TIMEOUT / READ_TIMEOUT", type="upstream_error", code="upstream_timeout", headers=headers,
        )
    if isinstance(exc, TimeoutError):  # asyncio's, not httpx's: a model lookup ran past MODELS_TIMEOUT
        return GatewayError(
            504, f"{where} did not answer within MODELS_TIMEOUT; check that it is up, or raise MODELS_TIMEOUT",
            type="upstream_error", code="upstream_timeout", headers=headers,
        )
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, UnreadableAnswer):
        return GatewayError(
            502, f"{where} failed: {reason}; see the backend's log", type="upstream_error", code="upstream_failed",
            headers=headers,
        )
    if isinstance(exc, httpx.RemoteProtocolError):  # reached, but it broke off or spoke no HTTP
        return GatewayError(
            502, f"{where} failed before answering: {reason}; see the backend's log",
            type="upstream_error", code="upstream_failed", headers=headers,
        )
    return GatewayError(
        502, f"could not reach {where}: {reason}; {_what_to_check(exc)}",
        type="upstream_error", code="upstream_unreachable", headers=headers,
    )


def _what_to_check(exc: BaseException | None) -> str:
    """The advice for a failed connection: TLS failures need another fix than a backend that is down."""
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                "its TLS certificate was not accepted: check the host name in its URL, or set SSL_CERT_FILE to "
                "the certificate authority that signed it"
            )
        if isinstance(exc, ssl.SSLError):
            return "the TLS handshake failed: check that it serves https on that port, or give its URL as http://"
        exc = exc.__cause__ or exc.__context__
    return "check that it is running and that its URL is right"


async def cancel_on_disconnect(receive: Receive, deadline: asyncio.Timeout) -> None:
    """Make `deadline` due when the client goes away, so the upstream request is closed at once."""
    while (await receive())["type"] != "http.disconnect":
        pass
    deadline.reschedule(-1.0)  # in the past: due at once


@asynccontextmanager
async def cancelled_if_client_leaves(receive: Receive) -> AsyncIterator[asyncio.Timeout]:
    """A block cancelled as soon as the client disconnects; afterwards `expired()` tells whether it was.

    A timeout whose deadline is the client's departure, because asyncio then cancels the task at
    once. anyio's cancel scope waits until the task blocks on a wait that is not over yet, which an
    upstream writing faster than the relay never lets happen: the relay streamed on into the void.
    """
    deadline = asyncio.timeout(None)
    try:
        async with deadline:
            watcher = asyncio.create_task(cancel_on_disconnect(receive, deadline))
            try:
                yield deadline
            finally:
                watcher.cancel()
    except TimeoutError:
        if not deadline.expired():
            raise


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled as soon as the client disconnects, for requests without a body to read."""
    async with cancelled_if_client_leaves(request.receive):
        return await work
    request.state.outcome = "client disconnected"
    raise GatewayError(499, "the client went away before the answer")  # for the log: nobody reads it


# An answer that moves a request on to its next server, then its next target, as long as nothing
# of it has reached the client: the backend is busy, overloaded, failing, or timed out.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
EJECTING_STATUS = frozenset({502, 503, 504})  # an answer that says the server itself is in trouble


class Attempt:
    """One try at a request: a target on one of its backend's servers, and how it went."""

    __slots__ = ("target", "server", "request", "outcome")

    def __init__(self, target: Target, server: Server, request: httpx.Request) -> None:
        self.target, self.server, self.request = target, server, request
        self.outcome: int | str = ""  # the status it got, or the error that moved the request on


class Plan:
    """The attempts at one request, in order: each target of its chain, and for each target the
    servers of its backend, each at most once, best first when its turn comes.

    The body is parsed once; each target gets it rewritten for itself (model, defaults, key). The
    usual request, one target on one server, is sent as it was parsed, without a copy.
    """

    def __init__(
        self, request: Request, path: str, payload: dict[str, Any], targets: list[Target], settings: Settings
    ) -> None:
        self.request, self.path, self.payload, self.targets, self.settings = request, path, payload, targets, settings
        self.position = 0  # the target being tried
        self.tried: set[Server] = set()  # its servers tried so far
        self.attempts: list[Attempt] = []
        self.bodies: dict[int, tuple[list[tuple[bytes, bytes]], bytes]] = {}

    def next(self) -> Attempt | None:
        """The next attempt, or None when every target's every server was tried."""
        while self.position < len(self.targets):
            target = self.targets[self.position]
            several = len(target.backend.servers) > 1  # a backend's one server is tried whatever its state
            now = asyncio.get_running_loop().time() if several else 0.0
            if (server := pick_server(target.backend, target.model, self.tried, now)) is not None:
                self.tried.add(server)
                if several and server.failures and server.ejected_until <= now:
                    server.on_trial = True  # back from its cooldown: this request tries it again, alone
                attempt = Attempt(target, server, self.upstream_request(self.position, server))
                self.attempts.append(attempt)
                return attempt
            self.position += 1
            self.tried.clear()  # the next target may be on the same backend: its servers are tried again
        return None

    def upstream_request(self, index: int, server: Server) -> httpx.Request:
        if index not in self.bodies:
            target = self.targets[index]
            payload = self.payload if len(self.targets) == 1 else dict(self.payload)
            payload["model"] = target.model
            fill_defaults(payload, target.backend, self.path, self.settings)
            headers = upstream_headers(self.request, target.backend, self.settings)
            headers.append((b"content-type", b"application/json"))
            self.bodies[index] = headers, serialize(payload)
        headers, body = self.bodies[index]
        return upstream_request("POST", server.url + self.path, self.request, headers, body)


def settle(attempt: Attempt, status: int | None, exc: Exception | None, now: float, metrics: Metrics) -> None:
    """Record how `attempt` went: for its server's health, the metrics and the access line."""
    server, backend = attempt.server, attempt.target.backend.name
    if exc is not None:
        attempt.outcome = type(exc).__name__
        kind = ("unreachable" if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) else
                "timeout" if isinstance(exc, httpx.TimeoutException) else
                "reset" if isinstance(exc, httpx.RemoteProtocolError) else type(exc).__name__)
        metrics.child(metrics.failures, backend, server.safe_url, kind).inc()
        if kind != "timeout":  # unreachable, or reset before answering: a slow answer is no failure
            eject(server, now)
            metrics.child(metrics.ejections, backend, server.safe_url).inc()
        else:
            server.on_trial = False
        return
    attempt.outcome = status
    if status in RETRYABLE_STATUS:
        metrics.child(metrics.failures, backend, server.safe_url, str(status)).inc()
    if status in EJECTING_STATUS:
        eject(server, now)
        metrics.child(metrics.ejections, backend, server.safe_url).inc()
    elif server.failures or server.on_trial:
        server.failures, server.on_trial = 0, False
    if status is not None and status < 300 and len(attempt.target.backend.servers) > 1:
        server.served[attempt.target.model] = now


class Relay:
    """An ASGI response that walks a request's plan and streams the answer back unchanged.

    The client's disconnect is watched from the first moment: while the upstream is still thinking
    and while it streams. Either way the upstream request is closed, so the backend stops
    generating. An upstream that fails mid-stream leaves the client's response without its end,
    so the client sees an error instead of a silently short answer.
    """

    def __init__(self, client: httpx.AsyncClient, plan: Plan, metrics: Metrics) -> None:
        self.client, self.plan, self.metrics = client, plan, metrics

    def begin(self, attempt: Attempt) -> None:
        attempt.server.in_flight += 1
        if self.metrics.multiprocess:  # else a scrape reads `in_flight` off the servers themselves
            self.metrics.child(self.metrics.in_flight, attempt.target.backend.name, attempt.server.safe_url).inc()

    def end(self, attempt: Attempt) -> None:
        attempt.server.in_flight -= 1
        if self.metrics.multiprocess:
            self.metrics.child(self.metrics.in_flight, attempt.target.backend.name, attempt.server.safe_url).dec()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with cancelled_if_client_leaves(receive) as watch:
            await self.relay(scope, send)
        if watch.expired():
            scope["state"]["outcome"] = "client disconnected"

    async def relay(self, scope: Scope, send: Send) -> None:
        response, attempt = await self.answer(scope["state"])
        target = attempt.target
        try:
            headers = client_headers(response, target)
            if len(self.plan.attempts) > 1 and response.status_code in RETRYABLE_STATUS:
                headers.append((b"x-should-retry", b"false"))  # the gateway tried every target: no SDK retries on top
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            before, last = b"", b""  # the usage is read off the last two chunks passed on, at the end
            async for chunk in response.stream:  # the raw body: no decoding, no re-chunking
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                before, last = last, chunk
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if response.status_code < 300 and (usage := usage_of(before + last)):
                self.metrics.tokens(target.backend.name, target.model, usage)
        except httpx.HTTPError as exc:
            scope["state"]["outcome"] = f"upstream failed mid-stream: {type(exc).__name__}"
        finally:
            self.end(attempt)
            await response.aclose()
            del response.stream  # httpx's response and its stream refer to each other: unlinked, both go now

    async def answer(self, state: dict[str, Any]) -> tuple[httpx.Response, Attempt]:
        """The first answer worth relaying, and the attempt that got it: the plan moves on while a
        server cannot be reached, times out before its response head, or answers RETRYABLE_STATUS;
        the last attempt's answer is relayed, whatever it is, or its failure answered as a 502/504."""
        loop = asyncio.get_running_loop()
        attempt = self.plan.next()
        assert attempt is not None
        while True:
            self.begin(attempt)
            state["backend"], state["model"] = attempt.target.backend.name, attempt.target.model
            if len(attempt.target.backend.servers) > 1:
                state["server"] = attempt.server.safe_url
            else:
                state.pop("server", None)  # an earlier attempt's, on another backend
            try:
                response = await self.client.send(attempt.request, stream=True)
            except httpx.HTTPError as exc:
                self.end(attempt)
                settle(attempt, None, exc, loop.time(), self.metrics)
                if (following := self.plan.next()) is None:
                    self.log_attempts(state)
                    error = upstream_failure(exc, attempt.target.backend, attempt.request.url)
                    if len(self.plan.attempts) > 1:
                        error.headers["x-should-retry"] = "false"
                    raise error from None
            except BaseException:  # the client left, or the gateway is stopping: no verdict on the server
                self.end(attempt)
                attempt.server.on_trial = False
                raise
            else:
                status = response.status_code
                if status not in RETRYABLE_STATUS or (following := self.plan.next()) is None:
                    settle(attempt, status, None, loop.time(), self.metrics)
                    self.log_attempts(state)
                    if status == 404 and len(attempt.target.backend.servers) > 1:
                        self.plan.request.app.state.models_stale.set()  # a server may have lost the model
                    return response, attempt
                self.end(attempt)
                settle(attempt, status, None, loop.time(), self.metrics)
                await response.aclose()
            if following.target is not attempt.target:
                self.metrics.child(self.metrics.fallbacks, attempt.target.backend.name).inc()
            attempt = following

    def log_attempts(self, state: dict[str, Any]) -> None:
        """Name every attempt in the access line, when there was more than one."""
        if len(attempts := self.plan.attempts) > 1:
            state["attempts"] = ", ".join(
                f"{a.target.name}@{a.server.safe_url}={a.outcome}" for a in attempts
            )


# ---------------------------------------------------------------------------------------------
# Metrics: Prometheus's text format, for one process or all the workers of `--workers N`
# ---------------------------------------------------------------------------------------------

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set by `python gateway.py --workers N` for its workers
prometheus_client.disable_created_metrics()  # a `_created` series beside every counter says nothing here
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MAX_MODEL_LABELS = 1000  # model names with a label of their own; every other name is "other"
STATUS_TEXT = {status: str(status) for status in range(100, 600)}  # label values, made once
FLUSH_EVERY = 1.0  # seconds: how far behind a scrape under `--workers` may see the other workers


class Metrics:
    """What `GET /metrics` shows, counted as requests go.

    A model name is a label value a client chooses, so it gets a label of its own only once a
    backend listed it, answered it with a 2xx, or an alias names it, and only up to
    MAX_MODEL_LABELS names: a client sending random names cannot grow the gateway's memory.

    What every request counts is added up in plain dicts and handed to prometheus_client's
    metrics in one go per series when they are read (a scrape), and every FLUSH_EVERY seconds
    under `--workers`, so that other workers' figures reach a scrape: a prometheus_client count
    or observation takes a lock, and a request makes several.
    """

    def __init__(self, settings: Settings) -> None:
        self.registry = registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        metric = functools.partial  # each metric of this app's own registry
        counter, gauge = metric(Counter, registry=registry), metric(Gauge, registry=registry)
        histogram = metric(Histogram, registry=registry, buckets=LATENCY_BUCKETS)
        self.requests = counter("llm_gateway_requests", "Requests answered, by backend, model and status.",
                                ["backend", "model", "status"])
        self.first_byte = histogram(
            "llm_gateway_time_to_first_byte_seconds", "Time from a request to the first byte of its answer; for a "
            "stream, the time to the first token.", ["backend"])
        self.duration = histogram("llm_gateway_request_duration_seconds", "Time from a request to the end of its "
                                  "answer.", ["backend"])
        self.in_flight = gauge("llm_gateway_server_requests_in_flight", "Requests in flight to a server.",
                               ["backend", "server"], multiprocess_mode="livesum")
        self.failures = counter("llm_gateway_upstream_failures", "Attempts a server failed, by kind: "
                                "unreachable, timeout, reset, or the status it answered.", ["backend", "server", "kind"])
        self.fallbacks = counter("llm_gateway_fallbacks", "Requests moved on from a target of their chain to the "
                                 "next, by the backend left.", ["backend"])
        self.ejections = counter("llm_gateway_ejections", "Times a server was ejected for a cooldown.",
                                 ["backend", "server"])
        self.server_up = gauge("llm_gateway_server_up", "1 while a server takes requests, 0 while it is ejected.",
                               ["backend", "server"], multiprocess_mode="livemin")
        self.prompt_tokens = counter("llm_gateway_prompt_tokens", "Prompt tokens, from the usage the backend sent.",
                                     ["backend", "model"])
        self.completion_tokens = counter("llm_gateway_completion_tokens", "Completion tokens, from the usage the "
                                         "backend sent.", ["backend", "model"])
        if not self.multiprocess:
            prometheus_client.ProcessCollector(registry=registry)
            prometheus_client.GCCollector(registry=registry)
        self.known = {model for chain in [*settings.aliases.values(), *(c for _, c in settings.alias_patterns)]
                      for name in chain for model in (name, name.partition(":")[2]) if model}
        self.known.update(settings.aliases)
        self.series: dict[tuple[Any, ...], Any] = {}
        self.counts: dict[tuple[Any, ...], float] = {}  # (counter, *labels) -> added since the last flush
        # histogram -> backend -> per bucket, then the sum, observed since the last flush
        self.observed: dict[Any, dict[str, list[float]]] = {self.first_byte: {}, self.duration: {}}
        self.backends = settings.backends
        self.totals = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}  # for the page

    def child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        if (series := self.series.get(key)) is None:
            series = self.series[key] = metric.labels(*labels)
        return series

    def label(self, model: str, earned: bool = True) -> str:
        """`model` as a label value: its own name once it has earned one (listed by a backend,
        answered with a 2xx, named by an alias) while there is room, else "other"."""
        if earned and model not in self.known and len(self.known) < MAX_MODEL_LABELS:
            self.known.add(model)
        return model if model in self.known else "other"

    def learn(self, names: Iterable[str]) -> None:
        """Model names a backend listed: they earn a label."""
        for name in names:
            self.label(name)

    def answered(self, backend: str | None, model: str | None, status: int, first_byte: float, total: float) -> None:
        if backend is None or model is None:
            self.count(self.requests, "-", "-", STATUS_TEXT[status])
            return
        self.totals["requests"] += 1  # the page's counters: requests routed to a backend
        self.totals["errors"] += status >= 500
        self.count(self.requests, backend, self.label(model, 200 <= status < 300), STATUS_TEXT[status])
        self.observe(self.first_byte, backend, first_byte)
        self.observe(self.duration, backend, total)

    def count(self, counter: Any, *labels: str, amount: float = 1) -> None:
        key = (counter, *labels)
        self.counts[key] = self.counts.get(key, 0) + amount

    def observe(self, histogram: Any, backend: str, value: float) -> None:
        if (slots := self.observed[histogram].get(backend)) is None:
            slots = self.observed[histogram][backend] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        slots[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1  # the last bucket but one: +Inf
        slots[-1] += value

    def flush(self) -> None:
        """Hand what was counted since the last flush to prometheus_client, one call per series."""
        counts, self.counts = self.counts, {}
        for (counter, *labels), amount in counts.items():
            self.child(counter, *labels).inc(amount)
        observed, self.observed = self.observed, {self.first_byte: {}, self.duration: {}}
        for histogram, backend, slots in ((h, b, s) for h, by_backend in observed.items() for b, s in by_backend.items()):
            series = self.child(histogram, backend)
            for bucket, n in zip(series._buckets, slots):  # what observe() would do, n at a time
                if n:
                    bucket.inc(n)
            series._sum.inc(slots[-1])

    def tokens(self, backend: str, model: str, usage: Mapping[str, int]) -> None:
        """Tokens of a 2xx answer, whose model has just earned its label."""
        label = self.label(model)
        for kind, counter in (("prompt_tokens", self.prompt_tokens), ("completion_tokens", self.completion_tokens)):
            if (n := usage.get(kind)) is not None:
                self.count(counter, backend, label, amount=n)
                self.totals[kind] += n

    def counters(self) -> dict[str, int]:
        """This process's totals since it started, and its requests in flight, for the page."""
        in_flight = sum(server.in_flight for backend in self.backends.values() for server in backend.servers)
        return {**self.totals, "in_flight": in_flight}

    async def flush_every_while(self) -> None:
        """Under `--workers`: this worker's figures reach the shared files at least every FLUSH_EVERY s."""
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            self.flush()

    def exposition(self) -> bytes:
        """The text format: this process's figures, or with `--workers`, every worker's together."""
        self.flush()
        now = asyncio.get_running_loop().time()
        for backend in self.backends.values():  # a server's state now, not at its last request
            for server in backend.servers:
                up = server.ejected_until <= now
                self.child(self.server_up, backend.name, server.safe_url).set(1 if up else 0)
                if not self.multiprocess:  # counted on the server as requests go, not twice
                    self.child(self.in_flight, backend.name, server.safe_url).set(server.in_flight)
        if not self.multiprocess:
            return prometheus_client.generate_latest(self.registry)
        registry = prometheus_client.CollectorRegistry()
        prometheus_client.multiprocess.MultiProcessCollector(registry)
        registry.register(WorkerProcesses(os.environ[MULTIPROCESS_DIR]))
        return prometheus_client.generate_latest(registry)


class WorkerProcesses:
    """The process figures of every worker whose metrics are in the multiprocess directory (the
    multiprocess collector leaves process figures out), labelled by pid."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Any]:
        cpu = prometheus_client.metrics_core.CounterMetricFamily(
            "process_cpu_seconds", "CPU time of a worker, user and system.", labels=["pid"])
        memory = prometheus_client.metrics_core.GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory of a worker.", labels=["pid"])
        pids = {match.group(1) for path in Path(self.directory).glob("*.db")
                if (match := re.search(r"_(\d+)\.db$", path.name))}
        ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        for pid in sorted(pids):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (OSError, IndexError, ValueError):  # a worker that is gone
                continue
            cpu.add_metric([pid], (int(stat[11]) + int(stat[12])) / ticks)
            memory.add_metric([pid], resident * page)
        return [cpu, memory]


_TOKEN_COUNT = re.compile(rb'"(prompt|completion)_tokens"\s*:\s*(\d+)')
USAGE_KEYS = {b"prompt": "prompt_tokens", b"completion": "completion_tokens"}


def usage_of(tail: bytes) -> dict[str, int] | None:
    """The token counts of the last `usage` object in the tail of an answer (its last two chunks:
    a JSON answer's usage comes last, and so does a stream's usage event), read off its text: a
    decoder would walk the whole answer for two numbers."""
    if (start := tail.rfind(b'"usage"')) < 0:
        return None
    return {USAGE_KEYS[kind]: int(n) for kind, n in _TOKEN_COUNT.findall(tail, start, start + 512)} or None


# ---------------------------------------------------------------------------------------------
# The app: admission, endpoints, access log, lifespan
# ---------------------------------------------------------------------------------------------


def admit(request: Request) -> None:
    """Refuse requests without a gateway key (when keys are set) and requests that loop back."""
    settings: Settings = request.app.state.settings
    if settings.gateway_api_keys and not _has_gateway_key(request, settings.gateway_api_keys):
        raise GatewayError(
            401, "missing or wrong gateway key; send 'Authorization: Bearer <key>' with a key from GATEWAY_API_KEYS",
            type="authentication_error", code="invalid_api_key",
        )
    if any(_passed_through(value, settings.via) for name, value in request.scope["headers"] if name == b"via"):
        raise GatewayError(
            508, "request loop: this request already passed through this gateway; a backend URL points back at it",
            type="server_error", code="loop_detected", headers={"x-should-retry": "false"},  # else the SDK retries it
        )


def _passed_through(via: bytes, entry: bytes) -> bool:
    """Whether a `Via` header names this gateway: an entry of the same name, its comment aside."""
    name = entry.split()[1]
    return any(received.split()[1:2] == [name] for received in via.split(b","))


def _has_gateway_key(request: Request, keys: tuple[bytes, ...]) -> bool:
    """A gateway key as `Authorization: Bearer` or as `x-api-key`: an SDK that always sends its own
    `Authorization` can still carry the gateway key in `x-api-key`."""
    auth = request.headers.get("authorization", "")
    offered = [auth[7:] if auth[:7].lower() == "bearer " else "", request.headers.get("x-api-key", "")]
    matches = [hmac.compare_digest(o.encode("latin-1"), key) for o in offered for key in keys]  # all: constant time
    return any(matches)


async def proxy(request: Request) -> Response | Relay:
    """`POST /v1/...`: route by the body's model, rewrite it, and relay the upstream's answer."""
    admit(request)
    settings: Settings = request.app.state.settings
    path = upstream_path(request.scope["raw_path"])
    if request.headers.get("content-type", "").startswith("multipart/"):  # refused before a byte is read
        raise GatewayError(
            400, "multipart uploads (audio transcriptions, files) cannot be routed: the gateway routes by the "
            "'model' of a JSON body; send those to the backend directly, or a JSON request with "
            "Content-Type: application/json",
        )
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise GatewayError(
            415, "compressed request bodies (Content-Encoding) are not accepted; send the JSON uncompressed",
            code="unsupported_content_encoding", headers={"accept-encoding": "identity"},
        )
    payload = parse_payload(await read_body(request, settings.max_body_bytes))
    request.state.model = payload["model"]  # logged as sent, should routing refuse it
    targets = route(payload["model"], settings)
    request.state.backend, request.state.model = targets[0].backend.name, targets[0].model
    state = request.app.state
    return Relay(state.client, Plan(request, path, payload, targets, settings), state.metrics)


_NOT_VISIBLE = re.compile(rb"[^\x21-\x7e]")


def upstream_request(
    method: str, url: str, request: Request, headers: list[tuple[bytes, bytes]], content: bytes | None = None
) -> httpx.Request:
    """A request to `url` with the client's query string as sent (`?api-version=...`): httpx would
    re-encode it, so the request target goes as written, but for bytes no request line may hold."""
    extensions = {}
    if query := request.scope["query_string"]:
        query = _NOT_VISIBLE.sub(lambda m: b"%%%02X" % m.group()[0], query)
        extensions["target"] = parsed_url(url).raw_path + b"?" + query
    return httpx.Request(method, parsed_url(url), headers=headers, content=content, extensions=extensions)


@functools.lru_cache(maxsize=1024)
def parsed_url(url: str) -> httpx.URL:
    """Parsing a URL costs about 11 µs; the few URLs a gateway sees are parsed once."""
    return httpx.URL(url)


async def list_models(request: Request) -> Response:
    """`GET /v1/models`: every backend's models, asked concurrently, each id prefixed by its backend
    and listed once however many servers list it; then every alias."""
    admit(request)
    settings: Settings = request.app.state.settings
    lists = await unless_client_leaves(
        request, asyncio.gather(*(_backend_models(request, backend) for backend in settings.backends.values()))
    )
    data = [model for models in lists for model in models]
    data += [alias_model(name) for name in settings.aliases]
    return Response(JSON_ENCODER.encode({"object": "list", "data": data}), media_type="application/json")


def alias_model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-gateway"}


async def _backend_models(request: Request, backend: Backend) -> list[dict[str, Any]]:
    answers = await asyncio.gather(*(_server_models(request, backend, server) for server in backend.servers))
    merged: dict[str, dict[str, Any]] = {}
    for models in answers:
        for model in models:
            merged.setdefault(f"{backend.name}:{model['id']}", model)
    return [{**model, "id": name} for name, model in merged.items()]


async def _server_models(request: Request, backend: Backend, server: Server) -> list[dict[str, Any]]:
    client: httpx.AsyncClient = request.app.state.client
    try:
        settings: Settings = request.app.state.settings
        headers = models_headers(request, backend, settings)
        models = await fetch_model_list(
            client, upstream_request("GET", server.url + "/models", request, headers), settings.models_timeout
        )
        if len(backend.servers) > 1:
            server.models = frozenset(model["id"] for model in models)
        request.app.state.metrics.learn(model["id"] for model in models)
        return models
    except ModelListUnusable as exc:
        logger.warning("models of backend %s at %s left out: %s", backend.name, server.safe_url, exc)
        return []


class ModelListUnusable(Exception):
    """A server's model list could not be had: unreachable, an error, or not a model list."""


async def fetch_model_list(
    client: httpx.AsyncClient, request: httpx.Request, timeout: float
) -> list[dict[str, Any]]:
    try:
        response, body = await fetch_models(client, request, timeout)
        response.raise_for_status()
        models = JSON_DECODER.decode(body)["data"] or []  # Ollama without models says null
        if not all(isinstance(model, dict) and isinstance(model.get("id"), str) for model in models):
            raise TypeError
        return models
    except (httpx.HTTPError, TimeoutError, UnreadableAnswer, ValueError, RecursionError, KeyError, TypeError) as exc:
        if isinstance(exc, httpx.HTTPStatusError):
            reason = f"status {exc.response.status_code}"
        else:
            reason = str(exc) if isinstance(exc, UnreadableAnswer) else type(exc).__name__
        raise ModelListUnusable(reason) from None


MODELS_REFRESH = 30.0  # seconds between two looks at the model lists of backends with several servers
MODELS_REFRESH_GAP = 5.0  # seconds at least between two looks, however many 404s ask for one


async def keep_model_lists(
    client: httpx.AsyncClient, settings: Settings, stale: asyncio.Event, metrics: Metrics
) -> None:
    """Learn which models each server of a backend with several servers lists, at start, every
    MODELS_REFRESH seconds, and soon after a 404 (`stale`), so that requests go to a server that
    has their model. A backend with one server is never asked unprompted."""
    servers = [(backend, server) for backend in settings.backends.values() if len(backend.servers) > 1
               for server in backend.servers]
    if not servers:
        return

    async def learn(backend: Backend, server: Server) -> None:
        headers = [(b"accept-encoding", b"identity"), (b"via", settings.via)]
        if backend.api_key:
            headers.append((b"authorization", b"Bearer " + backend.api_key.encode()))
        request = httpx.Request("GET", parsed_url(server.url + "/models"), headers=headers)
        try:
            models = await fetch_model_list(client, request, settings.models_timeout)
            server.models = frozenset(model["id"] for model in models)
            metrics.learn(server.models)
        except ModelListUnusable as exc:
            logger.debug("models of backend %s at %s not learnt: %s", backend.name, server.safe_url, exc)

    while True:
        await asyncio.gather(*(learn(backend, server) for backend, server in servers))
        await asyncio.sleep(MODELS_REFRESH_GAP)
        stale.clear()
        with suppress(TimeoutError):
            async with asyncio.timeout(MODELS_REFRESH - MODELS_REFRESH_GAP):
                await stale.wait()


MAX_MODELS_ANSWER = 16 * 1024 * 1024  # model lists run to kilobytes; this leaves room for the longest


class UnreadableAnswer(Exception):
    """A backend's answer to the gateway's own GET /models that it cannot hold or read."""


def models_headers(request: Request, backend: Backend, settings: Settings) -> list[tuple[bytes, bytes]]:
    """The headers of the gateway's own GET /models for a client: the answer is asked for
    uncompressed, whatever the client accepts, since the gateway reads it."""
    headers = [(n, v) for n, v in upstream_headers(request, backend, settings) if n != b"accept-encoding"]
    headers.append((b"accept-encoding", b"identity"))
    return headers


async def fetch_models(
    client: httpx.AsyncClient, request: httpx.Request, timeout: float
) -> tuple[httpx.Response, bytes]:
    """A backend's answer to the gateway's own GET /models or /models/{model}, read whole within
    `timeout` (MODELS_TIMEOUT) and never past MAX_MODELS_ANSWER, before or after decoding: the
    gateway holds it in memory, and a broken backend may never end it, or send a small gzip that
    inflates to gigabytes."""
    async with asyncio.timeout(timeout):
        response = await client.send(request, stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_MODELS_ANSWER:
                    raise UnreadableAnswer(f"its answer is larger than {MAX_MODELS_ANSWER} bytes")
            return response, inflated(bytes(body), response.headers.get("content-encoding", "identity"))
        finally:
            await response.aclose()


def inflated(body: bytes, encoding: str) -> bytes:
    """`body` decoded, at most MAX_MODELS_ANSWER bytes of it: gzip and deflate only, asked or not."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UnreadableAnswer(f"its answer is compressed with {escape(encoding)!r}, which the gateway did not ask for")
    decompressor = zlib.decompressobj(wbits=47)  # a gzip or a zlib stream, told apart by its header
    try:
        plain = decompressor.decompress(body, MAX_MODELS_ANSWER + 1)
    except zlib.error as exc:
        raise UnreadableAnswer(f"its {encoding} answer does not decode: {exc}") from None
    if len(plain) > MAX_MODELS_ANSWER:
        raise UnreadableAnswer(f"its answer is larger than {MAX_MODELS_ANSWER} bytes once decoded")
    return plain


async def retrieve_model(request: Request) -> Response:
    """`GET /v1/models/{model}`: one model from its backend, its id carrying the client's prefix."""
    admit(request)
    settings: Settings = request.app.state.settings
    raw_path = request.scope["raw_path"]
    if not raw_path.startswith(b"/v1/models/") or _DOT_SEGMENT.search(raw_path):
        raise invalid_path()
    asked = request.path_params["model"]  # decoded: the SDK sends `org/model` as `org%2Fmodel`
    if asked in settings.aliases:
        return Response(JSON_ENCODER.encode(alias_model(asked)), media_type="application/json")
    backend, model = route_model(asked, settings)
    # The upstream model as sent, byte for byte: decoding to text would turn `%FF` into U+FFFD.
    sent = unquote_to_bytes(raw_path[len(b"/v1/models/"):])[len(asked) - len(model):]
    if _names_another_path(sent):
        raise GatewayError(
            400, f"model {escape(asked)!r} names a path, not a model ('.' or '..' between slashes, or NUL); send a "
            f"model name, like {_choices(settings.backends)}", param="model", code="invalid_path",
        )
    request.state.backend, request.state.model = backend.name, model
    server = pick_server(backend, model, set(), asyncio.get_running_loop().time())
    assert server is not None
    url = server.url + "/models/" + quote(sent, safe="")
    lookup = upstream_request("GET", url, request, models_headers(request, backend, settings))
    try:
        response, body = await unless_client_leaves(
            request, fetch_models(request.app.state.client, lookup, settings.models_timeout)
        )
    except (httpx.HTTPError, TimeoutError, UnreadableAnswer) as exc:
        raise upstream_failure(exc, backend, parsed_url(url)) from None
    if response.status_code == 200:
        body = _with_id_prefix(body, asked[: len(asked) - len(model)])
    headers = filter_headers(response.headers.raw, NOT_FORWARDED_DOWN | {b"content-length", b"content-encoding"})
    headers.append((b"x-gateway-backend", backend.name.encode()))
    response_out = Response(body, response.status_code)
    response_out.raw_headers = [*headers, (b"content-length", str(len(body)).encode())]
    return response_out


def _names_another_path(model: bytes) -> bool:
    """Whether `model`, as the last path segment, names another path once decoded, by the backend or
    by a proxy in front of it that decodes `%2F` (once, or twice)."""
    for decoded in (model, unquote_to_bytes(model)):
        if b"\0" in decoded or any(part in (b".", b"..") for part in re.split(rb"[/\\]", decoded)):
            return True
    return False


def _with_id_prefix(body: bytes, prefix: str) -> bytes:
    try:
        model = JSON_DECODER.decode(body)
    except (ValueError, RecursionError):
        return body
    if isinstance(model, dict) and isinstance(model.get("id"), str):
        model["id"] = prefix + model["id"]
        return JSON_ENCODER.encode(model)
    return body


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def metrics_page(request: Request) -> Response:
    """`GET /metrics`: Prometheus's text format; it needs a gateway key like every route when keys are set."""
    admit(request)
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


VERSION = "0.1.0"


async def status(request: Request) -> Response:
    """`GET /gateway/status`: what the page at `/` shows, the gateway at a glance."""
    admit(request)
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    now = asyncio.get_running_loop().time()
    backends = [
        {"name": backend.name, "default": backend.name == settings.default_backend,
         "builtin": backend.servers[0].url == ECHO_URL,
         "key_configured": backend.api_key is not None,
         "servers": [{"url": server.safe_url, "state": "up" if server.ejected_until <= now else "ejected",
                      "in_flight": server.in_flight, "failures": server.failures,
                      "ejected_for_s": round(max(0.0, server.ejected_until - now), 1),
                      "models": sorted(server.models) if server.models is not None else None}
                     for server in backend.servers]}
        for backend in settings.backends.values()
    ]
    aliases = [{"name": name, "targets": list(chain)} for name, chain in settings.aliases.items()]
    aliases += [{"name": prefix + "*", "targets": list(chain)} for prefix, chain in settings.alias_patterns]
    body = {
        "gateway": {"id": settings.gateway_id, "version": VERSION, "keys_required": bool(settings.gateway_api_keys),
                    "uptime_s": round(time.monotonic() - request.app.state.started, 1)},
        "backends": backends, "aliases": aliases, "counters": metrics.counters(),
    }
    return Response(JSON_ENCODER.encode(body), media_type="application/json")


class Page:
    """An HTML page shipped beside this module, served with a Content-Security-Policy that allows its
    own one inline script and one inline style, by their hashes, and nothing from anywhere else."""

    def __init__(self, name: str) -> None:
        self.name = name

    @functools.cached_property
    def response(self) -> tuple[bytes, dict[str, str]]:
        beside, installed = Path(__file__).with_name(self.name), Path(sys.prefix, "share", "llm-gateway", self.name)
        html = (beside if beside.exists() else installed).read_bytes()

        def hashes(tag: bytes) -> str:
            blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), html, re.DOTALL)
            return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks)

        policy = (f"default-src 'none'; script-src {hashes(b'script') or chr(39) + 'none' + chr(39)}; "
                  f"style-src {hashes(b'style') or chr(39) + 'none' + chr(39)}; connect-src 'self'; img-src 'self' data:; "
                  "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return html, {"content-security-policy": policy, "x-content-type-options": "nosniff",
                      "referrer-policy": "no-referrer", "cache-control": "no-cache"}

    async def __call__(self, request: Request) -> Response:
        html, headers = self.response
        return Response(html, headers=headers, media_type="text/html; charset=utf-8")


async def openapi(request: Request) -> Response:
    """`GET /openapi.json`: the gateway's own API as an OpenAPI 3.1 document."""
    settings: Settings = request.app.state.settings
    return Response(JSON_ENCODER.encode(openapi_document(settings)), media_type="application/json")


def openapi_document(settings: Settings) -> dict[str, Any]:
    error = {"description": "An error in OpenAI's shape", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}
    routed = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["model"], "properties": {"model": {"type": "string", "description":
            "<backend>:<model>, an alias, or a fallback chain of models separated by '|'"}},
        "additionalProperties": True}}}},
        "responses": {"200": {"description": "The backend's answer, relayed byte for byte (JSON, or "
                                             "server-sent events with \"stream\": true)"},
                      "400": error, "401": error, "413": error, "502": error, "504": error}}

    def post(summary: str, description: str) -> dict[str, Any]:
        return {"post": {"summary": summary, "description": description, **routed}}

    def get(summary: str, description: str, media: str = "application/json", **extra: Any) -> dict[str, Any]:
        return {"get": {"summary": summary, "description": description, **extra,
                        "responses": {"200": {"description": "OK", "content": {media: {}}}, "401": error}}}

    model = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-gateway", "version": VERSION, "description": (
            "An OpenAI-compatible gateway: the backend is chosen by a prefix on the model name "
            "(ollama:qwen2.5, openai:gpt-4.1-mini), an alias, or a fallback chain; answers come back as sent.")},
        "paths": {
            "/v1/chat/completions": post("Chat completion", "Routed by its model; streams with \"stream\": true."),
            "/v1/completions": post("Text completion", "Routed by its model."),
            "/v1/embeddings": post("Embeddings", "Routed by its model."),
            "/v1/{path}": {"post": {"summary": "Any other OpenAI endpoint with a model", "description":
                                    "Responses, moderations, images, audio/speech: routed by the body's model.",
                                    "parameters": [{"name": "path", "in": "path", "required": True,
                                                    "schema": {"type": "string"}}], **routed}},
            "/v1/models": get("Models", "Every backend's models, prefixed by backend, and every alias."),
            "/v1/models/{model}": get("One model", "Asked of its backend; an alias answers for itself.",
                                      parameters=model),
            "/health": get("Health", "200 without touching any backend; needs no key.", security=[]),
            "/metrics": get("Metrics", "Prometheus's text format.", media="text/plain"),
            "/gateway/status": get("Status", "Backends, servers, aliases and counters, as the page at / shows them."),
            "/": get("The page", "Status and playground, for a browser; needs no key.", media="text/html", security=[]),
            "/docs": get("This API, readable", "Needs no key.", media="text/html", security=[]),
            "/openapi.json": get("This document", "Needs no key.", security=[]),
        },
        "components": {
            "securitySchemes": {"gatewayKey": {"type": "http", "scheme": "bearer",
                                               "description": "A key from GATEWAY_API_KEYS, when it is set"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                 "param": {"type": ["string", "null"]},
                                                 "code": {"type": ["string", "null"]}}}}}},
        },
        "security": [{"gatewayKey": []}] if settings.gateway_api_keys else [],
        "x-backends": list(settings.backends),
        "x-aliases": list(settings.aliases),
    }


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return exc.response()


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404 and 405, in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {escape(request.url.path)}; the gateway serves /v1/..."
    else:
        message = f"method {request.method} is not allowed on {escape(request.url.path)}"
        if request.url.path.startswith("/v1/"):
            message += f"; the gateway routes POST requests by their 'model', and GET /v1/models: {WITHOUT_A_MODEL}"
    return GatewayError(exc.status_code, message, headers=exc.headers).response()


async def internal_error(request: Request, exc: Exception) -> Response:
    return GatewayError(500, "the gateway failed to handle this request; see its log", type="server_error").response()


def stopping(backend: str | None) -> GatewayError:
    """The answer to a request that the shutdown cut short before its answer began."""
    headers = {"x-gateway-backend": backend} if backend else None
    return GatewayError(
        503, "the gateway is stopping, and this request was still waiting after SHUTDOWN_TIMEOUT; send it again",
        type="server_error", code="gateway_stopping", headers=headers,
    )


class AccessLog:
    """One log line per request: what was asked, where it went, and how it went.

    The outermost layer of the gateway, so also where a request that the shutdown cuts short gets
    its answer: here it is known whether an answer had started.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        first_byte: float | None = None
        status, sent = 0, 0  # 0: no answer started
        state = scope.setdefault("state", {})

        async def send_counted(message: Message) -> None:
            nonlocal first_byte, status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                if first_byte is None:
                    first_byte = time.perf_counter()
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except asyncio.CancelledError:  # only uvicorn cancels a request: it is stopping, SHUTDOWN_TIMEOUT is up
            state["outcome"] = "cut short: the gateway is stopping"
            if not status:  # else the answer stays without its end: aborted
                await stopping(state.get("backend")).response()(scope, receive, send_counted)
        finally:
            ended = time.perf_counter()
            ttfb = (first_byte or ended) - started
            if not status:  # nothing sent: 499 (as nginx logs it) when the client left first, else a failure
                status = 499 if state.get("outcome") == "client disconnected" else 500
            scope["app"].state.metrics.answered(state.get("backend"), state.get("model"), status, ttfb, ended - started)
            if logger.isEnabledFor(logging.INFO):  # spare the escaping when nobody reads the line
                logger.info(
                    "%s %s backend=%s%s model=%s status=%d ttfb_ms=%.1f total_ms=%.1f bytes=%d%s%s",
                    scope["method"], escape(scope["path"]), state.get("backend", "-"),
                    f" server={state['server']}" if "server" in state else "",
                    escape(state.get("model", "-")[:MAX_MODEL_NAME]),
                    status, ttfb * 1000, (ended - started) * 1000, sent,
                    f" attempts=[{escape(state['attempts'])}]" if "attempts" in state else "",
                    f" ({state['outcome']})" if "outcome" in state else "",
                )


class Endpoint:
    """A route endpoint: a handler of a request that returns the ASGI app that answers it.

    Starlette's own adapter wraps every route in a second exception handler and a second send
    wrapper; the app-level handlers already catch the same errors, and each chunk of a stream
    would pay for the extra layer.
    """

    def __init__(self, handler: Callable[[Request], Awaitable[ASGIApp]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await self.handler(Request(scope, receive))
        await answer(scope, receive, send)


YOUNG_GENERATION = 7_000  # allocations between collections: above what 64 requests in flight hold
# glibc's mallopt(): blocks below HEAP_BLOCKS come from the heap, which keeps up to HEAP_SPARE free
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_BLOCKS, HEAP_SPARE = 16 * 1024 * 1024, 64 * 1024 * 1024


def settle_memory() -> None:
    """Keep the cycle collector and the allocator off the request path, once per process.

    A request relayed to its end leaves no reference cycles behind, so what the collector would
    walk is the start-up objects (frozen here, never garbage) and the young objects of requests in
    flight. Run every 700 allocations, the default, those walks took a tenth of the gateway's CPU
    under load.

    Left to itself, glibc hands the top of its heap back to the system as soon as twice the largest
    block freed so far (about 2 MiB with 1 MiB bodies) lies free there, and faults it back in page by
    page for the next large body: up to 1 ms more per 1 MiB request, in some runs and not others.

    A process that has frozen objects already (a second app, a host process) is left as it is.
    """
    if gc.get_freeze_count():
        return
    gc.collect()  # start-up's own garbage goes first, or it would stay frozen for good
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION)
    if sys.platform == "linux" and (mallopt := getattr(ctypes.CDLL(None), "mallopt", None)):
        mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS)
        mallopt(M_TRIM_THRESHOLD, HEAP_SPARE)


def create_app(settings: Settings) -> Starlette:
    """The gateway as an ASGI app, with one shared upstream client opened and closed by its lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        timeout = httpx.Timeout(
            connect=settings.connect_timeout, read=settings.read_timeout,
            write=settings.read_timeout, pool=settings.connect_timeout,
        )
        limits = httpx.Limits(
            max_connections=settings.max_connections, max_keepalive_connections=settings.max_connections,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        # Plain-http backends get the lean transport; https ones httpx's own, with its TLS and proxies.
        plain_http = Http11Transport(settings.max_connections, KEEPALIVE_EXPIRY)
        async with UpstreamClient(plain_http, timeout=timeout, limits=limits) as client:
            app.state.client = client
            app.state.models_stale = asyncio.Event()
            app.state.started = time.monotonic()
            metrics: Metrics = app.state.metrics
            learning = asyncio.create_task(keep_model_lists(client, settings, app.state.models_stale, metrics))
            flushing = asyncio.create_task(metrics.flush_every_while()) if metrics.multiprocess else None
            settle_memory()
            try:
                yield
            finally:
                learning.cancel()
                if flushing:
                    flushing.cancel()

    app = Starlette(
        routes=[
            Route("/v1/{path:path}", Endpoint(proxy), methods=["POST"]),  # first: the router tries routes in order
            Route("/v1/models", Endpoint(list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", Endpoint(retrieve_model), methods=["GET"]),
            Route("/health", Endpoint(health), methods=["GET"]),
            Route("/metrics", Endpoint(metrics_page), methods=["GET"]),
            Route("/gateway/status", Endpoint(status), methods=["GET"]),
            Route("/", Endpoint(Page("page.html")), methods=["GET"]),
            Route("/docs", Endpoint(Page("docs.html")), methods=["GET"]),
            Route("/openapi.json", Endpoint(openapi), methods=["GET"]),
        ],
        middleware=[Middleware(AccessLog), *cors(settings)],
        exception_handlers={GatewayError: gateway_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(settings)
    return app


def cors(settings: Settings) -> list[Middleware]:
    """CORS for browser apps on the origins in CORS_ORIGINS (off by default): the preflight is
    answered, and every other request goes on as it is, with its answer's headers readable."""
    if not settings.cors_origins:
        return []
    exposed = ["x-gateway-backend", "x-gateway-model", "x-request-id", "retry-after", "x-should-retry"]
    return [Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["*"], expose_headers=exposed, max_age=600)]


def configure_logging(level: str) -> None:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


load_dotenv(Path.cwd() / ".env")
if not os.environ.get("GATEWAY_ID", "").strip():
    os.environ["GATEWAY_ID"] = secrets.token_hex(6)  # one id for this gateway and all its workers
try:
    SETTINGS = Settings.from_env(os.environ)
except ConfigError as exc:  # a setting to fix, not a bug: its message alone, whichever way the gateway starts
    raise SystemExit(f"llm-gateway: {exc}") from None
configure_logging(SETTINGS.log_level)
app = create_app(SETTINGS)


# ---------------------------------------------------------------------------------------------
# The client connection: uvicorn's HTTP/1.1, with limits on the request head and whole answers
# ---------------------------------------------------------------------------------------------

MAX_REQUEST_HEAD = 64 * 1024  # bytes of request line and headers: nginx allows 32 KiB, Node.js 16 KiB
LINGER = 2.0  # seconds a refused client's bytes are still read and dropped, so that it sees the answer


class Refusal(Exception):
    """Raised from a parser callback: the request is answered with `status` by the connection itself."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ClientConnection(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the limits it lacks while a request arrives, and a request
    answered once.

    httptools keeps every byte of a head until its end, and uvicorn's header list costs about 15
    times the bytes sent; and only a kept-alive connection between requests has a timer. So the
    bytes of a head are counted per read, however it is split, and checked once more when it is
    whole; and one timer per connection, armed only while a request is due and not all there
    after a read (the usual request comes whole in one read and never arms it), answers a head
    or a body that stops arriving. A body's silence is measured from its last read when the timer
    goes off, and the app is told through the request's state, so that its answer and log line
    say 408; a body whose framing breaks is told the same way, and gets a 400.

    Once the connection answers for the last time (a refusal of its own, or an app's answer
    before the request body was all read) it reads and drops what the client still sends for
    LINGER seconds, then closes: those bytes are never parsed as a request, and closing a socket
    with unread bytes would make the kernel reset it, losing the answer.
    """

    timer: asyncio.TimerHandle | None = None
    in_head = False  # a request head has begun and not ended
    in_message = False  # a request has begun and its body not ended
    message_ended = False  # a request ended in the current read
    read_size = 0  # bytes in the current read
    head_bytes = 0  # of the head still arriving, counted per read
    head_unsure = False  # part of it came in a read that was not counted
    body_heard = 0.0  # loop time of the last read while a body was arriving
    closing = False  # answered for the last time: what the client still sends is dropped
    refusal = b""  # the connection's own answer, written when it closes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)  # `5 ;x=1`: RFC 9112 7.1.1
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._unset_keepalive_if_required()
        self.message_ended, self.read_size = False, len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # the gateway speaks HTTP/1.1 only: answered, then closed
            self.cycle.keep_alive = False
            self.closing = True
            return
        except httptools.HttpParserError as exc:
            refusal = exc.__context__
            if isinstance(refusal, Refusal):
                self.refuse(refusal.status, refusal.message)
            else:
                self.malformed()
            return
        if self.in_head:
            if self.message_ended:  # it began after a request ended in this read: counted from the next read on
                self.head_unsure = True
            else:
                self.head_bytes += len(data)
            if self.head_bytes > MAX_REQUEST_HEAD:
                self.refuse(431, f"request head larger than {MAX_REQUEST_HEAD} bytes; send fewer, shorter headers")
                return
        if self.in_head or (not self.in_message and (self.cycle is None or self.cycle.response_complete)):
            self.arm()  # a head is due
        elif self.in_message and not self.cycle.response_started:  # a body still on its way
            self.framing(self.cycle)
            self.body_heard = self.loop.time()
            self.arm()
        else:
            self.disarm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = self.in_message = True

    def on_headers_complete(self) -> None:
        could_be_over = self.head_unsure or self.head_bytes + self.read_size > MAX_REQUEST_HEAD  # else reads hold less
        if could_be_over and len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > MAX_REQUEST_HEAD:
            raise Refusal(431, f"request head larger than {MAX_REQUEST_HEAD} bytes; send fewer, shorter headers")
        super().on_headers_complete()  # raises for a request target it cannot parse: the head stays unfinished
        self.in_head, self.head_bytes, self.head_unsure = False, 0, False
        if self.scope["http_version"] == "1.0":  # no 1xx and no chunks for it (RFC 9110 15.2, RFC 9112 6.1)
            self.framing(self.cycle).waiting_for_100_continue = False

    def framing(self, cycle: RequestResponseCycle) -> ClientCycle:
        """`cycle` made a ClientCycle, which frames its answer by the rules below. uvicorn builds the
        cycle itself; only a request with a body still arriving, or from an HTTP/1.0 client, needs
        them, and the usual request, whole in one read, keeps uvicorn's own."""
        if not isinstance(cycle, ClientCycle):
            cycle.__class__ = ClientCycle
            cycle.connection = self  # type: ignore[attr-defined]
        return cycle  # type: ignore[return-value]

    def on_message_complete(self) -> None:
        self.in_message, self.message_ended = False, True
        super().on_message_complete()

    def malformed(self) -> None:
        """Bytes the parser refuses: a 400 in OpenAI's shape, from the app when it is reading the body
        they broke, else from the connection."""
        message = "the request is not valid HTTP/1.1 (its head, or the framing of its body); check what the client sends"
        if not self.in_message or self.in_head:
            self.refuse(400, message)
            return
        cycle = self.framing(self.cycle)  # the request whose body broke
        self.closing = True  # the parser is done for: nothing more is read
        self.disarm()
        if not cycle.response_started:
            cycle.scope["state"][BODY_FAILED] = GatewayError(400, message, headers={"connection": "close"})
            cycle.message_event.set()  # the app's receive() returns, and read_body raises it
        elif cycle.response_complete:
            self.linger()
        else:
            cycle.lingers = True  # answered already: that answer ends, then the connection closes

    def arm(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_later(CLIENT_TIMEOUT, self.overdue)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def overdue(self) -> None:
        self.timer = None
        if self.closing or self.transport.is_closing():
            return
        if self.in_head:
            self.refuse(408, f"the request head did not arrive within {CLIENT_TIMEOUT:g} s")
        elif not self.in_message:  # no request begun
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()  # as uvicorn closes an idle kept-alive connection
        elif not self.cycle.response_started:
            if self.flow.read_paused:  # the gateway stopped reading (a pipelined request waits): no silence
                self.body_heard = self.loop.time()
            if (left := self.body_heard + CLIENT_TIMEOUT - self.loop.time()) > 0:
                self.timer = self.loop.call_later(left, self.overdue)
            else:
                self.cycle.scope["state"][BODY_FAILED] = GatewayError(
                    408, f"the request body stopped arriving: nothing came for {CLIENT_TIMEOUT:g} s; send it again",
                    headers={"connection": "close"},
                )
                self.cycle.message_event.set()  # the app's receive() returns, and read_body raises it

    def refuse(self, status: int, message: str) -> None:
        """Answer `status` in OpenAI's error shape and close the connection gently; an answer to an
        earlier, pipelined request that is under way ends first, and then the connection closes."""
        self.disarm()
        if self.closing or self.transport.is_closing():
            return
        logger.info("request refused: status=%d (%s)", status, message)
        response = GatewayError(status, message, headers={"connection": "close"}).response()
        head = b"".join(b"%s: %s\r\n" % header for header in response.raw_headers)
        phrase = HTTPStatus(status).phrase.encode()
        self.refusal = b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (status, phrase, head, response.body)
        if self.cycle is not None and not self.cycle.response_complete:  # an earlier request's answer is due first
            self.closing = True
            self.framing(self.cycle).lingers = True
            return
        self.linger()

    def linger(self) -> None:
        """Stop answering, but for a refusal of the connection's own: read and drop what comes for
        LINGER seconds, then close."""
        self.closing = True
        self.disarm()
        self._unset_keepalive_if_required()
        self.pipeline.clear()
        if self.refusal:
            self.transport.write(self.refusal)
        if self.transport.can_write_eof():  # not over TLS
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)


class ClientCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, with two rules of framing it lacks.

    An answer that starts before its request's body was all read says `Connection: close`, and
    the connection lingers after it (above). An HTTP/1.0 client cannot read chunked encoding
    (RFC 9112 6.1): a body without a length goes to it as raw bytes that end when the connection
    closes.
    """

    connection: ClientConnection
    lingers = False  # the connection closes gently after this answer
    until_close = False  # the body is delimited by closing the connection

    async def send(self, message: Message) -> None:
        if not self.response_started and message["type"] == "http.response.start":
            message = self.framed(message)
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            if self.until_close:
                self.expected_content_length = len(message.get("body", b""))
            if self.lingers:
                self.keep_alive = True  # uvicorn would close at once, and a reset may lose the answer
                await super().send(message)
                self.connection.linger()
                return
        await super().send(message)

    def framed(self, message: Message) -> Message:
        headers = message.get("headers", [])
        if self.more_body or self.lingers:
            self.lingers = True
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        if (
            self.scope["http_version"] == "1.0" and self.scope["method"] != "HEAD"
            and message["status"] not in (204, 304) and all(name.lower() != b"content-length" for name, _ in headers)
        ):
            self.chunked_encoding, self.expected_content_length, self.until_close = False, sys.maxsize, True
        return message


# What the gateway uses of uvicorn, httpx and prometheus_client beyond their public APIs: a release
# may change it, and a gateway that starts without it would fail on every connection instead.
INTERNALS: dict[type, tuple[str, ...]] = {
    HttpToolsProtocol: (
        "_unset_keepalive_if_required()", "on_message_begin()", "on_headers_complete()", "on_message_complete()",
        "on_response_complete()", "parser", "cycle", "flow", "pipeline", "url", "headers",
    ),
    RequestResponseCycle: (
        "send()", "scope", "more_body", "response_started", "response_complete", "message_event", "keep_alive",
        "chunked_encoding", "expected_content_length", "waiting_for_100_continue",
    ),
    FlowControl: ("read_paused",),
    httpx.AsyncClient: ("_transport_for_url()",),
    Histogram: ("_buckets", "_sum"),  # Metrics.flush adds counts to a histogram's buckets directly
}


def missing_internals() -> list[str]:
    """What of INTERNALS the installed libraries lack: methods (named with `()`), and the attributes
    that their methods set."""
    missing = []
    for cls, names in INTERNALS.items():
        attributes = {name for f in vars(cls).values() for name in getattr(getattr(f, "__code__", None), "co_names", ())}
        for name in names:
            there = callable(getattr(cls, name[:-2], None)) if name.endswith("()") else name in attributes
            if not there:
                missing.append(f"{cls.__name__}.{name}")
    return missing


if missing := missing_internals():
    raise SystemExit(
        f"llm-gateway: the installed uvicorn ({uvicorn.__version__}), httpx ({httpx.__version__}) or prometheus_client "
        f"lack {', '.join(missing)}, which the gateway builds on; install the versions that pyproject.toml names"
    )


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})


def points_at(url: str, host: str, port: int) -> bool:
    """Whether `url` names the address the gateway itself listens on."""
    parts = urlsplit(url)
    same_host = parts.hostname == host or (parts.hostname in LOCAL_HOSTS and host in LOCAL_HOSTS)
    return same_host and (parts.port or {"http": 80, "https": 443}.get(parts.scheme)) == port


def _cli_number(name: str, low: int, high: int) -> Callable[[str], int]:
    def number(text: str) -> int:
        if not text.strip().isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number from {low} to {high}, got {text!r}")
        return int(text)

    return number


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one, as Go programs do at start: each stream
    holds two descriptors (client and backend), and many systems start processes with 1,024."""
    try:
        import resource  # Unix only

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # not here, or not allowed: the limit stays as it is
        pass


def main(argv: list[str] | None = None) -> None:
    """`python gateway.py` / `llm-gateway`: serve the gateway with uvicorn."""
    parser = argparse.ArgumentParser(
        prog="llm-gateway", description=__doc__.splitlines()[0],
        epilog="Every other setting comes from the environment or a .env file in the working directory; "
        ".env.example documents each one.",
    )
    parser.add_argument("--host", default=os.environ.get("HOST", "").strip() or "127.0.0.1",
                        help="address to listen on (default: HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=_cli_number("PORT/--port", 0, 65535),
                        default=os.environ.get("PORT", "").strip() or "8000",
                        help="port to listen on (default: PORT, else 8000)")
    parser.add_argument("--workers", type=_cli_number("--workers", 1, 1024), default="1",
                        help="processes to serve with; about one per core")
    args = parser.parse_args(argv)
    for backend in SETTINGS.backends.values():
        if any(points_at(server.url, args.host, args.port) for server in backend.servers):
            logger.warning(
                "backend %s at %s points at this gateway itself: its requests will loop (and get 508)",
                backend.name, backend.safe_url,
            )
    raise_open_files_limit()
    if args.workers > 1:  # each worker writes its metrics here, and a scrape of any of them adds them all up
        os.environ[MULTIPROCESS_DIR] = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
    try:
        serve(args)
    finally:
        if args.workers > 1:
            shutil.rmtree(os.environ[MULTIPROCESS_DIR], ignore_errors=True)


def serve(args: argparse.Namespace) -> None:
    """uvicorn, with the gateway's own client protocol, and no WebSocket."""
    uvicorn.run(
        "gateway:app" if args.workers > 1 else app,
        http="gateway:ClientConnection" if args.workers > 1 else ClientConnection,
        host=args.host, port=args.port, workers=args.workers,
        ws="none",  # the gateway serves no WebSocket, and a WebSocket library would log its handshakes' keys
        log_level=SETTINGS.log_level.lower(), access_log=False, proxy_headers=False,
        timeout_graceful_shutdown=SETTINGS.shutdown_timeout,
    )


if __name__ == "__main__":
    main()
