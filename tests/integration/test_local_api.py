"""The local API (issue 10, item 5; from item 7 the bundle worker pool and the HTTP deadlines),
attacked on real daemons.

Who attacks: a web page in a browser on the same host (CSRF, DNS rebinding), a local user
without the token (or with a wrong, truncated or another site's token), a token holder who
names folders outside the configuration, and clients that hold connections open (slowloris)
or send more bundle requests than the daemon serves at once. Each test checks the safe outcome
(nothing stored, sent, written, read or leaked; the posts of others still answered), not only
the status code. Docstring lines starting `Attack:` feed the threat model (docs/security.md).

The module prints "local API attacks: N refused of M" when it ends.
"""
import collections
import http.client
import json
import os
import socket
import threading
import time

from relay_harness import CHANNEL, RelayTestCase, messages, post_all, wait_for

ATTACKS = collections.Counter()  # "refused" / "fed"


def tearDownModule():
    print(f"\nlocal API attacks: {ATTACKS['refused']} refused of {ATTACKS['fed']}", flush=True)


def counted(refused):
    ATTACKS["fed"] += 1
    ATTACKS["refused"] += bool(refused)
    return refused


def raw_http(port, data, timeout=10):
    """Sends raw bytes on a fresh connection; returns everything received until the server
    closes (or `timeout`)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(data)
        except OSError:
            pass
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        return got
    finally:
        s.close()


def status_of(reply):
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def body_of(reply):
    return reply.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in reply else b""


def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def files_under(folder):
    out = []
    for d, _dirs, names in os.walk(folder):
        out += [os.path.join(d, n) for n in names]
    return sorted(out)


class LocalApiCase(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.usb = os.path.join(self.root, "usb")            # aws's files_dir at europe
        self.transfer = os.path.join(self.root, "transfer")  # europe's [site] transfer_dirs
        self.outside = os.path.join(self.root, "outside")    # configured nowhere
        for d in (self.usb, self.transfer, self.outside):
            os.makedirs(d)

    def pair_with_folders(self, ingest=None):
        """europe (aws's files_dir = usb, transfer_dirs = transfer) and aws (transfer_dirs =
        transfer), linked over ZeroMQ; both started."""
        eu, aws = self.site("europe"), self.site("aws")
        eu.write_config({"aws": {"site": aws, "dial": True, "keys": {"files_dir": self.usb}}},
                        {CHANNEL: ["aws"]}, site={"transfer_dirs": self.transfer}, ingest=ingest)
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]},
                         site={"transfer_dirs": self.transfer})
        aws.start()
        eu.start()
        return eu, aws

    def disk_pair(self, **peer_keys):
        """The same folders, no network: bundles are the only way between them."""
        eu, aws = self.site("europe"), self.site("aws")
        eu.write_config({"aws": {"site": aws, "keys": dict(files_dir=self.usb, **peer_keys)}},
                        {CHANNEL: ["aws"]}, zmq_listen=False, site={"transfer_dirs": self.transfer})
        aws.write_config({"europe": {"site": eu, "keys": {"files_dir": self.usb}}},
                         {CHANNEL: ["europe"]}, zmq_listen=False,
                         site={"transfer_dirs": self.transfer})
        eu.start()
        aws.start()
        return eu, aws

    def state(self, eu, aws):
        """What an accepted request would change: europe's ingest and store counters, and the
        lines in aws's sink."""
        m = eu.metrics()
        return (m.value("relay_events_ingested_total"), m.value("relay_store_commits_total"),
                m.value("relay_ingest_requests_total"), aws.sink_count())

    def assert_nothing_happened(self, eu, aws, before, what):
        time.sleep(0.5)  # a delivery in flight would show by now (the link is up)
        self.assertEqual(self.state(eu, aws), before, f"{what}: something was stored or sent")

    def refused(self, site, reason):
        return site.metric("relay_api_refused_total", 0, reason=reason)


class BrowserTest(LocalApiCase):
    def test_cross_site_post_from_a_web_page_stores_and_sends_nothing(self):
        """Attack: a web page in a browser on the same host POSTs a message (text/plain or a
        form, Origin of another site, no token: a CSRF "simple request"); safe outcome:
        refused before the body is read, nothing stored at europe, nothing delivered at aws."""
        eu, aws = self.pair_with_folders()
        before = self.state(eu, aws)
        port = eu.ingest_port
        body = json.dumps({"channel": CHANNEL, "author": "mallory", "text": "csrf"}).encode()
        host = f"Host: 127.0.0.1:{port}\r\n".encode()
        browser = (b"Origin: http://evil.example\r\nSec-Fetch-Site: cross-site\r\n"
                   b"Sec-Fetch-Mode: no-cors\r\nReferer: http://evil.example/page\r\n"
                   b"User-Agent: Mozilla/5.0\r\n")
        cases = [
            ("text/plain with Origin", host + browser + b"Content-Type: text/plain;charset=UTF-8\r\n",
             403),
            ("form with Origin", host + browser +
             b"Content-Type: application/x-www-form-urlencoded\r\n", 403),
            ("multipart with Origin", host + browser +
             b"Content-Type: multipart/form-data; boundary=x\r\n", 403),
            ("Origin null (sandboxed frame)", host + b"Origin: null\r\nContent-Type: text/plain\r\n",
             403),
            ("text/plain, no Origin (older browser)", host + b"Content-Type: text/plain\r\n", 401),
            # Even a page that had the token could not use it: browsers add Origin, and
            # text/plain is refused.
            ("with the token but Origin", host + browser + b"Authorization: Bearer " +
             eu.token.encode() + b"\r\nContent-Type: application/json\r\n", 403),
            ("with the token but text/plain", host + b"Authorization: Bearer " +
             eu.token.encode() + b"\r\nContent-Type: text/plain\r\n", 415),
        ]
        for what, headers, want in cases:
            for path in (b"/v1/messages", b"/v1/bundles/export"):
                with self.subTest(what, path=path):
                    data = (b"POST " + path + b" HTTP/1.1\r\n" + headers +
                            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                    reply = raw_http(port, data)
                    self.assertTrue(counted(status_of(reply) == want), f"{what}: {reply[:300]!r}")
                    err = json.loads(body_of(reply))["error"]
                    self.assertTrue(err)
        self.assert_nothing_happened(eu, aws, before, "cross-site POSTs")
        self.assertEqual(files_under(self.usb) + files_under(self.transfer), [])
        self.assertGreaterEqual(self.refused(eu, "origin"), 8)
        # Positive control: the same message from a real client goes through.
        st, _ = eu.post({"channel": CHANNEL, "author": "alice", "text": "real"})
        self.assertEqual(st, 202)
        self.assertEqual([l["text"] for l in self.wait_sink(aws, 1, 30)], ["real"])

    def test_dns_rebinding_reads_and_changes_nothing(self):
        """Attack: a web page whose name was rebound to 127.0.0.1 (Host: evil.example:PORT)
        reads /v1/status and /metrics and posts, with and without a token; safe outcome: 403
        with only an error in the body (no identity, peers or counters), nothing stored."""
        eu, aws = self.pair_with_folders()
        st, status = eu.get("/v1/status")
        self.assertEqual(st, 200)
        identity = json.loads(status)["identity"]
        before = self.state(eu, aws)
        port = eu.ingest_port
        leaks = [identity.encode(), b"aws", b"relay_", b"events_ingested"]
        for host in (f"evil.example:{port}", "evil.example", f"EVIL.example:{port}",
                     f"127.0.0.1.nip.io:{port}", f"localhost.evil.example:{port}"):
            for token in (None, eu.token):
                auth = f"Authorization: Bearer {token}\r\n" if token else ""
                for method, path, body in (("GET", "/v1/status", b""), ("GET", "/metrics", b""),
                                           ("GET", "/healthz", b""),
                                           ("POST", "/v1/messages", json.dumps(
                                               {"channel": CHANNEL, "author": "m",
                                                "text": "rebound"}).encode())):
                    with self.subTest(host=host, token=bool(token), path=path):
                        data = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}"
                                "Content-Type: application/json\r\n"
                                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
                        reply = raw_http(port, data)
                        self.assertTrue(counted(status_of(reply) == 403), reply[:300])
                        text = body_of(reply)
                        self.assertIn(b"does not name this relay", text)
                        for leak in leaks:
                            self.assertNotIn(leak, text)
        self.assert_nothing_happened(eu, aws, before, "rebound requests")
        self.assertEqual(self.refused(eu, "host"), 40)
        # The names clients really use still work.
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            reply = raw_http(port, (f"GET /v1/status HTTP/1.1\r\nHost: {host}\r\nAuthorization: "
                                    f"Bearer {eu.token}\r\nConnection: close\r\n\r\n").encode())
            self.assertEqual(status_of(reply), 200, reply[:200])


class TokenTest(LocalApiCase):
    def test_missing_wrong_and_truncated_tokens_get_401_and_change_nothing(self):
        """Attack: a local user without the token (none, empty, wrong, truncated, extended,
        another site's, another scheme) posts, reads the status, exports and imports; safe
        outcome: 401 with WWW-Authenticate: Bearer and a JSON error, nothing stored, written
        or read, and no token in the log."""
        eu, aws = self.disk_pair()  # no link: what europe holds for aws stays to export
        post_all(eu, messages(5, prefix="before"))
        before = self.state(eu, aws)
        good = eu.token
        auths = [None, "", "Bearer", "Bearer ", f"Bearer {good[:-1]}", f"Bearer {good[:32]}",
                 f"Bearer {good}x", f"Bearer {good.upper()}", f"Bearer {aws.token}",
                 f"Basic {good}", good, f"Bearer  {good[:-1]}", "Bearer " + "0" * 64,
                 "Bearer " + "a" * 5000]
        requests = [("POST", "/v1/messages", {"channel": CHANNEL, "author": "m", "text": "x"}),
                    ("GET", "/v1/status", None),
                    ("POST", "/v1/bundles/export", {"peer": "aws", "out": self.usb, "all": True}),
                    ("POST", "/v1/bundles/import", {"paths": [self.transfer]}),
                    ("GET", "/no-such-endpoint", None), ("POST", "/healthz", None)]
        for auth in auths:
            for method, path, body in requests:
                with self.subTest(auth=(auth or "")[:20], path=path):
                    headers = {} if auth is None else {"Authorization": auth}
                    r = eu.request(method, path, body, headers=headers, token=False)
                    self.assertTrue(counted(r.status == 401), f"{auth!r:.30} {path}: {r.status} "
                                                               f"{r.text[:200]}")
                    self.assertTrue(r.headers.get("WWW-Authenticate", "").startswith("Bearer"))
                    self.assertIsInstance(r.json, dict, r.text)
                    self.assertIn("error", r.json)
                    self.assertNotIn("identity", r.text)
        self.assert_nothing_happened(eu, aws, before, "unauthenticated requests")
        self.assertEqual(files_under(self.usb), [], "an unauthenticated export wrote files")
        refused = self.refused(eu, "missing_token") + self.refused(eu, "wrong_token")
        self.assertEqual(refused, len(auths) * len(requests))
        self.assertGreater(self.refused(eu, "wrong_token"), 0)
        log = eu.log_text()
        for secret in (good, aws.token, good[:-1]):
            self.assertNotIn(secret, log, "a token is in the log")
        # The token's holder still gets everything: the export after the refusals has every
        # event (nothing was marked exported by them).
        r = eu.request("POST", "/v1/bundles/export", {"peer": "aws", "out": self.usb})
        self.assertEqual(r.status, 200, r.text)
        self.assertEqual(r.json["events"], 5, r.text)

    def test_healthz_and_metrics_need_no_token(self):
        """Attack: none -- a monitoring probe without the token; outcome: GET /healthz and
        GET /metrics answer 200, and only those (POST to them needs the token)."""
        eu, aws = self.pair_with_folders()
        for path in ("/healthz", "/metrics", "/healthz?probe=1"):
            r = eu.request("GET", path, token=False)
            self.assertEqual(r.status, 200, f"{path}: {r.text[:200]}")
        self.assertIn("relay_api_refused_total", eu.request("GET", "/metrics", token=False).text)
        for method, path in (("POST", "/metrics"), ("GET", "/v1/status"), ("PUT", "/healthz")):
            self.assertEqual(eu.request(method, path, token=False).status, 401, path)
        # The CLI finds the token through the config.
        r = eu.cli("status", "--config", eu.conf, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["api_refused"]["missing_token"], 3)
        r = eu.cli("post", "--config", eu.conf, "--channel", CHANNEL, "--author", "a", "cli")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.wait_sink(aws, 1, 30)


class FolderTest(LocalApiCase):
    def test_export_to_a_folder_not_configured_is_refused_and_hides_nothing(self):
        """Attack: a token holder exports the peer's events to a folder the configuration does
        not name (elsewhere, through '..', a symlink, data_dir), hoping the operator's next
        `relay export` finds "nothing to export"; safe outcome: refused naming the folder and
        [site] transfer_dirs, nothing written there, and the next export to the peer's own
        folder still has every event (also after an allowed export to a transfer folder)."""
        eu, aws = self.disk_pair()
        post_all(eu, messages(20, prefix="e"))
        os.symlink(self.outside, os.path.join(self.transfer, "link-out"))
        os.makedirs(os.path.join(self.transfer, "sub"))
        hostile = [self.outside, os.path.join(self.transfer, "link-out"),
                   os.path.join(self.transfer, "sub", "..", "..", "outside"),
                   eu.data, os.path.join(eu.data, ".."), eu.dir, "/tmp", "/"]
        t0 = {d: files_under(d) for d in (self.outside, eu.dir, self.usb)}
        for out in hostile:
            with self.subTest(out=out):
                r = eu.request("POST", "/v1/bundles/export", {"peer": "aws", "out": out})
                self.assertTrue(counted(r.status == 403), f"{out}: {r.status} {r.text}")
                self.assertIn("transfer_dirs", r.json["error"])
                self.assertIn("not in a folder the configuration names" if out != eu.data
                              else "inside the site's data_dir", r.json["error"])
        # The CLI path says the same (through the daemon, and offline below).
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--out", self.outside)
        self.assertEqual(counted(r.returncode == 1), True, r.stdout + r.stderr)
        self.assertIn(f"add '{os.path.realpath(self.outside)}' to [site] transfer_dirs", r.stderr)
        for d, files in t0.items():
            self.assertEqual(files_under(d), files, f"something was written in {d}")
        self.assertGreaterEqual(self.refused(eu, "folder"), len(hostile) + 1)
        # Allowed: a transfer folder. It does not move the cursor of the peer's own folder.
        r = eu.request("POST", "/v1/bundles/export", {"peer": "aws", "out": self.transfer})
        self.assertEqual(r.status, 200, r.text)
        self.assertEqual(r.json["events"], 20)
        r = eu.request("POST", "/v1/bundles/export", {"peer": "aws", "out": self.transfer})
        self.assertEqual(r.json["events"], 0, "the transfer folder's own cursor did not move")
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws")  # default: files_dir
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("exported 20 event(s)", r.stderr)
        files = r.stdout.split()
        self.assertTrue(files and all(f.startswith(os.path.realpath(self.usb)) for f in files))
        r = aws.cli("import", "--config", aws.conf, *files)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assert_exactly_once(self.wait_sink(aws, 20, 30), [f"e-{i}" for i in range(20)],
                                 "aws after importing the files_dir export")
        # Offline (no daemon) the same folders apply: the operator's CLI follows the config too.
        eu.stop()
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--all", "--out", self.outside)
        self.assertEqual(counted(r.returncode == 1), True, r.stdout + r.stderr)
        self.assertIn("transfer_dirs", r.stderr)
        self.assertEqual(files_under(self.outside), [])
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--all", "--out", self.transfer)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_import_from_outside_the_folders_is_refused(self):
        """Attack: a token holder has the daemon read files the configuration does not name (a
        valid bundle copied elsewhere, a symlink in a transfer folder pointing out, files in
        data_dir, /etc/passwd); safe outcome: each refused by name with the key to set,
        nothing read into the store, nothing delivered."""
        eu, aws = self.disk_pair()
        post_all(eu, messages(7, prefix="i"))
        files = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--out", self.transfer)
        self.assertEqual(files.returncode, 0, files.stderr)
        bundle = files.stdout.split()[0]
        moved = os.path.join(self.outside, os.path.basename(bundle))
        os.rename(bundle, moved)
        os.symlink(moved, os.path.join(self.transfer, "planted.bundle"))
        current = os.path.join(aws.data, "CURRENT")
        hostile = [moved, self.outside, os.path.join(self.transfer, "planted.bundle"),
                   os.path.join(self.transfer, "..", "outside", os.path.basename(bundle)),
                   current, aws.data, "/etc/passwd", aws.key]
        before = aws.metrics().value("relay_events_received_total", 0, peer="europe")
        r = aws.request("POST", "/v1/bundles/import", {"paths": hostile})
        self.assertEqual(r.status, 200, r.text)
        results = r.json["results"]
        self.assertEqual([x["path"] for x in results], hostile)
        for res in results:
            with self.subTest(path=res["path"]):
                self.assertTrue(counted(not res["ok"]), res)
                self.assertTrue("transfer_dirs" in res["message"] or
                                "inside the site's data_dir" in res["message"], res["message"])
        # A folder import skips the planted symlink silently; nothing is in the folder else.
        r = aws.request("POST", "/v1/bundles/import", {"paths": [self.transfer]})
        self.assertEqual(r.json["results"], [], r.text)
        r = aws.cli("import", "--config", aws.conf, moved)
        self.assertEqual(counted(r.returncode == 1), True, r.stdout)
        self.assertIn("add '" + os.path.realpath(self.outside) + "' to [site] transfer_dirs",
                      r.stdout)
        time.sleep(0.5)
        self.assertEqual(aws.sink_count(), 0)
        self.assertEqual(aws.metrics().value("relay_events_received_total", 0, peer="europe"),
                         before)
        # Positive control: moved back into the transfer folder it imports.
        os.remove(os.path.join(self.transfer, "planted.bundle"))
        os.rename(moved, bundle)
        r = aws.cli("import", "--config", aws.conf, bundle)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_sink(aws, 7, 30)


class PoolTest(LocalApiCase):
    def test_bundle_requests_beyond_the_pool_get_429_and_no_thread_leaks(self):
        """Attack: a token holder sends many bundle requests at once (each used to cost a
        thread kept until the daemon stopped); safe outcome: a fixed pool serves some, the rest
        get 429 with Retry-After, and the daemon's thread count does not grow."""
        # Small frames and bundles: each export writes ~300 files, each synced, so that the
        # requests overlap.
        eu, aws = self.disk_pair(max_frame_events=10)
        post_all(eu, [dict(m, text=m["text"] + " " + "x" * 1000)
                      for m in messages(3000, prefix="p")], batch=500)
        pid = eu.proc.pid
        threads0 = threads_of(pid)
        n = 40
        barrier = threading.Barrier(n)
        answers = [None] * n
        peak = [threads0]
        body = lambda i: json.dumps({"peer": "aws", "out": os.path.join(self.transfer, f"r{i}"),
                                     "all": True, "max_bytes": 16384}).encode()
        for i in range(n):
            os.makedirs(os.path.join(self.transfer, f"r{i}"))

        def client(i):
            c = http.client.HTTPConnection("127.0.0.1", eu.ingest_port, timeout=120)
            c.connect()
            barrier.wait()
            c.request("POST", "/v1/bundles/export", body(i),
                      eu.auth({"Content-Type": "application/json"}))
            r = c.getresponse()
            answers[i] = (r.status, r.getheader("Retry-After"), r.read())
            c.close()

        workers = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            peak[0] = max(peak[0], threads_of(pid))
            time.sleep(0.01)
        for w in workers:
            w.join()
        statuses = collections.Counter(a[0] for a in answers)
        print(f"\nbundle pool: {n} concurrent exports -> {dict(statuses)}; threads {threads0} "
              f"before, peak {peak[0]}, {threads_of(pid)} after")
        self.assertEqual(set(statuses) - {200, 429}, set(), answers)
        self.assertGreater(statuses[429], 0, "no request was refused busy")
        self.assertGreaterEqual(statuses[200], 2)
        for status, retry, text in answers:
            if status == 429:  # the requests beyond the pool: refused
                counted(True)
                self.assertEqual(retry, "1")
                self.assertIn("busy with other bundle requests", json.loads(text)["error"])
        self.assertLessEqual(peak[0], threads0, "serving bundle requests started threads")
        self.assertEqual(threads_of(pid), threads0)
        self.assertEqual(self.refused(eu, "bundle_busy"), statuses[429])
        # Refused folders were not written; served ones were, each whole.
        for i, (status, _, text) in enumerate(answers):
            written = os.listdir(os.path.join(self.transfer, f"r{i}"))
            if status == 429:
                self.assertEqual(written, [], f"a refused export wrote {written}")
            else:
                self.assertEqual(len(written), len(json.loads(text)["files"]))
        # After the burst the pool serves the CLI as before.
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(eu.stop(timeout=20), 0)


class DeadlineTest(LocalApiCase):
    HEADER_DEADLINE = 10.0  # HttpServer::Options::header_timeout
    BODY_DEADLINE = 10.0    # body_timeout, plus the body's length at 1 MiB/s

    def trickle(self, port, first, step=b"x", every=0.5, limit=40.0):
        """Sends `first`, then one byte of `step` every `every` seconds until the server closes
        the connection; returns the seconds it stayed open (or `limit`)."""
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        try:
            s.sendall(first)
            s.settimeout(every)
            while time.monotonic() - t0 < limit:
                try:
                    if s.recv(4096) == b"":
                        return time.monotonic() - t0
                except socket.timeout:
                    pass
                except OSError:
                    return time.monotonic() - t0
                try:
                    s.sendall(step)
                except OSError:
                    return time.monotonic() - t0
            return limit
        finally:
            s.close()

    def test_slow_headers_and_bodies_are_closed_at_their_deadline_while_posts_go_on(self):
        """Attack: a local client holds connections open: header-only requests announcing a
        whole max_body (no token), headers trickled a byte at a time, and (with the token)
        bodies trickled a byte at a time; safe outcome: the first are answered 401 at once and
        reserve nothing, the others are closed at their deadlines (10 s, 10 s + length at
        1 MiB/s) and release what they held, and every post meanwhile is answered 202."""
        eu, aws = self.pair_with_folders(ingest={"max_body": "1MiB", "max_pending": "2MiB"})
        port = eu.ingest_port
        host = f"Host: 127.0.0.1:{port}\r\n".encode()
        auth = f"Authorization: Bearer {eu.token}\r\n".encode()
        # Four header-only requests, each announcing all of max_body, no token.
        held = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/messages HTTP/1.1\r\n" + host +
                      b"Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n")
            held.append(s)
        for s in held:
            got = s.recv(4096)
            self.assertTrue(counted(status_of(got) == 401), got[:200])
        results = {}

        def run(name, first):
            results[name] = self.trickle(port, first)

        slow = []
        for i in range(3):
            slow.append(threading.Thread(target=run, args=(f"header-{i}", b"POST /v1/messages "
                                                           b"HTTP/1.1\r\n" + host + b"X-Slow: ")))
            slow.append(threading.Thread(target=run, args=(
                f"body-{i}", b"POST /v1/messages HTTP/1.1\r\n" + host + auth +
                b"Content-Type: application/json\r\nContent-Length: 65536\r\n\r\n[")))
        t0 = time.monotonic()
        for t in slow:
            t.start()
        posts = collections.Counter()
        n = 0
        while any(t.is_alive() for t in slow) and time.monotonic() - t0 < 60:
            st, body = eu.post({"channel": CHANNEL, "author": "a", "text": f"during-{n}"},
                               timeout=10)
            posts[st] += 1
            n += 1
            time.sleep(0.25)
        for t in slow:
            t.join(30)
        for s in held:
            s.close()
        print(f"\ndeadlines: open for {', '.join(f'{k} {v:.1f} s' for k, v in sorted(results.items()))}; "
              f"posts meanwhile {dict(posts)}")
        self.assertEqual(dict(posts), {202: n}, "a post was not answered 202 meanwhile")
        for name, seconds in results.items():
            deadline = self.HEADER_DEADLINE if name.startswith("header") else \
                self.BODY_DEADLINE + 65536 / (1 << 20)
            self.assertTrue(counted(deadline - 0.5 <= seconds <= deadline + 5),
                            f"{name} stayed open {seconds:.1f} s (deadline {deadline} s)")
        self.wait_for(lambda: self.refused(eu, "header_timeout") == 3 and
                      self.refused(eu, "body_timeout") == 3, 5, "the deadlines to be counted")
        self.assert_exactly_once(self.wait_sink(aws, n, 30), [f"during-{i}" for i in range(n)],
                                 "aws")

    def test_a_token_holder_cannot_hold_the_budget_past_the_body_deadline(self):
        """Attack: a token holder announces bodies that fill max_pending and never sends them
        (this made every post answer 503 for two minutes); safe outcome: posts are refused busy
        (503, Retry-After) only until the body deadline (10 s + 1 s for 1 MiB), then accepted."""
        eu, aws = self.pair_with_folders(ingest={"max_body": "1MiB", "max_pending": "2MiB"})
        port = eu.ingest_port
        held = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: "
                      f"Bearer {eu.token}\r\nContent-Type: application/json\r\n"
                      "Content-Length: 1048576\r\n\r\n".encode())
            held.append(s)
        time.sleep(0.3)
        t0 = time.monotonic()
        st, body = eu.post({"channel": CHANNEL, "author": "a", "text": "while held"})
        self.assertEqual(st, 503, body)
        self.assertIn("relay is busy", body["error"])
        accepted = wait_for(lambda: eu.post({"channel": CHANNEL, "author": "a",
                                             "text": "after"})[0] == 202, 30, step=0.5)
        waited = time.monotonic() - t0
        for s in held:
            s.close()
        print(f"\nbudget held by 2 silent 1 MiB bodies: posts refused for {waited:.1f} s")
        self.assertTrue(counted(accepted), "posts were still refused after 30 s")
        self.assertLess(waited, self.BODY_DEADLINE + 1 + 5)
        self.assertEqual(self.refused(eu, "body_timeout"), 2)
        self.wait_sink(aws, 1, 30)
