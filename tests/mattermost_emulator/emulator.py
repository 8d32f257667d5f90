#!/usr/bin/env python3
"""A Mattermost server emulator for the relay's tests (Python 3.11 standard library only).

    python3 tests/mattermost_emulator/emulator.py --port 0 \\
        --user relay-bot:BOTTOKEN:bot=true --user alice:ALICETOKEN:system_admin=true \\
        --channel war-room --state-file /tmp/mm.json

prints one line `LISTENING <port>` on stdout once it accepts connections, and serves until
SIGTERM/SIGINT. In-process:

    emu = Emulator(users=["relay-bot:BOTTOKEN:bot=true"], channels=["war-room"]).start()
    emu.url, emu.channel("war-room")["id"], ...; emu.stop()

The REST API, WebSocket and incoming webhooks follow the real server (see README.md for the list
and mmstate.py / mmws.py for the rules); /__control/* is the unauthenticated test API (state,
configuration, fault injection, WebSocket drops, request log).
"""
import argparse
import base64
import collections
import copy
import email.utils
import hashlib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import gojson  # noqa: E402
import mmstate  # noqa: E402
from mmstate import ApiError, State, is_valid_id, new_id  # noqa: E402
from mmws import Hub, WsSocket, accept_key, mangle_types  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Rate limiting: throttled's GCRA limiter as Mattermost configures it (per remote IP)
# ---------------------------------------------------------------------------------------------

class RateLimiter:
    def __init__(self):
        self.lock = threading.Lock()
        self.tat = {}

    def reset(self):
        with self.lock:
            self.tat.clear()

    def check(self, key, per_sec, max_burst):
        """Returns (limited, headers) like throttled.GCRARateLimiter + setRateLimitHeaders."""
        interval = 1.0 / per_sec
        tolerance = interval * (max_burst + 1)   # throttled: MaxBurst+1 requests at once
        limit = max_burst + 1
        with self.lock:
            now = time.monotonic()
            tat = self.tat.get(key, now)
            new_tat = now + interval if now > tat else tat + interval
            allow_at = new_tat - tolerance
            diff = now - allow_at
            retry_after = -1.0
            if diff < 0:
                limited = True
                if interval <= tolerance:
                    retry_after = -diff
                ttl = tat - now
            else:
                limited = False
                self.tat[key] = new_tat
                ttl = new_tat - now
            nxt = tolerance - ttl
            remaining = int(nxt / interval) if nxt > -interval else 0
        headers = [("X-Ratelimit-Limit", str(limit)),
                   ("X-Ratelimit-Remaining", str(max(remaining, 0))),
                   ("X-Ratelimit-Reset", str(int(math.ceil(max(ttl, 0.0)))))]
        if retry_after >= 0:
            headers.append(("Retry-After", str(int(math.ceil(retry_after)))))
        return limited, headers


LIMIT_EXCEEDED = b"limit exceeded\n"   # http.Error(w, "limit exceeded", 429)

FAULT_KINDS = ("rate_limit", "status", "delay", "garbage", "drop")
GARBAGE_STYLES = ("truncated", "cut", "wrong_types", "html", "empty", "null")
DELAY_PHASES = ("before", "after")

# What an authenticating reverse proxy (or a captive portal) answers instead of the API: a
# complete, well-formed HTML page, often with status 200.
HTML_LOGIN_PAGE = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">"
                   "<title>Sign in</title></head>\n<body>\n<h1>Sign in to continue</h1>\n"
                   "<form method=\"post\" action=\"/oauth2/start\"><button>Sign in</button>"
                   "</form>\n</body>\n</html>\n")


def garbage_body(style, real=None, rng=None):
    """The body of a `garbage` fault. `real` is the body the server would have sent (bytes) when
    the request was carried out; styles that need it fall back to "truncated" without it."""
    if style == "cut" and real is not None:
        return real[:len(real) // 2]
    if style == "wrong_types" and real is not None:
        try:
            return json.dumps(mangle_types(json.loads(real.decode("utf-8")))).encode()
        except ValueError:
            return real[:len(real) // 2]   # not JSON (a file): cut it instead
    if style == "html":
        return HTML_LOGIN_PAGE.encode()
    if style == "empty":
        return b""
    if style == "null":
        return b"null"
    return ('{"id":"%s","create_at":17' % new_id(rng)).encode()


class Fault:
    _next = [1]

    def __init__(self, spec):
        kind = spec.get("kind")
        if kind not in FAULT_KINDS:
            raise ValueError("kind must be one of %s" % ", ".join(FAULT_KINDS))
        known = {"kind", "count", "status", "retry_after", "delay_ms", "body", "content_type",
                 "path_prefix", "path_regex", "method", "process", "duration_ms", "every",
                 "style", "delay_phase"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError("unknown fault field(s): %s" % ", ".join(sorted(unknown)))
        self.id = Fault._next[0]
        Fault._next[0] += 1
        self.kind = kind
        # "For a while": duration_ms bounds the fault in time; without a count it then matches
        # every request until it expires. count alone: that many requests (default 1).
        self.duration_ms = spec.get("duration_ms")
        self.expires = None
        if self.duration_ms is not None:
            self.duration_ms = int(self.duration_ms)
            if self.duration_ms < 1:
                raise ValueError("duration_ms must be >= 1")
            self.expires = time.monotonic() + self.duration_ms / 1000.0
        if "count" in spec or self.expires is None:
            self.count = int(spec.get("count", 1))
            if self.count < 1:
                raise ValueError("count must be >= 1")
        else:
            self.count = None   # unlimited until it expires
        # every: of the matching requests only every Nth is hit (the 1st, N+1th, ...); the
        # others pass untouched and do not use up the count: an intermittent fault.
        self.every = int(spec.get("every", 1))
        if self.every < 1:
            raise ValueError("every must be >= 1")
        self.seen = 0
        # status: one code, or a list the hits cycle through ([500, 502, 503]).
        status = spec.get("status", 500 if kind == "status" else 200)
        self.statuses = [int(x) for x in status] if isinstance(status, list) else [int(status)]
        if not self.statuses:
            raise ValueError("status must not be an empty list")
        self.status = self.statuses[0]
        self.retry_after = int(spec.get("retry_after", 1))
        self.delay_ms = int(spec.get("delay_ms", 0))
        # delay_phase "before": the request waits, then is carried out (it may happen after the
        # client gave up); "after": it is carried out at once and only the answer is late.
        self.delay_phase = spec.get("delay_phase") or "before"
        if self.delay_phase not in DELAY_PHASES:
            raise ValueError("delay_phase must be one of %s" % ", ".join(DELAY_PHASES))
        self.body = spec.get("body")
        self.content_type = spec.get("content_type")
        self.style = spec.get("style") or "truncated"
        if self.style not in GARBAGE_STYLES:
            raise ValueError("style must be one of %s" % ", ".join(GARBAGE_STYLES))
        self.path_prefix = spec.get("path_prefix") or ""
        self.path_regex = spec.get("path_regex") or ""
        self.path_rx = re.compile(self.path_regex) if self.path_regex else None
        self.method = (spec.get("method") or "").upper()
        # Whether the request is still carried out (its effects happen, only the response is
        # replaced): the ambiguous failure a client must survive without duplicating. Styles
        # that garble the real answer always carry it out.
        self.process = bool(spec.get("process", kind == "garbage"))
        if kind == "garbage" and self.style in ("cut", "wrong_types") and self.body is None:
            self.process = True
        self.matched = 0

    def expired(self, now):
        return self.expires is not None and now >= self.expires

    def matches(self, method, path):
        return ((not self.method or self.method == method)
                and path.startswith(self.path_prefix)
                and (self.path_rx is None or self.path_rx.search(path) is not None))

    def hit(self):
        """Called for a matching request: whether this one is affected (see `every`); a hit
        picks its status and uses up one of the count."""
        self.seen += 1
        if (self.seen - 1) % self.every != 0:
            return False
        self.status = self.statuses[self.matched % len(self.statuses)]
        self.matched += 1
        if self.count is not None:
            self.count -= 1
        return True

    def used_up(self):
        return self.count is not None and self.count <= 0

    def describe(self):
        remaining_ms = None
        if self.expires is not None:
            remaining_ms = max(0, int((self.expires - time.monotonic()) * 1000))
        return {"id": self.id, "kind": self.kind, "remaining": self.count, "status": self.status,
                "statuses": self.statuses, "retry_after": self.retry_after,
                "delay_ms": self.delay_ms, "delay_phase": self.delay_phase,
                "path_prefix": self.path_prefix, "path_regex": self.path_regex,
                "method": self.method, "process": self.process, "style": self.style,
                "every": self.every, "duration_ms": self.duration_ms,
                "remaining_ms": remaining_ms, "matched": self.matched}


# ---------------------------------------------------------------------------------------------
# Request plumbing
# ---------------------------------------------------------------------------------------------

class BadRequest(Exception):
    pass


class Response:
    def __init__(self, status, body=b"", content_type="application/json", headers=None):
        self.status = status
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = list(headers or [])


def json_response(status, obj, encoder=False, headers=None):
    text = gojson.dumps_encoder(obj) if encoder else gojson.dumps(obj)
    return Response(status, text, "application/json", headers)


class Ctx:
    def __init__(self, handler, method, raw_path):
        self.handler = handler
        self.method = method
        split = urllib.parse.urlsplit(raw_path)
        self.path = urllib.parse.unquote(split.path)
        self.raw_query = split.query
        self.query = {}
        for k, v in urllib.parse.parse_qsl(split.query, keep_blank_values=True):
            self.query.setdefault(k, v)   # url.Values.Get: the first value
        self.headers = handler.headers
        self.request_id = None
        self.body = b""
        self.user = None
        self.token = None
        self.upgraded = False


def parse_token(ctx):
    """app.ParseAuthTokenFromRequest: cookie, then Bearer, then Token, then ?access_token=."""
    cookies = ctx.headers.get_all("Cookie") or []
    for header in cookies:
        for item in header.split(";"):
            name, _, value = item.strip().partition("=")
            if name == "MMAUTHTOKEN" and value:
                return value, "cookie"
    auth = ctx.headers.get("Authorization") or ""
    if len(auth) > 6 and auth[:6].upper() == "BEARER":
        return auth[7:], "header"
    if len(auth) > 5 and auth[:5].lower() == "token":
        return auth[6:], "header"
    token = ctx.query.get("access_token")
    if token:
        return token, "query"
    return "", ""


def _disposition_params(value):
    params = {}
    for m in re.finditer(r';\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', value):
        key, val = m.group(1).lower(), m.group(2).strip()
        if val.startswith('"'):
            val = re.sub(r'\\(.)', r'\1', val[1:-1])
        params[key] = val
    if "filename*" in params:
        enc, _, rest = params["filename*"].partition("'")
        _, _, encoded = rest.partition("'")
        try:
            params["filename"] = urllib.parse.unquote(encoded, encoding=enc or "utf-8")
        except LookupError:
            pass
    return params


def parse_multipart(body, boundary):
    """[(form name, file name or None, bytes)] in order; raises BadRequest on a broken body."""
    delim = b"\r\n--" + boundary.encode("latin-1")
    chunks = (b"\r\n" + body).split(delim)
    if len(chunks) < 2:
        raise BadRequest("multipart: NextPart: EOF")
    parts, closed = [], False
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            closed = True
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        else:
            chunk = chunk.lstrip(b" \t")
            if chunk.startswith(b"\r\n"):
                chunk = chunk[2:]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            if chunk.endswith(b"\r\n") or chunk == b"":
                head, data = chunk, b""
            else:
                raise BadRequest("multipart: malformed part headers")
        headers = {}
        for line in head.decode("utf-8", errors="replace").split("\r\n"):
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        disp = headers.get("content-disposition", "")
        if not disp.lower().startswith("form-data"):
            parts.append(("", None, data))
            continue
        params = _disposition_params(disp)
        filename = params.get("filename")
        if filename is not None:
            filename = filename.replace("\\", "/").rsplit("/", 1)[-1]
        parts.append((params.get("name", ""), filename, data))
    if not closed:
        raise BadRequest("multipart: NextPart: EOF")
    return parts


# ---------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------

def _parse_user_spec(spec):
    """NAME:TOKEN[:key=value[,key=value...]] with keys system_admin, bot, oauth, id."""
    if isinstance(spec, dict):
        return dict(spec)
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError("--user expects NAME:TOKEN[:key=value,...], got %r" % spec)
    out = {"username": parts[0], "token": parts[1]}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError("user option %r needs key=value" % item)
            if key in ("system_admin", "bot", "oauth"):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("user option %s expects true/false, got %r" % (key, value))
                out[key] = value.lower() in ("true", "1", "yes")
            elif key == "id":
                out["id"] = value
            else:
                raise ValueError("unknown user option %r (system_admin, bot, oauth, id)" % key)
    return out


def _parse_channel_spec(spec):
    if isinstance(spec, dict):
        return dict(spec)
    name, eq, cid = spec.partition("=")
    if not name:
        raise ValueError("--channel expects NAME[=ID], got %r" % spec)
    out = {"name": name}
    if eq:
        out["id"] = cid
    return out


class Emulator:
    def __init__(self, port=0, host="127.0.0.1", config=None, seed=None, users=(), channels=(),
                 hooks=()):
        self.host = host
        self.requested_port = port
        self.state = State(seed=seed, config=config)
        version = self.state.config["server_version"]
        digest = hashlib.md5(version.encode()).hexdigest()
        self.version_id = "%s.0.%s.false" % (version, digest)
        self.hub = Hub(self.state, self.version_id)
        self.state.publish = self.hub.publish
        self.limiter = RateLimiter()
        self.fault_lock = threading.Lock()
        self.faults = []
        self.log_lock = threading.Lock()
        self.request_log = collections.deque(maxlen=50000)
        self.log_index = 0
        self.server = None
        self.thread = None
        self.open_sockets = set()
        self.sock_lock = threading.Lock()
        for spec in users:
            self.create_user(**_parse_user_spec(spec))
        for spec in channels:
            self.create_channel(**_parse_channel_spec(spec))
        for spec in hooks:
            self.create_hook(**spec)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self):
        server = _Server((self.host, self.requested_port), Handler)
        server.daemon_threads = True
        server.emu = self
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True, name="mm-emulator")
        self.thread.start()
        return self

    def stop(self):
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.hub.close_all()
        with self.sock_lock:
            socks = list(self.open_sockets)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self.server.server_address[1]

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    @property
    def ws_url(self):
        return "ws://%s:%d/api/v4/websocket" % (self.host, self.port)

    # -- convenience wrappers over the state (same as the control API) ---------------------

    def create_user(self, username, token=None, system_admin=False, bot=False, oauth=False,
                    id=None, join_all=True, tokens=()):
        user = self.state.create_user(username, token=token, is_admin=system_admin, is_bot=bot,
                                      uid=id, join_all=join_all, oauth=oauth)
        for t in tokens:
            self.state.add_token(user.id, t)
        return user

    def create_channel(self, name, display_name=None, team_id=None, type="O", id=None,
                       members=None):
        return self.state.create_channel(name, display_name, team_id, type, id, members)

    def create_hook(self, channel_id, user=None, id=None, channel_locked=False):
        return self.state.create_hook(channel_id, user, id, channel_locked)

    def user(self, ref):
        return self.state.find_user(ref)

    def channel(self, ref):
        with self.state.lock:
            if ref in self.state.channels:
                return self.state.channels[ref]
            for ch in self.state.channels.values():
                if ch["name"] == ref:
                    return ch
        return None

    def set_config(self, **changes):
        return self.state.set_config(changes)

    def add_fault(self, **spec):
        fault = Fault(spec)
        with self.fault_lock:
            self.faults.append(fault)
        return fault.id

    def clear_faults(self):
        with self.fault_lock:
            self.faults.clear()

    def active_faults(self):
        with self.fault_lock:
            now = time.monotonic()
            self.faults = [f for f in self.faults if not f.expired(now)]
            return [f.describe() for f in self.faults]

    def add_ws_fault(self, **spec):
        return self.hub.add_fault(spec)

    def clear_ws_faults(self):
        self.hub.clear_faults()

    def requests(self):
        with self.log_lock:
            return list(self.request_log)

    def clear_requests(self):
        with self.log_lock:
            self.request_log.clear()

    def take_fault(self, method, path):
        with self.fault_lock:
            now = time.monotonic()
            self.faults = [f for f in self.faults if not f.expired(now)]
            for f in self.faults:
                if f.matches(method, path) and f.hit():
                    if f.used_up():
                        self.faults.remove(f)
                    return copy.copy(f)   # this request's status, whatever later hits pick
        return None

    def log(self, ctx, status):
        with self.log_lock:
            self.log_index += 1
            self.request_log.append({"index": self.log_index, "time": self.state.now(),
                                     "method": ctx.method,
                                     "path": ctx.path + ("?" + ctx.raw_query if ctx.raw_query
                                                         else ""),
                                     "status": status,
                                     "user": ctx.user.username if ctx.user else "",
                                     "request_id": ctx.request_id or ""})

    def describe_state(self):
        with self.state.lock:
            return {
                "url": self.url if self.server else None,
                "port": self.port if self.server else None,
                "team": {"id": self.state.default_team["id"],
                         "name": self.state.default_team["name"]},
                "users": [{"id": u.id, "username": u.username,
                           "tokens": sorted(t for t, uid in self.state.tokens.items()
                                            if uid == u.id),
                           "system_admin": u.is_admin, "bot": u.is_bot}
                          for u in self.state.users.values()],
                "channels": [{"id": c["id"], "name": c["name"], "team_id": c["team_id"],
                              "type": c["type"],
                              "members": sorted(self.state.members.get(c["id"], ()))}
                             for c in self.state.channels.values()],
                "hooks": [dict(h) for h in self.state.hooks.values()],
            }


# ---------------------------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients that vanish (or sockets the emulator drops on purpose) are not errors.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


ID = r"([A-Za-z0-9]+)"
ROUTES = []


def route(method, pattern, auth="session", file_api=False):
    def deco(fn):
        ROUTES.append((method, re.compile("^" + pattern + "$"), fn, auth, file_api))
        return fn
    return deco


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mm-emulator"

    def setup(self):
        super().setup()
        # Go's net package sets TCP_NODELAY on every TCP connection.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self.server.emu.sock_lock:
            self.server.emu.open_sockets.add(self.connection)

    def finish(self):
        with self.server.emu.sock_lock:
            self.server.emu.open_sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # -- plumbing --------------------------------------------------------------------------

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise BadRequest("truncated chunked body")
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise BadRequest("bad chunk size")
                if size == 0:
                    while True:  # trailers
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        length = self.headers.get("Content-Length")
        if length:
            try:
                n = int(length)
            except ValueError:
                raise BadRequest("bad Content-Length")
            if n < 0:
                raise BadRequest("bad Content-Length")
            return self.rfile.read(n)
        return b""

    def _write(self, ctx, resp):
        emu = self.server.emu
        self.send_response_only(resp.status)
        # The server's clock (clock_offset_ms included): a client may read server time here.
        self.send_header("Date", email.utils.formatdate(emu.state.now() / 1000.0, usegmt=True))
        if ctx.request_id:
            self.send_header("X-Request-Id", ctx.request_id)
            self.send_header("X-Version-Id", emu.version_id)
            self.send_header("Permissions-Policy", "")
            self.send_header("Referrer-Policy", "no-referrer")
        names = {k.lower() for k, _ in resp.headers}
        if "x-content-type-options" not in names:
            self.send_header("X-Content-Type-Options", "nosniff")
        if resp.content_type:
            self.send_header("Content-Type", resp.content_type)
        if ctx.method == "GET" and resp.content_type == "application/json" and ctx.request_id:
            self.send_header("Expires", "0")
        for k, v in resp.headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write (end_headers() would send the headers on their own).
        self._headers_buffer.append(b"\r\n")
        if ctx.method != "HEAD":
            self._headers_buffer.append(resp.body)
        data = b"".join(self._headers_buffer)
        self._headers_buffer = []
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, ctx, err):
        emu = self.server.emu
        if not emu.state.config["enable_developer"]:
            err.detailed = ""
        return json_response(err.status, err.body(ctx.request_id))

    def _dispatch(self, method):
        emu = self.server.emu
        ctx = Ctx(self, method, self.path)
        if ctx.path.startswith("/__control/") or ctx.path == "/__control":
            try:
                ctx.body = self._read_body()
            except BadRequest as e:
                self.close_connection = True
                self._write(ctx, Response(400, json.dumps({"error": str(e)})))
                return
            self._write(ctx, control(emu, ctx))
            return
        ctx.request_id = new_id(emu.state.rng)
        status = 0
        try:
            try:
                ctx.body = self._read_body()
            except BadRequest as e:
                self.close_connection = True
                resp = Response(400, "400 Bad Request: %s" % e, "text/plain; charset=utf-8")
                ctx.request_id = None
                self._write(ctx, resp)
                status = 400
                return
            fault = emu.take_fault(method, ctx.path)
            if fault is not None and fault.delay_ms and fault.delay_phase == "before":
                time.sleep(fault.delay_ms / 1000.0)
            if fault is not None and fault.kind == "rate_limit":
                burst = emu.state.config["rate_limit"]["max_burst"]
                resp = Response(429, LIMIT_EXCEEDED, "text/plain; charset=utf-8", [
                    ("X-Ratelimit-Limit", str(burst + 1)), ("X-Ratelimit-Remaining", "0"),
                    ("X-Ratelimit-Reset", str(fault.retry_after)),
                    ("Retry-After", str(fault.retry_after))])
                ctx.request_id = None
                self._write(ctx, resp)
                status = 429
                return
            if fault is not None and fault.kind in ("status", "garbage", "drop") \
                    and not fault.process:
                status = self._fault_response(ctx, fault)
                return
            rl = emu.state.config["rate_limit"]
            rl_headers = []
            if rl["enabled"]:
                limited, rl_headers = emu.limiter.check(self.client_address[0],
                                                        float(rl["per_sec"]),
                                                        int(rl["max_burst"]))
                if limited:
                    ctx.request_id = None
                    self._write(ctx, Response(429, LIMIT_EXCEEDED, "text/plain; charset=utf-8",
                                              rl_headers))
                    status = 429
                    return
            resp = self._route(ctx)
            if ctx.upgraded:
                status = 101
                return
            resp.headers = rl_headers + resp.headers
            if fault is not None and fault.delay_ms and fault.delay_phase == "after":
                time.sleep(fault.delay_ms / 1000.0)
            if fault is not None and fault.kind in ("status", "garbage", "drop"):
                status = self._fault_response(ctx, fault, resp)
                return
            self._write(ctx, resp)
            status = resp.status
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if not ctx.upgraded:
                emu.log(ctx, status)

    def _fault_response(self, ctx, fault, real=None):
        if fault.kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return 0
        if fault.kind == "garbage":
            if fault.body is not None:
                body = fault.body
            else:
                body = garbage_body(fault.style, real.body if real is not None else None,
                                    self.server.emu.state.rng)
            ctype = fault.content_type or ("text/html; charset=utf-8" if fault.style == "html"
                                           else "application/json")
            resp = Response(fault.status, body, ctype)
        else:
            if fault.body is not None:
                resp = Response(fault.status, fault.body,
                                fault.content_type or "text/plain; charset=utf-8")
            elif fault.status in (502, 503, 504):
                # What a reverse proxy in front of Mattermost answers: HTML, not JSON.
                reason = self.responses.get(fault.status, ("Error",))[0]
                html = ("<html>\r\n<head><title>%d %s</title></head>\r\n<body>\r\n<center><h1>"
                        "%d %s</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n"
                        "</html>\r\n" % (fault.status, reason, fault.status, reason))
                resp = Response(fault.status, html, fault.content_type or "text/html")
                ctx.request_id = None
            else:
                err = ApiError(fault.status, "emulator.fault.injected")
                resp = self._error(ctx, err)
        self._write(ctx, resp)
        return resp.status

    # -- routing and authentication --------------------------------------------------------

    def _route(self, ctx):
        emu = self.server.emu
        path_matched = False
        for method, rx, fn, auth, file_api in ROUTES:
            m = rx.match(ctx.path)
            if not m:
                continue
            path_matched = True
            if method != ctx.method and not (method == "GET" and ctx.method == "HEAD"):
                continue
            limit = emu.state.config["max_file_size"] if file_api else \
                emu.state.config["max_payload_bytes"]
            if len(ctx.body) > limit + 512:
                return self._error(ctx, ApiError(413,
                                                 "api.context.request_body_too_large.app_error"))
            try:
                err = self._authenticate(ctx, auth)
                if err is not None:
                    return self._error(ctx, err)
                return fn(self, ctx, *m.groups())
            except ApiError as e:
                return self._error(ctx, e)
        if path_matched:
            return Response(405, b"", None)
        if ctx.path.startswith("/api/"):
            return self._error(ctx, ApiError(404, "api.context.404.app_error"))
        return Response(404, "404 page not found\n", "text/plain; charset=utf-8")

    def _authenticate(self, ctx, auth):
        if auth == "none":
            return None
        emu = self.server.emu
        token, where = parse_token(ctx)
        if token:
            user = emu.state.user_for_token(token)
            if user is None:
                if auth == "session":
                    return ApiError(401, "api.context.session_expired.app_error", {},
                                    "token=" + token)
            elif where == "query" and emu.state.config["query_token_oauth_only"] \
                    and token not in emu.state.oauth_tokens:
                return ApiError(401, "api.context.token_provided.app_error", {}, "token=" + token)
            else:
                if (where == "cookie" and auth == "session" and ctx.method != "GET"
                        and ctx.headers.get("X-Requested-With") != "XMLHttpRequest"):
                    return ApiError(401, "api.context.session_expired.app_error", {},
                                    "token=" + token + " Appears to be a CSRF attempt")
                ctx.user = user
                ctx.token = token
        if auth == "session" and ctx.user is None:
            return ApiError(401, "api.context.session_expired.app_error", {}, "UserRequired")
        return None

    def _json_body(self, ctx, name):
        try:
            return gojson.loads(ctx.body or b"null")
        except gojson.DecodeError as e:
            raise mmstate.invalid_body(name, str(e))

    # -- WebSocket upgrade -----------------------------------------------------------------

    def upgrade(self, ctx):
        emu = self.server.emu
        h = self.headers
        key = h.get("Sec-WebSocket-Key") or ""
        conn_tokens = [t.strip().lower() for t in (h.get("Connection") or "").split(",")]
        problem = None
        if (h.get("Upgrade") or "").lower() != "websocket":
            problem = "websocket: the client is not using the websocket protocol: 'websocket' " \
                      "token not found in 'Upgrade' header"
        elif "upgrade" not in conn_tokens:
            problem = "websocket: the client is not using the websocket protocol: 'upgrade' " \
                      "token not found in 'Connection' header"
        elif h.get("Sec-WebSocket-Version") != "13":
            problem = "websocket: unsupported version: 13 not found in " \
                      "'Sec-Websocket-Version' header"
        else:
            try:
                if len(base64.b64decode(key, validate=True)) != 16:
                    problem = "websocket: not a websocket handshake: 'Sec-WebSocket-Key' " \
                              "header must be Base64 encoded value of 16-byte in length"
            except ValueError:
                problem = "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header " \
                          "must be Base64 encoded value of 16-byte in length"
        if problem:
            raise ApiError(400, "api.web_socket.connect.upgrade.app_error", {}, problem)
        self.send_response_only(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept_key(key))
        self.end_headers()
        self.wfile.flush()
        ctx.upgraded = True
        self.close_connection = True
        emu.log(ctx, 101)
        # Frames the client sent right after the request may already sit in rfile's buffer.
        sock = self.connection
        sock.setblocking(False)
        prefix = bytearray()
        try:
            while True:
                chunk = self.rfile.read1(65536)
                if not chunk:
                    break
                prefix += chunk
        except (BlockingIOError, OSError):
            pass
        sock.setblocking(True)
        ws = WsSocket(sock, bytes(prefix))
        conn = emu.hub.attach(ws, ctx.user, ctx.token, ctx.query.get("connection_id", ""),
                              ctx.query.get("sequence_number"))
        if conn is None:
            ws.abort()
        else:
            emu.hub.serve_socket(conn, ws)
        return Response(101)


# ---------------------------------------------------------------------------------------------
# REST endpoints
# ---------------------------------------------------------------------------------------------

def _user_ref(handler, ctx, ref):
    if ref == "me":
        return ctx.user
    return handler.server.emu.state.users.get(ref)


@route("GET", r"/api/v4/system/ping", auth="none")
def system_ping(h, ctx):
    return json_response(200, {"ActiveSearchBackend": "database", "AndroidLatestVersion": "",
                               "AndroidMinVersion": "", "IosLatestVersion": "",
                               "IosMinVersion": "", "status": "OK"})


@route("GET", r"/api/v4/config/client", auth="none")
def client_config(h, ctx):
    cfg = h.server.emu.state.config
    if ctx.query.get("format") != "old":
        raise mmstate.ApiError(501, "api.config.client.old_format.app_error")
    return json_response(200, {
        "Version": cfg["server_version"], "BuildNumber": "0", "SiteName": "Mattermost",
        "MaxPostSize": str(cfg["max_post_size"]),
        "PostEditTimeLimit": str(cfg["post_edit_time_limit"]),
        "EnablePostUsernameOverride": str(cfg["enable_post_username_override"]).lower(),
        "EnablePostIconOverride": str(cfg["enable_post_icon_override"]).lower(),
        "EnableFileAttachments": str(cfg["enable_file_attachments"]).lower(),
        "MaxFileSize": str(cfg["max_file_size"]),
        "UniqueEmojiReactionLimitPerPost": str(cfg["unique_emoji_reaction_limit_per_post"]),
        "CollapsedThreads": "disabled",
    })


@route("GET", r"/api/v4/users/" + ID)
def get_user(h, ctx, ref):
    user = _user_ref(h, ctx, ref)
    if ref != "me" and not is_valid_id(ref):
        raise mmstate.invalid_url("user_id")
    if user is None:
        raise ApiError(404, "app.user.missing_account.const")
    return json_response(200, user.to_struct())


@route("GET", r"/api/v4/users/username/([A-Za-z0-9.\-_]+)")
def get_user_by_name(h, ctx, name):
    user = h.server.emu.state.find_user(name)
    if user is None or user.username != name:
        raise ApiError(404, "app.user.missing_account.const")
    return json_response(200, user.to_struct())


@route("POST", r"/api/v4/users/ids")
def get_users_by_ids(h, ctx):
    ids = h._json_body(ctx, "user_ids")
    if not isinstance(ids, list) or not ids:
        raise mmstate.invalid_body("user_ids")
    users = h.server.emu.state.users
    return json_response(200, [users[i].to_struct() for i in ids if i in users])


@route("GET", r"/api/v4/teams/" + ID)
def get_team(h, ctx, tid):
    if not is_valid_id(tid):
        raise mmstate.invalid_url("team_id")
    team = h.server.emu.state.teams.get(tid)
    if team is None:
        raise ApiError(404, "app.team.get.find.app_error")
    return json_response(200, h.server.emu.state.team_struct(team))


@route("GET", r"/api/v4/channels/" + ID)
def get_channel(h, ctx, cid):
    st = h.server.emu.state
    if not is_valid_id(cid):
        raise mmstate.invalid_url("channel_id")
    ch = st.channels.get(cid)
    if ch is None:
        raise ApiError(404, "app.channel.get.existing.app_error")
    if not st.can_read_channel(ctx.user, ch):
        raise mmstate.forbidden()
    return json_response(200, st.channel_struct(ch))


@route("GET", r"/api/v4/teams/" + ID + r"/channels/name/([A-Za-z0-9\-_]+)")
def get_channel_by_name(h, ctx, tid, name):
    st = h.server.emu.state
    for ch in st.channels.values():
        if ch["team_id"] == tid and ch["name"] == name and st.can_read_channel(ctx.user, ch):
            return json_response(200, st.channel_struct(ch))
    raise ApiError(404, "app.channel.get.existing.app_error")


@route("POST", r"/api/v4/posts")
def create_post(h, ctx):
    body = h._json_body(ctx, "post")
    status, obj = h.server.emu.state.create_post(ctx.user, body)
    return json_response(status, obj, encoder=True)


@route("GET", r"/api/v4/posts/" + ID)
def get_post(h, ctx, pid):
    include = ctx.query.get("include_deleted", "").lower() in ("1", "t", "true")
    status, obj = h.server.emu.state.get_post(ctx.user, pid, include)
    return json_response(status, obj, encoder=True)


@route("PUT", r"/api/v4/posts/" + ID)
def update_post(h, ctx, pid):
    status, obj = h.server.emu.state.update_post(ctx.user, pid, h._json_body(ctx, "post"))
    return json_response(status, obj, encoder=True)


@route("DELETE", r"/api/v4/posts/" + ID)
def delete_post(h, ctx, pid):
    status, obj = h.server.emu.state.delete_post(ctx.user, pid)
    return json_response(status, obj)


@route("PUT", r"/api/v4/posts/" + ID + r"/patch")
def patch_post(h, ctx, pid):
    status, obj = h.server.emu.state.patch_post(ctx.user, pid, h._json_body(ctx, "post"))
    return json_response(status, obj, encoder=True)


@route("GET", r"/api/v4/posts/" + ID + r"/thread")
def get_thread(h, ctx, pid):
    status, obj = h.server.emu.state.get_thread(ctx.user, pid)
    return json_response(status, obj, encoder=True)


@route("GET", r"/api/v4/posts/" + ID + r"/reactions")
def get_reactions(h, ctx, pid):
    status, obj = h.server.emu.state.get_reactions(ctx.user, pid)
    return json_response(status, obj)


@route("GET", r"/api/v4/channels/" + ID + r"/posts")
def channel_posts(h, ctx, cid):
    status, obj = h.server.emu.state.channel_posts_query(ctx.user, cid, ctx.query)
    return json_response(status, obj, encoder=True)


@route("POST", r"/api/v4/reactions")
def save_reaction(h, ctx):
    status, obj = h.server.emu.state.save_reaction(ctx.user, h._json_body(ctx, "reaction"))
    return json_response(status, obj)


@route("DELETE", r"/api/v4/users/" + ID + r"/posts/" + ID + r"/reactions/(" +
       mmstate.EMOJI_PATH_RE + r")")
def delete_reaction(h, ctx, uid, pid, name):
    if uid == "me":
        uid = ctx.user.id
    status, obj = h.server.emu.state.delete_reaction(ctx.user, uid, pid, name)
    return json_response(status, obj)


@route("POST", r"/api/v4/files", file_api=True)
def upload_files(h, ctx):
    st = h.server.emu.state
    if not st.config["enable_file_attachments"]:
        raise ApiError(403, "api.file.attachments.disabled.app_error")
    if len(ctx.body) == 0:
        raise ApiError(400, "api.file.upload_file.read_request.app_error", {},
                       "Content-Length should not be 0")
    ctype = ctx.headers.get("Content-Type") or ""
    mtype, _, rest = ctype.partition(";")
    channel_param = ctx.query.get("channel_id", "")
    if mtype.strip().lower() == "multipart/form-data":
        m = re.search(r'boundary="?([^";]+)"?', rest)
        if not m:
            raise ApiError(400, "api.file.upload_file.read_request.app_error", {},
                           "no multipart boundary param in Content-Type")
        try:
            parts = parse_multipart(ctx.body, m.group(1))
        except BadRequest as e:
            raise ApiError(400, "api.file.upload_file.read_request.app_error", {}, str(e))
        status, obj = st.upload_files(ctx.user, parts, channel_param)
    else:
        status, obj = st.upload_files(ctx.user, None, channel_param, simple=(
            ctx.query.get("filename", ""), ctx.body, ctx.query.get("client_id", "")))
    return json_response(status, obj, encoder=True)


@route("GET", r"/api/v4/files/" + ID, auth="session")
def get_file(h, ctx, fid):
    info, data = h.server.emu.state.get_file(ctx.user, fid)
    force = ctx.query.get("download", "").lower() in ("1", "t", "true")
    mime = info["mime_type"] or "application/octet-stream"
    inline = not force and mime in mmstate.MEDIA_TYPES
    name = urllib.parse.quote(info["name"], safe="")
    disp = "%s;filename=\"%s\"; filename*=UTF-8''%s" % ("inline" if inline else "attachment",
                                                        name, name)
    return Response(200, data, mime, [
        ("Content-Disposition", disp), ("Cache-Control", "private, no-cache"),
        ("X-Frame-Options", "DENY"), ("Content-Security-Policy", "Frame-ancestors 'none'"),
        ("Last-Modified", email.utils.formatdate(info["update_at"] / 1000.0, usegmt=True))])


@route("GET", r"/api/v4/files/" + ID + r"/info")
def get_file_info(h, ctx, fid):
    status, obj = h.server.emu.state.get_file_info(ctx.user, fid)
    return json_response(status, obj)


@route("GET", r"/api/v4/websocket/?", auth="trust")
def websocket(h, ctx):
    return h.upgrade(ctx)


@route("POST", r"/hooks/" + ID, auth="none")
def incoming_webhook(h, ctx, hook_id):
    ctype = (ctx.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    raw = ctx.body
    try:
        if ctype == "application/x-www-form-urlencoded":
            form = dict(urllib.parse.parse_qsl(raw.decode("utf-8", errors="replace")))
            payload = json.loads(form.get("payload", ""))
        elif ctype == "multipart/form-data":
            m = re.search(r'boundary="?([^";]+)"?', ctx.headers.get("Content-Type") or "")
            parts = parse_multipart(raw, m.group(1)) if m else []
            payload = json.loads(next((d for n, f, d in parts if n == "payload"), b"").decode())
        else:
            payload = json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, BadRequest, AttributeError):
        raise ApiError(400, "web.incoming_webhook.parse.app_error")
    status, text = h.server.emu.state.webhook_post(hook_id, payload)
    return Response(status, text, "text/plain")


# ---------------------------------------------------------------------------------------------
# Control API (/__control/*, no authentication, plain JSON)
# ---------------------------------------------------------------------------------------------

def _ok(obj, status=200):
    return Response(status, json.dumps(obj), "application/json")


def _bad(msg, status=400):
    return Response(status, json.dumps({"error": msg}), "application/json")


def _api(emu, ctx, fn):
    """Run a REST operation for the control API; answer exactly what the REST API answers."""
    try:
        status, obj = fn()
    except ApiError as e:
        if not emu.state.config["enable_developer"]:
            e.detailed = ""
        return Response(e.status, gojson.dumps(e.body("")), "application/json")
    return Response(status, gojson.dumps(obj), "application/json")


def _actor(emu, body, ctx):
    ref = body.get("as") if isinstance(body, dict) else None
    ref = ref or ctx.query.get("as")
    if not ref:
        raise ValueError("'as' (user id or username) is required")
    user = emu.state.find_user(ref)
    if user is None:
        raise ValueError("unknown user %r" % ref)
    return user


def control(emu, ctx):
    try:
        body = json.loads(ctx.body.decode("utf-8")) if ctx.body.strip() else {}
    except ValueError as e:
        return _bad("invalid JSON body: %s" % e)
    if not isinstance(body, dict):
        return _bad("the body must be a JSON object")
    parts = [p for p in ctx.path.split("/") if p][1:]   # after "__control"
    m = ctx.method
    st = emu.state
    try:
        if parts == ["health"]:
            return _ok({"ok": True, "port": emu.port})
        if parts == ["reset"] and m == "POST":
            st.reset(everything=bool(body.get("everything")))
            emu.clear_faults()
            emu.clear_requests()
            emu.limiter.reset()
            emu.hub.drop(keep_buffer=False)
            emu.clear_ws_faults()
            return _ok({"ok": True})
        if parts == ["config"]:
            if m == "POST":
                return _ok(st.set_config(body))
            return _ok(st.config)
        if parts == ["clock"] and m == "POST":
            with st.lock:
                if "offset_ms" in body:
                    st.clock_offset_ms = int(body["offset_ms"])
                if "advance_ms" in body:
                    st.clock_offset_ms += int(body["advance_ms"])
                return _ok({"offset_ms": st.clock_offset_ms, "now": st.now()})
        if parts == ["state"]:
            return _ok(emu.describe_state())
        if parts == ["users"]:
            if m == "POST":
                allowed = {"username", "token", "tokens", "system_admin", "bot", "oauth", "id",
                           "join_all"}
                unknown = set(body) - allowed
                if unknown:
                    return _bad("unknown field(s): %s" % ", ".join(sorted(unknown)))
                user = emu.create_user(**body)
                return _ok(dict(gojson.loads(gojson.dumps(user.to_struct())),
                                token=body.get("token")), 201)
            return _ok({"users": emu.describe_state()["users"]})
        if parts == ["tokens"] and m == "POST":
            user = st.find_user(body.get("user") or "")
            if user is None:
                return _bad("unknown user %r" % body.get("user"))
            st.add_token(user.id, body.get("token"), oauth=bool(body.get("oauth")))
            return _ok({"ok": True}, 201)
        if len(parts) == 2 and parts[0] == "tokens" and m == "DELETE":
            return _ok({"revoked": st.revoke_token(urllib.parse.unquote(parts[1]))})
        if parts == ["teams"]:
            if m == "POST":
                team = st.create_team(body["name"], body.get("display_name"), body.get("id"))
                return _ok(team, 201)
            return _ok({"teams": list(st.teams.values())})
        if parts == ["channels"]:
            if m == "POST":
                allowed = {"name", "display_name", "team_id", "type", "id", "members"}
                unknown = set(body) - allowed
                if unknown:
                    return _bad("unknown field(s): %s" % ", ".join(sorted(unknown)))
                ch = emu.create_channel(**body)
                return _ok(dict(ch, members=sorted(st.members[ch["id"]])), 201)
            return _ok({"channels": emu.describe_state()["channels"]})
        if len(parts) >= 3 and parts[0] == "channels":
            ch = emu.channel(parts[1])
            if ch is None:
                return _bad("unknown channel %r" % parts[1], 404)
            with st.lock:
                # "as" (optional): the user making the change, as through the REST API; the
                # server then posts its system message. Without it: a plain database change.
                actor = _actor(emu, body, ctx) if (body.get("as") or ctx.query.get("as")) \
                    else None

                def changed(post, **extra):
                    out = dict(extra, ok=True, post=gojson.loads(gojson.dumps(post))
                               if post is not None else None)
                    return _ok(out)
                if parts[2] == "members" and m == "POST" and len(parts) == 3:
                    user = st.find_user(body.get("user") or "")
                    if user is None:
                        return _bad("unknown user %r" % body.get("user"))
                    post = st.add_channel_member(ch["id"], user, actor)
                    return changed(post, members=sorted(st.members[ch["id"]]))
                if parts[2] == "members" and m == "DELETE" and len(parts) == 4:
                    user = st.find_user(urllib.parse.unquote(parts[3]))
                    if user is None:
                        return _bad("unknown user %r" % parts[3])
                    post = st.remove_channel_member(ch["id"], user, actor)
                    return changed(post, members=sorted(st.members[ch["id"]]))
                if parts[2] == "header" and m in ("POST", "PUT") and len(parts) == 3:
                    if not isinstance(body.get("header"), str):
                        return _bad("'header' (a string) is required")
                    return changed(st.update_channel_header(ch["id"], body["header"], actor))
                if parts[2] == "archive" and m == "POST":
                    return changed(st.archive_channel(ch["id"], actor))
                if parts[2] == "unarchive" and m == "POST":
                    return changed(st.restore_channel(ch["id"], actor))
        if parts == ["hooks"] and m == "POST":
            hook = emu.create_hook(body.get("channel_id"), body.get("user"), body.get("id"),
                                   body.get("channel_locked", False))
            return _ok(dict(hook, url="%s/hooks/%s" % (emu.url, hook["id"])), 201)
        if parts == ["posts"] and m == "POST":
            actor = _actor(emu, body, ctx)
            fields = {k: v for k, v in body.items() if k != "as"}
            return _api(emu, ctx, lambda: st.create_post(actor, fields, allow_create_at=True))
        if len(parts) == 3 and parts[0] == "posts" and parts[2] == "patch" and m in ("PUT",
                                                                                     "POST"):
            actor = _actor(emu, body, ctx)
            fields = {k: v for k, v in body.items() if k != "as"}
            return _api(emu, ctx, lambda: st.patch_post(actor, parts[1], fields))
        if len(parts) == 2 and parts[0] == "posts" and m == "DELETE":
            actor = _actor(emu, body, ctx)
            return _api(emu, ctx, lambda: st.delete_post(actor, parts[1]))
        if parts == ["reactions"] and m in ("POST", "DELETE"):
            actor = _actor(emu, body, ctx)
            if m == "POST":
                fields = {"user_id": actor.id, "post_id": body.get("post_id"),
                          "emoji_name": body.get("emoji_name")}
                return _api(emu, ctx, lambda: st.save_reaction(actor, fields))
            return _api(emu, ctx, lambda: st.delete_reaction(actor, actor.id,
                                                             body.get("post_id") or "",
                                                             body.get("emoji_name") or ""))
        if parts == ["files"] and m == "POST":
            actor = _actor(emu, body, ctx)
            if "content_b64" in body:
                data = base64.b64decode(body["content_b64"])
            else:
                data = (body.get("content") or "").encode("utf-8")
            parts_ = [("channel_id", None, (body.get("channel_id") or "").encode()),
                      ("files", body.get("name") or "file.bin", data)]
            return _api(emu, ctx, lambda: st.upload_files(actor, parts_, ""))
        if parts[:1] == ["state"]:
            if len(parts) == 4 and parts[1] == "channels" and parts[3] == "posts":
                ch = emu.channel(parts[2])
                if ch is None:
                    return _bad("unknown channel %r" % parts[2], 404)
                return _ok({"posts": st.inspect_channel(ch["id"])})
            if len(parts) == 3 and parts[1] == "posts":
                with st.lock:
                    p = st.posts.get(parts[2])
                    if p is None:
                        return _bad("unknown post %r" % parts[2], 404)
                    out = st.raw_post(p)
                    out["versions"] = len(st.versions.get(parts[2], []))
                    return _ok(out)
            if parts[1:] == ["reactions"]:
                with st.lock:
                    rows = [dict(r) for r in st.reactions.values()
                            if not ctx.query.get("post_id")
                            or r["post_id"] == ctx.query["post_id"]]
                rows.sort(key=lambda r: (r["create_at"], r["post_id"], r["emoji_name"]))
                return _ok({"reactions": rows})
            if parts[1:] == ["files"]:
                with st.lock:
                    return _ok({"files": [dict(f["info"]) for f in st.files.values()]})
        if parts == ["faults"]:
            if m == "POST":
                return _ok({"id": emu.add_fault(**body)}, 201)
            if m == "DELETE":
                emu.clear_faults()
                return _ok({"ok": True})
            return _ok({"faults": emu.active_faults()})
        if parts == ["ws", "faults"]:
            if m == "POST":
                spec = dict(body)
                if spec.get("user"):
                    user = st.find_user(spec["user"])
                    if user is None:
                        return _bad("unknown user %r" % spec["user"])
                    spec["user"] = user.id
                return _ok({"id": emu.add_ws_fault(**spec)}, 201)
            if m == "DELETE":
                emu.clear_ws_faults()
                return _ok({"ok": True})
            return _ok({"faults": emu.hub.describe_faults()})
        if parts == ["requests"]:
            if m == "DELETE":
                emu.clear_requests()
                return _ok({"ok": True})
            rows = emu.requests()
            after = int(ctx.query.get("after", "0") or 0)
            return _ok({"requests": [r for r in rows if r["index"] > after]})
        if parts == ["ws"]:
            return _ok({"connections": emu.hub.describe()})
        if len(parts) == 2 and parts[0] == "ws" and m == "POST":
            user = st.find_user(body["user"]) if body.get("user") else None
            if body.get("user") and user is None:
                return _bad("unknown user %r" % body["user"])
            uid = user.id if user else None
            cid = body.get("connection_id")
            if parts[1] == "drop":
                n = emu.hub.drop(keep_buffer=body.get("keep_buffer", True), connection_id=cid,
                                 user_id=uid, close_code=body.get("close_code"))
                return _ok({"dropped": n})
            if parts[1] == "expire":
                return _ok({"expired": emu.hub.forget(connection_id=cid, user_id=uid)})
            if parts[1] == "skip_seq":
                n = emu.hub.skip_seq(int(body.get("count", 1)), connection_id=cid, user_id=uid)
                return _ok({"affected": n})
            if parts[1] == "publish":
                ev = mmstate.Event(body["event"], body.get("data") or {},
                                   channel_id=body.get("channel_id", ""),
                                   user_id=body.get("user_id", ""),
                                   team_id=body.get("team_id", ""),
                                   connection_id=body.get("target_connection_id", ""))
                emu.hub.publish(ev)
                return _ok({"ok": True})
        return _bad("unknown control endpoint %s %s" % (m, ctx.path), 404)
    except (KeyError, ValueError, TypeError) as e:
        return _bad("%s: %s" % (type(e).__name__, e))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _parse_set(item):
    key, eq, value = item.partition("=")
    if not eq:
        raise ValueError("--set expects KEY=VALUE, got %r" % item)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Mattermost server emulator for the relay's tests. Prints 'LISTENING <port>' "
                    "when ready.")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default)")
    ap.add_argument("--user", action="append", default=[], metavar="NAME:TOKEN[:OPTS]",
                    help="a user with a token; OPTS: system_admin=true,bot=true,oauth=true,id=ID")
    ap.add_argument("--channel", action="append", default=[], metavar="NAME[=ID]",
                    help="a channel in the default team (every user is a member)")
    ap.add_argument("--config", metavar="FILE",
                    help="JSON file: {\"config\": {...}, \"users\": [...], \"channels\": [...], "
                         "\"hooks\": [...]}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one config setting (VALUE is JSON, or a plain string)")
    ap.add_argument("--seed", type=int, help="seed for ids and the catch-up subset")
    ap.add_argument("--state-file", metavar="PATH",
                    help="write {url, port, team, users, channels, hooks} as JSON once listening")
    args = ap.parse_args(argv)
    try:
        spec = {}
        if args.config:
            with open(args.config) as f:
                spec = json.load(f)
            unknown = set(spec) - {"config", "users", "channels", "hooks"}
            if unknown:
                raise ValueError("unknown key(s) in %s: %s" % (args.config,
                                                               ", ".join(sorted(unknown))))
        config = dict(spec.get("config") or {})
        for item in args.set:
            k, v = _parse_set(item)
            config[k] = v
        emu = Emulator(port=args.port, host=args.host, config=config, seed=args.seed,
                       users=list(spec.get("users") or []) + args.user,
                       channels=list(spec.get("channels") or []) + args.channel)
        for hook in spec.get("hooks") or []:
            hook = dict(hook)
            name = hook.pop("channel", None)
            ch = emu.channel(hook.get("channel_id") or name or "")
            if ch is None:
                raise ValueError("hook refers to an unknown channel: %r" % hook)
            hook["channel_id"] = ch["id"]
            emu.create_hook(**hook)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print("emulator: %s" % e, file=sys.stderr)
        return 2
    try:
        emu.start()
    except OSError as e:
        print("emulator: cannot listen on %s:%d: %s" % (args.host, args.port, e),
              file=sys.stderr)
        return 1
    if args.state_file:
        tmp = args.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(emu.describe_state(), f, indent=2)
        os.replace(tmp, args.state_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("LISTENING %d" % emu.port, flush=True)
    while not stop.wait(0.5):
        pass
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
