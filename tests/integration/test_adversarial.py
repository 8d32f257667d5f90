"""Adversarial-input catalogue (issue 6, item 4), against real daemons and the real CLI.

Every known-bad input is fed to a running site and checked for
  (a) the distinct error that names what was wrong: the HTTP status and error text of the ingest
      API, the `relay_frames_rejected_total{reason}` counter that moves (and only that one), the
      message of `relay import` / `POST /v1/bundles/import`, the exit code of the CLI; and
  (b) an unchanged store and unchanged sinks: the bytes of every JSONL sink, the store's commit
      counter, the event/frame counters, queue depths and acknowledged positions, and
      `/v1/status`.

Classes of input: ingest requests (invalid UTF-8 in every string field, escaped lone surrogates,
100000 nested arrays/objects, bodies over max_body, texts over max_text, over-long fields, broken
HTTP); frames on a live link (a flipped bit in every header field, in the ciphertext and in the
signature, truncation at every length class, one extra byte, frames sealed by an unknown key or
for another site, replays, gaps, a message over the 80 MiB link limit, tampered control
messages); bundle files (every header field flipped, wrong kind, truncation classes, expired,
foreign, unknown sender, ack and resend-request files tampered, replays of bundles and acks);
file names (`..` in --out and import paths, hostile names in a files_auto folder, a symlink
planted at the export's temporary name, a FIFO in the folder).

Frames are not built here (the standard library has no Ed25519/X25519): they are taken out of
bundle files that `relay export` writes, which hold ordinary sealed frames (docs/wire-format.md).

The module prints "adversarial cases: N" (N = inputs fed and checked) when it ends.
"""
import collections
import datetime
import hashlib
import json
import os
import re
import socket
import stat
import struct
import time

from relay_harness import CHANNEL, RelayTestCase, ZmtpProxy, messages, post_all, wait_for

CASES = collections.Counter()  # class of input -> number of inputs fed and checked


def tearDownModule():
    total = sum(CASES.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(CASES.items()))
    print(f"\nadversarial cases: {total} ({detail})", flush=True)


REASONS = ("truncated", "bad_magic", "unsupported_version", "unknown_sender", "wrong_recipient",
           "bad_signature", "decrypt_failed", "malformed", "replay", "gap", "unroutable", "loop",
           "unknown_origin", "bad_origin_signature", "origin_not_allowed", "bad_hops", "stale",
           "not_owner")
FAST_LINK = {"heartbeat_interval": "500ms", "peer_timeout": "2s"}

# ---- byte layouts (docs/wire-format.md), written out independently of the implementation ----
F_MAGIC, F_VERSION, F_FLAGS, F_RESERVED = 0, 4, 5, 6
MAX_SEQ = 2**62  # link sequences beyond are malformed (docs/wire-format.md, "Frame")
F_SENDER, F_RECIPIENT, F_EPHEMERAL, F_NONCE = 8, 40, 72, 104
F_FIRST, F_LAST, F_COUNT, F_CTLEN, F_HEADER = 128, 136, 144, 148, 152
C_TYPE, C_RESERVED, C_SENDER, C_RECIPIENT = 5, 6, 8, 40
C_TIMESTAMP, C_BODYLEN, C_HEADER = 72, 80, 84
B_KIND, B_RESERVED, B_SENDER, B_RECIPIENT, B_ID = 5, 6, 8, 40, 72
B_CREATED, B_EXPIRES, B_BODYLEN, B_HEADER = 88, 96, 104, 112
SIG = 64


def flip(data, offset, bit=0):
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


def u(data, offset, width):
    return int.from_bytes(data[offset:offset + width], "big")


def bundle_frames(path):
    """The frames inside a frames bundle file (kind 1)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"RLYB" and data[B_KIND] == 1, path
    body = data[B_HEADER:B_HEADER + u(data, B_BODYLEN, 8)]
    count, pos, out = u(body, 0, 4), 4, []
    for _ in range(count):
        n = u(body, pos, 4)
        out.append(body[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert pos == len(body)
    return out


def fingerprint(key32):
    return key32[:8].hex()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


def tree(root, skip=("data",)):
    """{relative path: (kind, size, sha256)} of everything under root, except data_dir folders
    and relay.log files; symlinks are listed (not followed)."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        for name in dirs + files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                if name == "relay.log":
                    continue
                out[rel] = ("file", st.st_size, hashlib.sha256(read(p)).hexdigest())
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


def rejections(metrics):
    return {r: metrics.value("relay_frames_rejected_total", 0, reason=r) for r in REASONS}


STATE_FAMILIES = ("relay_events_ingested_total", "relay_store_commits_total",
                  "relay_events_delivered_total", "relay_events_received_total",
                  "relay_frames_received_total", "relay_dedup_hits_total",
                  "relay_events_forwarded_total", "relay_inbound_backlog", "relay_queue_depth",
                  "relay_acked_through", "relay_ingest_duplicates_total")


def state(site):
    """What a refused input must not change: sinks (bytes), store counters, queues, status."""
    m = site.metrics()
    fam = {k: v for k, v in m.items() if k.split("{")[0] in STATE_FAMILIES}
    st, body = site.get("/v1/status")
    status = json.loads(body)
    status.pop("refused", None)  # the refusal counters: checked by reason, separately
    for p in status.get("peers", []):
        p.pop("last_contact_ms", None)
        p.pop("link", None)
        p.pop("frames_sent", None)
        p.pop("acks_refused", None)
    sinks = {}
    for ch in site.channels:
        try:
            sinks[ch] = read(site.sink_path(ch))
        except FileNotFoundError:
            sinks[ch] = None
    return {"metrics": fam, "status": status, "sinks": sinks}, rejections(m)



def printable(text):
    """What relay prints for `text`: control characters and backslashes as \\xNN."""
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7f or c == "\\" else c
                   for c in text)

class Catalogue(RelayTestCase):
    """Shared checks: a refused input moves exactly the expected rejection counter by one and
    changes nothing else."""

    def settle(self, site, timeout=10):
        """Waits until the site's state stops moving (queue depth is refreshed periodically)."""
        last = None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s, _ = state(site)
            if s == last:
                return s
            last = s
            time.sleep(1.2)  # queue depths are refreshed every second
        self.fail(f"{site.name}: state did not settle within {timeout}s")

    def assert_unchanged(self, site, before, what, ignore=()):
        after, _ = state(site)
        for key in ("sinks", "metrics", "status"):
            if key == "metrics" and ignore:
                after[key] = {k: v for k, v in after[key].items() if k not in ignore}
                before = dict(before, metrics={k: v for k, v in before[key].items()
                                               if k not in ignore})
            if after[key] != before[key]:
                if key == "sinks":
                    diff = {c: (len(before[key][c] or b""), len(after[key][c] or b""))
                            for c in after[key] if after[key][c] != before[key].get(c)}
                else:
                    diff = {k: (before[key].get(k), v) for k, v in
                            (after[key].items() if isinstance(after[key], dict) else [])
                            if before[key].get(k) != v}
                self.fail(f"{what}: {site.name}'s {key} changed: {diff}")

    def wait_rejection(self, site, before_rej, reason, what, timeout=10):
        """Waits until `reason` moved by one; every other reason must stay put."""
        def moved():
            now = rejections(site.metrics())
            return now if now[reason] > before_rej[reason] else None
        now = wait_for(moved, timeout)
        if not now:
            now = rejections(site.metrics())
            delta = {r: now[r] - before_rej[r] for r in REASONS if now[r] != before_rej[r]}
            self.fail(f"{what}: expected one '{reason}' rejection, counters moved by {delta}")
        delta = {r: now[r] - before_rej[r] for r in REASONS if now[r] != before_rej[r]}
        self.assertEqual(delta, {reason: 1}, f"{what}: rejection counters moved by {delta}")


# =============================================================================================
# Ingest API
# =============================================================================================
class IngestCatalogue(Catalogue):
    MAX_BODY = 1 << 20
    MAX_TEXT = 1024

    def setUp(self):
        super().setUp()
        self.eu, self.aws = self.site("europe"), self.site("aws")
        self.eu.write_config({"aws": {"site": self.aws}}, {CHANNEL: ["aws"]}, zmq_listen=False,
                             ingest={"max_body": str(self.MAX_BODY),
                                     "max_text": str(self.MAX_TEXT)})
        self.eu.start()

    @staticmethod
    def msg(**over):
        m = {"channel": CHANNEL, "author": "alice", "text": "hi"}
        m.update(over)
        return m

    def raw_msg(self, channel=b'"war-room"', author=b'"alice"', text=b'"hi"', extra=b""):
        return b'{"channel":' + channel + b',"author":' + author + b',"text":' + text + extra + b"}"

    def cases(self):
        bad_utf8 = {  # raw bytes inside a JSON string
            "lone continuation byte": b"\x80",
            "byte 0xff": b"\xff",
            "overlong '/' (c0 af)": b"\xc0\xaf",
            "overlong NUL (e0 80 80)": b"\xe0\x80\x80",
            "UTF-16 surrogate encoded (ed a0 80)": b"\xed\xa0\x80",
            "beyond U+10FFFF (f4 90 80 80)": b"\xf4\x90\x80\x80",
            "5-byte form (f8 88 80 80 80)": b"\xf8\x88\x80\x80\x80",
            "truncated 3-byte sequence": b"\xe2\x82",
        }
        out = []
        for name, seq in bad_utf8.items():
            for field in ("text", "author", "channel"):
                val = b'"x' + seq + b'y"'
                kw = {field: val}
                out.append((f"invalid UTF-8 in {field}: {name}", self.raw_msg(**kw), 400,
                            "not valid UTF-8"))
        for field in ("id", "thread"):
            out.append((f"invalid UTF-8 in {field}", self.raw_msg(
                extra=b',"' + field.encode() + b'":"a\xffb"'), 400, "not valid UTF-8"))
        out.append(("invalid UTF-8 in a props key", self.raw_msg(extra=b',"props":{"k\xfe":"v"}'),
                    400, "not valid UTF-8"))
        out.append(("invalid UTF-8 in a props value", self.raw_msg(extra=b',"props":{"k":"\xc3"}'),
                    400, "not valid UTF-8"))
        out.append(("invalid UTF-8 in a field name", b'{"chan\xffnel":"war-room"}', 400,
                    "not valid UTF-8"))
        for esc in (b"\\ud800", b"\\udc00", b"\\ud800\\u0041", b"\\udbff\\udbff"):
            for field in ("text", "author"):
                out.append((f"escaped lone surrogate {esc.decode()} in {field}",
                            self.raw_msg(**{field: b'"a' + esc + b'b"'}), 400,
                            "malformed JSON: a lone UTF-16"))
        # Nesting: 100000 levels of arrays and of objects, bare and inside fields.
        deep_a = b"[" * 100000 + b"]" * 100000
        deep_o = b'{"a":' * 100000 + b"1" + b"}" * 100000
        out += [("100000 nested arrays", deep_a, 400, "too deep"),
                ("100000 nested objects", deep_o, 400, "too deep"),
                ("100000 nested arrays in text", self.raw_msg(text=deep_a), 400, "too deep"),
                ("100000 nested objects in props", self.raw_msg(extra=b',"props":' + deep_o),
                 400, "too deep"),
                ("100000 nested arrays in a batch", b"[" + self.raw_msg() + b"," + deep_a + b"]",
                 400, "too deep"),
                ("100000 unclosed arrays", b"[" * 100000, 400, "malformed JSON"),
                ("1000 nested arrays in props", self.raw_msg(
                    extra=b',"props":{"k":' + b"[" * 1000 + b"]" * 1000 + b"}"), 400,
                 "must be a string")]
        # Sizes.
        big = "x" * (self.MAX_TEXT + 1)
        out += [
            ("text one byte over max_text", json.dumps(self.msg(text=big)).encode(), 413,
             f"field 'text' has {self.MAX_TEXT + 1} bytes, more than the limit of {self.MAX_TEXT}"),
            ("multi-byte text over max_text in bytes", json.dumps(
                self.msg(text="\u00e9" * (self.MAX_TEXT // 2 + 1)), ensure_ascii=False).encode(),
             413, "more than the limit"),
            ("batch whose 3rd message is over max_text", json.dumps(
                [self.msg(text="ok-1"), self.msg(text="ok-2"), self.msg(text=big)]).encode(), 413,
             "message 2: field 'text'"),
            ("body one byte over max_body", json.dumps(
                self.msg(text="y" * (self.MAX_BODY - 50))).encode().ljust(self.MAX_BODY + 1), 413,
             f"request body larger than {self.MAX_BODY} bytes"),
            ("body of 8 MiB", b"[" + b" " * (8 << 20) + b"]", 413, "request body larger than"),
            ("author over 256 bytes", json.dumps(self.msg(author="a" * 257)).encode(), 400,
             "field 'author' is longer than 256 bytes"),
            ("id over 256 bytes", json.dumps(self.msg(id="i" * 257)).encode(), 400,
             "field 'id' is longer than 256 bytes"),
            ("thread over 256 bytes", json.dumps(self.msg(thread="t" * 257)).encode(), 400,
             "field 'thread' is longer than 256 bytes"),
            ("props key over 256 bytes", json.dumps(self.msg(props={"k" * 257: "v"})).encode(),
             400, "props key is longer than 256 bytes"),
        ]
        # Names that look like paths, and types.
        out += [
            ("channel '../war-room'", json.dumps(self.msg(channel="../war-room")).encode(), 400,
             "unknown channel '../war-room'"),
            ("channel with a NUL", json.dumps(self.msg(channel="war-room\u0000")).encode(), 400,
             "unknown channel"),
            ("channel 'war-room/../war-room'", json.dumps(
                self.msg(channel="war-room/../war-room")).encode(), 400, "unknown channel"),
            ("text is a number", json.dumps(self.msg(text=5)).encode(), 400,
             "field 'text' must be a string"),
            ("unknown field", json.dumps(self.msg(path="/etc/passwd")).encode(), 400,
             "unknown field 'path'"),
            ("empty body", b"", 400, "malformed JSON"),
            ("NUL bytes", b"\x00" * 64, 400, "malformed JSON"),
            ("empty batch", b"[]", 400, "empty batch"),
        ]
        return out

    def test_bad_requests_get_distinct_errors_and_change_nothing(self):
        eu = self.eu
        before = self.settle(eu)
        rejected0 = eu.metric("relay_ingest_rejected_total", 0)
        n = http_layer = 0
        for name, body, want_status, want_error in self.cases():
            with self.subTest(name):
                r = eu.request("POST", "/v1/messages", body, timeout=60)
                self.assertEqual(r.status, want_status, f"{name}: {r.text[:300]}")
                self.assertIsInstance(r.json, dict, f"{name}: answer is not a JSON object: "
                                      f"{r.text[:200]}")
                self.assertIn(want_error, r.json.get("error", ""), name)
                http_layer += want_error.startswith("request body larger")  # before the handler
                n += 1
                CASES["ingest"] += 1
                self.assert_unchanged(eu, before, name)
        # Every request the handler refused is counted (the HTTP layer refuses bodies over
        # max_body before the handler sees them).
        self.assertEqual(eu.metric("relay_ingest_rejected_total", 0) - rejected0, n - http_layer)
        # Positive control: a good message does change the state the checks compare.
        st, body = eu.post(self.msg(text="x" * self.MAX_TEXT))
        self.assertEqual(st, 202, body)
        self.wait_for(lambda: state(eu)[0] != before, 10, "the good message to change the state")

    def test_broken_http_is_refused(self):
        eu = self.eu
        before = self.settle(eu)
        # Well-formed but for the part under test: the right Host, the token, a JSON type (the
        # access checks come first; tests/integration/test_local_api.py attacks those).
        h = (f"Host: 127.0.0.1:{eu.ingest_port}\r\nAuthorization: Bearer {eu.token}\r\n"
             "Content-Type: application/json\r\n").encode()
        raw_cases = [
            ("Content-Length of 10^15", b"POST /v1/messages HTTP/1.1\r\n" + h +
             b"Content-Length: 1000000000000000\r\n\r\n{}", b"413"),
            ("Content-Length beyond 2^64", b"POST /v1/messages HTTP/1.1\r\n" + h +
             b"Content-Length: 99999999999999999999999\r\n\r\n{}", b"400"),
            ("two Content-Length headers", b"POST /v1/messages HTTP/1.1\r\n" + h +
             b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}}", b"400"),
            ("chunked body over max_body", b"POST /v1/messages HTTP/1.1\r\n" + h +
             b"Transfer-Encoding: chunked\r\n\r\n" + (b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 40
             + b"0\r\n\r\n", b"413"),
            ("header block over the limit", b"POST /v1/messages HTTP/1.1\r\n" + h + b"X-A: "
             + b"a" * 70000 + b"\r\n\r\n", b"431"),
            ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64
             + b"\r\n\r\n", b"400"),
        ]
        for name, raw, want in raw_cases:
            with self.subTest(name):
                s = socket.create_connection(("127.0.0.1", eu.ingest_port), timeout=20)
                try:
                    try:
                        s.sendall(raw)
                    except OSError:
                        pass  # answered and closed early
                    got = b""
                    while b"\r\n" not in got:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        got += chunk
                finally:
                    s.close()
                self.assertTrue(got.startswith(b"HTTP/1.1 " + want), f"{name}: {got[:200]!r}")
                CASES["ingest"] += 1
                self.assert_unchanged(eu, before, name)
        self.assertTrue(eu.healthy())


# =============================================================================================
# Frames and control messages on a live ZeroMQ link
# =============================================================================================
class RecordingProxy(ZmtpProxy):
    """A ZmtpProxy that also records the control messages (RLYC) the dialer sends."""

    def __init__(self, target_port, listener_key, dialer_key):
        self.controls = []
        super().__init__(target_port, listener_key, dialer_key)

    def encode(self, flags, body):  # called for every message forwarded or injected
        if not flags & 0x04 and body[:4] == b"RLYC" and len(self.controls) < 1000:
            self.controls.append(body)
        return ZmtpProxy.encode(flags, body)


class LinkCatalogue(Catalogue):
    """europe dials aws through a proxy that drops europe's own frames: only what the test
    injects reaches aws. The proxy terminates the link's CURVE security with both sites' keys
    (a thief of both keys, or a man in the middle where CURVE is not there), so these cases test
    the frame-level defences behind it. Sealed frames come out of bundle files europe, the
    enclave (another peer of aws) and a rogue export."""

    def setUp(self):
        super().setUp()
        eu, aws = self.site("europe"), self.site("aws")
        enclave, rogue = self.site("enclave"), self.site("rogue")
        self.eu, self.aws = eu, aws
        self.px = RecordingProxy(aws.zmq_port, aws.key, eu.key)
        self.proxies.append(self.px)
        self.px.mode = "drop"
        eu.write_config({"aws": {"site": aws, "connect": self.px.url,
                                 "keys": {"max_frame_events": "2"}},
                         "enclave": {"site": enclave}},
                        {CHANNEL: ["aws", "enclave"]}, zmq=FAST_LINK)
        aws.write_config({"europe": {"site": eu}, "enclave": {"site": enclave}},
                         {CHANNEL: ["europe"]}, zmq=FAST_LINK)
        rogue.write_config({"aws": {"site": aws}}, {CHANNEL: ["aws"]}, zmq_listen=False)
        enclave.write_config({"aws": {"site": aws}}, {CHANNEL: ["aws"]}, zmq_listen=False)
        aws.start()
        eu.start()
        rogue.start()
        enclave.start()
        self.wait_for(lambda: eu.metric("relay_link_up", peer="aws") == 1, 30,
                      "europe's link to aws to come up")
        post_all(eu, messages(6, prefix="m"), batch=1)
        post_all(rogue, messages(2, prefix="rogue"))
        disk = os.path.join(self.root, "disk")
        os.makedirs(disk)
        self.frames = bundle_frames(self.export(eu, "aws", disk)[0])
        self.assertEqual(len(self.frames), 3, "6 events, 2 per frame")
        self.foreign = bundle_frames(self.export(eu, "enclave", disk)[0])[0]
        self.unknown = bundle_frames(self.export(rogue, "aws", disk)[0])[0]
        post_all(enclave, messages(2, prefix="enclave"))
        self.other_peer = bundle_frames(self.export(enclave, "aws", disk)[0])[0]
        rogue.kill9()
        enclave.kill9()
        self.eu_pk = self.frames[0][F_SENDER:F_SENDER + 32]
        self.aws_pk = self.frames[0][F_RECIPIENT:F_RECIPIENT + 32]

    def export(self, site, peer, out, *extra):
        r = site.cli("export", "--config", site.conf, "--peer", peer, "--out", out, *extra)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.split()

    def inject(self, data):
        # On a loaded machine the proxy (Python) can stall for longer than peer_timeout, and the
        # link then comes back on a new connection: wait for one.
        self.wait_for(lambda: self.px.live() > 0
                      and self.eu.metric("relay_link_up", peer="aws") == 1, 30,
                      "a live connection through the proxy to inject into")
        self.assertGreater(self.px.inject(data), 0, "no live connection to inject into")

    def feed(self, before, data, reason, what, says=None):
        """Injects one message; exactly `reason` must be counted and nothing else change."""
        if says:
            time.sleep(1.1)  # a fresh window of the daemon's warning limiter (5 per second)
        _, rej = state(self.aws)
        mark = len(self.aws.log_text())
        self.inject(data)
        self.wait_rejection(self.aws, rej, reason, what)
        self.assert_unchanged(self.aws, before, what)
        if says:  # the log names the problem
            self.assertTrue(wait_for(lambda: says in self.aws.log_text()[mark:], 5),
                            f"{what}: the log does not say {says!r}")
        CASES["link"] += 1

    def feed_refused(self, before, data, reason, what):
        """Injects one message the link itself must refuse: relay_link_refused_total{reason}
        moves by one, no frame rejection counter moves, nothing else changes."""
        _, rej = state(self.aws)
        was = self.aws.metric("relay_link_refused_total", 0, reason=reason)
        self.inject(data)
        self.wait_for(lambda: self.aws.metric("relay_link_refused_total", 0, reason=reason)
                      > was, 10, f"{what}: aws to refuse it as {reason}")
        self.assertEqual(self.aws.metric("relay_link_refused_total", 0, reason=reason), was + 1,
                         what)
        self.assertEqual(rejections(self.aws.metrics()), rej, what)
        self.assert_unchanged(self.aws, before, what)
        CASES["link"] += 1

    def frame_cases(self, f):
        """(what, bytes, reason) for every header field of frame f, its ciphertext and signature.
        The expected reason follows the check order of docs/wire-format.md."""
        first, last, ctlen = u(f, F_FIRST, 8), u(f, F_LAST, 8), u(f, F_CTLEN, 4)
        out = [("magic byte 0", flip(f, F_MAGIC), "bad_magic"),
               ("magic byte 3", flip(f, F_MAGIC + 3, 7), "bad_magic"),
               ("version", flip(f, F_VERSION), "unsupported_version"),
               ("version bit 7", flip(f, F_VERSION, 7), "unsupported_version"),
               ("flags bit 0 (resume, a known flag)", flip(f, F_FLAGS), "decrypt_failed"),
               ("flags bit 1", flip(f, F_FLAGS, 1), "malformed"),
               ("flags bit 7", flip(f, F_FLAGS, 7), "malformed"),
               ("reserved byte 0", flip(f, F_RESERVED, 3), "malformed"),
               ("reserved byte 1", flip(f, F_RESERVED + 1), "malformed")]
        for name, off, reason in (("sender", F_SENDER, "unknown_sender"),
                                  ("recipient", F_RECIPIENT, "wrong_recipient"),
                                  ("ephemeral key", F_EPHEMERAL, "decrypt_failed"),
                                  ("nonce", F_NONCE, "decrypt_failed")):
            out.append((f"{name} first byte", flip(f, off), reason))
            out.append((f"{name} last byte", flip(f, off + 31 if name != "nonce" else off + 23, 5),
                        reason))
        for bit in (0, 63):  # low and high bit of each sequence field
            byte, b = 7 - bit // 8, bit % 8
            nf = first ^ (1 << bit)
            out.append((f"first_seq bit {bit}", flip(f, F_FIRST + byte, b),
                        "malformed" if nf > last else "decrypt_failed"))
            nl = last ^ (1 << bit)  # beyond 2^62 (MAX_SEQ) or below first_seq: malformed
            out.append((f"last_seq bit {bit}", flip(f, F_LAST + byte, b),
                        "malformed" if first > nl or nl > MAX_SEQ else "decrypt_failed"))
        # The header is the AEAD's associated data: a changed field fails decryption.
        out.append(("event_count bit 0", flip(f, F_COUNT + 3), "decrypt_failed"))
        out.append(("event_count bit 31", flip(f, F_COUNT, 7), "decrypt_failed"))
        low = ctlen & -ctlen  # lowest set bit: clearing it declares fewer bytes than present
        lb = low.bit_length() - 1
        out.append(("ciphertext_len smaller", flip(f, F_CTLEN + 3 - lb // 8, lb % 8),
                    "malformed"))
        out.append(("ciphertext_len bit 31 (4 GiB)", flip(f, F_CTLEN, 7), "truncated"))
        zero = next(b for b in range(32) if not ctlen >> b & 1)
        out.append(("ciphertext_len larger", flip(f, F_CTLEN + 3 - zero // 8, zero % 8),
                    "truncated"))
        for off in (F_HEADER, F_HEADER + ctlen // 2, F_HEADER + ctlen - 16, F_HEADER + ctlen - 1):
            out.append((f"ciphertext byte {off - F_HEADER}", flip(f, off, 2), "decrypt_failed"))
        for off in (len(f) - SIG, len(f) - SIG + 31, len(f) - 1):
            out.append((f"signature byte {off - len(f) + SIG}", flip(f, off, 6), "bad_signature"))
        # Truncation at every length class, and one byte more.
        out += [("empty message", b"", "truncated"),
                ("shorter than the magic (RLY)", f[:3], "truncated"),
                ("magic only", f[:4], "truncated"),
                ("inside the header (100 bytes)", f[:100], "truncated"),
                ("header only", f[:F_HEADER], "truncated"),
                ("inside the ciphertext", f[:F_HEADER + ctlen // 2], "truncated"),
                ("ciphertext without signature", f[:F_HEADER + ctlen], "truncated"),
                ("missing the last signature byte", f[:-1], "truncated"),
                ("one extra byte", f + b"\x00", "malformed"),
                ("two frames in one message", f + f, "malformed")]
        return out

    def test_bad_frames_and_control_messages_are_rejected_by_reason(self):
        """Attack: a man in the middle holding both keys (or europe itself) injects every kind of
        bad frame and control message on europe's connection; safe outcome: each is refused by
        its distinct reason and nothing changes; frames signed by another configured peer are
        refused by the link (sender_mismatch) before they are opened."""
        eu, aws, px = self.eu, self.aws, self.px
        f1, f2, f3 = self.frames
        before = self.settle(aws)
        self.assertEqual(aws.sink_lines(), [])
        for what, data, reason in self.frame_cases(f1):
            with self.subTest(what):
                self.feed(before, data, reason, "frame: " + what)
        with self.subTest("sealed by an unknown key"):
            self.feed(before, self.unknown, "unknown_sender", "frame from an unknown key",
                      says=f"sender {fingerprint(self.unknown[F_SENDER:F_SENDER + 32])} is not "
                           "a configured peer")
        with self.subTest("sealed for another site"):
            self.feed(before, self.foreign, "wrong_recipient", "frame for another site",
                      says="addressed to site "
                           f"{fingerprint(self.foreign[F_RECIPIENT:F_RECIPIENT + 32])}")
        with self.subTest("unknown sender with the sender field of a peer"):
            spoof = self.unknown[:F_SENDER] + self.eu_pk + self.unknown[F_SENDER + 32:]
            # Sealed without europe's box secret: it does not decrypt, its payload is not parsed.
            self.feed(before, spoof, "decrypt_failed", "rogue frame claiming europe's key")
        with self.subTest("declares 4 GiB of ciphertext"):
            huge = f1[:F_CTLEN] + b"\xff\xff\xff\xf0" + f1[F_HEADER:]
            self.feed(before, huge, "truncated", "frame declaring 4 GiB")
        with self.subTest("signed by another configured peer (the enclave), on europe's link"):
            self.feed_refused(before, self.other_peer, "sender_mismatch",
                              "the enclave's valid frame on europe's connection")

        # Control messages europe sent (hello, pings), each field flipped.
        ctl = next((c for c in px.controls if c[C_TYPE] in (1, 4) and len(c) == C_HEADER + SIG),
                   None)
        self.assertIsNotNone(ctl, "no hello or ping from europe was recorded")
        t = ctl[C_TYPE]
        control_cases = [
            ("magic", flip(ctl, 1), "bad_magic"),
            ("version", flip(ctl, 4), "unsupported_version"),
            ("type to an unknown one", flip(ctl, C_TYPE, 4), "malformed"),
            ("type to another known one", flip(ctl, C_TYPE, 0 if t == 4 else 1), "bad_signature"),
            ("reserved", flip(ctl, C_RESERVED + 1), "malformed"),
            ("sender", flip(ctl, C_SENDER + 9), "unknown_sender"),
            ("recipient", flip(ctl, C_RECIPIENT + 9), "wrong_recipient"),
            ("timestamp", flip(ctl, C_TIMESTAMP + 7), "bad_signature"),
            ("body_len larger", flip(ctl, C_BODYLEN + 3, 3), "truncated"),
            ("signature", flip(ctl, len(ctl) - 1), "bad_signature"),
            ("truncated inside the header", ctl[:40], "truncated"),
            ("missing the last byte", ctl[:-1], "truncated"),
            ("one extra byte", ctl + b"\x00", "malformed"),
            ("ack with a 4-byte body (forged)", ctl[:C_TYPE] + b"\x03" + ctl[C_TYPE + 1:C_BODYLEN]
             + b"\x00\x00\x00\x04" + b"\x00" * 4 + ctl[-SIG:], "bad_signature"),
        ]
        for what, data, reason in control_cases:
            with self.subTest("control: " + what):
                self.feed(before, data, reason, "control message: " + what)

        # Sequence handling: the first frame is accepted (positive control), a replay of it and
        # a frame beyond the next expected one change nothing.
        self.inject(f1)
        self.wait_sink(aws, 2, 15)
        self.assert_exactly_once(aws.sink_lines(), ["m-0", "m-1"], "after the first frame")
        after_first = self.settle(aws)
        self.assertNotEqual(after_first, before)
        self.feed(after_first, f1, "replay", "replayed frame")
        self.feed(after_first, f3, "gap", "frame beyond a gap")
        for what, data, reason in [("replay, signature flipped", flip(f1, len(f1) - 1),
                                    "bad_signature"),
                                   ("replay, truncated", f1[:-1], "truncated")]:
            self.feed(after_first, data, reason, what)
        self.inject(f2)
        self.inject(f3)
        self.wait_sink(aws, 6, 15)
        after_all = self.settle(aws)
        for what, data in (("replay of frame 2", f2), ("replay of frame 3", f3),
                           ("replay of frame 1 again", f1)):
            self.feed(after_all, data, "replay", what)
        self.assert_exactly_once(aws.sink_lines(), [f"m-{i}" for i in range(6)], "aws sink")
        # Over the link's 80 MiB message limit: ZeroMQ drops the connection; nothing changes,
        # and the link comes back and carries new messages.
        _, rej = state(aws)
        self.inject(f1[:F_CTLEN] + struct.pack(">I", (81 << 20) - F_HEADER - SIG)
                    + b"\x00" * ((81 << 20) - F_HEADER - SIG) + f1[-SIG:])
        time.sleep(0.5)
        self.assertTrue(aws.running() and aws.healthy(), "aws died on an 81 MiB message")
        self.assert_unchanged(aws, after_all, "81 MiB message")
        self.assertEqual(rejections(aws.metrics()), rej)
        CASES["link"] += 1
        px.mode = "pass"
        post_all(eu, messages(1, prefix="after"))
        self.wait_sink(aws, 7, 30)
        self.assert_exactly_once(aws.sink_lines(), [f"m-{i}" for i in range(6)] + ["after-0"],
                                 "aws sink")
        self.assertTrue(aws.running() and eu.running())

    def test_a_later_frame_first_on_a_new_link_is_a_gap(self):
        """Attack: a man in the middle holding both keys holds back the first frame of a new
        link and delivers the second; safe outcome: a gap, nothing delivered or acknowledged out
        of order, everything arrives once when the first frame comes.
        docs/wire-format.md: a frame must continue the accepted range; docs/security.md: a
        path attacker cannot "make a frame skip a sequence (gap, never acknowledged)"."""
        eu, aws, px = self.eu, self.aws, self.px
        f1, f2, f3 = self.frames
        before = self.settle(aws)
        _, rej = state(aws)
        self.inject(f2)  # covers europe's log after f1's range
        time.sleep(1.5)
        early = [l["text"] for l in aws.sink_lines()]
        now = rejections(aws.metrics())
        moved = {r: now[r] - rej[r] for r in REASONS if now[r] != rej[r]}
        px.mode = "pass"  # europe's own (re-)sends now get through
        self.wait_for(lambda: eu.metric("relay_acked_through", peer="aws") >= u(f3, F_LAST, 8),
                      20, "aws to acknowledge everything europe sent")
        time.sleep(0.5)
        CASES["link"] += 1
        self.assert_exactly_once(
            aws.sink_lines(), [f"m-{i}" for i in range(6)],
            f"aws sink (frame 2, {u(f2, F_FIRST, 8)}..{u(f2, F_LAST, 8)}, injected before frame "
            f"1, 1..{u(f1, F_LAST, 8)}: delivered at once: {early}; rejections {moved}; europe "
            f"then got ack {eu.metric('relay_acked_through', peer='aws'):.0f} and freed its queue)")
        self.assertEqual(early, [], "frame 2 was delivered before frame 1")
        self.assertEqual(moved, {"gap": 1})


# =============================================================================================
# Bundle, ack and resend-request files
# =============================================================================================
class BundleCatalogue(Catalogue):
    def setUp(self):
        super().setUp()
        eu, aws, enclave, rogue = (self.site(n) for n in ("europe", "aws", "enclave", "rogue"))
        self.eu, self.aws = eu, aws
        eu.write_config({"aws": {"site": aws}, "enclave": {"site": enclave}},
                        {CHANNEL: ["aws", "enclave"]}, zmq_listen=False)
        aws.write_config({"europe": {"site": eu}, "enclave": {"site": enclave}},
                         {CHANNEL: ["europe"]}, zmq_listen=False)
        rogue.write_config({"aws": {"site": aws}}, {CHANNEL: ["aws"]}, zmq_listen=False)
        for s in (eu, aws, rogue):
            s.start()
        self.disk = os.path.join(self.root, "disk")
        self.bad = os.path.join(self.root, "bad")
        for d in (self.disk, self.bad):
            os.makedirs(d)
        post_all(eu, messages(10, prefix="good"))
        post_all(rogue, messages(3, prefix="rogue"))
        self.good = self.export(eu, "aws")[0]
        self.foreign = self.export(eu, "enclave")[0]
        self.unknown = self.export(rogue, "aws")[0]
        rogue.kill9()
        exp = os.path.join(self.root, "exp")
        os.makedirs(exp)
        self.expired = self.export(eu, "aws", "--all", "--ttl", "1ms", out=exp)[0]
        self.ack0 = self.export(aws, "europe", "--ack")[0]            # through 0
        self.resend = self.export(aws, "europe", "--resend-request")[0]
        self.ack_other = self.export(aws, "enclave", "--ack")[0]      # for another site
        time.sleep(0.01)

    def export(self, site, peer, *extra, out=None):
        r = site.cli("export", "--config", site.conf, "--peer", peer, "--out", out or self.disk,
                     *extra)
        self.assertEqual(r.returncode, 0, r.stderr)
        files = r.stdout.split()
        self.assertTrue(files, r.stderr)
        return files

    def import_api(self, site, path):
        r = site.request("POST", "/v1/bundles/import", {"paths": [path]}, timeout=60)
        self.assertEqual(r.status, 200, r.text)
        results = r.json["results"]
        self.assertEqual(len(results), 1, r.text)
        return results[0]

    def refuse(self, site, before, path, reason, says, what):
        """Imports one file through the daemon: refused, the message says `says`, `reason` is
        counted (None: nothing is counted), nothing else changes."""
        _, rej = state(site)
        res = self.import_api(site, path)
        self.assertFalse(res["ok"], f"{what}: accepted: {res}")
        self.assertIn(says, res["message"], what)
        if reason:
            self.assertTrue(res["message"].startswith("bundle rejected: "), res["message"])
            self.wait_rejection(site, rej, reason, what, timeout=5)
        else:
            self.assertEqual(rejections(site.metrics()), rej, what)
        self.assert_unchanged(site, before, what)
        CASES["bundle"] += 1

    def header_cases(self, data, name):
        """(what, bytes, reason, says) for each header field of a bundle, its body and signature."""
        body_len = u(data, B_BODYLEN, 8)
        low = body_len & -body_len
        lb = low.bit_length() - 1
        zero = next(b for b in range(32) if not body_len >> b & 1)
        kind = data[B_KIND]
        other_kind = next(k for k in (1, 2, 3) if k != kind and bin(k ^ kind).count("1") == 1)
        ob = (other_kind ^ kind).bit_length() - 1
        cases = [
            ("magic", flip(data, 2), "bad_magic", "does not start with 'RLYB'"),
            ("version", flip(data, 4, 1), "unsupported_version", "format version 0"),
            ("kind to an unknown kind", flip(data, B_KIND, 6), "malformed", "unknown bundle kind"),
            (f"kind {kind} to {other_kind}", flip(data, B_KIND, ob), "bad_signature",
             "bad signature"),
            ("reserved", flip(data, B_RESERVED + 1), "malformed", "reserved field is 1"),
            ("sender", flip(data, B_SENDER + 31), "unknown_sender", "is not a configured peer"),
            ("recipient", flip(data, B_RECIPIENT), "wrong_recipient", "addressed to site"),
            ("bundle_id", flip(data, B_ID + 15), "bad_signature", "bad signature"),
            ("created_at", flip(data, B_CREATED + 7), "bad_signature", "bad signature"),
            ("created_at sign bit", flip(data, B_CREATED, 7), "bad_signature", "bad signature"),
            ("expires_at", flip(data, B_EXPIRES + 5), "bad_signature", "bad signature"),
            ("expires_at to the past", data[:B_EXPIRES] + b"\x00" * 7 + b"\x01"
             + data[B_EXPIRES + 8:], "bad_signature", "bad signature"),
            ("body_len smaller", flip(data, B_BODYLEN + 7 - lb // 8, lb % 8), "malformed",
             "trailing bytes"),
            ("body_len larger", flip(data, B_BODYLEN + 7 - zero // 8, zero % 8), "truncated",
             "truncated"),
            ("body_len over 4 GiB", flip(data, B_BODYLEN + 3, 1), "malformed",
             "more than the limit"),
            ("body_len 2^64-1", data[:B_BODYLEN] + b"\xff" * 8 + data[B_HEADER:], "malformed",
             "more than the limit"),
            ("first body byte", flip(data, B_HEADER, 3), "bad_signature", "bad signature"),
            ("last body byte", flip(data, len(data) - SIG - 1), "bad_signature", "bad signature"),
            ("first signature byte", flip(data, len(data) - SIG), "bad_signature",
             "bad signature"),
            ("last signature byte", flip(data, len(data) - 1, 7), "bad_signature",
             "bad signature"),
            ("empty file", b"", "truncated", "truncated: 0 bytes"),
            ("shorter than the magic", data[:3], "truncated", "truncated: 3 bytes"),
            ("inside the header", data[:60], "truncated", "truncated: 60 bytes, header needs 112"),
            ("header only", data[:B_HEADER], "truncated", "truncated: 112 bytes, header declares"),
            ("inside the body", data[:B_HEADER + body_len // 2], "truncated", "header declares"),
            ("missing the last byte", data[:-1], "truncated", "header declares"),
            ("one extra byte", data + b"\n", "malformed", "1 trailing bytes"),
            ("the file twice", data + data, "malformed", "trailing bytes"),
        ]
        return [(f"{name}: {w}", d, r, s) for w, d, r, s in cases]

    def test_bad_bundle_files_are_refused_by_reason_and_change_nothing(self):
        aws = self.aws
        before = self.settle(aws)
        self.assertEqual(aws.sink_count(), 0)
        good = read(self.good)
        frame = bundle_frames(self.good)[0]
        cases = self.header_cases(good, "frames bundle")
        cases += [
            ("bundle for another site", read(self.foreign), "wrong_recipient", "addressed to site"),
            ("bundle from an unknown key", read(self.unknown), "unknown_sender",
             "is not a configured peer"),
            ("a frame, not a bundle", frame, "bad_magic", "not a relay bundle"),
            ("random bytes", os.urandom(700), "bad_magic", "not a relay bundle"),
            ("a bundle of wire version 1 cut short", b"RLYB\x01", "unsupported_version",
             "format version 1 is not supported (this relay supports version 2)"),
        ]
        paths = []
        for i, (what, data, reason, says) in enumerate(cases):
            p = write(os.path.join(self.bad, f"case-{i:03d}.bundle"), data)
            paths.append(p)
            with self.subTest(what):
                self.refuse(aws, before, p, reason, says, what)
        with self.subTest("expired"):
            self.refuse(aws, before, self.expired, None, "expired at", "expired bundle")
            self.assertEqual(aws.metric("relay_bundles_expired_total"), 1)
        with self.subTest("missing file"):
            self.refuse(aws, before, os.path.join(self.bad, "nope.bundle"), None, "cannot read",
                        "missing file")
        # The real CLI: exit 1, every bad file named with REFUSED, the good one still imported.
        r = aws.cli("import", "--config", aws.conf, *paths[:5], self.expired, self.good)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        for p in paths[:5] + [self.expired]:
            self.assertRegex(r.stdout, re.escape(p) + r": REFUSED: bundle rejected: ")
        self.assertIn("imported 10 new event(s) from 'europe'", r.stdout)
        self.wait_sink(aws, 10, 15)
        CASES["bundle"] += 1

    def test_tampered_ack_and_resend_files_change_nothing(self):
        eu, aws = self.eu, self.aws
        # aws stores the good bundle and acknowledges it; europe gets tampered copies first.
        r = aws.cli("import", "--config", aws.conf, self.good)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        ack = self.export(aws, "europe", "--ack")[0]
        before = self.settle(eu)
        self.assertEqual(eu.metric("relay_queue_depth", peer="aws"), 10)
        for label, path in (("ack", ack), ("resend request", self.resend)):
            data = read(path)
            for i, (what, d, reason, says) in enumerate(self.header_cases(data, label)):
                with self.subTest(what):
                    p = write(os.path.join(self.bad, f"{label[0]}-{i:03d}.ack"), d)
                    self.refuse(eu, before, p, reason, says, what)
            for off in range(B_HEADER, len(data) - SIG):  # every body byte: the acked position
                with self.subTest(f"{label} body byte {off - B_HEADER}"):
                    p = write(os.path.join(self.bad, f"{label[0]}-body-{off}.ack"),
                              flip(data, off, (off * 3) % 8))
                    self.refuse(eu, before, p, "bad_signature", "bad signature",
                                f"{label} body byte {off - B_HEADER}")
        with self.subTest("ack for another site"):
            self.refuse(eu, before, self.ack_other, "wrong_recipient", "addressed to site",
                        "ack for another site")
        # Positive control: the real ack frees europe's queue for aws.
        r = eu.cli("import", "--config", eu.conf, ack)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("acknowledges everything through", r.stdout)
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 0, 15,
                      "the ack to free europe's queue")
        after = self.settle(eu)
        # Replays: the same ack again, under another name, and an older ack (through 0).
        copy = write(os.path.join(self.bad, "renamed-copy.bundle"), read(ack))
        for what, path, says in (("same ack again", ack, "already imported"),
                                 ("renamed copy of the ack", copy, "already imported"),
                                 ("older ack (through 0)", self.ack0, "acknowledges")):
            with self.subTest(what):
                res = self.import_api(eu, path)
                self.assertTrue(res["ok"], res)
                self.assertIn(says, res["message"])
                time.sleep(0.3)
                if says == "already imported":
                    self.assert_unchanged(eu, after, what)
                else:  # a new (stale) ack: only its id is recorded
                    self.assert_unchanged(eu, after, what, ignore=("relay_store_commits_total",))
                self.assertEqual(eu.metric("relay_queue_depth", peer="aws"), 0)
                CASES["bundle"] += 1

    def test_replayed_bundles_deliver_nothing_twice(self):
        aws = self.aws
        r = aws.cli("import", "--config", aws.conf, self.good)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_sink(aws, 10, 15)
        after = self.settle(aws)
        copy = write(os.path.join(self.bad, "copy.bundle"), read(self.good))
        holder = os.path.join(self.root, "holder")
        os.makedirs(holder)
        write(os.path.join(holder, "x.bundle"), read(self.good))
        again = os.path.join(self.root, "again")
        os.makedirs(again)
        reexport = self.export(self.eu, "aws", "--all", out=again)[0]  # same events, new bundle
        for what, path, says in (("same file", self.good, "already imported"),
                                 ("renamed copy", copy, "already imported"),
                                 ("folder holding a copy", holder, "already imported")):
            with self.subTest(what):
                res = self.import_api(aws, path)
                self.assertTrue(res["ok"], res)
                self.assertIn(says, res["message"])
                self.assert_unchanged(aws, after, what)
                CASES["replay"] += 1
        with self.subTest("re-exported bundle with the same events"):
            res = self.import_api(aws, reexport)
            self.assertTrue(res["ok"], res)
            self.assertIn("imported 0 new event(s)", res["message"])
            time.sleep(0.5)
            self.assertEqual(read(aws.sink_path()), after["sinks"][CHANNEL])
            # Dropped by their position in the sender's log (received before), counted as
            # duplicates.
            self.assertEqual(aws.metric("relay_dedup_hits_total") -
                             after["metrics"]["relay_dedup_hits_total"], 10)
            self.assert_exactly_once(aws.sink_lines(), [f"good-{i}" for i in range(10)], "sink")
            CASES["replay"] += 1
        r = aws.cli("import", "--config", aws.conf, self.good, copy)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(r.stdout.count("already imported"), 2, r.stdout)
        self.assertEqual(aws.sink_count(), 10)
        CASES["replay"] += 1


class BundleDedupExpiryTest(Catalogue):
    def test_bundle_with_already_stored_events_after_dedup_ttl(self):
        """A second bundle carrying events aws has already stored (an `export --all` made while
        the ack was on its way back, as docs/sneakernet.md suggests after a lost disk, or a
        bundle of events that also came over the link) is imported after aws's dedup_ttl.
        aws's cursor for europe already covers them; they must not be delivered again."""
        eu, aws = self.site("europe"), self.site("aws")
        eu.write_config({"aws": {"site": aws}}, {CHANNEL: ["aws"]}, zmq_listen=False)
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]}, zmq_listen=False,
                         site={"dedup_ttl": "1s"})
        eu.start()
        aws.start()
        post_all(eu, messages(5, prefix="once"))
        d1, d2 = os.path.join(self.root, "d1"), os.path.join(self.root, "d2")
        os.makedirs(d1)
        os.makedirs(d2)
        for d, extra in ((d1, []), (d2, ["--all"])):
            r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--out", d, *extra)
            self.assertEqual(r.returncode, 0, r.stderr)
        r = aws.cli("import", "--config", aws.conf, d1)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_sink(aws, 5, 15)
        ack = aws.cli("export", "--config", aws.conf, "--peer", "europe", "--ack", "--out", d1)
        self.assertIn(".ack", ack.stdout)
        time.sleep(2.0)  # past aws's dedup_ttl
        r = aws.cli("import", "--config", aws.conf, d2)
        CASES["replay"] += 1
        time.sleep(1.0)
        self.assert_exactly_once(aws.sink_lines(), [f"once-{i}" for i in range(5)],
                                 f"aws sink after the second bundle ({r.stdout.strip()})")


# =============================================================================================
# File names: '..', hostile names, planted symlinks, FIFOs
# =============================================================================================
NAME = re.compile(r"^(europe|aws)-to-(aws|europe)-\d{17}-\d+\.(bundle|ack|resend)$")


class PathCatalogue(Catalogue):
    def pair(self, auto=None):
        eu, aws = self.site("europe"), self.site("aws")
        self.shared = os.path.join(self.root, "transfer")
        self.outside = os.path.join(self.root, "outside")
        for d in (self.shared, self.outside):
            os.makedirs(d)
        keys = {"files_dir": self.shared, "files_auto": "true", "files_interval": "200ms"}
        eu.write_config({"aws": {"site": aws}}, {CHANNEL: ["aws"]}, zmq_listen=False)
        aws.write_config({"europe": {"site": eu, "keys": keys if auto else {}}},
                         {CHANNEL: ["europe"]}, zmq_listen=False)
        return eu, aws

    def test_export_and_import_paths_stay_inside_their_folders(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        post_all(eu, messages(4, prefix="p"))
        usb, usb2 = os.path.join(self.root, "usb"), os.path.join(self.root, "usb2")
        os.makedirs(os.path.join(usb, "sub"))
        os.makedirs(usb2)
        write(os.path.join(self.root, "afile"), b"x")
        cases = [  # (what, args, expected exit code, folder the files must land in, stderr says)
            ("--out with sub/..", ["--peer", "aws", "--out", os.path.join(usb, "sub", "..")], 0,
             usb, None),
            ("--out with ../usb2", ["--peer", "aws", "--all", "--out",
                                    os.path.join(usb, "..", "usb2")], 0, usb2, None),
            ("--out through a missing folder", ["--peer", "aws", "--all", "--out",
                                                os.path.join(self.root, "nope", "..", "usb")], 1,
             None, "does not exist"),
            ("--out is a file", ["--peer", "aws", "--all", "--out",
                                 os.path.join(self.root, "afile")], 1, None, "does not exist"),
            ("--peer ../aws", ["--peer", "../aws", "--out", usb], 1, None, "unknown peer '../aws'"),
            ("--peer aws/../aws", ["--peer", "aws/../aws", "--out", usb], 1, None,
             "unknown peer"),
            ("--peer with a slash", ["--peer", "/tmp/x", "--all", "--out", usb], 1, None,
             "unknown peer"),
        ]
        for what, args, code, folder, says in cases:
            with self.subTest(what):
                t0 = tree(self.root)
                r = eu.cli("export", "--config", eu.conf, *args)
                self.assertEqual(r.returncode, code, f"{what}: {r.stdout}{r.stderr}")
                if says:
                    self.assertIn(says, r.stderr)
                t1 = tree(self.root)
                new = sorted(set(t1) - set(t0))
                changed = sorted(k for k in t0 if k in t1 and t0[k] != t1[k])
                self.assertEqual(changed, [], what)
                if folder is None:
                    self.assertEqual(new, [], f"{what}: wrote {new}")
                else:
                    self.assertTrue(new, f"{what}: nothing written")
                    for rel in new:
                        p = os.path.join(self.root, rel)
                        self.assertEqual(os.path.dirname(os.path.realpath(p)),
                                         os.path.realpath(folder), f"{what}: {rel}")
                        self.assertRegex(os.path.basename(rel), NAME)
                    self.assertEqual(sorted(os.path.realpath(x) for x in r.stdout.split()),
                                     sorted(os.path.realpath(os.path.join(self.root, x))
                                            for x in new))
                CASES["paths"] += 1
        exported = sorted(os.path.join(usb, x) for x in os.listdir(usb) if x.endswith(".bundle"))
        self.assertEqual(len(exported), 1)
        # Import paths with '..' are only read: nothing is written outside data_dir.
        t0 = tree(self.root)
        dotted = os.path.join(usb, "sub", "..", "..", "usb", os.path.basename(exported[0]))
        r = aws.cli("import", "--config", aws.conf, dotted)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_sink(aws, 4, 15)
        t1 = tree(self.root)
        self.assertEqual({k for k in set(t0) | set(t1) if t0.get(k) != t1.get(k)},
                         {os.path.join("aws", "war-room.jsonl")})
        CASES["paths"] += 1
        # Hostile names in a folder given to `relay import`: refused or skipped by name, each
        # named on its own line; the rest of the folder still imports.
        hostile = os.path.join(self.root, "hostile")
        os.makedirs(hostile)
        names = ["x\nREFUSED: fake line.bundle", "-rf.bundle", "a b\tc.bundle",
                 "\u00e9\u2603\u202e.bundle", "n" * 248 + ".bundle", "--all.bundle",
                 "..bundle"]
        for n in names:
            write(os.path.join(hostile, n), b"RLYB\x02" + b"\x00" * 50)
        os.makedirs(os.path.join(hostile, "dir.bundle"))
        os.symlink("/dev/null", os.path.join(hostile, "devnull.bundle"))
        os.symlink(self.outside, os.path.join(hostile, "outside.bundle"))
        write(os.path.join(hostile, ".tmp-half.bundle"), b"RLYB")
        write(os.path.join(hostile, ".bundle"), b"RLYB")  # a dot file: no extension
        t0 = tree(self.root)
        r = aws.cli("import", "--config", aws.conf, hostile)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        for n in names:
            # Printed with control characters escaped (\xNN): a name cannot forge a line.
            self.assertIn(printable(os.path.join(hostile, n)) +
                          ": REFUSED: bundle rejected: truncated", r.stdout)
            CASES["paths"] += 1
        for skipped in ("dir.bundle", "devnull.bundle", "outside.bundle", ".tmp-half.bundle",
                        "/.bundle"):
            self.assertNotIn(skipped + ":", r.stdout)
            CASES["paths"] += 1
        self.assertEqual(tree(self.root), t0, "import of hostile names wrote something")
        self.assertEqual(aws.sink_count(), 4)

    def plant(self, folder, names, target, seconds=6.0):
        """Symlinks at the temporary and final names an export started in the next `seconds`
        would use (the names hold the UTC time in ms: docs/sneakernet.md)."""
        start = int(time.time() * 1000)
        n = 0
        for ms in range(start, start + int(seconds * 1000)):
            stamp = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
            compact = stamp.strftime("%Y%m%d%H%M%S") + f"{ms % 1000:03d}"
            for name in names:
                os.symlink(target, os.path.join(folder, name.format(compact)))
                n += 1
        return n

    def test_export_does_not_follow_a_symlink_planted_at_its_temporary_name(self):
        """Whoever can write to the transfer folder (docs/sneakernet.md: "a folder that a
        cross-domain solution or a person synchronises") plants symlinks at the predictable
        temporary names of the next exports; the export must not write through them."""
        eu, aws = self.pair()
        eu.start()
        aws.start()
        post_all(eu, messages(3, prefix="s"))
        victim = os.path.join(self.outside, "victim")
        self.plant(self.shared, [".tmp-europe-to-aws-{}-1.bundle", ".tmp-aws-to-europe-{}-1.ack"],
                   victim)
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--out", self.shared)
        r2 = aws.cli("export", "--config", aws.conf, "--peer", "europe", "--ack", "--out",
                     self.shared)
        CASES["paths"] += 2
        written = r.stdout.split() + r2.stdout.split()
        size = os.path.getsize(victim) if os.path.exists(victim) else 0
        self.assertFalse(os.path.lexists(victim),
                         f"the export wrote {size} bytes outside its folder, to {victim}, through "
                         f"a planted symlink (exit codes {r.returncode}, {r2.returncode}; files "
                         f"{written})")
        for f in written:
            if os.path.islink(f):
                self.fail(f"{f} is a symlink to {os.readlink(f)}")

    def test_final_name_symlink_is_replaced_not_followed(self):
        eu, aws = self.pair()
        eu.start()
        post_all(eu, messages(2, prefix="f"))
        victim = os.path.join(self.outside, "victim-final")
        self.plant(self.shared, ["europe-to-aws-{}-1.bundle"], victim, seconds=4.0)
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--out", self.shared)
        self.assertEqual(r.returncode, 0, r.stderr)
        CASES["paths"] += 1
        self.assertFalse(os.path.lexists(victim))
        for f in r.stdout.split():
            self.assertFalse(os.path.islink(f))

    def hostile_auto_folder(self):
        """Hostile entries named like europe's files in aws's files_auto folder."""
        p = os.path.join(self.shared, "europe-to-aws-")
        write(p + "zero.bundle", b"")
        write(p + "junk.bundle", os.urandom(300))
        write(p + "a b\u00e9\u202e.bundle", b"RLYB\x02")
        write(p + "n" * 200 + ".bundle", b"RLYB")
        os.makedirs(p + "dir.bundle")
        os.makedirs(p + "..")
        os.symlink("/dev/null", p + "devnull.bundle")
        os.symlink(self.outside, p + "outside-dir.bundle")
        os.symlink(os.path.join(self.outside, "dangling"), p + "dangling.bundle")
        return 9

    def test_hostile_entries_in_a_files_auto_folder(self):
        eu, aws = self.pair(auto=True)
        eu.start()
        post_all(eu, messages(5, prefix="auto"))
        n = self.hostile_auto_folder()
        t_out = tree(self.outside)
        aws.start()
        time.sleep(1.0)
        self.assertTrue(aws.healthy())
        # The good bundle still imports after the hostile entries.
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--out", self.root)
        self.assertEqual(r.returncode, 0, r.stderr)
        good = r.stdout.split()[0]
        os.rename(good, os.path.join(self.shared, os.path.basename(good)))
        self.wait_sink(aws, 5, 20)
        time.sleep(0.6)
        CASES["paths"] += n
        self.assertEqual(tree(self.outside), t_out, "something was written outside the folder")
        self.assertEqual(aws.sink_count(), 5)
        log = aws.log_text()
        self.assertGreaterEqual(log.count("refused: bundle rejected"), 4, log[-3000:])
        # What aws wrote into the folder has its own names only.
        own = [x for x in os.listdir(self.shared) if x.startswith("aws-")]
        self.assertTrue(own, "aws wrote no ack into the folder")
        for x in own:
            self.assertRegex(x, NAME)
        self.assertTrue(aws.running() and aws.healthy())
        self.assertEqual(aws.stop(timeout=15), 0)

    def test_file_name_in_files_auto_folder_cannot_forge_log_lines(self):
        eu, aws = self.pair(auto=True)
        forged = "2026-01-01T00:00:00.000Z info: files_dir: FORGED imported 999 new event(s)"
        write(os.path.join(self.shared, "europe-to-aws-x\n" + forged + "\n.bundle"), b"RLYB")
        aws.start()
        self.wait_for(lambda: "refused" in aws.log_text(), 10, "the file to be refused")
        CASES["paths"] += 1
        lines = aws.log_text().splitlines()
        self.assertNotIn(forged, lines, "a file name wrote a line of its own into the log")

    def test_fifo_in_files_auto_folder_does_not_block_the_daemon(self):
        """A FIFO named like a peer's file (anyone who can write to the transfer folder can make
        one) must be refused, not opened for reading (which waits for a writer for ever)."""
        eu, aws = self.pair(auto=True)
        eu.start()
        post_all(eu, messages(3, prefix="fifo"))
        fifo = os.path.join(self.shared, "europe-to-aws-0-fifo.bundle")
        os.mkfifo(fifo)
        aws.start()
        time.sleep(1.0)
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--out", self.root)
        self.assertEqual(r.returncode, 0, r.stderr)
        good = r.stdout.split()[0]
        os.rename(good, os.path.join(self.shared, os.path.basename(good)))
        CASES["paths"] += 1
        try:
            imported = wait_for(lambda: aws.sink_count() >= 3, 6)
            self.assertTrue(imported, "a FIFO in files_dir stopped the automatic import: the "
                            "bundle placed after it was not imported within 6 s")
            t0 = time.monotonic()
            try:
                rc = aws.stop(timeout=10)
            except AssertionError as e:
                self.fail(f"{e} (the maintenance thread is blocked opening the FIFO)")
            self.assertEqual(rc, 0)
            self.assertLess(time.monotonic() - t0, 10)
        finally:
            # Unblock a reader stuck in open() so the daemon can be cleaned up.
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
