"""Fidelity tests of the Mattermost emulator: one test (or more) per point of
/work/shared/docs/mattermost-api.md, plus the control API the relay's tests rely on.

    python3 -m unittest discover -s tests/mattermost_emulator -v

Standard library only. Every test starts its own in-process emulator on an ephemeral port
(one test also runs it as a subprocess, the way the relay's integration tests will).
"""
import base64
import hashlib
import http.client
import json
import os
import socket
import struct
import subprocess
import threading
import sys
import time
import unittest
import urllib.parse
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import gojson  # noqa: E402
from emulator import Emulator  # noqa: E402

BOT, ALICE, ADMIN, OAUTH = "BOTTOKEN", "ALICETOKEN", "ADMINTOKEN", "OAUTHTOKEN"
POST_FIELDS = ["id", "create_at", "update_at", "edit_at", "delete_at", "is_pinned", "user_id",
               "channel_id", "root_id", "original_id", "message", "type", "props", "hashtags",
               "file_ids", "pending_post_id", "reply_count", "last_reply_at", "participants"]
FILEINFO_FIELDS = ["id", "user_id", "post_id", "channel_id", "create_at", "update_at",
                   "delete_at", "name", "extension", "size", "mime_type", "width", "height",
                   "has_preview_image", "mini_preview", "remote_id", "archived"]


def png_bytes(width, height):
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def multipart(fields, files, boundary="XyZb0uNdArY"):
    """fields: [(name, value)], files: [(form name, file name, bytes)], in that order."""
    out = bytearray()
    for name, value in fields:
        out += b"--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n" % (
            boundary.encode(), name.encode(), value.encode())
    for name, filename, data in files:
        out += (b"--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n" % (
                    boundary.encode(), name.encode(), filename.encode())) + data + b"\r\n"
    out += b"--%s--\r\n" % boundary.encode()
    return bytes(out), "multipart/form-data; boundary=" + boundary


class Reply:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class Api:
    """A keep-alive HTTP client for one emulator."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def request(self, method, path, body=None, token=BOT, headers=None, raw=None,
                content_type=None):
        hdrs = dict(headers or {})
        if token:
            hdrs.setdefault("Authorization", "Bearer " + token)
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if content_type:
            hdrs["Content-Type"] = content_type
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request(method, path, body=data, headers=hdrs)
                resp = self.conn.getresponse()
                out = Reply(resp.status, resp.getheaders(), resp.read())
                if resp.will_close:
                    self.close()
                return out
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class WSClient:
    """A minimal RFC 6455 client: masked frames out, unmasked frames in."""

    def __init__(self, port, token=None, query="", cookie=None, timeout=5):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            self._handshake(port, token, query, cookie)
        except BaseException:
            self.sock.close()
            raise
        self.buf = b""
        self.raw_texts = []

    def _handshake(self, port, token, query, cookie):
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET /api/v4/websocket%s HTTP/1.1" % (("?" + query) if query else ""),
                 "Host: 127.0.0.1:%d" % port, "Upgrade: websocket", "Connection: Upgrade",
                 "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13"]
        if token:
            lines.append("Authorization: Bearer " + token)
        if cookie:
            lines.append("Cookie: MMAUTHTOKEN=" + cookie)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during handshake: %r" % head)
            head += chunk
        self.status_line = head.split(b"\r\n")[0].decode()
        self.handshake_headers = {}
        for line in head.decode().split("\r\n")[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                self.handshake_headers[k.strip().lower()] = v.strip()
        expected = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        if " 101 " not in self.status_line:
            raise ConnectionError("upgrade refused: " + self.status_line)
        if self.handshake_headers.get("sec-websocket-accept") != expected:
            raise ConnectionError("bad Sec-WebSocket-Accept")

    def send_frame(self, opcode, payload, fin=True, mask=True):
        head = bytearray([(0x80 if fin else 0) | opcode])
        n = len(payload)
        bit = 0x80 if mask else 0
        if n < 126:
            head.append(bit | n)
        elif n < 65536:
            head.append(bit | 126)
            head += struct.pack(">H", n)
        else:
            head.append(bit | 127)
            head += struct.pack(">Q", n)
        if mask:
            key = os.urandom(4)
            head += key
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(head) + payload)

    def send_json(self, obj, fragments=1):
        data = json.dumps(obj).encode()
        if fragments <= 1:
            self.send_frame(0x1, data)
            return
        size = max(1, len(data) // fragments)
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        for i, piece in enumerate(pieces):
            self.send_frame(0x1 if i == 0 else 0x0, piece, fin=(i == len(pieces) - 1))

    def _recv_exact(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self, timeout=3.0):
        deadline = time.monotonic() + timeout
        b0, b1 = self._recv_exact(2, deadline)
        if b1 & 0x80:
            raise AssertionError("server frames must not be masked")
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._recv_exact(2, deadline))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._recv_exact(8, deadline))[0]
        return b0 & 0x80, b0 & 0x0F, self._recv_exact(n, deadline)

    def recv_json(self, timeout=3.0):
        """The next text message as JSON; pings are answered and skipped."""
        deadline = time.monotonic() + timeout
        while True:
            fin, op, payload = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if op == 0x9:
                self.send_frame(0xA, payload)
                continue
            if op == 0x8:
                raise EOFError("close frame %r" % payload)
            if op == 0x1:
                text = payload.decode()
                self.raw_texts.append(text)
                return json.loads(text)

    def events(self, count, timeout=3.0):
        return [self.recv_json(timeout) for _ in range(count)]

    def wait_event(self, name, timeout=3.0):
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv_json(max(0.01, deadline - time.monotonic()))
            if msg.get("event") == name:
                return msg

    def quiet(self, seconds=0.3):
        """Every text message that arrives within `seconds`."""
        out = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                out.append(self.recv_json(max(0.01, end - time.monotonic())))
            except socket.timeout:
                break
        return out

    def closed_within(self, seconds):
        """True when the server closes the TCP connection (or sends close) in time."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                fin, op, payload = self.recv_frame(max(0.01, end - time.monotonic()))
                if op == 0x8:
                    return True
            except socket.timeout:
                return False
            except (EOFError, ConnectionResetError, OSError):
                return True
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def wait_for(cond, timeout=3.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for " + what)


class EmuTestCase(unittest.TestCase):
    config = {}

    def setUp(self):
        self.emu = Emulator(config=dict(self.config), seed=7, users=[
            "relay-bot:%s:bot=true" % BOT, "alice:%s" % ALICE,
            "root:%s:system_admin=true" % ADMIN, "oauthapp:%s:oauth=true" % OAUTH,
        ], channels=["war-room", "other"]).start()
        self.api = Api(self.emu.port)
        self.ch = self.emu.channel("war-room")["id"]
        self.other = self.emu.channel("other")["id"]
        self.bot = self.emu.user("relay-bot")
        self.alice = self.emu.user("alice")
        self.admin = self.emu.user("root")
        self.sockets = []

    def tearDown(self):
        for ws in self.sockets:
            ws.close()
        self.api.close()
        self.emu.stop()

    # helpers --------------------------------------------------------------------------------

    def ws(self, token=BOT, **kw):
        client = WSClient(self.emu.port, token=token, **kw)
        self.sockets.append(client)
        return client

    def control(self, method, path, body=None):
        return self.api.request(method, "/__control/" + path, body, token=None)

    def create(self, message="hi", token=BOT, channel=None, **fields):
        body = dict(channel_id=channel or self.ch, message=message, **fields)
        r = self.api.post("/api/v4/posts", body, token=token)
        self.assertEqual(r.status, 201, r.body)
        return r.json()

    def get_post(self, pid, token=BOT):
        return self.api.get("/api/v4/posts/" + pid, token=token)

    def since(self, t, extra="", token=BOT):
        r = self.api.get("/api/v4/channels/%s/posts?since=%d%s" % (self.ch, t, extra),
                         token=token)
        self.assertEqual(r.status, 200, r.body)
        return r.json()

    def rows(self, channel=None):
        return self.control("GET", "state/channels/%s/posts" % (channel or self.ch)).json()[
            "posts"]

    def assertAppError(self, reply, status, err_id):
        self.assertEqual(reply.status, status, reply.body)
        body = reply.json()
        self.assertEqual(list(body), ["id", "message", "detailed_error", "request_id",
                                      "status_code"])
        self.assertEqual(body["id"], err_id)
        self.assertEqual(body["status_code"], status)
        self.assertTrue(body["message"])
        self.assertEqual(body["request_id"], reply.header("X-Request-Id"))
        return body


# ---------------------------------------------------------------------------------------------
# Authentication and error bodies
# ---------------------------------------------------------------------------------------------

class AuthTest(EmuTestCase):
    def test_bearer_token_and_cookie_are_accepted(self):
        for headers in ({"Authorization": "Bearer " + ALICE},
                        {"Authorization": "bearer " + ALICE},
                        {"Authorization": "Token " + ALICE},
                        {"Cookie": "MMAUTHTOKEN=" + ALICE}):
            r = self.api.get("/api/v4/users/me", token=None, headers=headers)
            self.assertEqual(r.status, 200, headers)
            self.assertEqual(r.json()["username"], "alice")

    def test_missing_or_unknown_token_is_401_json(self):
        body = self.assertAppError(self.api.get("/api/v4/users/me", token=None), 401,
                                   "api.context.session_expired.app_error")
        self.assertEqual(body["detailed_error"], "")   # wiped unless EnableDeveloper
        self.assertAppError(self.api.get("/api/v4/users/me", token="nope"), 401,
                            "api.context.session_expired.app_error")

    def test_query_string_token_only_for_oauth_sessions(self):
        # web.Handler: a non-OAuth session token in ?access_token= is refused.
        r = self.api.get("/api/v4/users/me?access_token=" + BOT, token=None)
        self.assertAppError(r, 401, "api.context.token_provided.app_error")
        r = self.api.get("/api/v4/users/me?access_token=" + OAUTH, token=None)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["username"], "oauthapp")
        self.control("POST", "config", {"query_token_oauth_only": False})
        r = self.api.get("/api/v4/users/me?access_token=" + BOT, token=None)
        self.assertEqual(r.status, 200)

    def test_cookie_auth_needs_xhr_header_for_writes(self):
        body = {"channel_id": self.ch, "message": "via cookie"}
        r = self.api.post("/api/v4/posts", body, token=None,
                          headers={"Cookie": "MMAUTHTOKEN=" + ALICE})
        self.assertAppError(r, 401, "api.context.session_expired.app_error")
        r = self.api.post("/api/v4/posts", body, token=None,
                          headers={"Cookie": "MMAUTHTOKEN=" + ALICE,
                                   "X-Requested-With": "XMLHttpRequest"})
        self.assertEqual(r.status, 201)

    def test_error_bodies_and_headers(self):
        r = self.api.get("/api/v4/no/such/route")
        self.assertAppError(r, 404, "api.context.404.app_error")
        r = self.api.get("/api/v4/posts/short")
        self.assertAppError(r, 400, "api.context.invalid_url_param.app_error")
        r = self.api.post("/api/v4/posts", raw=b"{not json", content_type="application/json")
        body = self.assertAppError(r, 400, "api.context.invalid_body_param.app_error")
        self.assertIn("post", body["message"])
        self.assertEqual(r.header("Content-Type"), "application/json")
        self.assertTrue(r.header("X-Version-Id").startswith("10.11.0."))
        self.control("POST", "config", {"enable_developer": True})
        body = self.api.get("/api/v4/users/me", token=None).json()
        self.assertEqual(body["detailed_error"], "UserRequired")

    def test_revoked_token(self):
        self.assertEqual(self.api.get("/api/v4/users/me", token=ALICE).status, 200)
        self.assertTrue(self.control("DELETE", "tokens/" + ALICE).json()["revoked"])
        self.assertEqual(self.api.get("/api/v4/users/me", token=ALICE).status, 401)


# ---------------------------------------------------------------------------------------------
# Create
# ---------------------------------------------------------------------------------------------

class CreatePostTest(EmuTestCase):
    def test_post_object_has_every_always_present_field(self):
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "hello",
                                            "props": {"k": "v", "nested": {"a": [1, "x"]}},
                                            "pending_post_id": "p1"})
        self.assertEqual(r.status, 201)
        self.assertTrue(r.body.endswith(b"}\n"))  # json.Encoder adds a newline
        post = r.json()
        self.assertEqual(list(post)[:len(POST_FIELDS) - 3], POST_FIELDS[:-3])
        for field in POST_FIELDS:
            self.assertIn(field, post)
        self.assertEqual(len(post["id"]), 26)
        self.assertTrue(post["id"].isalnum() and post["id"].islower())
        self.assertEqual(post["create_at"], post["update_at"])
        self.assertEqual(post["props"], {"from_bot": "true", "k": "v",
                                         "nested": {"a": [1, "x"]}})
        self.assertEqual(post["pending_post_id"], "p1")
        self.assertEqual(post["file_ids"], [])
        self.assertEqual(post["metadata"], {})
        self.assertIsNone(post["participants"])
        self.assertEqual(post["user_id"], self.bot.id)

    def test_server_clears_delete_at_and_remote_id(self):
        post = self.create(delete_at=12345, remote_id="someremote", user_id=self.alice.id)
        self.assertEqual(post["delete_at"], 0)
        self.assertEqual(post["remote_id"], "")
        self.assertEqual(post["user_id"], self.bot.id)   # the session user, not the body's
        self.assertEqual(self.get_post(post["id"]).status, 200)

    def test_create_at_ignored_without_manage_system(self):
        post = self.create(create_at=1000, token=ALICE)
        self.assertGreater(post["create_at"], 10 ** 12)
        post = self.create(create_at=1000, token=BOT)
        self.assertGreater(post["create_at"], 10 ** 12)
        post = self.create(create_at=1000, token=ADMIN)
        self.assertEqual(post["create_at"], 1000)
        self.assertEqual(post["update_at"], 1000)

    def test_reply_must_target_a_root_in_the_same_channel(self):
        root = self.create("root")
        reply = self.create("reply", root_id=root["id"])
        self.assertEqual(reply["root_id"], root["id"])
        self.assertEqual(reply["reply_count"], 1)
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "nested",
                                            "root_id": reply["id"]})
        self.assertAppError(r, 400, "api.post.create_post.root_id.app_error")
        r = self.api.post("/api/v4/posts", {"channel_id": self.other, "message": "x",
                                            "root_id": root["id"]})
        self.assertAppError(r, 400, "api.post.create_post.channel_root_id.app_error")
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "x",
                                            "root_id": "a" * 26})
        self.assertAppError(r, 400, "api.post.create_post.root_id.app_error")

    def test_reply_bumps_root_update_at(self):
        root = self.create("root")
        reply = self.create("reply", root_id=root["id"])
        now_root = self.get_post(root["id"]).json()
        self.assertEqual(now_root["update_at"], reply["create_at"])
        self.assertEqual(now_root["reply_count"], 1)

    def test_pending_post_id_deduplicates_for_30s(self):
        first = self.create("once", pending_post_id="bot:1")
        again = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "once",
                                                "pending_post_id": "bot:1"})
        self.assertEqual(again.status, 201)
        self.assertEqual(again.json()["id"], first["id"])
        self.assertEqual(again.json()["pending_post_id"], "")   # read back from the store
        self.assertNotIn("metadata", again.json())
        self.assertEqual(len(self.rows()), 1)
        self.control("POST", "clock", {"advance_ms": 31000})
        third = self.create("once", pending_post_id="bot:1")
        self.assertNotEqual(third["id"], first["id"])

    def test_pending_post_id_repeat_while_the_first_is_being_saved(self):
        # deduplicateCreatePost claims the id before the post is saved: a repeat that arrives
        # meanwhile is answered 500 api.post.deduplicate_create_post.pending (the client is
        # to retry), and once the save is done a repeat gets the first post.
        self.control("POST", "config", {"create_post_save_ms": 800})
        body = {"channel_id": self.ch, "message": "once", "pending_post_id": "bot:2"}
        first = {}

        def slow_create():
            api = Api(self.emu.port)
            try:
                first["reply"] = api.post("/api/v4/posts", body)
            finally:
                api.close()

        worker = threading.Thread(target=slow_create)
        worker.start()
        deadline = time.monotonic() + 5
        while "bot:2" not in self.emu.state.pending_ids and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        repeat = self.api.post("/api/v4/posts", body)
        self.assertAppError(repeat, 500, "api.post.deduplicate_create_post.pending")
        self.assertLess(time.monotonic() - started, 0.5, "the repeat waited for the save")
        self.assertTrue(worker.is_alive(), "the first create was not in flight any more")
        self.assertEqual(self.rows(), [])            # nothing saved yet
        worker.join(10)
        self.assertEqual(first["reply"].status, 201, first["reply"].body)
        again = self.api.post("/api/v4/posts", body)
        self.assertEqual(again.status, 201)
        self.assertEqual(again.json()["id"], first["reply"].json()["id"])
        self.assertEqual(len(self.rows()), 1)
        # A create that fails gives the id up at once: a retry is not told "pending".
        self.control("POST", "config", {"create_post_save_ms": 0})
        bad = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "x",
                                              "root_id": "a" * 26, "pending_post_id": "bot:3"})
        self.assertAppError(bad, 400, "api.post.create_post.root_id.app_error")
        self.assertEqual(self.create("x", pending_post_id="bot:3")["message"], "x")

    def test_props_numbers_go_through_float64(self):
        post = self.create(props={"seq": 12345678901234567890, "big": 1e21, "small": 1.5e-7,
                                  "int": 3, "s": "<&>"})
        r = self.get_post(post["id"])
        text = r.body.decode()
        self.assertIn('"seq":12345678901234567000', text)
        self.assertIn('"big":1e+21', text)
        self.assertIn('"small":1.5e-7', text)
        self.assertIn('"int":3', text)
        self.assertIn('"s":"\\u003c\\u0026\\u003e"', text)

    def test_custom_props_survive_every_read(self):
        marker = {"relay_origin": "europe", "relay_event": "europe:42"}
        ws = self.ws(ALICE)
        ws.wait_event("hello")
        post = self.create("tagged", props=marker)
        for key, value in marker.items():
            self.assertEqual(post["props"][key], value)
            self.assertEqual(self.get_post(post["id"]).json()["props"][key], value)
            self.assertEqual(self.since(1)["posts"][post["id"]]["props"][key], value)
        posted = json.loads(ws.wait_event("posted")["data"]["post"])
        self.assertEqual(posted["props"]["relay_event"], "europe:42")
        self.api.request("DELETE", "/api/v4/posts/" + post["id"])
        gone = self.since(1)["posts"][post["id"]]
        self.assertEqual(gone["props"]["relay_event"], "europe:42")   # deleted rows keep props
        self.assertEqual(gone["props"]["deleteBy"], self.bot.id)

    def test_validation_errors(self):
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "x" * 16384})
        self.assertAppError(r, 400, "model.post.is_valid.message_length.app_error")
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "x",
                                            "create_at": "soon"})
        self.assertAppError(r, 400, "api.context.invalid_body_param.app_error")
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "x",
                                            "type": "system_join_channel"})
        self.assertAppError(r, 400, "api.context.invalid_param.app_error")
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "x",
                                            "id": "a" * 26})
        self.assertAppError(r, 400, "app.post.save.existing.app_error")
        r = self.api.post("/api/v4/posts", {"channel_id": "b" * 26, "message": "x"})
        self.assertAppError(r, 403, "api.context.permissions.app_error")
        r = self.api.post("/api/v4/posts", {"channel_id": "b" * 26, "message": "x"},
                          token=ADMIN)
        self.assertAppError(r, 400, "api.context.invalid_param.app_error")
        r = self.api.post("/api/v4/posts", raw=b"x" * 400000, content_type="application/json")
        self.assertAppError(r, 413, "api.context.request_body_too_large.app_error")


# ---------------------------------------------------------------------------------------------
# Edit
# ---------------------------------------------------------------------------------------------

class EditTest(EmuTestCase):
    def patch(self, pid, body, token=BOT):
        return self.api.request("PUT", "/api/v4/posts/%s/patch" % pid, body, token=token)

    def test_props_replace_the_whole_map(self):
        post = self.create(props={"a": "1", "b": "2"})
        r = self.patch(post["id"], {"props": {"c": "3"}})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["props"], {"c": "3"})   # from_bot is gone too (10.x)
        self.assertEqual(self.get_post(post["id"]).json()["props"], {"c": "3"})
        r = self.patch(post["id"], {"message": "no props in the patch"})
        self.assertEqual(r.json()["props"], {"c": "3"})    # absent props: map kept
        self.control("POST", "config", {"preserve_identity_props_on_patch": True})
        post = self.create(props={"a": "1"})
        self.assertEqual(self.patch(post["id"], {"props": {"c": "3"}}).json()["props"],
                         {"c": "3", "from_bot": "true"})

    def test_edit_archives_previous_version_as_new_row(self):
        post = self.create("v1", props={"origin": "relay"})
        time.sleep(0.01)
        r = self.patch(post["id"], {"message": "v2", "props": {"origin": "relay"}})
        self.assertEqual(r.status, 200)
        edited = r.json()
        self.assertEqual(edited["id"], post["id"])
        self.assertGreater(edited["update_at"], post["update_at"])
        self.assertEqual(edited["edit_at"], edited["update_at"])
        self.assertEqual(edited["create_at"], post["create_at"])
        rows = self.rows()
        self.assertEqual(len(rows), 2)
        archived = [p for p in rows if p["original_id"] == post["id"]]
        self.assertEqual(len(archived), 1)
        archived = archived[0]
        self.assertNotEqual(archived["id"], post["id"])
        self.assertEqual(archived["message"], "v1")
        self.assertEqual(archived["delete_at"], edited["update_at"])
        self.assertEqual(archived["channel_id"], self.ch)
        self.assertEqual(archived["create_at"], post["create_at"])
        self.assertEqual(self.get_post(archived["id"]).status, 404)   # deleted row

    def test_edit_at_only_for_message_or_files(self):
        post = self.create("same")
        r = self.patch(post["id"], {"props": {"x": "y"}, "is_pinned": True})
        self.assertEqual(r.json()["edit_at"], 0)
        self.assertTrue(r.json()["is_pinned"])
        self.assertGreater(r.json()["update_at"], post["update_at"] - 1)
        self.assertEqual(len(self.rows()), 2)   # an archived copy even without a text change

    def test_post_edit_time_limit(self):
        post = self.create("old")
        self.control("POST", "config", {"post_edit_time_limit": 60})
        self.control("POST", "clock", {"advance_ms": 61000})
        r = self.patch(post["id"], {"message": "too late"})
        body = self.assertAppError(r, 400, "api.post.update_post.permissions_time_limit.app_error")
        self.assertIn("60", body["message"])
        self.assertEqual(self.patch(post["id"], {"is_pinned": True}).status, 200)

    def test_patch_permissions(self):
        post = self.create("mine")
        self.assertAppError(self.patch(post["id"], {"message": "x"}, token=ALICE), 403,
                            "api.context.permissions.app_error")
        self.assertEqual(self.patch(post["id"], {"message": "admin"}, token=ADMIN).status, 200)
        self.assertAppError(self.patch("c" * 26, {"message": "x"}), 403,
                            "api.context.permissions.app_error")

    def test_edit_event_carries_post_as_json_string(self):
        post = self.create("v1")
        ws = self.ws(ALICE)
        ws.wait_event("hello")
        self.patch(post["id"], {"message": "v2"})
        ev = ws.wait_event("post_edited")
        self.assertIsInstance(ev["data"]["post"], str)
        inner = json.loads(ev["data"]["post"])
        self.assertEqual((inner["id"], inner["message"]), (post["id"], "v2"))
        self.assertEqual(ev["broadcast"]["channel_id"], self.ch)


# ---------------------------------------------------------------------------------------------
# Delete
# ---------------------------------------------------------------------------------------------

class DeleteTest(EmuTestCase):
    def test_soft_delete(self):
        post = self.create("bye")
        r = self.api.request("DELETE", "/api/v4/posts/" + post["id"])
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b'{"status":"OK"}')
        row = self.rows()[0]
        self.assertGreater(row["delete_at"], 0)
        self.assertEqual(row["update_at"], row["delete_at"])
        self.assertEqual(row["props"]["deleteBy"], self.bot.id)
        self.assertEqual(row["message"], "bye")   # kept in the store
        self.assertAppError(self.get_post(post["id"]), 404, "app.post.get.app_error")
        self.assertAppError(self.api.request("DELETE", "/api/v4/posts/" + post["id"]), 404,
                            "app.post.get.app_error")

    def test_root_delete_cascades_with_one_event(self):
        root = self.create("root")
        r1 = self.create("r1", root_id=root["id"])
        r2 = self.create("r2", root_id=root["id"], token=ALICE)
        user_ws = self.ws(ALICE)
        admin_ws = self.ws(ADMIN)
        user_ws.wait_event("hello")
        admin_ws.wait_event("hello")
        self.assertEqual(self.api.request("DELETE", "/api/v4/posts/" + root["id"]).status, 200)
        rows = {p["id"]: p for p in self.rows()}
        stamps = {rows[i]["delete_at"] for i in (root["id"], r1["id"], r2["id"])}
        self.assertEqual(len(stamps), 1)
        self.assertGreater(stamps.pop(), 0)
        self.assertEqual(rows[r2["id"]]["props"]["deleteBy"], self.bot.id)
        events = [m for m in user_ws.quiet(0.4) if m.get("event") == "post_deleted"]
        self.assertEqual(len(events), 1)
        ev = events[0]
        post = json.loads(ev["data"]["post"])
        self.assertEqual(post["id"], root["id"])
        self.assertEqual(post["delete_at"], 0)   # the post as it was before deletion
        self.assertNotIn("delete_by", ev["data"])
        self.assertTrue(ev["broadcast"]["contains_sanitized_data"])
        admin_events = [m for m in admin_ws.quiet(0.2) if m.get("event") == "post_deleted"]
        self.assertEqual(len(admin_events), 1)
        self.assertEqual(admin_events[0]["data"]["delete_by"], self.bot.id)

    def test_delete_others_post_needs_admin(self):
        post = self.create("bot's")
        self.assertAppError(self.api.request("DELETE", "/api/v4/posts/" + post["id"],
                                             token=ALICE), 403,
                            "api.context.permissions.app_error")
        self.assertEqual(self.api.request("DELETE", "/api/v4/posts/" + post["id"],
                                          token=ADMIN).status, 200)


# ---------------------------------------------------------------------------------------------
# Reactions
# ---------------------------------------------------------------------------------------------

class ReactionTest(EmuTestCase):
    def react(self, pid, emoji, user=None, token=BOT):
        return self.api.post("/api/v4/reactions", {"user_id": (user or self.bot).id,
                                                   "post_id": pid, "emoji_name": emoji},
                             token=token)

    def test_add_is_200_with_reaction_and_bumps_update_at(self):
        post = self.create("react to me")
        time.sleep(0.005)
        r = self.react(post["id"], "+1")
        self.assertEqual(r.status, 200)
        reaction = r.json()
        self.assertEqual(list(reaction), ["user_id", "post_id", "emoji_name", "create_at",
                                          "update_at", "delete_at", "remote_id", "channel_id"])
        self.assertEqual((reaction["user_id"], reaction["post_id"], reaction["emoji_name"]),
                         (self.bot.id, post["id"], "+1"))
        after = self.get_post(post["id"]).json()
        self.assertGreater(after["update_at"], post["update_at"])
        self.assertTrue(after["has_reactions"])
        self.assertEqual([x["emoji_name"] for x in after["metadata"]["reactions"]], ["+1"])
        listed = self.api.get("/api/v4/posts/%s/reactions" % post["id"]).json()
        self.assertEqual(len(listed), 1)
        # The bump brings the post back in a catch-up that started after it was created.
        body = self.api.get("/api/v4/channels/%s/posts?since=%d"
                            % (self.ch, post["update_at"])).json()
        self.assertEqual(body["order"], [post["id"]])

    def test_user_must_be_the_caller(self):
        post = self.create("x")
        r = self.react(post["id"], "smile", user=self.alice)
        self.assertAppError(r, 403, "api.reaction.save_reaction.user_id.app_error")

    def test_emoji_name_regex(self):
        post = self.create("x")
        for bad in ("thumbs up", "smile!", "é"):
            self.assertAppError(self.react(post["id"], bad), 400,
                                "model.reaction.is_valid.emoji_name.app_error")
        self.assertAppError(self.react(post["id"], "x" * 65), 400,
                            "api.reaction.save_reaction.invalid.app_error")
        for good in ("white_check_mark", "+1", "-1", "a_b-c+d"):
            self.assertEqual(self.react(post["id"], good).status, 200)

    def test_key_is_user_post_emoji(self):
        post = self.create("x")
        self.assertEqual(self.react(post["id"], "tada").status, 200)
        self.assertEqual(self.react(post["id"], "tada").status, 200)   # idempotent
        self.assertEqual(self.react(post["id"], "tada", user=self.alice, token=ALICE).status,
                         200)
        listed = self.api.get("/api/v4/posts/%s/reactions" % post["id"]).json()
        self.assertEqual(sorted(r["user_id"] for r in listed),
                         sorted([self.bot.id, self.alice.id]))
        state = self.control("GET", "state/reactions?post_id=" + post["id"]).json()
        self.assertEqual(len(state["reactions"]), 2)

    def test_remove(self):
        post = self.create("x")
        self.react(post["id"], "tada")
        before = self.get_post(post["id"]).json()["update_at"]
        time.sleep(0.005)
        r = self.api.request("DELETE", "/api/v4/users/%s/posts/%s/reactions/tada"
                             % (self.bot.id, post["id"]))
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json(), {"status": "OK"})
        after = self.get_post(post["id"]).json()
        self.assertGreater(after["update_at"], before)
        self.assertNotIn("has_reactions", after)
        self.assertEqual(self.api.get("/api/v4/posts/%s/reactions" % post["id"]).json(), [])
        r = self.api.request("DELETE", "/api/v4/users/%s/posts/%s/reactions/+1"
                             % (self.bot.id, post["id"]))
        self.assertEqual(r.status, 200)   # removing what is not there is still OK
        r = self.api.request("DELETE", "/api/v4/users/%s/posts/%s/reactions/tada"
                             % (self.bot.id, post["id"]), token=ALICE)
        self.assertAppError(r, 403, "api.context.permissions.app_error")

    def test_reaction_events_carry_json_strings(self):
        post = self.create("x")
        ws = self.ws(ALICE)
        ws.wait_event("hello")
        self.react(post["id"], "rocket")
        ev = ws.wait_event("reaction_added")
        self.assertIsInstance(ev["data"]["reaction"], str)
        self.assertEqual(json.loads(ev["data"]["reaction"])["emoji_name"], "rocket")
        self.api.request("DELETE", "/api/v4/users/%s/posts/%s/reactions/rocket"
                         % (self.bot.id, post["id"]))
        ev = ws.wait_event("reaction_removed")
        self.assertEqual(json.loads(ev["data"]["reaction"])["post_id"], post["id"])

    def test_reaction_on_deleted_post_and_emoji_limit(self):
        post = self.create("x")
        self.control("POST", "config", {"unique_emoji_reaction_limit_per_post": 2})
        self.assertEqual(self.react(post["id"], "a").status, 200)
        self.assertEqual(self.react(post["id"], "b").status, 200)
        self.assertAppError(self.react(post["id"], "c"), 400,
                            "app.reaction.save.save.too_many_reactions")
        self.api.request("DELETE", "/api/v4/posts/" + post["id"])
        self.assertAppError(self.react(post["id"], "a"), 404, "app.post.get.app_error")


# ---------------------------------------------------------------------------------------------
# Catch-up
# ---------------------------------------------------------------------------------------------

class CatchUpTest(EmuTestCase):
    def test_postlist_shape_and_exclusive_since(self):
        ids = [self.create("t%d" % t, token=ADMIN, create_at=t)["id"] for t in (1000, 2000,
                                                                                 3000)]
        body = self.since(2000)
        self.assertEqual(list(body), ["order", "posts", "next_post_id", "prev_post_id",
                                      "first_inaccessible_post_time"])
        self.assertEqual(body["order"], [ids[2]])
        self.assertEqual(body["next_post_id"], "")
        self.assertEqual(body["prev_post_id"], "")
        self.assertEqual(body["first_inaccessible_post_time"], 0)
        self.assertEqual(self.since(1999)["order"], [ids[2], ids[1]])   # newest first
        self.assertEqual(self.since(3000)["order"], [])
        self.assertEqual(self.since(3000)["posts"], {})

    def test_since_cannot_be_combined(self):
        for extra in ("&page=0", "&per_page=10", "&before=" + "a" * 26, "&after=" + "a" * 26):
            r = self.api.get("/api/v4/channels/%s/posts?since=5%s" % (self.ch, extra))
            self.assertAppError(r, 400, "api.context.invalid_body_param.app_error")
        self.control("POST", "config", {"since_combined_params": "ignore"})
        r = self.api.get("/api/v4/channels/%s/posts?since=5&per_page=1" % self.ch)
        self.assertEqual(r.status, 200)   # what the real server does: ignored

    def test_at_most_1000_rows_an_arbitrary_subset(self):
        st = self.emu.state
        created = [st.create_post(self.admin, {"channel_id": self.ch, "message": "m%d" % i,
                                                "create_at": 10000 + i})[1]["id"]
                   for i in range(1500)]
        self.control("POST", "config", {"since_seed": 42})
        first = self.since(1)
        self.assertEqual(len(first["order"]), 1000)
        self.assertEqual(len(first["posts"]), 1000)
        chosen = set(first["order"])
        self.assertNotEqual(chosen, set(created[:1000]))     # not the oldest 1000
        self.assertNotEqual(chosen, set(created[500:]))      # not the newest 1000
        times = [first["posts"][i]["create_at"] for i in first["order"]]
        self.assertEqual(times, sorted(times, reverse=True))
        self.control("POST", "config", {"since_seed": 42})
        self.assertEqual(self.since(1)["order"], first["order"])   # seedable
        self.assertEqual(len(self.since(10000 + 1499 - 10)["order"]), 10)

    def test_deleted_rows_and_archived_copies_are_included(self):
        t0 = self.create("before", token=ADMIN, create_at=5)["create_at"]
        a = self.create("a v1")
        self.api.request("PUT", "/api/v4/posts/%s/patch" % a["id"], {"message": "a v2"})
        b = self.create("b")
        self.api.request("DELETE", "/api/v4/posts/" + b["id"])
        body = self.since(t0)
        posts = body["posts"]
        self.assertEqual(len(body["order"]), 3)
        self.assertEqual(posts[a["id"]]["message"], "a v2")
        copies = [p for p in posts.values() if p["original_id"] == a["id"]]
        self.assertEqual(len(copies), 1)
        self.assertGreater(copies[0]["delete_at"], 0)
        self.assertEqual(copies[0]["message"], "")        # PreparePostForClient blanks it
        self.assertEqual(copies[0]["metadata"], {})
        self.assertGreater(posts[b["id"]]["delete_at"], 0)
        self.assertEqual(posts[b["id"]]["props"]["deleteBy"], self.bot.id)
        self.assertEqual(posts[b["id"]]["message"], "")

    def test_roots_of_returned_replies_are_in_posts_not_order(self):
        root = self.create("root")
        reply = self.create("reply", root_id=root["id"])
        mark = self.get_post(root["id"]).json()["update_at"]
        time.sleep(0.005)
        # A reaction on the reply bumps only the reply.
        self.api.post("/api/v4/reactions", {"user_id": self.bot.id, "post_id": reply["id"],
                                            "emoji_name": "eyes"})
        body = self.since(mark)
        self.assertEqual(body["order"], [reply["id"]])
        self.assertIn(root["id"], body["posts"])
        # A new reply bumps the root, which then is in `order`.
        mark2 = self.get_post(reply["id"]).json()["update_at"]
        time.sleep(0.005)
        self.create("reply 2", root_id=root["id"])
        self.assertIn(root["id"], self.since(mark2)["order"])

    def test_thread_fields(self):
        root = self.create("root")
        self.create("r1", root_id=root["id"], token=ALICE)
        time.sleep(0.002)   # participants are ordered by the time of their first reply
        self.create("r2", root_id=root["id"])
        plain = self.since(1)["posts"][root["id"]]
        self.assertEqual(plain["reply_count"], 0)     # non-CRT since: ReplyCount not computed
        counted = self.since(1, "&skipFetchThreads=true")["posts"][root["id"]]
        self.assertEqual(counted["reply_count"], 2)
        crt = self.since(1, "&collapsedThreads=true")
        self.assertEqual(crt["order"], [root["id"]])   # roots only
        thread = crt["posts"][root["id"]]
        self.assertEqual(thread["reply_count"], 2)
        self.assertGreater(thread["last_reply_at"], 0)
        self.assertEqual([p["id"] for p in thread["participants"]],
                         [self.alice.id, self.bot.id])
        self.assertEqual(self.get_post(root["id"]).json()["reply_count"], 2)

    def test_paging_without_since(self):
        # Distinct create_at values: posts of the same millisecond have no defined order.
        ids = [self.create("p%d" % i, token=ADMIN, create_at=1000 + i)["id"] for i in range(5)]
        body = self.api.get("/api/v4/channels/%s/posts?page=0&per_page=2" % self.ch).json()
        self.assertEqual(body["order"], [ids[4], ids[3]])
        self.assertEqual(body["prev_post_id"], ids[2])
        self.assertEqual(body["next_post_id"], "")
        body = self.api.get("/api/v4/channels/%s/posts?page=1&per_page=2" % self.ch).json()
        self.assertEqual(body["order"], [ids[2], ids[1]])
        self.assertEqual(body["next_post_id"], ids[3])
        body = self.api.get("/api/v4/channels/%s/posts?before=%s&per_page=2"
                            % (self.ch, ids[2])).json()
        self.assertEqual(body["order"], [ids[1], ids[0]])
        self.assertAppError(self.api.get("/api/v4/channels/%s/posts" % ("z" * 26)), 404,
                            "app.channel.get.existing.app_error")

    def test_replica_lag(self):
        before = self.create("old")
        time.sleep(0.35)   # older than the lag below
        self.control("POST", "config", {"replica_lag_ms": 300})
        post = self.create("fresh")
        self.assertEqual(self.get_post(post["id"]).status, 404)
        self.assertNotIn(post["id"], self.since(before["create_at"] - 1)["order"])
        self.api.request("PUT", "/api/v4/posts/%s/patch" % before["id"], {"message": "new"})
        self.assertEqual(self.get_post(before["id"]).json()["message"], "old")
        time.sleep(0.35)
        self.assertEqual(self.get_post(post["id"]).status, 200)
        self.assertEqual(self.get_post(before["id"]).json()["message"], "new")
        self.assertIn(post["id"], self.since(before["create_at"] - 1)["order"])


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

class FileTest(EmuTestCase):
    def upload(self, files, token=BOT, fields=None, client_ids=()):
        fields = fields if fields is not None else [("channel_id", self.ch)]
        fields = list(fields) + [("client_ids", c) for c in client_ids]
        raw, ctype = multipart(fields, files)
        return self.api.request("POST", "/api/v4/files", raw=raw, content_type=ctype,
                                token=token)

    def test_upload_info_download(self):
        png = png_bytes(3, 2)
        r = self.upload([("files", "pic.png", png), ("files", "notes.txt", b"hello\n")])
        self.assertEqual(r.status, 201, r.body)
        body = r.json()
        self.assertEqual(list(body), ["file_infos", "client_ids"])
        self.assertEqual(body["client_ids"], [])
        pic, txt = body["file_infos"]
        self.assertEqual(list(pic), FILEINFO_FIELDS)     # every listed field on an image
        self.assertEqual((pic["width"], pic["height"], pic["mime_type"], pic["extension"],
                          pic["size"], pic["post_id"], pic["user_id"]),
                         (3, 2, "image/png", "png", len(png), "", self.bot.id))
        self.assertTrue(pic["has_preview_image"])
        # width/height/has_preview_image are omitempty in model.FileInfo.
        self.assertNotIn("width", txt)
        self.assertEqual(txt["mime_type"], "text/plain; charset=utf-8")
        got = self.api.get("/api/v4/files/" + pic["id"])
        self.assertEqual(got.status, 200)
        self.assertEqual(got.body, png)
        self.assertEqual(got.header("Content-Type"), "image/png")
        self.assertTrue(got.header("Content-Disposition").startswith("inline;filename=\"pic.png\""))
        got = self.api.get("/api/v4/files/" + txt["id"])
        self.assertEqual(got.body, b"hello\n")
        self.assertTrue(got.header("Content-Disposition").startswith("attachment;"))
        info = self.api.get("/api/v4/files/%s/info" % pic["id"]).json()
        self.assertEqual(info["id"], pic["id"])
        # Not attached to a post yet: only the uploader may read it.
        self.assertAppError(self.api.get("/api/v4/files/" + pic["id"], token=ALICE), 403,
                            "api.context.permissions.app_error")
        post = self.create("with files", file_ids=[pic["id"], txt["id"]])
        self.assertEqual(post["file_ids"], [pic["id"], txt["id"]])
        self.assertEqual([f["id"] for f in post["metadata"]["files"]], [pic["id"], txt["id"]])
        self.assertEqual(post["metadata"]["files"][0]["post_id"], post["id"])
        self.assertEqual(self.api.get("/api/v4/files/" + pic["id"], token=ALICE).status, 200)

    def test_file_ids_that_cannot_attach_are_dropped(self):
        mine = self.upload([("files", "a.txt", b"a")]).json()["file_infos"][0]["id"]
        theirs = self.upload([("files", "b.txt", b"b")], token=ALICE).json()["file_infos"][0]
        post = self.create("x", file_ids=[mine, theirs["id"], "q" * 26])
        self.assertEqual(post["file_ids"], [mine])
        again = self.create("y", file_ids=[mine])     # already attached
        self.assertEqual(again["file_ids"], [])

    def test_at_most_5_files_per_post(self):
        ids = [self.upload([("files", "f%d.txt" % i, b"x")]).json()["file_infos"][0]["id"]
               for i in range(6)]
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "six",
                                            "file_ids": ids})
        self.assertAppError(r, 400, "model.post.is_valid.file_ids.app_error")
        self.assertEqual(len(self.create("five", file_ids=ids[:5])["file_ids"]), 5)

    def test_attachments_disabled_is_403(self):
        self.control("POST", "config", {"enable_file_attachments": False})
        self.assertAppError(self.upload([("files", "a.txt", b"a")]), 403,
                            "api.file.attachments.disabled.app_error")

    def test_multipart_details(self):
        r = self.upload([("files", "a.txt", b"a"), ("files", "b.txt", b"b")],
                        client_ids=["c1", "c2"])
        self.assertEqual(r.json()["client_ids"], ["c1", "c2"])
        self.assertAppError(self.upload([("files", "a.txt", b"a")], client_ids=["c1", "c2"]),
                            400, "api.file.upload_file.incorrect_number_of_client_ids.app_error")
        self.assertAppError(self.upload([("files", "a.txt", b"a")], fields=[]), 400,
                            "api.context.invalid_body_param.app_error")
        # channel_id after the files: Mattermost's buffered (legacy) path still accepts it.
        raw = (b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"z.txt\"\r\n"
               b"\r\nzz\r\n--B\r\nContent-Disposition: form-data; name=\"channel_id\"\r\n\r\n"
               + self.ch.encode() + b"\r\n--B--\r\n")
        r = self.api.request("POST", "/api/v4/files", raw=raw,
                             content_type="multipart/form-data; boundary=B")
        self.assertEqual(r.status, 201)
        r = self.api.request("POST", "/api/v4/files?channel_id=%s&filename=raw.bin" % self.ch,
                             raw=b"\x00\x01", content_type="application/octet-stream")
        self.assertEqual(r.status, 201)
        self.assertEqual(r.json()["file_infos"][0]["name"], "raw.bin")

    def test_files_of_a_deleted_post_are_gone(self):
        fid = self.upload([("files", "a.txt", b"a")]).json()["file_infos"][0]["id"]
        post = self.create("x", file_ids=[fid])
        self.api.request("DELETE", "/api/v4/posts/" + post["id"])
        self.assertAppError(self.api.get("/api/v4/files/" + fid), 404,
                            "app.file_info.get.app_error")


# ---------------------------------------------------------------------------------------------
# Rate limiting and faults
# ---------------------------------------------------------------------------------------------

class RateLimitAndFaultTest(EmuTestCase):
    def test_rate_limit_is_plain_text_429(self):
        self.assertIsNone(self.api.get("/api/v4/users/me").header("X-Ratelimit-Limit"))
        self.control("POST", "config", {"rate_limit": {"enabled": True, "per_sec": 1,
                                                       "max_burst": 2}})
        ok = [self.api.get("/api/v4/users/me") for _ in range(3)]
        self.assertEqual([r.status for r in ok], [200, 200, 200])
        self.assertEqual(ok[0].header("X-Ratelimit-Limit"), "3")
        self.assertEqual([r.header("X-Ratelimit-Remaining") for r in ok], ["2", "1", "0"])
        self.assertIsNotNone(ok[0].header("X-Ratelimit-Reset"))
        r = self.api.get("/api/v4/users/me")
        self.assertEqual(r.status, 429)
        self.assertEqual(r.body, b"limit exceeded\n")
        self.assertTrue(r.header("Content-Type").startswith("text/plain"))
        self.assertGreaterEqual(int(r.header("Retry-After")), 1)
        time.sleep(1.05)
        self.assertEqual(self.api.get("/api/v4/users/me").status, 200)

    def test_429_storm(self):
        self.control("POST", "faults", {"kind": "rate_limit", "count": 3, "retry_after": 7})
        replies = [self.api.get("/api/v4/users/me") for _ in range(4)]
        self.assertEqual([r.status for r in replies], [429, 429, 429, 200])
        self.assertEqual(replies[0].header("Retry-After"), "7")
        self.assertEqual(replies[0].body, b"limit exceeded\n")

    def test_5xx_with_and_without_processing(self):
        self.control("POST", "faults", {"kind": "status", "status": 503,
                                        "path_prefix": "/api/v4/posts"})
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "lost"})
        self.assertEqual(r.status, 503)
        self.assertTrue(r.header("Content-Type").startswith("text/html"))
        self.assertEqual(self.rows(), [])
        self.control("POST", "faults", {"kind": "status", "status": 500, "process": True,
                                        "method": "POST", "path_prefix": "/api/v4/posts"})
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "done anyway",
                                            "pending_post_id": "retry-1"})
        self.assertAppError(r, 500, "emulator.fault.injected")
        self.assertEqual(len(self.rows()), 1)   # it happened; only the answer was lost
        retry = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "done anyway",
                                                "pending_post_id": "retry-1"})
        self.assertEqual(retry.status, 201)
        self.assertEqual(retry.json()["id"], self.rows()[0]["id"])
        self.assertEqual(len(self.rows()), 1)

    def test_delay_garbage_and_drop(self):
        self.control("POST", "faults", {"kind": "delay", "delay_ms": 300})
        t = time.monotonic()
        self.assertEqual(self.api.get("/api/v4/users/me").status, 200)
        self.assertGreaterEqual(time.monotonic() - t, 0.3)
        self.control("POST", "faults", {"kind": "garbage"})
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "garbled"})
        self.assertEqual(r.status, 200)
        with self.assertRaises(ValueError):
            json.loads(r.body)
        self.assertEqual(len(self.rows()), 1)
        self.control("POST", "faults", {"kind": "drop"})
        conn = http.client.HTTPConnection("127.0.0.1", self.emu.port, timeout=5)
        conn.request("GET", "/api/v4/users/me", headers={"Authorization": "Bearer " + BOT})
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionResetError)):
            conn.getresponse()
        conn.close()
        self.assertEqual(self.control("GET", "faults").json()["faults"], [])

    def test_fault_for_a_while_with_cycling_statuses(self):
        r = self.control("POST", "faults", {"kind": "status", "status": [500, 502, 503],
                                            "duration_ms": 400, "path_prefix": "/api/v4/users"})
        self.assertEqual(r.status, 201)
        got = [self.api.get("/api/v4/users/me") for _ in range(4)]
        self.assertEqual([x.status for x in got], [500, 502, 503, 500])
        self.assertAppError(got[0], 500, "emulator.fault.injected")
        self.assertTrue(got[1].header("Content-Type").startswith("text/html"))
        self.assertIn(b"502 Bad Gateway", got[1].body)
        self.assertEqual(self.api.get("/api/v4/system/ping").status, 200)   # other paths
        faults = self.control("GET", "faults").json()["faults"]
        self.assertEqual(len(faults), 1)
        self.assertIsNone(faults[0]["remaining"])
        self.assertEqual(faults[0]["matched"], 4)
        time.sleep(0.45)
        self.assertEqual(self.api.get("/api/v4/users/me").status, 200)   # it wore off
        self.assertEqual(self.control("GET", "faults").json()["faults"], [])
        bad = self.control("POST", "faults", {"kind": "status", "bogus": 1})
        self.assertEqual(bad.status, 400)
        self.assertIn("bogus", bad.json()["error"])

    def test_fault_every_nth_request_and_path_regex(self):
        p = self.create("target")
        self.control("POST", "faults", {"kind": "status", "status": 502, "every": 2, "count": 2,
                                        "method": "PUT",
                                        "path_regex": r"^/api/v4/posts/[^/]+/patch$"})
        # PUT /posts/{id} (full update) does not match the regex: untouched.
        self.assertEqual(self.api.request("PUT", "/api/v4/posts/" + p["id"],
                                          {"id": p["id"], "message": "full"}).status, 200)
        statuses = [self.api.request("PUT", "/api/v4/posts/%s/patch" % p["id"],
                                     {"message": "m%d" % i}).status for i in range(5)]
        self.assertEqual(statuses, [502, 200, 502, 200, 200])
        self.assertEqual(self.control("GET", "faults").json()["faults"], [])

    def test_garbage_styles(self):
        # cut / wrong_types garble the real answer (the post is created); html, empty and null
        # replace it.
        self.control("POST", "faults", {"kind": "garbage", "style": "cut", "status": 201,
                                        "method": "POST", "path_prefix": "/api/v4/posts"})
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "cut"})
        self.assertEqual(r.status, 201)
        with self.assertRaises(ValueError):
            json.loads(r.body)
        self.assertTrue(r.body.startswith(b'{"id":"'))
        self.control("POST", "faults", {"kind": "garbage", "style": "wrong_types", "status": 201,
                                        "process": False, "method": "POST",
                                        "path_prefix": "/api/v4/posts"})
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "typed"})
        body = r.json()
        self.assertEqual(body["message"], len("typed"))
        self.assertIsInstance(body["create_at"], str)
        self.assertIsInstance(body["file_ids"], dict)
        self.assertEqual([row["message"] for row in self.rows()], ["cut", "typed"])
        self.control("POST", "faults", {"kind": "garbage", "style": "html", "count": 3,
                                        "path_prefix": "/api/v4/channels/"})
        r = self.api.get("/api/v4/channels/%s/posts?since=1" % self.ch)
        self.assertEqual(r.status, 200)
        self.assertTrue(r.header("Content-Type").startswith("text/html"))
        self.assertIn(b"<title>Sign in</title>", r.body)
        self.control("DELETE", "faults")
        for style, expected in (("empty", b""), ("null", b"null")):
            self.control("POST", "faults", {"kind": "garbage", "style": style})
            r = self.api.get("/api/v4/users/me")
            self.assertEqual((r.status, r.body), (200, expected))
        # A file download cut short: a body of the wrong size with a matching Content-Length.
        up = self.api.post("/api/v4/files?channel_id=%s&filename=a.txt" % self.ch,
                           raw=b"0123456789", content_type="text/plain").json()
        fid = up["file_infos"][0]["id"]
        self.control("POST", "faults", {"kind": "garbage", "style": "wrong_types",
                                        "path_regex": "^/api/v4/files/[^/]+$"})
        r = self.api.get("/api/v4/files/" + fid)
        self.assertEqual((r.status, r.body), (200, b"01234"))
        self.assertEqual(self.api.get("/api/v4/files/" + fid).body, b"0123456789")

    def test_delay_before_or_after_processing(self):
        self.control("POST", "faults", {"kind": "delay", "delay_ms": 400, "method": "POST",
                                        "path_prefix": "/api/v4/posts"})
        slow = http.client.HTTPConnection("127.0.0.1", self.emu.port, timeout=0.1)
        slow.request("POST", "/api/v4/posts", body=json.dumps(
            {"channel_id": self.ch, "message": "late"}),
            headers={"Authorization": "Bearer " + BOT, "Content-Type": "application/json"})
        with self.assertRaises(socket.timeout):
            slow.getresponse()          # the client gives up...
        slow.close()
        self.assertEqual(self.rows(), [])
        wait_for(lambda: len(self.rows()) == 1, 2, "the late post")   # ...it happens anyway
        self.control("POST", "faults", {"kind": "delay", "delay_ms": 400, "method": "POST",
                                        "delay_phase": "after", "path_prefix": "/api/v4/posts"})
        t = time.monotonic()
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "answered late"})
        self.assertEqual(r.status, 201)
        self.assertGreaterEqual(time.monotonic() - t, 0.4)
        bad = self.control("POST", "faults", {"kind": "delay", "delay_phase": "never"})
        self.assertEqual(bad.status, 400)

    def test_request_log(self):
        self.control("DELETE", "requests")
        self.api.get("/api/v4/users/me")
        self.api.get("/api/v4/users/me", token="bad")
        log = self.control("GET", "requests").json()["requests"]
        self.assertEqual([(r["method"], r["path"], r["status"]) for r in log],
                         [("GET", "/api/v4/users/me", 200), ("GET", "/api/v4/users/me", 401)])
        self.assertEqual(log[0]["user"], "relay-bot")


# ---------------------------------------------------------------------------------------------
# WebSocket
# ---------------------------------------------------------------------------------------------

class WebSocketTest(EmuTestCase):
    config = {"ws_ping_interval_ms": 60000}

    def test_hello_first_with_connection_id_and_seq_0(self):
        ws = self.ws(BOT)
        hello = ws.recv_json()
        self.assertEqual(hello["event"], "hello")
        self.assertEqual(hello["seq"], 0)
        self.assertEqual(len(hello["data"]["connection_id"]), 26)
        self.assertTrue(hello["data"]["server_version"].startswith("10.11.0."))
        self.assertEqual(hello["broadcast"], {"omit_users": None, "user_id": self.bot.id,
                                              "channel_id": "", "team_id": "",
                                              "connection_id": "", "omit_connection_id": ""})
        self.assertTrue(ws.raw_texts[0].endswith("}\n"))   # encoded directly, not precomputed

    def test_posted_event_and_seq_increments(self):
        ws = self.ws(ALICE)
        ws.recv_json()
        first = self.create("one", props={"relay_origin": "eu:1"})
        second = self.create("two")
        e1, e2 = ws.events(2)
        self.assertEqual((e1["event"], e1["seq"]), ("posted", 1))
        self.assertEqual((e2["event"], e2["seq"]), ("posted", 2))
        self.assertIsInstance(e1["data"]["post"], str)
        inner = json.loads(e1["data"]["post"])
        self.assertEqual(inner["id"], first["id"])
        self.assertEqual(inner["props"]["relay_origin"], "eu:1")
        self.assertEqual(json.loads(e2["data"]["post"])["id"], second["id"])
        self.assertEqual(e1["data"]["channel_name"], "war-room")
        self.assertEqual(e1["data"]["sender_name"], "@relay-bot")
        self.assertEqual(e1["broadcast"]["channel_id"], self.ch)
        self.assertTrue(ws.raw_texts[1].startswith('{"event": "posted", "data": {'))

    def test_authentication_challenge(self):
        ws = self.ws(token=None)
        ws.send_json({"seq": 1, "action": "authentication_challenge",
                      "data": {"token": ALICE}}, fragments=3)   # fragmented client message
        hello = ws.recv_json()
        self.assertEqual((hello["event"], hello["seq"]), ("hello", 0))
        self.assertEqual(ws.recv_json(), {"status": "OK", "seq_reply": 1})
        self.create("after auth")
        self.assertEqual(ws.wait_event("posted")["seq"], 1)
        ws.send_json({"seq": 2, "action": "ping"})
        pong = ws.recv_json()
        self.assertEqual((pong["status"], pong["seq_reply"], pong["data"]["text"]),
                         ("OK", 2, "pong"))

    def test_bad_challenge_token_closes(self):
        ws = self.ws(token=None)
        ws.send_json({"seq": 1, "action": "authentication_challenge", "data": {"token": "no"}})
        self.assertTrue(ws.closed_within(2))

    def test_unauthenticated_socket_is_dropped(self):
        self.control("POST", "config", {"ws_auth_timeout_ms": 300})
        quiet = self.ws(token=None)
        authed = self.ws(BOT)
        authed.recv_json()
        t = time.monotonic()
        self.assertTrue(quiet.closed_within(3))
        self.assertGreaterEqual(time.monotonic() - t, 0.15)
        self.create("still here")
        self.assertEqual(authed.wait_event("posted")["seq"], 1)

    def test_resume_replays_missed_events_without_hello(self):
        ws = self.ws(ALICE)
        hello = ws.recv_json()
        conn_id = hello["data"]["connection_id"]
        self.create("m1")
        self.create("m2")
        got = ws.events(2)
        self.assertEqual([e["seq"] for e in got], [1, 2])
        # Pretend m2 never reached us; the network drops; one more post while disconnected.
        self.assertEqual(self.control("POST", "ws/drop", {"keep_buffer": True}).json()["dropped"],
                         1)
        m3 = self.create("m3")
        ws2 = self.ws(ALICE, query="connection_id=%s&sequence_number=2" % conn_id)
        replay = ws2.events(2)
        self.assertEqual([e["event"] for e in replay], ["posted", "posted"])
        self.assertEqual([e["seq"] for e in replay], [2, 3])
        self.assertEqual(json.loads(replay[1]["data"]["post"])["id"], m3["id"])
        self.assertEqual(ws2.quiet(0.2), [])   # no hello
        conns = [c for c in self.control("GET", "ws").json()["connections"] if c["active"]]
        self.assertEqual([c["connection_id"] for c in conns], [conn_id])
        self.create("m4")
        self.assertEqual(ws2.recv_json()["seq"], 4)

    def test_lossless_resume_continues_seq(self):
        ws = self.ws(ALICE)
        conn_id = ws.recv_json()["data"]["connection_id"]
        self.create("m1")
        self.assertEqual(ws.recv_json()["seq"], 1)
        self.control("POST", "ws/drop", {})
        ws2 = self.ws(ALICE, query="connection_id=%s&sequence_number=2" % conn_id)
        self.assertEqual(ws2.quiet(0.2), [])
        self.create("m2")
        self.assertEqual(ws2.recv_json()["seq"], 2)

    def test_resume_after_buffer_expired_gives_new_connection(self):
        self.control("POST", "config", {"ws_resume_window_ms": 150})
        ws = self.ws(ALICE)
        conn_id = ws.recv_json()["data"]["connection_id"]
        self.create("m1")
        ws.recv_json()
        self.control("POST", "ws/drop", {})
        time.sleep(0.3)
        ws2 = self.ws(ALICE, query="connection_id=%s&sequence_number=2" % conn_id)
        hello = ws2.recv_json()
        self.assertEqual((hello["event"], hello["seq"]), ("hello", 0))
        self.assertNotEqual(hello["data"]["connection_id"], conn_id)

    def test_resuming_a_connection_the_server_thinks_alive_starts_fresh(self):
        ws = self.ws(ALICE)
        conn_id = ws.recv_json()["data"]["connection_id"]
        # Half-open: the client gave up on the socket but the server has not noticed yet.
        ws2 = self.ws(ALICE, query="connection_id=%s&sequence_number=1" % conn_id)
        hello = ws2.recv_json()
        self.assertEqual((hello["event"], hello["seq"]), ("hello", 0))
        self.assertNotEqual(hello["data"]["connection_id"], conn_id)
        # Another user cannot take over a resumable connection either.
        self.control("POST", "ws/drop", {"user": "alice"})
        ws3 = self.ws(BOT, query="connection_id=%s&sequence_number=1" % conn_id)
        self.assertNotEqual(ws3.recv_json()["data"]["connection_id"], conn_id)

    def test_drop_without_buffer_is_a_server_restart(self):
        ws = self.ws(ALICE)
        conn_id = ws.recv_json()["data"]["connection_id"]
        self.control("POST", "ws/drop", {"keep_buffer": False})
        ws2 = self.ws(ALICE, query="connection_id=%s&sequence_number=1" % conn_id)
        hello = ws2.recv_json()
        self.assertEqual(hello["event"], "hello")
        self.assertNotEqual(hello["data"]["connection_id"], conn_id)

    def test_dead_queue_keeps_only_the_last_128_events(self):
        ws = self.ws(ALICE)
        conn_id = ws.recv_json()["data"]["connection_id"]
        for i in range(130):
            self.emu.state.create_post(self.bot, {"channel_id": self.ch, "message": str(i)})
        last = None
        for _ in range(130):
            last = ws.recv_json()
        self.assertEqual(last["seq"], 130)
        self.control("POST", "ws/drop", {})
        # seq 1 and 2 have left the 128-event dead queue: resume is impossible.
        ws2 = self.ws(ALICE, query="connection_id=%s&sequence_number=1" % conn_id)
        hello = ws2.recv_json()
        self.assertEqual((hello["event"], hello["seq"]), ("hello", 0))
        self.assertNotEqual(hello["data"]["connection_id"], conn_id)

    def test_events_queued_while_away_are_bounded(self):
        self.control("POST", "config", {"ws_send_queue_size": 5})
        ws = self.ws(ALICE)
        conn_id = ws.recv_json()["data"]["connection_id"]
        self.control("POST", "ws/drop", {})
        for i in range(5):
            self.create("queued %d" % i)
        ws2 = self.ws(ALICE, query="connection_id=%s&sequence_number=1" % conn_id)
        self.assertEqual([e["seq"] for e in ws2.events(5)], [1, 2, 3, 4, 5])
        self.control("POST", "ws/drop", {})
        for i in range(6):                      # one more than the queue holds
            self.create("overflow %d" % i)
        ws3 = self.ws(ALICE, query="connection_id=%s&sequence_number=6" % conn_id)
        hello = ws3.recv_json()
        self.assertEqual((hello["event"], hello["seq"]), ("hello", 0))
        self.assertNotEqual(hello["data"]["connection_id"], conn_id)

    def test_seq_gap_injection(self):
        ws = self.ws(ALICE)
        conn_id = ws.recv_json()["data"]["connection_id"]
        self.create("m1")
        self.assertEqual(ws.recv_json()["seq"], 1)
        self.assertEqual(self.control("POST", "ws/skip_seq", {"user": "alice"}).json()[
            "affected"], 1)
        self.create("m2")
        self.assertEqual(ws.recv_json()["seq"], 3)   # 2 never comes: a gap
        ws.close()
        wait_for(lambda: not any(c["active"] for c in self.control("GET", "ws").json()[
            "connections"]), what="disconnect")
        ws2 = self.ws(ALICE, query="connection_id=%s&sequence_number=2" % conn_id)
        hello = ws2.recv_json()
        self.assertEqual((hello["event"], hello["seq"]), ("hello", 0))
        self.assertNotEqual(hello["data"]["connection_id"], conn_id)

    def test_ws_garbage_frames_keep_seq_and_resume_intact(self):
        ws = self.ws(BOT)
        conn_id = ws.recv_json()["data"]["connection_id"]
        self.assertEqual(self.control("POST", "ws/faults", {"kind": "garbage",
                                                            "event": "posted"}).status, 201)
        self.create("m1")
        fin, op, payload = ws.recv_frame()
        self.assertEqual(op, 0x1)
        with self.assertRaises(ValueError):
            json.loads(payload)                     # truncated on the wire
        self.create("m2")
        self.assertEqual(ws.recv_json()["seq"], 2)  # the next one is intact
        ws.close()
        wait_for(lambda: not any(c["active"] for c in self.control("GET", "ws").json()[
            "connections"]), what="disconnect")
        ws2 = self.ws(BOT, query="connection_id=%s&sequence_number=1" % conn_id)
        replay = ws2.events(2)                      # the dead queue kept the real event
        self.assertEqual([e["seq"] for e in replay], [1, 2])
        self.assertEqual(json.loads(replay[0]["data"]["post"])["message"], "m1")

    def test_ws_garbage_styles(self):
        ws = self.ws(BOT)
        ws.recv_json()
        for style in ("not_json", "wrong_types", "bad_payload", "payload_types"):
            self.control("POST", "ws/faults", {"kind": "garbage", "style": style,
                                               "user": "relay-bot"})
        p = self.create("one")
        fin, op, payload = ws.recv_frame()
        self.assertIn(b"502 Bad Gateway", payload)
        self.emu.state.save_reaction(self.bot, {"user_id": self.bot.id, "post_id": p["id"],
                                                "emoji_name": "smile"})
        typed = ws.recv_json()
        self.assertEqual(typed["event"], len("reaction_added"))
        self.assertIsInstance(typed["seq"], str)
        self.create("two")
        bad = ws.recv_json()
        self.assertEqual((bad["event"], bad["seq"]), ("posted", 3))
        with self.assertRaises(ValueError):
            json.loads(bad["data"]["post"])
        self.create("three")
        typed_post = json.loads(ws.recv_json()["data"]["post"])
        self.assertEqual(typed_post["message"], len("three"))
        self.create("four")
        self.assertEqual(json.loads(ws.recv_json()["data"]["post"])["message"], "four")
        self.assertEqual(self.control("GET", "ws/faults").json()["faults"], [])
        self.assertEqual(self.control("POST", "ws/faults", {"kind": "garbage",
                                                            "style": "nope"}).status, 400)

    def test_ws_delay_and_close_faults(self):
        ws = self.ws(BOT)
        conn_id = ws.recv_json()["data"]["connection_id"]
        self.control("POST", "ws/faults", {"kind": "delay", "delay_ms": 300, "duration_ms": 5000})
        t = time.monotonic()
        self.create("slow")
        self.assertEqual(ws.recv_json()["seq"], 1)
        self.assertGreaterEqual(time.monotonic() - t, 0.3)
        self.control("DELETE", "ws/faults")
        self.control("POST", "ws/faults", {"kind": "close", "close_code": 1011})
        self.create("never on this socket")
        fin, op, payload = ws.recv_frame()
        self.assertEqual((op, struct.unpack(">H", payload[:2])[0]), (0x8, 1011))
        wait_for(lambda: not any(c["active"] for c in self.control("GET", "ws").json()[
            "connections"]), what="disconnect")
        ws2 = self.ws(BOT, query="connection_id=%s&sequence_number=2" % conn_id)
        again = ws2.recv_json()
        self.assertEqual((again["event"], again["seq"]), ("posted", 2))

    def test_events_only_for_channel_members(self):
        ws = self.ws(ALICE)
        ws.recv_json()
        self.control("DELETE", "channels/%s/members/alice" % self.other)
        self.create("elsewhere", channel=self.other)
        self.create("here")
        ev = ws.recv_json()
        self.assertEqual(json.loads(ev["data"]["post"])["message"], "here")
        self.assertEqual(ev["seq"], 1)

    def test_ping_pong_and_protocol_errors(self):
        self.control("POST", "config", {"ws_ping_interval_ms": 150})
        ws = self.ws(BOT)
        ws.recv_json()
        fin, op, payload = ws.recv_frame(timeout=2)
        self.assertEqual(op, 0x9)   # server ping
        ws.send_frame(0x9, b"ping!")
        while True:
            fin, op, payload = ws.recv_frame(timeout=2)
            if op == 0xA:
                break
        self.assertEqual(payload, b"ping!")
        ws.send_frame(0x1, b'{"seq":1,"action":"ping"}', mask=False)
        fin, op, payload = ws.recv_frame(timeout=2)
        while op == 0x9:
            fin, op, payload = ws.recv_frame(timeout=2)
        self.assertEqual(op, 0x8)
        self.assertEqual(struct.unpack(">H", payload[:2])[0], 1002)

    def test_query_token_on_upgrade(self):
        with self.assertRaises(ConnectionError):
            self.ws(token=None, query="access_token=" + BOT)   # 401 token_provided
        ws = self.ws(token=None, query="access_token=" + OAUTH)
        self.assertEqual(ws.recv_json()["event"], "hello")


# ---------------------------------------------------------------------------------------------
# Incoming webhooks, control API, CLI
# ---------------------------------------------------------------------------------------------

class WebhookTest(EmuTestCase):
    def test_incoming_webhook(self):
        hook = self.control("POST", "hooks", {"channel_id": self.ch, "user": "alice"}).json()
        r = self.api.post("/hooks/" + hook["id"], {"text": "from a hook", "username": "nagios",
                                                   "props": {"k": "v"}}, token=None)
        self.assertEqual((r.status, r.body), (200, b"ok"))
        self.assertTrue(r.header("Content-Type").startswith("text/plain"))
        row = self.rows()[0]
        self.assertEqual(row["props"], {"from_webhook": "true", "k": "v"})
        self.assertEqual(row["user_id"], self.alice.id)
        self.assertNotIn("remote_id", self.since(1)["posts"][row["id"]])
        self.control("POST", "config", {"enable_post_username_override": True})
        form = urllib.parse.urlencode({"payload": json.dumps({"text": "form",
                                                              "username": "nagios"})})
        r = self.api.request("POST", "/hooks/" + hook["id"], raw=form.encode(), token=None,
                             content_type="application/x-www-form-urlencoded")
        self.assertEqual(r.body, b"ok")
        self.assertEqual(self.rows()[1]["props"]["override_username"], "nagios")
        self.assertAppError(self.api.post("/hooks/" + hook["id"], {"text": ""}, token=None),
                            400, "web.incoming_webhook.text.app_error")


class ControlAndCliTest(EmuTestCase):
    def test_control_post_as_user_with_create_at(self):
        r = self.control("POST", "posts", {"as": "alice", "channel_id": self.ch,
                                           "message": "seeded", "create_at": 42})
        self.assertEqual(r.status, 201)
        self.assertEqual(r.json()["create_at"], 42)
        self.assertEqual(r.json()["user_id"], self.alice.id)
        pid = r.json()["id"]
        r = self.control("PUT", "posts/%s/patch" % pid, {"as": "alice", "message": "edited"})
        self.assertEqual(r.json()["message"], "edited")
        r = self.control("POST", "reactions", {"as": "alice", "post_id": pid,
                                               "emoji_name": "+1"})
        self.assertEqual(r.status, 200)
        r = self.control("DELETE", "posts/" + pid, {"as": "root"})
        self.assertEqual(r.json(), {"status": "OK"})
        states = self.control("GET", "state").json()
        self.assertEqual({c["name"] for c in states["channels"]}, {"war-room", "other"})
        r = self.control("POST", "posts", {"as": "alice", "channel_id": self.ch,
                                           "message": "x", "root_id": "n" * 26})
        self.assertEqual(r.json()["id"], "api.post.create_post.root_id.app_error")

    def test_subprocess_cli(self):
        state_file = os.path.join(self.emu_tmp(), "state.json")
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "emulator.py"), "--port", "0", "--user",
             "bot:TOK:bot=true", "--user", "boss:BOSS:system_admin=true", "--channel",
             "war-room", "--state-file", state_file, "--set", "replica_lag_ms=0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            self.assertRegex(line, r"^LISTENING \d+\n$")
            port = int(line.split()[1])
            with open(state_file) as f:
                state = json.load(f)
            self.assertEqual(state["port"], port)
            channel_id = state["channels"][0]["id"]
            api = Api(port)
            self.assertEqual(api.get("/api/v4/system/ping", token=None).json()["status"], "OK")
            r = api.post("/api/v4/posts", {"channel_id": channel_id, "message": "cli"},
                         token="TOK")
            self.assertEqual(r.status, 201)
            self.assertEqual(r.json()["props"], {"from_bot": "true"})
            api.close()
        finally:
            proc.terminate()
            self.assertEqual(proc.wait(10), 0)
            proc.stdout.close()
            proc.stderr.close()
        bad = subprocess.run([sys.executable, os.path.join(HERE, "emulator.py"), "--user",
                              "nocolon"], capture_output=True, text=True, timeout=30)
        self.assertEqual(bad.returncode, 2)
        self.assertIn("NAME:TOKEN", bad.stderr)

    def emu_tmp(self):
        import tempfile
        d = tempfile.mkdtemp(prefix="mmemu-")
        self.addCleanup(lambda: __import__("shutil").rmtree(d, ignore_errors=True))
        return d


class ServerBehaviourTest(EmuTestCase):
    """The "real-server behaviours" of mattermost-api.md that need knobs or control calls."""

    def test_date_header_follows_the_server_clock(self):
        # A client may take server time from the Date header; the emulator's clock offset
        # (POST __control/clock) moves it like every server timestamp.
        import email.utils

        def server_time():
            r = self.api.get("/api/v4/system/ping", token=None)
            return email.utils.parsedate_to_datetime(r.header("Date")).timestamp()

        self.assertLess(abs(server_time() - time.time()), 2)
        for offset in (-300000, 300000):
            self.control("POST", "clock", {"offset_ms": offset})
            self.assertLess(abs(server_time() - (time.time() + offset / 1000)), 2, offset)
            post = self.create("stamped")
            self.assertLess(abs(post["create_at"] / 1000 - (time.time() + offset / 1000)), 2)
        # Control answers carry it too (harmless, same clock).
        self.control("POST", "clock", {"offset_ms": 0})
        self.assertLess(abs(server_time() - time.time()), 2)

    def test_pending_post_id_cache_per_node_without_redis(self):
        # Default: one cache for the cluster (Redis, or a single node): a retry is de-duplicated.
        self.assertTrue(self.emu.state.config["pending_post_id_shared"])
        first = self.create("once", pending_post_id="bot:n1")
        self.assertEqual(self.create("once", pending_post_id="bot:n1")["id"], first["id"])
        self.assertEqual(len(self.rows()), 1)
        # Per node (no Redis): creates go round-robin over 2 nodes; the retry lands on the
        # other node, which has never seen the id: a second post. The third attempt is back on
        # the first node and is de-duplicated against the first post there.
        self.control("POST", "config", {"pending_post_id_shared": False, "cluster_nodes": 2})
        a = self.create("twice", pending_post_id="bot:n2")
        b = self.create("twice", pending_post_id="bot:n2")
        c = self.create("twice", pending_post_id="bot:n2")
        self.assertNotEqual(a["id"], b["id"])
        self.assertEqual(c["id"], a["id"])
        self.assertEqual([r["message"] for r in self.rows()].count("twice"), 2)

    def system_rows(self, ptype):
        return [r for r in self.rows() if r["type"] == ptype]

    def test_membership_changes_post_system_messages(self):
        ws = self.ws(BOT)
        ws.recv_json()                               # hello
        # Without "as": a database change, nothing posted (and nothing else changes).
        self.control("DELETE", "channels/%s/members/alice" % self.ch)
        self.control("POST", "channels/%s/members" % self.ch, {"user": "alice"})
        self.assertEqual(self.rows(), [])
        # Removed by an admin: system_remove_from_channel by the remover, after the removal.
        r = self.control("DELETE", "channels/%s/members/alice?as=root" % self.ch)
        self.assertEqual(r.status, 200, r.body)
        self.assertNotIn(self.alice.id, r.json()["members"])
        post = r.json()["post"]
        self.assertEqual((post["type"], post["user_id"], post["message"]),
                         ("system_remove_from_channel", self.admin.id,
                          "@alice removed from the channel."))
        self.assertEqual(post["props"], {"removedUserId": self.alice.id,
                                         "removedUsername": "alice"})
        # Added back by the admin: system_add_to_channel by the actor.
        post = self.control("POST", "channels/%s/members" % self.ch,
                            {"user": "alice", "as": "root"}).json()["post"]
        self.assertEqual((post["type"], post["user_id"], post["message"]),
                         ("system_add_to_channel", self.admin.id,
                          "alice added to the channel by root."))
        self.assertEqual(post["props"]["addedUserId"], self.alice.id)
        self.assertEqual(post["props"]["addedUsername"], "alice")
        # Adding a member again changes nothing and posts nothing.
        self.assertIsNone(self.control("POST", "channels/%s/members" % self.ch,
                                       {"user": "alice", "as": "root"}).json()["post"])
        # Leaving and joining oneself: system_leave_channel / system_join_channel by the user.
        self.control("DELETE", "channels/%s/members/alice?as=alice" % self.ch)
        self.control("POST", "channels/%s/members" % self.ch, {"user": "alice", "as": "alice"})
        # (rows come by create_at, and these are made within a millisecond: compare sorted)
        self.assertEqual(sorted((r["type"], r["user_id"]) for r in self.rows()),
                         sorted([("system_remove_from_channel", self.admin.id),
                                 ("system_add_to_channel", self.admin.id),
                                 ("system_leave_channel", self.alice.id),
                                 ("system_join_channel", self.alice.id)]))
        self.assertEqual(self.system_rows("system_join_channel")[0]["message"],
                         "alice joined the channel.")
        # They are stored posts: published as `posted`, returned by catch-up with their type.
        types = [json.loads(ws.recv_json()["data"]["post"])["type"] for _ in range(4)]
        self.assertEqual(types, ["system_remove_from_channel", "system_add_to_channel",
                                 "system_leave_channel", "system_join_channel"])
        since = self.since(1)
        self.assertEqual(sorted(since["posts"][i]["type"] for i in since["order"]),
                         sorted(types))
        # A client cannot create them itself.
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "x",
                                            "type": "system_join_channel"})
        self.assertEqual(r.status, 400)
        # Bot removed from the channel: its creates are 403 until it is added back.
        self.control("DELETE", "channels/%s/members/relay-bot?as=root" % self.ch)
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "blocked"})
        self.assertAppError(r, 403, "api.context.permissions.app_error")
        self.control("POST", "channels/%s/members" % self.ch, {"user": "relay-bot", "as": "root"})
        self.create("unblocked")

    def test_header_change_posts_a_system_message(self):
        self.control("POST", "channels/%s/header" % self.ch, {"header": "quiet"})  # no actor
        self.assertEqual(self.rows(), [])
        self.assertEqual(self.api.get("/api/v4/channels/" + self.ch).json()["header"], "quiet")
        for new, message in (("Q3 plan", "alice updated the channel header from: quiet to: "
                                         "Q3 plan"),
                             ("", "alice removed the channel header (was: Q3 plan)"),
                             ("on call: bob", "alice updated the channel header to: on call: "
                                              "bob")):
            post = self.control("POST", "channels/%s/header" % self.ch,
                                {"header": new, "as": "alice"}).json()["post"]
            self.assertEqual((post["type"], post["user_id"], post["message"]),
                             ("system_header_change", self.alice.id, message))
            self.assertEqual(post["props"]["new_header"], new)
        # The same header again: nothing posted.
        self.assertIsNone(self.control("POST", "channels/%s/header" % self.ch,
                                       {"header": "on call: bob", "as": "alice"}).json()["post"])
        self.assertEqual(len(self.system_rows("system_header_change")), 3)
        # System messages cannot be edited.
        pid = self.system_rows("system_header_change")[0]["id"]
        r = self.api.request("PUT", "/api/v4/posts/%s/patch" % pid, {"message": "x"},
                             token=ADMIN)
        self.assertAppError(r, 400, "api.post.update_post.system_message.app_error")

    def test_archived_channel_refuses_posts_until_restored(self):
        post = self.control("POST", "channels/%s/archive" % self.ch,
                            {"as": "root"}).json()["post"]
        self.assertEqual((post["type"], post["message"]),
                         ("system_channel_deleted", "root archived the channel."))
        r = self.api.post("/api/v4/posts", {"channel_id": self.ch, "message": "into the void"})
        self.assertAppError(r, 400, "api.post.create_post.can_not_post_to_deleted.error")
        self.assertTrue(self.api.get("/api/v4/channels/" + self.ch).json()["delete_at"] > 0)
        post = self.control("POST", "channels/%s/unarchive" % self.ch,
                            {"as": "root"}).json()["post"]
        self.assertEqual((post["type"], post["message"]),
                         ("system_channel_restored", "root unarchived the channel."))
        self.create("back again")
        self.assertEqual(sorted(r["type"] for r in self.rows()),
                         ["", "system_channel_deleted", "system_channel_restored"])


class GoJsonTest(unittest.TestCase):
    def test_float_and_string_encoding_like_go(self):
        cases = {1.0: "1", 100.0: "100", 0.1: "0.1", 1e20: "100000000000000000000",
                 1e21: "1e+21", 1.5e-7: "1.5e-7", 1e-6: "0.000001", -0.0: "-0",
                 12345678901234567890.0: "12345678901234567000", 2.5: "2.5"}
        for value, text in cases.items():
            self.assertEqual(gojson.go_float(value), text, value)
        self.assertEqual(gojson.dumps({"b": 1, "a": [True, None, "é\u2028"]}),
                         '{"a":[true,null,"é\\u2028"],"b":1}')
        self.assertEqual(gojson.dumps(gojson.Struct(b=1, a=2)), '{"b":1,"a":2}')


if __name__ == "__main__":
    unittest.main()
