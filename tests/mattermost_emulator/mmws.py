"""The server side of Mattermost's WebSocket API: RFC 6455 framing and the connection hub.

Modelled on server/channels/app/platform/{web_conn.go,web_hub.go,websocket_router.go}:

- A `WebConn` outlives its socket. While the socket is gone the connection is *inactive*: events
  keep being queued for it (up to ws_send_queue_size, else it is dropped like a slow client), and
  a reconnect with ?connection_id=<id>&sequence_number=<n> inside ws_resume_window_ms resumes it.
- Every event written to the socket gets the connection's next `seq` and goes into a dead queue of
  the last ws_dead_queue_size events. On resume: if event n is still in the dead queue, the events
  from n on are replayed (no hello); if nothing was missed it just continues; otherwise the server
  gives the connection a new id, resets seq to 0 and sends hello (the client must catch up).
- Only *inactive* connections of the *same user* can be resumed; resuming needs header/query
  authentication on the upgrade request (a challenge-authenticated socket always starts fresh).
- hello is sent when an authenticated connection registers (header auth: at once; challenge:
  before the {"status":"OK","seq_reply":n} reply). Unauthenticated sockets are closed after
  ws_auth_timeout_ms. The server pings every ws_ping_interval_ms.

Threads: the HTTP handler thread that upgraded a socket reads it (`serve_socket`); a writer thread
per socket sends. Lock order: State.lock -> Hub.lock -> WebConn.cond.
"""
import base64
import collections
import hashlib
import json
import select
import socket
import struct
import threading
import time

from gojson import Struct
import gojson
from mmstate import Event, is_valid_id, new_id

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key):
    digest = hashlib.sha1((key + GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


class Closed(Exception):
    pass


class WsSocket:
    """One upgraded TCP connection. Writes are serialised by a lock; reads belong to one thread."""

    def __init__(self, sock, prefix=b""):
        self.sock = sock
        self.rbuf = bytearray(prefix)
        self.wlock = threading.Lock()
        self.closed = False
        self.last_rx = time.monotonic()
        # One timeout for the whole life of the socket: it bounds writes (writeWaitTime); the
        # reader polls with select() so that it never has to change it.
        sock.settimeout(30)

    # -- writing (server frames are never masked) ------------------------------------------

    def send_frame(self, opcode, payload, fin=True):
        head = bytearray([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            head.append(n)
        elif n < 65536:
            head.append(126)
            head += struct.pack(">H", n)
        else:
            head.append(127)
            head += struct.pack(">Q", n)
        data = bytes(head) + payload
        with self.wlock:
            if self.closed:
                raise Closed("socket closed")
            self.sock.sendall(data)

    def send_text(self, text):
        self.send_frame(OP_TEXT, text.encode("utf-8"))

    def send_close(self, code, reason=""):
        try:
            self.send_frame(OP_CLOSE, struct.pack(">H", code) + reason.encode("utf-8")[:120])
        except (OSError, Closed):
            pass

    def abort(self):
        """End the TCP connection without a close frame (what gorilla's Close() does).

        Only shutdown(): it wakes a writer blocked in sendall (so no write lock is taken here)
        and the reader; the HTTP server closes the socket when the handler thread returns."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reading (client frames must be masked) ----------------------------------------------

    def _fill(self, n, idle_limit):
        while len(self.rbuf) < n:
            if self.closed:
                raise Closed("socket closed")
            try:
                readable, _, _ = select.select([self.sock], [], [], 0.2)
                if not readable:
                    if idle_limit and time.monotonic() - self.last_rx > idle_limit:
                        raise Closed("read deadline (pong wait) exceeded")
                    continue
                chunk = self.sock.recv(65536)
            except (OSError, ValueError) as e:
                raise Closed(str(e))
            if not chunk:
                raise Closed("peer closed")
            self.rbuf += chunk
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    def read_frame(self, idle_limit):
        b0, b1 = self._fill(2, idle_limit)
        fin, rsv, opcode = b0 & 0x80, b0 & 0x70, b0 & 0x0F
        masked, n = b1 & 0x80, b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._fill(2, idle_limit))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._fill(8, idle_limit))[0]
        if rsv:
            raise ProtocolError(1002, "unexpected reserved bits")
        if not masked:
            raise ProtocolError(1002, "bad MASK")
        if n > 16 * 1024 * 1024:
            raise ProtocolError(1009, "frame too large")
        mask = self._fill(4, idle_limit)
        payload = bytearray(self._fill(n, idle_limit))
        for i in range(n):
            payload[i] ^= mask[i & 3]
        self.last_rx = time.monotonic()
        return bool(fin), opcode, bytes(payload)

    def read_message(self, idle_limit, max_bytes):
        """The next text/binary message; answers pings, swallows pongs, reassembles fragments.
        Returns None when the peer sent a close frame (which is echoed)."""
        parts, kind = [], None
        while True:
            fin, opcode, payload = self.read_frame(idle_limit)
            if opcode >= 0x8:
                if not fin or len(payload) > 125:
                    raise ProtocolError(1002, "invalid control frame")
                if opcode == OP_PING:
                    self.send_frame(OP_PONG, payload)
                elif opcode == OP_PONG:
                    pass
                elif opcode == OP_CLOSE:
                    code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1000
                    self.send_close(code if code not in (1005, 1006) else 1000)
                    return None
                else:
                    raise ProtocolError(1002, "unknown control opcode %d" % opcode)
                continue
            if opcode in (OP_TEXT, OP_BINARY):
                if kind is not None:
                    raise ProtocolError(1002, "new message inside a fragmented message")
                kind = opcode
            elif opcode == OP_CONT:
                if kind is None:
                    raise ProtocolError(1002, "continuation without a message")
            else:
                raise ProtocolError(1002, "unknown data opcode %d" % opcode)
            parts.append(payload)
            if sum(len(p) for p in parts) > max_bytes:
                raise ProtocolError(1009, "message too big")
            if fin:
                return kind, b"".join(parts)


def mangle_types(value):
    """The same JSON document with every value's type changed: strings become numbers (their
    length), numbers and booleans strings, arrays objects, null an empty array. What a client
    sees when a broken proxy or a version skew serves a differently typed document."""
    if isinstance(value, dict):
        return {k: mangle_types(v) for k, v in value.items()}
    if isinstance(value, list):
        return {str(i): mangle_types(v) for i, v in enumerate(value)}
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return len(value)
    return []


WS_FAULT_KINDS = ("garbage", "delay", "close")
WS_GARBAGE_STYLES = ("truncated", "not_json", "wrong_types", "bad_payload", "payload_types")
WS_NOT_JSON = ("<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
               "<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n")


class WsFault:
    """A fault on the event stream of live WebSocket connections (control `ws/faults`).

    garbage: the event's frame is replaced on the wire by `style` — "truncated" (the frame cut
    in half), "not_json" (an HTML page), "wrong_types" (every value's type changed),
    "bad_payload" (data.post / data.reaction, a JSON string, cut in half) or "payload_types"
    (that embedded JSON with its types changed). The event keeps its seq and stays in the dead
    queue as it should have been sent, so a resume replays it intact: like a corrupting proxy.
    delay: the frame is held back `delay_ms` (a slow server; later frames queue behind it).
    close: instead of the frame the server sends a close frame (`close_code`, default 1011
    internal error) and drops the socket; the event stays resumable.
    `event` limits the fault to one event type, `user` to one user's connections; `count`
    (default 1) or `duration_ms` (then every matching frame until it expires) bound it."""

    _next = [1]

    def __init__(self, spec):
        kind = spec.get("kind")
        if kind not in WS_FAULT_KINDS:
            raise ValueError("kind must be one of %s" % ", ".join(WS_FAULT_KINDS))
        known = {"kind", "count", "duration_ms", "event", "user", "style", "delay_ms",
                 "close_code"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError("unknown ws fault field(s): %s" % ", ".join(sorted(unknown)))
        self.id = WsFault._next[0]
        WsFault._next[0] += 1
        self.kind = kind
        self.expires = None
        self.duration_ms = spec.get("duration_ms")
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
            self.count = None
        self.event = spec.get("event") or ""
        self.user = spec.get("user") or ""
        self.style = spec.get("style") or "truncated"
        if self.style not in WS_GARBAGE_STYLES:
            raise ValueError("style must be one of %s" % ", ".join(WS_GARBAGE_STYLES))
        self.delay_ms = int(spec.get("delay_ms", 0))
        self.close_code = int(spec.get("close_code", 1011))
        self.matched = 0

    def expired(self, now):
        return self.expires is not None and now >= self.expires

    def matches(self, conn, event_name):
        return ((not self.event or self.event == event_name)
                and (not self.user or (conn.user is not None and conn.user.id == self.user)))

    def garble(self, text):
        if self.style == "not_json":
            return WS_NOT_JSON
        if self.style == "truncated":
            return text[:len(text) // 2]
        try:
            frame = json.loads(text)
        except ValueError:
            return text[:len(text) // 2]
        if self.style == "wrong_types":
            return json.dumps(mangle_types(frame))
        data = frame.get("data") if isinstance(frame, dict) else None
        if isinstance(data, dict):
            for key in ("post", "reaction"):
                if isinstance(data.get(key), str):
                    embedded = data[key]
                    if self.style == "bad_payload":
                        data[key] = embedded[:len(embedded) // 2]
                    else:
                        try:
                            data[key] = json.dumps(mangle_types(json.loads(embedded)))
                        except ValueError:
                            data[key] = embedded[:len(embedded) // 2]
        return json.dumps(frame)

    def describe(self):
        remaining_ms = None
        if self.expires is not None:
            remaining_ms = max(0, int((self.expires - time.monotonic()) * 1000))
        return {"id": self.id, "kind": self.kind, "remaining": self.count, "event": self.event,
                "user": self.user, "style": self.style, "delay_ms": self.delay_ms,
                "close_code": self.close_code, "duration_ms": self.duration_ms,
                "remaining_ms": remaining_ms, "matched": self.matched}


class ProtocolError(Exception):
    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class WebConn:
    def __init__(self, cid, user=None, token=None):
        self.id = cid
        self.user = user
        self.token = token
        self.sequence = 0
        self.dead = collections.deque()
        self.queue = collections.deque()
        self.cond = threading.Condition()
        self.ws = None
        self.active = False
        self.reuse_count = 0
        self.created_at = time.monotonic()
        self.disconnected_at = None
        self.discard = False      # set by "drop without keeping the buffer"
        self.resume = False       # the next writer must run the reconnect logic
        self.writer = None


class Hub:
    def __init__(self, state, version_string):
        self.state = state
        self.version_string = version_string
        self.lock = threading.RLock()
        self.conns = {}          # connection id -> registered (authenticated) WebConn
        self.sockets = {}        # WsSocket -> WebConn, every open socket incl. unauthenticated
        self.fault_lock = threading.Lock()
        self.faults = []         # WsFault, first match wins

    # -- helpers ---------------------------------------------------------------------------

    def _cfg(self, key):
        return self.state.config[key]

    def _reap(self):
        window = self._cfg("ws_resume_window_ms") / 1000.0
        now = time.monotonic()
        for cid, c in list(self.conns.items()):
            if not c.active and c.disconnected_at is not None and now - c.disconnected_at > window:
                del self.conns[cid]

    def _hello(self, conn):
        return Event("hello", {"connection_id": conn.id, "server_version": self.version_string},
                     user_id=conn.user.id, precomputed=False)

    def _authenticated(self, conn):
        # WebConn.IsAuthenticated: a revoked token stops delivery.
        return conn.user is not None and self.state.tokens.get(conn.token) == conn.user.id

    def _should_send(self, conn, ev):
        """WebConn.ShouldSendEvent."""
        if not self._authenticated(conn):
            return False
        if ev.sanitized and conn.user.is_admin:
            return False
        if ev.sensitive and not conn.user.is_admin:
            return False
        if ev.connection_id:
            return conn.id == ev.connection_id
        if ev.omit_connection_id and conn.id == ev.omit_connection_id:
            return False
        if ev.user_id:
            return conn.user.id == ev.user_id
        if ev.omit_users and conn.user.id in ev.omit_users:
            return False
        if ev.channel_id:
            return self.state.is_member(conn.user.id, ev.channel_id)
        return True

    def _enqueue(self, conn, item):
        with conn.cond:
            if len(conn.queue) >= self._cfg("ws_send_queue_size"):
                # closeAndRemoveConn: the slow (or long-gone) client loses its resumable state.
                self.conns.pop(conn.id, None)
                conn.discard = True
                ws = conn.ws
                conn.cond.notify_all()
            else:
                conn.queue.append(item)
                conn.cond.notify_all()
                return
        if ws is not None:
            ws.abort()

    # -- publishing ------------------------------------------------------------------------

    def publish(self, ev):
        with self.lock:
            self._reap()
            for conn in list(self.conns.values()):
                if self._should_send(conn, ev):
                    self._enqueue(conn, ("event", ev))

    # -- connecting ------------------------------------------------------------------------

    def attach(self, ws, user, token, conn_param, seq_param):
        """Register an upgraded socket. Returns the WebConn, or None when the server closes the
        socket straight away (bad connection_id or sequence_number on a resume)."""
        with self.lock:
            self._reap()
            if user is None or not conn_param:
                conn = WebConn(new_id(self.state.rng), user, token)
            else:
                if not is_valid_id(conn_param):
                    return None
                old = self.conns.get(conn_param)
                if old is not None and old.user.id == user.id and not old.active:
                    del self.conns[conn_param]          # CheckConn removes it in any case
                    if seq_param is None or seq_param == "":
                        return None
                    try:
                        seq = int(seq_param)
                    except ValueError:
                        return None
                    if seq < 0:
                        return None
                    conn = old
                    conn.reuse_count += 1
                    conn.sequence = seq
                    conn.resume = True
                    conn.token = token
                    conn.user = user
                else:
                    conn = WebConn(new_id(self.state.rng), user, token)
            conn.ws = ws
            conn.active = True
            conn.disconnected_at = None
            conn.discard = False
            self.sockets[ws] = conn
            if user is not None:
                self.conns[conn.id] = conn
                if conn.reuse_count == 0:
                    with conn.cond:
                        conn.queue.append(("event", self._hello(conn)))
            self._start_writer(conn, ws)
            return conn

    def authenticate(self, conn, user, token, seq):
        """authentication_challenge succeeded: register, hello, then the OK reply."""
        with self.lock:
            conn.user = user
            conn.token = token
            self.conns[conn.id] = conn
            with conn.cond:
                conn.queue.append(("event", self._hello(conn)))
                conn.queue.append(("response", Struct(status="OK", seq_reply=seq)))
                conn.cond.notify_all()

    def respond(self, conn, obj):
        """hub.SendMessage: only registered connections get replies."""
        with self.lock:
            if self.conns.get(conn.id) is not conn:
                return
            with conn.cond:
                conn.queue.append(("response", obj))
                conn.cond.notify_all()

    def detach(self, conn, ws):
        with self.lock:
            self.sockets.pop(ws, None)
            with conn.cond:
                if conn.ws is ws:
                    conn.ws = None
                    conn.active = False
                    conn.disconnected_at = time.monotonic()
                conn.cond.notify_all()
            if conn.user is None or conn.discard:
                if self.conns.get(conn.id) is conn:
                    del self.conns[conn.id]
        ws.abort()
        writer = conn.writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(2)

    # -- the writer (WebConn.writePump) ----------------------------------------------------

    def _start_writer(self, conn, ws):
        old = conn.writer
        if old is not None and old.is_alive():
            old.join(2)
        t = threading.Thread(target=self._write_pump, args=(conn, ws), daemon=True,
                             name="ws-writer-" + conn.id[:6])
        conn.writer = t
        t.start()

    def _sequence(self, conn, item):
        kind, payload = item
        if kind == "event":
            seq = conn.sequence
            text = payload.encode(seq)
            conn.sequence = seq + 1
            conn.dead.append((seq, text))
            while len(conn.dead) > self._cfg("ws_dead_queue_size"):
                conn.dead.popleft()
            return text
        return gojson.dumps_encoder(payload)

    def _resume_texts(self, conn):
        """The reconnect branch at the top of writePump; called with conn.cond held."""
        conn.resume = False
        if conn.sequence == 0:
            return []
        seqs = [s for s, _ in conn.dead]
        if conn.sequence in seqs:
            i = seqs.index(conn.sequence)
            texts = [t for _, t in list(conn.dead)[i:]]
            conn.sequence += len(texts)
            return texts
        lossless = not conn.dead or conn.dead[-1][0] == conn.sequence - 1
        if lossless:
            return []
        # Message loss: new connection id, seq back to 0, hello.
        with self.lock:
            self.conns.pop(conn.id, None)
            conn.id = new_id(self.state.rng)
            self.conns[conn.id] = conn
        conn.dead.clear()
        conn.sequence = 0
        return [self._sequence(conn, ("event", self._hello(conn)))]

    def _write_pump(self, conn, ws):
        ping_every = self._cfg("ws_ping_interval_ms") / 1000.0
        auth_deadline = time.monotonic() + self._cfg("ws_auth_timeout_ms") / 1000.0
        next_ping = time.monotonic() + ping_every
        try:
            with self.lock:   # lock order: Hub.lock before WebConn.cond
                with conn.cond:
                    texts = self._resume_texts(conn) if conn.resume else []
            for text in texts:
                ws.send_text(text)
            while True:
                text = None
                with conn.cond:
                    while not conn.queue and conn.ws is ws and not ws.closed:
                        now = time.monotonic()
                        wake = next_ping
                        if conn.user is None:
                            wake = min(wake, auth_deadline)
                        if wake <= now:
                            break
                        conn.cond.wait(min(wake - now, 0.5))
                    if conn.ws is not ws or ws.closed:
                        return
                    if conn.queue:
                        item = conn.queue.popleft()
                        text = self._sequence(conn, item)
                if text is not None:
                    fault = self._take_fault(conn, item) if self.faults else None
                    if fault is not None:
                        text = self._apply_fault(fault, ws, text)
                        if text is None:
                            return
                    ws.send_text(text)
                now = time.monotonic()
                if conn.user is None and now >= auth_deadline:
                    ws.abort()   # authTicker: did not authenticate
                    return
                if now >= next_ping:
                    ws.send_frame(OP_PING, b"")
                    next_ping = now + ping_every
        except (OSError, Closed):
            ws.abort()

    # -- the reader (WebConn.readPump + WebSocketRouter) -----------------------------------

    def serve_socket(self, conn, ws):
        """Runs on the HTTP handler thread until the socket ends."""
        try:
            while True:
                idle = self._cfg("ws_pong_wait_ms") / 1000.0
                try:
                    msg = ws.read_message(idle, self._cfg("ws_max_message_bytes"))
                except ProtocolError as e:
                    ws.send_close(e.code, e.reason)
                    return
                if msg is None:
                    return
                kind, payload = msg
                if kind != OP_TEXT:
                    return  # msgpack is not emulated; a decode error closes the socket
                try:
                    req = json.loads(payload.decode("utf-8", errors="replace"))
                except ValueError:
                    return  # readPump: a decode error ends the connection
                if not isinstance(req, dict):
                    return
                if not self._route(conn, ws, req):
                    return
        except Closed:
            return
        finally:
            self.detach(conn, ws)

    def _error(self, conn, seq, status, err_id):
        err = Struct(id=err_id, message=err_id, detailed_error="", status_code=status)
        self.respond(conn, Struct(status="FAIL", seq_reply=seq, error=err))

    def _route(self, conn, ws, req):
        action = req.get("action")
        seq = req.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            seq = 0
        if not action:
            self._error(conn, seq, 400, "api.web_socket_router.no_action.app_error")
            return True
        if seq <= 0:
            self._error(conn, seq, 400, "api.web_socket_router.bad_seq.app_error")
            return True
        if action == "authentication_challenge":
            if conn.token:
                return True
            data = req.get("data")
            token = data.get("token") if isinstance(data, dict) else None
            if not isinstance(token, str):
                return False
            user = self.state.user_for_token(token)
            if user is None:
                return False
            self.authenticate(conn, user, token, seq)
            return True
        if not self._authenticated(conn):
            self._error(conn, seq, 401, "api.web_socket_router.not_authenticated.app_error")
            return True
        if action == "ping":
            self.respond(conn, Struct(status="OK", seq_reply=seq, data={
                "text": "pong", "version": self._cfg("server_version"),
                "server_time": self.state.now(), "node_id": ""}))
        elif action == "user_typing":
            data = req.get("data") if isinstance(req.get("data"), dict) else {}
            cid = data.get("channel_id") or ""
            if cid and self.state.is_member(conn.user.id, cid):
                self.publish(Event("typing", {"parent_id": data.get("parent_id") or "",
                                              "user_id": conn.user.id}, channel_id=cid,
                                   omit_users={conn.user.id: True}))
            self.respond(conn, Struct(status="OK", seq_reply=seq))
        else:
            self._error(conn, seq, 500, "api.web_socket_router.bad_action.app_error")
        return True

    # -- faults on the event stream (control ws/faults) -----------------------------------

    def add_fault(self, spec):
        fault = WsFault(spec)
        with self.fault_lock:
            self.faults.append(fault)
        return fault.id

    def clear_faults(self):
        with self.fault_lock:
            self.faults = []

    def describe_faults(self):
        with self.fault_lock:
            now = time.monotonic()
            self.faults = [f for f in self.faults if not f.expired(now)]
            return [f.describe() for f in self.faults]

    def _take_fault(self, conn, item):
        kind, payload = item
        if kind != "event":
            return None
        with self.fault_lock:
            now = time.monotonic()
            self.faults = [f for f in self.faults if not f.expired(now)]
            for f in self.faults:
                if f.matches(conn, payload.event):
                    f.matched += 1
                    if f.count is not None:
                        f.count -= 1
                        if f.count <= 0:
                            self.faults.remove(f)
                    return f
        return None

    def _apply_fault(self, fault, ws, text):
        """The text to send instead of `text`, or None when the socket was closed."""
        if fault.kind == "delay":
            time.sleep(fault.delay_ms / 1000.0)
            return text
        if fault.kind == "close":
            try:
                ws.send_close(fault.close_code)
            except (OSError, Closed):
                pass
            ws.abort()
            return None
        return fault.garble(text)

    # -- control ---------------------------------------------------------------------------

    def describe(self):
        with self.lock:
            out = []
            seen = set()
            for c in list(self.conns.values()) + list(self.sockets.values()):
                if id(c) in seen:
                    continue
                seen.add(id(c))
                with c.cond:
                    out.append({"connection_id": c.id,
                                "user_id": c.user.id if c.user else "",
                                "username": c.user.username if c.user else "",
                                "authenticated": c.user is not None,
                                "active": c.active, "sequence": c.sequence,
                                "dead_queue": len(c.dead), "queued": len(c.queue),
                                "reuse_count": c.reuse_count,
                                "resumable": self.conns.get(c.id) is c and not c.active})
            return out

    def _select(self, connection_id=None, user_id=None):
        with self.lock:
            conns = set(self.sockets.values()) | set(self.conns.values())
            out = []
            for c in conns:
                if connection_id and c.id != connection_id:
                    continue
                if user_id and (c.user is None or c.user.id != user_id):
                    continue
                out.append(c)
            return out

    def drop(self, keep_buffer=True, connection_id=None, user_id=None, close_code=None,
             wait=2.0):
        """Disconnect sockets. keep_buffer=True: the connections stay resumable (a network
        drop); False: they are forgotten (a server restart)."""
        targets = [c for c in self._select(connection_id, user_id) if c.active]
        with self.lock:
            for c in targets:
                if not keep_buffer:
                    c.discard = True
                    if self.conns.get(c.id) is c:
                        del self.conns[c.id]
        for c in targets:
            ws = c.ws
            if ws is None:
                continue
            if close_code:
                ws.send_close(int(close_code))
            ws.abort()
        end = time.monotonic() + wait
        while time.monotonic() < end and any(c.active for c in targets):
            time.sleep(0.01)
        if not keep_buffer:
            with self.lock:
                for c in targets:
                    if self.conns.get(c.id) is c:
                        del self.conns[c.id]
        return len(targets)

    def forget(self, connection_id=None, user_id=None):
        """Expire resumable (inactive) connections now, as if the window had passed."""
        with self.lock:
            n = 0
            for cid, c in list(self.conns.items()):
                if c.active:
                    continue
                if connection_id and cid != connection_id:
                    continue
                if user_id and c.user.id != user_id:
                    continue
                del self.conns[cid]
                n += 1
            return n

    def skip_seq(self, count=1, connection_id=None, user_id=None):
        targets = [c for c in self._select(connection_id, user_id) if c.user is not None]
        for c in targets:
            with c.cond:
                c.sequence += count
        return len(targets)

    def close_all(self):
        with self.lock:
            sockets = list(self.sockets)
        for ws in sockets:
            ws.abort()
