"""Harness for the relay integration tests: real `relay` daemons on loopback.

Standard library only. The binary is taken from $RELAY_BIN (CTest sets it), or else
<repo>/build/relay/relay. Every test gets its own root folder; every site lives in a sub-folder
of it (key file, config, data_dir, JSONL sinks, relay.log). The root is removed when the test
ends unless $RELAY_KEEP is set ($RELAY_KEEP_LOGS=DIR keeps only the daemons' logs, in DIR); when a test fails, the tail of each site's log is printed.

Typical use:

    class MyTest(RelayTestCase):
        def test_x(self):
            eu, aws = self.pair()            # europe dials aws, channel war-room both ways
            eu.start(); aws.start()
            st, body = eu.post({"channel": "war-room", "author": "a", "text": "hi"})
            self.wait_for(lambda: len(aws.sink_lines("war-room")) == 1, 30, "delivery")
"""
import atexit
import base64
import ctypes
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CHANNEL = "war-room"

# Ports are chosen below the kernel's ephemeral range, so that the local port of some outgoing
# connection (ZeroMQ dials, HTTP clients) cannot take a port between our choice and the bind.
def _port_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph_lo = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        eph_lo = 32768
    if eph_lo > 12000:
        return max(10000, eph_lo - 12000), eph_lo - 1
    return 1025, 65535  # no room below the ephemeral range: rely on the bind test


_PORT_LO, _PORT_HI = _port_range()
_used_ports = set()
_port_lock = threading.Lock()
_rng = random.Random(os.getpid() ^ int(time.time() * 1000))


def source_bin():
    """The binary named by $RELAY_BIN (or <repo>/build/relay/relay), as an absolute path."""
    return os.path.abspath(os.environ.get("RELAY_BIN")
                           or os.path.join(REPO, "build", "relay", "relay"))


_snapshot = None
_snapshot_lock = threading.Lock()


def _take_snapshot(src, wait):
    """Copies the binary once it has not changed for a moment and runs; None if it never
    settles within `wait` seconds."""
    end = time.time() + wait
    while time.time() < end:
        try:
            st = os.stat(src)
        except OSError:
            time.sleep(0.5)
            continue
        if not os.access(src, os.X_OK) or time.time() - st.st_mtime < 2:
            time.sleep(0.5)  # being (re)linked right now
            continue
        folder = tempfile.mkdtemp(prefix="relay-bin-")
        dst = os.path.join(folder, "relay")
        try:
            shutil.copy2(src, dst)
            st2 = os.stat(src)
            ok = (st2.st_mtime, st2.st_size) == (st.st_mtime, st.st_size)
            ok = ok and subprocess.run([dst, "--help"], capture_output=True,
                                       timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            atexit.register(shutil.rmtree, folder, True)
            return dst
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.5)
    return None


def relay_bin(wait=180):
    """Path of the relay binary the tests run.

    Other people may rebuild the binary while the suite runs; a test whose sites ran two
    different builds would fail for no fault of either. So the first call copies the binary
    (once it is complete) and every later call returns that snapshot. RELAY_NO_SNAPSHOT=1 runs
    $RELAY_BIN directly."""
    global _snapshot
    with _snapshot_lock:
        if _snapshot and os.path.exists(_snapshot):
            return _snapshot
        src = source_bin()
        if os.environ.get("RELAY_NO_SNAPSHOT"):
            end = time.time() + wait
            while not (os.path.isfile(src) and os.access(src, os.X_OK)):
                if time.time() > end:
                    raise RuntimeError(f"relay binary not found at {src} (set RELAY_BIN)")
                time.sleep(0.5)
            return src
        snap = _take_snapshot(src, wait)
        if snap is None:
            raise RuntimeError(f"no usable relay binary at {src} within {wait}s (set RELAY_BIN)")
        _snapshot = snap
        return snap


# Test modules run in parallel (ctest -j): a port handed out here is also claimed in a folder
# shared by every test process (a file per port, created exclusively), so two processes never
# pick the same port between their bind test and the daemon's bind. The claims of a process are
# removed when it exits; those of a killed one only keep their ports out of use.
_CLAIMS = os.path.join(tempfile.gettempdir(), f"relay-it-ports-{os.getuid()}")


def _release_claims():
    for port in _used_ports:
        try:
            os.unlink(os.path.join(_CLAIMS, str(port)))
        except OSError:
            pass


atexit.register(_release_claims)


def _claim(port):
    """Whether this process now holds the shared claim on `port`."""
    try:
        os.makedirs(_CLAIMS, mode=0o700, exist_ok=True)
        os.close(os.open(os.path.join(_CLAIMS, str(port)), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                         0o600))
        return True
    except FileExistsError:
        return False


def free_port():
    """A TCP port on 127.0.0.1 that is free now and was not handed out before in this or any
    other test process still running."""
    with _port_lock:
        for _ in range(500):
            port = _rng.randint(_PORT_LO, _PORT_HI)
            if port in _used_ports or not _claim(port):
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                os.unlink(os.path.join(_CLAIMS, str(port)))
                continue
            finally:
                s.close()
            _used_ports.add(port)
            return port
        # Fallback: let the kernel choose.
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        _used_ports.add(port)
        return port


def forge_bin():
    """tests/tools/relay_forge (hostile bundles, frames and acks for the attack tests): from
    $RELAY_FORGE (CTest sets it), or next to the relay binary's build folder."""
    return os.environ.get("RELAY_FORGE") or os.path.join(
        os.path.dirname(os.path.dirname(source_bin())), "tests", "tools", "relay_forge")


def forge(*args, timeout=60):
    """Runs relay_forge ARGS...; raises when it fails (a test's own mistake)."""
    r = subprocess.run([forge_bin()] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"relay_forge {args[0]} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def run_cli(args, timeout=60, input=None, env=None):
    """Runs `relay ARGS...`; returns subprocess.CompletedProcess (text mode)."""
    last = None
    for _ in range(3):  # the binary may vanish for a moment while being re-linked
        try:
            return subprocess.run([relay_bin()] + [str(a) for a in args], capture_output=True,
                                  text=True, timeout=timeout, input=input, env=env)
        except (FileNotFoundError, PermissionError, OSError) as e:
            last = e
            time.sleep(1)
    raise last


def wait_for(pred, timeout, step=0.05):
    """Polls pred() until it returns a truthy value or `timeout` seconds pass; returns the last
    value. Bounded in time; the step grows a little so long waits do not spin."""
    end = time.monotonic() + timeout
    delay = step
    while True:
        v = pred()
        if v or time.monotonic() >= end:
            return v
        time.sleep(min(delay, max(0.0, end - time.monotonic())))
        delay = min(delay * 1.5, 0.5)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def series_key(name, labels=None):
    """The dict key of a sample: `name` or `name{a="x",b="y"}` with labels sorted by name."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


class Metrics(dict):
    """Prometheus text parsed into {series_key: float}; .types maps family -> type."""

    def __init__(self, text):
        super().__init__()
        self.types = {}
        self.text = text
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 4 and parts[1] == "TYPE":
                    self.types[parts[2]] = parts[3].strip()
                continue
            m = _SAMPLE.match(line)
            if not m:
                raise ValueError(f"not a Prometheus sample line: {line!r}")
            name, labels_text, value = m.groups()
            labels = {}
            if labels_text:
                pos = 0
                while pos < len(labels_text):
                    lm = _LABEL.match(labels_text, pos)
                    if not lm or lm.end() == pos:
                        raise ValueError(f"bad labels in {line!r}")
                    labels[lm.group(1)] = lm.group(2)
                    pos = lm.end()
            self[series_key(name, labels)] = float(value)

    def value(self, name, default=None, **labels):
        return self.get(series_key(name, labels), default)


class HttpReply:
    def __init__(self, status, body_bytes, headers):
        self.status = status
        self.raw = body_bytes
        self.headers = headers
        try:
            self.json = json.loads(body_bytes) if body_bytes else None
        except ValueError:
            self.json = None

    @property
    def text(self):
        return self.raw.decode(errors="replace")


def http_request(port, method, path, body=None, headers=None, timeout=30):
    """One request on a fresh connection. A server that answers early (413) and closes while we
    are still sending is handled: the answer is read anyway."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        try:
            conn.request(method, path, body=body, headers=hdrs)
        except (BrokenPipeError, ConnectionResetError):
            # The server may have answered before reading everything: read the answer. But a
            # connection that was never made (reset while connecting) has no answer to read.
            if conn.sock is None:
                raise
        r = conn.getresponse()
        return HttpReply(r.status, r.read(), dict(r.getheaders()))
    finally:
        conn.close()


class Site:
    """One relay site: key, config, data, sinks and log in its own folder under `root`.

    Every site has an API token (`relay token`, [ingest] token_file) that request() and post()
    send; the test root is its [site] transfer_dirs, so bundles may go to any folder of the
    test (tests of the folder rules set their own transfer_dirs)."""

    def __init__(self, root, name, keygen=True):
        self.name = name
        self.root = root
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir, exist_ok=True)
        self.key = os.path.join(self.dir, name + ".key")
        self.conf = os.path.join(self.dir, name + ".conf")
        self.data = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "relay.log")
        self.ingest_port = free_port()
        self.zmq_port = free_port()
        self.proc = None
        self._log = None
        self.pub = None
        self.channels = []
        self.token_file = os.path.join(self.dir, "ingest.token")
        r = run_cli(["token", self.token_file])
        if r.returncode != 0:
            raise RuntimeError(f"token for {name} failed ({r.returncode}): {r.stderr.strip()}")
        with open(self.token_file) as f:
            self.token = f.read().strip()
        if keygen:
            r = run_cli(["keygen", self.key])
            if r.returncode != 0:
                raise RuntimeError(f"keygen for {name} failed ({r.returncode}): {r.stderr.strip()}")
            r = run_cli(["pubkey", self.key])
            if r.returncode != 0:
                raise RuntimeError(f"pubkey for {name} failed ({r.returncode}): {r.stderr.strip()}")
            self.pub = r.stdout.strip()

    def __repr__(self):
        return f"Site({self.name}, ingest={self.ingest_port}, zmq={self.zmq_port})"

    @property
    def zmq_url(self):
        return f"tcp://127.0.0.1:{self.zmq_port}"

    # ---- configuration ---------------------------------------------------------------------
    def sink_path(self, channel=CHANNEL):
        return os.path.join(self.dir, f"{channel}.jsonl")

    def config_text(self, peers=None, channels=None, zmq_listen=True, site=None, ingest=None,
                    zmq=None, extra="", origins=None):
        """peers: {peer_name: {"site": Site, "dial": bool, "connect": URL to dial instead of the
        site's listener, "public_key": str (overrides the site's), "keys": {k: v}}}; channels: {channel: [peer names]} (or {channel: {"peers":
        [...], "keys": {...}}}); site/ingest/zmq: extra keys for those sections; origins: sites
        reached through others, {name: {"site": Site (or "public_key": str), "via": [peer
        names]}} -> [origin.NAME] sections."""
        peers = peers or {}
        channels = channels if channels is not None else {}
        lines = ["[site]", f"name = {self.name}", f"key_file = {self.key}",
                 f"data_dir = {self.data}"]
        site = dict(site or {})
        site.setdefault("transfer_dirs", self.root)
        lines += [f"{k} = {v}" for k, v in site.items() if v is not None]
        lines += ["", "[ingest]", f"listen = 127.0.0.1:{self.ingest_port}"]
        ingest = dict(ingest or {})
        if "allow_anonymous" not in ingest:
            ingest.setdefault("token_file", self.token_file)
        lines += [f"{k} = {v}" for k, v in ingest.items() if v is not None]
        lines.append("")
        if zmq_listen or zmq:
            lines.append("[zmq]")
            if zmq_listen:
                lines.append(f"listen = {self.zmq_url}")
            lines += [f"{k} = {v}" for k, v in (zmq or {}).items()]
            lines.append("")
        for pname, p in peers.items():
            key = p.get("public_key") or p["site"].pub
            lines += [f"[peer.{pname}]", f"public_key = {key}"]
            if p.get("connect"):
                lines.append(f"zmq_connect = {p['connect']}")
            elif p.get("dial"):
                lines.append(f"zmq_connect = {p['site'].zmq_url}")
            lines += [f"{k} = {v}" for k, v in p.get("keys", {}).items()]
            lines.append("")
        for oname, o in (origins or {}).items():
            key = o.get("public_key") or o["site"].pub
            lines += [f"[origin.{oname}]", f"public_key = {key}", "via = " + ", ".join(o["via"]),
                      ""]
        self.channels = []
        for cname, c in channels.items():
            if isinstance(c, dict):
                plist, ckeys = c["peers"], c.get("keys", {})
            else:
                plist, ckeys = c, {}
            self.channels.append(cname)
            lines += [f"[channel.{cname}]", "peers = " + ", ".join(plist), "sink = jsonl",
                      f"jsonl_path = {self.sink_path(cname)}"]
            lines += [f"{k} = {v}" for k, v in ckeys.items()]
            lines.append("")
        if extra:
            lines.append(extra)
        return "\n".join(lines) + "\n"

    def write_config(self, *args, **kw):
        with open(self.conf, "w") as f:
            f.write(self.config_text(*args, **kw))
        return self.conf

    # ---- process control -------------------------------------------------------------------
    def start(self, wait=True, timeout=30, env=None):
        assert not self.running(), f"{self.name} is already running"
        self._log = open(self.log_path, "ab")
        self._log.write(f"---- harness: start {time.strftime('%H:%M:%S')} ----\n".encode())
        self._log.flush()
        binary = relay_bin()
        for attempt in range(3):
            try:
                self.proc = subprocess.Popen([binary, "run", "--config", self.conf],
                                             stdout=self._log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env=env)
                break
            except OSError:
                if attempt == 2:
                    raise
                time.sleep(1)
        if wait:
            self.wait_healthy(timeout)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name}: relay exited with {self.proc.returncode} "
                                     f"before it was healthy; log:\n{self.log_tail()}")
            try:
                if http_request(self.ingest_port, "GET", "/healthz", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: /healthz not 200 within {timeout}s; log:\n"
                             f"{self.log_tail()}")

    def _signal(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _close_log(self):
        if self._log:
            self._log.close()
            self._log = None

    def stop(self, timeout=30):
        """SIGTERM to the process group; waits (bounded) and returns the exit code. If it does
        not stop in time it is killed and an AssertionError raised."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=30)
                self._close_log()
                raise AssertionError(f"{self.name}: did not stop within {timeout}s of SIGTERM")
        self._close_log()
        return self.proc.returncode

    def kill9(self):
        """SIGKILL to the whole process group, as a crash or power cut would."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._close_log()
        return self.proc.returncode

    def restart(self, timeout=30):
        self.stop()
        return self.start(timeout=timeout)

    # ---- HTTP --------------------------------------------------------------------------------
    def auth(self, headers=None):
        """`headers` plus this site's "Authorization: Bearer <token>" (unless they set one)."""
        h = dict(headers or {})
        if "Authorization" not in h:
            h["Authorization"] = "Bearer " + self.token
        return h

    def request(self, method, path, body=None, headers=None, timeout=30, token=True):
        """One request on a fresh connection, with the site's token unless token=False (or
        `headers` carry their own Authorization)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        if token:
            headers = self.auth(headers)
        return http_request(self.ingest_port, method, path, body, headers, timeout)

    def post(self, body, timeout=30):
        """POST /v1/messages with an object, a list (batch), or raw bytes/str.
        Returns (status, parsed JSON or text)."""
        r = self.request("POST", "/v1/messages", body, timeout=timeout)
        return r.status, (r.json if r.json is not None else r.text)

    def get(self, path, timeout=30):
        r = self.request("GET", path, timeout=timeout)
        return r.status, r.text

    def healthy(self):
        try:
            return self.get("/healthz", timeout=5)[0] == 200
        except OSError:
            return False

    def metrics(self):
        st, text = self.get("/metrics")
        if st != 200:
            raise AssertionError(f"{self.name}: /metrics answered {st}: {text[:200]}")
        return Metrics(text)

    def metric(self, name, default=None, **labels):
        return self.metrics().value(name, default, **labels)

    # ---- sinks and logs ----------------------------------------------------------------------
    def sink_lines(self, channel=CHANNEL):
        """Parsed complete lines of the channel's JSONL sink (a trailing partial line, being
        written right now, is ignored; any other unparsable line is an error)."""
        try:
            with open(self.sink_path(channel), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        chunks = data.split(b"\n")
        for i, raw in enumerate(chunks):
            if i == len(chunks) - 1:
                break  # after the last newline: empty or a partial line
            if not raw.strip():
                raise AssertionError(f"{self.name}: empty line {i + 1} in {channel} sink")
            try:
                out.append(json.loads(raw))
            except ValueError:
                raise AssertionError(f"{self.name}: line {i + 1} of {channel} sink is not JSON: "
                                     f"{raw[:200]!r}")
        return out

    def sink_count(self, channel=CHANNEL):
        try:
            with open(self.sink_path(channel), "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def cli(self, *args, timeout=60):
        return run_cli(list(args), timeout=timeout)


def messages(n, channel=CHANNEL, author="alice", prefix="m", start=0, ids=False, **extra):
    """n message objects with texts f"{prefix}-{i}" (and client ids of the same value)."""
    out = []
    for i in range(start, start + n):
        m = {"channel": channel, "author": author, "text": f"{prefix}-{i}"}
        if ids:
            m["id"] = f"{prefix}-{i}"
        m.update(extra)
        out.append(m)
    return out


def post_all(site, msgs, batch=100, timeout=30):
    """Posts msgs in batches; every batch must answer 202. Returns the event ids in order."""
    ids = []
    for i in range(0, len(msgs), batch):
        st, body = site.post(msgs[i:i + batch], timeout=timeout)
        if st != 202:
            raise AssertionError(f"{site.name}: batch at {i} answered {st}: {body!r:.300}")
        ids += [x["id"] for x in body]
    return ids


# ---- CurveZMQ over libsodium: a man in the middle that holds both sites' keys ----------------
class CurveError(Exception):
    """A CURVE handshake or message that did not verify, or an ERROR command from the peer."""


class Sodium:
    """The few libsodium functions CurveZMQ needs, through ctypes (the tests use the standard
    library only; libsodium.so.23 is relay's own dependency)."""

    _lib = None
    _lock = threading.Lock()

    @classmethod
    def lib(cls):
        with cls._lock:
            if cls._lib is None:
                lib = ctypes.CDLL("libsodium.so.23")
                if lib.sodium_init() < 0:
                    raise RuntimeError("sodium_init failed")
                u64 = ctypes.c_ulonglong
                p = ctypes.c_char_p
                for name, args in (("crypto_box_keypair", [p, p]),
                                   ("crypto_scalarmult_base", [p, p]),
                                   ("crypto_box_easy", [p, p, u64, p, p, p]),
                                   ("crypto_box_open_easy", [p, p, u64, p, p, p]),
                                   ("crypto_box_beforenm", [p, p, p]),
                                   ("crypto_box_easy_afternm", [p, p, u64, p, p]),
                                   ("crypto_box_open_easy_afternm", [p, p, u64, p, p]),
                                   ("crypto_secretbox_easy", [p, p, u64, p, p]),
                                   ("crypto_secretbox_open_easy", [p, p, u64, p, p])):
                    getattr(lib, name).argtypes = args
                    getattr(lib, name).restype = ctypes.c_int
                lib.randombytes_buf.argtypes = [p, ctypes.c_size_t]
                lib.randombytes_buf.restype = None
                cls._lib = lib
            return cls._lib

    @classmethod
    def random(cls, n):
        out = ctypes.create_string_buffer(n)
        cls.lib().randombytes_buf(out, n)
        return out.raw

    @classmethod
    def keypair(cls):
        pk, sk = ctypes.create_string_buffer(32), ctypes.create_string_buffer(32)
        cls.lib().crypto_box_keypair(pk, sk)
        return pk.raw, sk.raw

    @classmethod
    def public_key(cls, sk):
        pk = ctypes.create_string_buffer(32)
        if cls.lib().crypto_scalarmult_base(pk, sk) != 0:
            raise ValueError("unusable X25519 secret key")
        return pk.raw

    @classmethod
    def box(cls, m, n, pk, sk):
        c = ctypes.create_string_buffer(len(m) + 16)
        cls.lib().crypto_box_easy(c, m, len(m), n, pk, sk)
        return c.raw

    @classmethod
    def box_open(cls, c, n, pk, sk):
        if len(c) < 16:
            return None
        m = ctypes.create_string_buffer(max(1, len(c) - 16))
        if cls.lib().crypto_box_open_easy(m, c, len(c), n, pk, sk) != 0:
            return None
        return m.raw[:len(c) - 16]

    @classmethod
    def beforenm(cls, pk, sk):
        k = ctypes.create_string_buffer(32)
        cls.lib().crypto_box_beforenm(k, pk, sk)
        return k.raw

    @classmethod
    def box_afternm(cls, m, n, k):
        c = ctypes.create_string_buffer(len(m) + 16)
        cls.lib().crypto_box_easy_afternm(c, m, len(m), n, k)
        return c.raw

    @classmethod
    def box_open_afternm(cls, c, n, k):
        if len(c) < 16:
            return None
        m = ctypes.create_string_buffer(max(1, len(c) - 16))
        if cls.lib().crypto_box_open_easy_afternm(m, c, len(c), n, k) != 0:
            return None
        return m.raw[:len(c) - 16]

    @classmethod
    def secretbox(cls, m, n, k):
        c = ctypes.create_string_buffer(len(m) + 16)
        cls.lib().crypto_secretbox_easy(c, m, len(m), n, k)
        return c.raw


def box_keypair(key_file):
    """(box_pk, box_sk) of a relay key file: the X25519 secret is bytes 32..64 of line 2
    (docs/wire-format.md, "Key file")."""
    with open(key_file) as f:
        line = f.read().split("\n")[1]
    enc = line.split(" ", 1)[1].strip()
    raw = base64.urlsafe_b64decode(enc + "=" * (-len(enc) % 4))
    sk = raw[32:64]
    return Sodium.public_key(sk), sk


def _zmtp_frame(flags, body):
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags & ~0x02]) + bytes([len(body)]) + body


def _properties(**props):
    out = b""
    for name, value in props.items():
        name = name.replace("_", "-").encode()
        out += bytes([len(name)]) + name + struct.pack(">I", len(value)) + value
    return out


class CurveConnection:
    """One end of a ZMTP 3.0 connection secured with CURVE (RFC 25/26, as libzmq 4.3 speaks it):
    after server_handshake() or client_handshake(), recv() and send() carry the (ZMTP flags,
    body) of plaintext messages. Not thread-safe: one reader, and one writer at a time."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.key = None
        self.send_nonce = 0
        self.send_prefix = self.recv_prefix = b""
        self.peer_key = None  # the other side's long-term key, learned by server_handshake

    def _need(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(max(65536, n - len(self.buf)))
            if not data:
                raise EOFError("connection closed")
            self.buf.extend(data)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _read_frame(self):
        flags = self._need(1)[0]
        size = struct.unpack(">Q", self._need(8))[0] if flags & 0x02 else self._need(1)[0]
        return flags, self._need(size)

    def _command(self, expect):
        flags, body = self._read_frame()
        if not flags & 0x04:
            raise CurveError(f"expected the {expect} command, got a message")
        if body.startswith(b"\x05ERROR"):
            raise CurveError(f"ERROR from the peer: {body[7:7 + body[6]].decode(errors='replace')}")
        name = bytes([len(expect)]) + expect.encode()
        if not body.startswith(name):
            raise CurveError(f"expected {expect}, got {body[:12]!r}")
        return body

    def _greeting(self, as_server):
        self.sock.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00")
                          + bytes([1 if as_server else 0]) + b"\x00" * 31)
        peer = self._need(64)
        if peer[0] != 0xff or peer[9] != 0x7f or peer[10] < 3:
            raise CurveError(f"not a ZMTP 3 greeting: {peer[:12]!r}")
        if peer[12:32].rstrip(b"\x00") != b"CURVE":
            raise CurveError(f"the peer offers mechanism {peer[12:32].rstrip(bytes(1))!r}")

    def _nonce8(self):
        self.send_nonce += 1
        return struct.pack(">Q", self.send_nonce)

    def server_handshake(self, server_pk, server_sk):
        """Acts as the CURVE server with the long-term key pair (server_pk, server_sk); returns
        the client's long-term public key (which a ZAP handler would check)."""
        self._greeting(True)
        hello = self._command("HELLO")
        if len(hello) != 200:
            raise CurveError(f"HELLO of {len(hello)} bytes")
        client_eph = hello[80:112]
        if Sodium.box_open(hello[120:200], b"CurveZMQHELLO---" + hello[112:120], client_eph,
                           server_sk) is None:
            raise CurveError("HELLO does not open: the client uses another server key")
        eph_pk, eph_sk = Sodium.keypair()
        cookie_key, cookie_nonce = Sodium.random(32), Sodium.random(16)
        cookie = cookie_nonce + Sodium.secretbox(client_eph + eph_sk, b"COOKIE--" + cookie_nonce,
                                                 cookie_key)
        wn = Sodium.random(16)
        self.sock.sendall(_zmtp_frame(0x04, b"\x07WELCOME" + wn + Sodium.box(
            eph_pk + cookie, b"WELCOME-" + wn, client_eph, server_sk)))
        init = self._command("INITIATE")
        if init[9:105] != cookie:
            raise CurveError("INITIATE carries another cookie")
        plain = Sodium.box_open(init[113:], b"CurveZMQINITIATE" + init[105:113], client_eph, eph_sk)
        if plain is None or len(plain) < 128:
            raise CurveError("INITIATE does not open")
        client_pk = plain[:32]
        vouch = Sodium.box_open(plain[48:128], b"VOUCH---" + plain[32:48], client_pk, eph_sk)
        if vouch != client_eph + server_pk:
            raise CurveError("INITIATE's vouch does not prove the client's key")
        self.key = Sodium.beforenm(client_eph, eph_sk)
        self.send_prefix, self.recv_prefix = b"CurveZMQMESSAGES", b"CurveZMQMESSAGEC"
        n = self._nonce8()
        self.sock.sendall(_zmtp_frame(0x04, b"\x05READY" + n + Sodium.box_afternm(
            _properties(Socket_Type=b"ROUTER"), b"CurveZMQREADY---" + n, self.key)))
        self.peer_key = client_pk
        return client_pk

    def client_handshake(self, server_pk, client_pk, client_sk, socket_type=b"DEALER"):
        """Acts as a CURVE client with the long-term key pair (client_pk, client_sk) towards a
        server whose key is server_pk. CurveError when the server refuses (ERROR) or lies."""
        self._greeting(False)
        eph_pk, eph_sk = Sodium.keypair()
        n = self._nonce8()
        self.sock.sendall(_zmtp_frame(0x04, b"\x05HELLO\x01\x00" + b"\x00" * 72 + eph_pk + n
                                      + Sodium.box(b"\x00" * 64, b"CurveZMQHELLO---" + n,
                                                   server_pk, eph_sk)))
        welcome = self._command("WELCOME")
        plain = Sodium.box_open(welcome[24:], b"WELCOME-" + welcome[8:24], server_pk, eph_sk)
        if len(welcome) != 168 or plain is None:
            raise CurveError("WELCOME does not open: the server does not hold server_pk's key")
        server_eph, cookie = plain[:32], plain[32:128]
        vn = Sodium.random(16)
        vouch = Sodium.box(eph_pk + server_pk, b"VOUCH---" + vn, server_eph, client_sk)
        n = self._nonce8()
        meta = _properties(Socket_Type=socket_type, Identity=b"")
        self.sock.sendall(_zmtp_frame(0x04, b"\x08INITIATE" + cookie + n + Sodium.box(
            client_pk + vn + vouch + meta, b"CurveZMQINITIATE" + n, server_eph, eph_sk)))
        ready = self._command("READY")
        self.key = Sodium.beforenm(server_eph, eph_sk)
        if Sodium.box_open_afternm(ready[14:], b"CurveZMQREADY---" + ready[6:14], self.key) is None:
            raise CurveError("READY does not open")
        self.send_prefix, self.recv_prefix = b"CurveZMQMESSAGEC", b"CurveZMQMESSAGES"

    def recv(self):
        """(flags, body) of the next message: ZMTP flags 0x01 more, 0x04 command."""
        _, body = self._read_frame()
        if body.startswith(b"\x05ERROR"):
            raise CurveError(f"ERROR from the peer: {body[7:7 + body[6]].decode(errors='replace')}")
        if not body.startswith(b"\x07MESSAGE") or len(body) < 33:
            raise CurveError(f"expected a MESSAGE, got {body[:12]!r}")
        plain = Sodium.box_open_afternm(body[16:], self.recv_prefix + body[8:16], self.key)
        if plain is None:
            raise CurveError("a MESSAGE box does not open")
        inner = plain[0]
        return (0x01 if inner & 0x01 else 0) | (0x04 if inner & 0x02 else 0), plain[1:]

    def send(self, flags, body):
        inner = (0x01 if flags & 0x01 else 0) | (0x02 if flags & 0x04 else 0)
        n = self._nonce8()
        self.sock.sendall(_zmtp_frame(0, b"\x07MESSAGE" + n + Sodium.box_afternm(
            bytes([inner]) + body, self.send_prefix + n, self.key)))

    def send_framed(self, framed):
        """Sends a message given as a plaintext ZMTP frame (what ZmtpProxy.encode returns)."""
        flags = framed[0]
        self.send(flags, framed[9:] if flags & 0x02 else framed[2:])


class ZmtpProxy:
    """A man in the middle of one ZeroMQ link (dialer -> proxy -> listener) that terminates the
    link's CURVE security on both sides: it holds the listener's key file (to be the listener
    towards the dialer) and the dialer's (to authenticate as the dialer towards the listener),
    as someone who stole both keys could. So a test can tamper with, truncate, record and replay
    relay frames (messages starting with b"RLYF") on a live connection and check the frame-level
    defences behind CURVE.

    mode: "pass" (forward unchanged), "flip" (flip the last byte of every frame: the
    signature), "truncate" (drop the last 100 bytes of every frame), "drop" (swallow frames).
    Every frame seen is recorded in .frames; inject(body) sends a message to the listener on
    the current connection(s). encode(flags, body) is the hook every message to the listener
    passes through (forwarded or injected); it returns the message as a plaintext ZMTP frame.
    .errors lists handshakes that failed (e.g. the listener refused the dialer's key)."""

    def __init__(self, target_port, listener_key, dialer_key):
        self.target_port = target_port
        self.listener_pk, self._listener_sk = box_keypair(listener_key)
        self.dialer_pk, self._dialer_sk = box_keypair(dialer_key)
        self.port = free_port()
        self.mode = "pass"
        self.frames = []
        self.errors = []
        self.lock = threading.Lock()
        self._upstreams = []      # CurveConnections towards the listener, for inject()
        self._socks = []
        self._stop = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self):
        return f"tcp://127.0.0.1:{self.port}"

    def close(self):
        self._stop = True
        with self.lock:
            socks = list(self._socks)
        for s in socks + [self._listener]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _shut(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _serve(self, client):
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            client.close()
            return
        with self.lock:
            self._socks += [client, server]
        up, down = CurveConnection(server), CurveConnection(client)
        try:
            client.settimeout(10)
            up.client_handshake(self.listener_pk, self.dialer_pk, self._dialer_sk)
            down.server_handshake(self.listener_pk, self._listener_sk)
            client.settimeout(None)
            server.settimeout(None)
        except (OSError, EOFError, CurveError) as e:
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")
            self._shut(client, server)
            return
        with self.lock:
            self._upstreams.append(up)
        t = threading.Thread(target=self._pump_up, args=(down, up), daemon=True)
        t.start()
        self._threads.append(t)
        try:  # listener -> dialer, unchanged
            while True:
                flags, body = up.recv()
                down.send(flags, body)
        except (OSError, EOFError, CurveError):
            pass
        finally:
            self._shut(client, server)

    @staticmethod
    def encode(flags, body):
        return _zmtp_frame(flags, body)

    def live(self):
        """The number of live connections (handshakes done at both ends)."""
        with self.lock:
            return len(self._upstreams)

    def inject(self, body):
        """Sends one single-part message to the listener on every live connection."""
        with self.lock:
            ups = list(self._upstreams)
            for up in ups:
                try:
                    up.send_framed(self.encode(0, body))
                except OSError:
                    pass
        return len(ups)

    def _pump_up(self, down, up):
        try:
            while True:
                flags, body = down.recv()
                if not flags & 0x04 and body[:4] == b"RLYF":
                    with self.lock:
                        self.frames.append(body)
                        mode = self.mode
                        # Hold the lock while sending so inject() cannot split a message.
                        if mode == "flip":
                            body = body[:-1] + bytes([body[-1] ^ 0x01])
                        elif mode == "truncate":
                            body = body[:-100]
                        if mode != "drop":
                            up.send_framed(self.encode(flags, body))
                    continue
                with self.lock:
                    up.send_framed(self.encode(flags, body))
        except (OSError, EOFError, CurveError):
            pass
        finally:
            with self.lock:
                if up in self._upstreams:
                    self._upstreams.remove(up)
            self._shut(down.sock, up.sock)


class TcpProxy:
    """A byte-level TCP proxy for one ZeroMQ link (dialer -> proxy -> listener), below CURVE:
    it records what each dialer connection sent (.sent[i], bytes in order) and can alter it:
    `tamper(index, offset, chunk)` returns the chunk to forward for bytes [offset, offset +
    len(chunk)) of connection `index` (None: forward as is)."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.port = free_port()
        self.tamper = None
        self.sent = []
        self.lock = threading.Lock()
        self._socks = []
        self._stop = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self):
        return f"tcp://127.0.0.1:{self.port}"

    def close(self):
        self._stop = True
        with self.lock:
            socks = list(self._socks)
        for s in socks + [self._listener]:
            ZmtpProxy._shut(s)
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self._socks += [client, server]
                index = len(self.sent)
                self.sent.append(bytearray())
            for target in (lambda: self._pump(server, client, None),
                           lambda: self._pump(client, server, index)):
                t = threading.Thread(target=target, daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src, dst, index):
        offset = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if index is not None:
                    with self.lock:
                        self.sent[index].extend(data)
                        tamper = self.tamper
                    if tamper is not None:
                        data = tamper(index, offset, data)
                    offset += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            ZmtpProxy._shut(src, dst)


class RelayTestCase(unittest.TestCase):
    """Gives each test its own root folder and cleans up the sites it created."""

    maxDiff = 4000

    def setUp(self):
        short = self.id().split(".")[-1][:40]
        base = os.environ.get("RELAY_TEST_TMP") or None
        self.root = tempfile.mkdtemp(prefix=f"relay-it-{short}-", dir=base)
        self.sites = []
        self.proxies = []

    def tearDown(self):
        for p in self.proxies:
            try:
                p.close()
            except Exception as e:
                print(f"cleanup of a proxy: {e}", file=sys.stderr)
        for s in self.sites:
            try:
                s.kill9()
            except Exception as e:  # keep cleaning the others
                print(f"cleanup of {s.name}: {e}", file=sys.stderr)

    def run(self, result=None):
        if result is None:
            result = self.defaultTestResult()
        def bad():
            return (len(result.failures) + len(result.errors)
                    + len(getattr(result, "unexpectedSuccesses", [])))
        before = bad()
        try:
            return super().run(result)
        finally:
            failed = bad() > before
            root = getattr(self, "root", None)
            if failed:
                self.dump_logs()
            if root and os.path.isdir(root):
                if os.environ.get("RELAY_KEEP") or (failed and os.environ.get("RELAY_KEEP_FAILED")):
                    print(f"\n[kept test folder {root}]", file=sys.stderr)
                else:
                    self.keep_logs(root)
                    shutil.rmtree(root, ignore_errors=True)

    def keep_logs(self, root):
        """With $RELAY_KEEP_LOGS (a folder), copies each site's relay.log there before the test
        folder goes (the sanitizer run searches them for reports), as
        <folder>/<test folder name>/<site>/relay.log."""
        dest = os.environ.get("RELAY_KEEP_LOGS")
        if not dest:
            return
        for s in getattr(self, "sites", []):
            if os.path.exists(s.log_path):
                d = os.path.join(dest, os.path.basename(root), s.name)
                os.makedirs(d, exist_ok=True)
                shutil.copy(s.log_path, os.path.join(d, "relay.log"))

    def dump_logs(self, lines=40):
        out = [f"\n===== {self.id()} failed; site logs (last {lines} lines each) ====="]
        for s in getattr(self, "sites", []):
            out.append(f"----- {s.name} ({s.log_path}) -----")
            out.append(s.log_tail(lines) or "(empty)")
        out.append("=" * 60)
        print("\n".join(out), file=sys.stderr, flush=True)

    # ---- helpers -----------------------------------------------------------------------------
    def site(self, name, **kw):
        s = Site(self.root, name, **kw)
        self.sites.append(s)
        return s

    def proxy(self, target, dialer):
        """A ZmtpProxy in front of the target site's ZeroMQ listener, for `dialer` to dial
        (it holds both sites' keys)."""
        p = ZmtpProxy(target.zmq_port, target.key, dialer.key)
        self.proxies.append(p)
        return p

    def tcp_proxy(self, target):
        """A byte-level TcpProxy in front of the target site's ZeroMQ listener."""
        p = TcpProxy(target.zmq_port)
        self.proxies.append(p)
        return p

    def pair(self, channel=CHANNEL, dialer="europe", **cfg):
        """europe and aws, channel bridged both ways; `dialer` names the side that dials."""
        eu, aws = self.site("europe"), self.site("aws")
        eu.write_config({"aws": {"site": aws, "dial": dialer == "europe"}}, {channel: ["aws"]}, **cfg)
        aws.write_config({"europe": {"site": eu, "dial": dialer == "aws"}}, {channel: ["europe"]},
                         **cfg)
        return eu, aws

    def wait_for(self, pred, timeout, what, diag=None):
        """Like wait_for, but fails the test with `what` (and diag() if given) on timeout."""
        v = wait_for(pred, timeout)
        if not v:
            extra = ""
            if diag is not None:
                try:
                    extra = "; " + str(diag())
                except Exception as e:
                    extra = f"; (diagnostics failed: {e})"
            self.fail(f"timed out after {timeout}s waiting for {what}{extra}")
        return v

    def settle(self, sites, timeout=60):
        """Waits until no site has anything queued or undelivered, then a little longer, so
        that a late duplicate would be seen."""
        def drained():
            for s in sites:
                m = s.metrics()
                if any(v != 0 for k, v in m.items() if k.startswith("relay_queue_depth{")):
                    return False
                if m.value("relay_inbound_backlog", 0) != 0:
                    return False
            return True
        self.wait_for(drained, timeout, "every queue to drain")
        time.sleep(1.0)

    def wait_sink(self, site, count, timeout=60, channel=CHANNEL):
        """Waits until the site's sink holds at least `count` lines; returns the parsed lines."""
        self.wait_for(lambda: site.sink_count(channel) >= count, timeout,
                      f"{count} lines in {site.name}'s {channel} sink",
                      lambda: f"it has {site.sink_count(channel)}")
        return site.sink_lines(channel)

    def assert_exactly_once(self, lines, expected_texts, where):
        """The sink lines carry exactly the expected texts, each once, in this order."""
        texts = [l.get("text") for l in lines]
        ids = [l.get("id") for l in lines]
        dup_ids = len(ids) - len(set(ids))
        have, want = set(texts), set(expected_texts)
        missing = [t for t in expected_texts if t not in have]
        extra = list(have - want)
        summary = (f"{where}: {len(lines)} lines, {len(set(ids))} distinct ids, {dup_ids} duplicate "
                   f"ids, expected {len(expected_texts)}, {len(missing)} missing "
                   f"(first {missing[:5]}), {len(extra)} unexpected (first {sorted(extra)[:5]})")
        self.assertEqual(dup_ids, 0, summary)
        self.assertEqual(missing, [], summary)
        self.assertEqual(extra, [], summary)
        self.assertEqual(len(texts), len(expected_texts), summary)
        if texts != list(expected_texts):
            first = next(i for i, (a, b) in enumerate(zip(texts, expected_texts)) if a != b)
            self.fail(f"{where}: order differs first at position {first}: got "
                      f"{texts[first:first + 5]}, expected {list(expected_texts)[first:first + 5]}")
