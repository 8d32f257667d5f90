"""Fault injection (issue 6, hardening, item 3): many crash points, a flapping link, a peer that
stops reading, wall-clock jumps. After each fault, every acknowledged message must be in the
receiver's JSONL sink exactly once.

Figures are printed for the report: "crash-point trials: N", the sender's peak RSS while its
peer stalls, how often the link was cut, which clock offsets were applied.

Environment: RELAY_SEED fixes the random choices (kill moments, cut intervals); it is printed.
"""
import datetime
import http.client
import json
import os
import re
import random
import select
import shutil
import socket
import struct
import subprocess
import threading
import time

from relay_harness import (CHANNEL, RelayTestCase, free_port, messages, post_all, relay_bin,
                           wait_for)

WAIT = 120          # longest any final delivery wait may take
# Under scripts/test-sanitizers.sh (ASan + UBSan, a Debug build, several times slower and with
# AddressSanitizer's shadow memory and 256 MiB quarantine) the loops are shorter and the memory
# bounds keep their meaning but not their figures; no check is skipped.
SANITIZED = bool(os.environ.get("RELAY_SANITIZED"))
CRASH_POINTS = 15 if SANITIZED else 30     # per victim (sender, receiver)
STALL_MESSAGES = 160_000 if SANITIZED else 480_000
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def seed():
    s = int(os.environ.get("RELAY_SEED") or random.SystemRandom().randrange(1 << 30))
    return s, random.Random(s)


def proc_status(pid):
    """{'VmRSS': kB, 'VmHWM': kB} of a live process (empty when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


# ---- a TCP proxy that can cut and stall ---------------------------------------------------------
class FaultProxy:
    """A byte-level TCP proxy for one ZeroMQ link (dialer -> proxy -> listener).

    cut_all() resets every live connection (both sides; the dialer's ZeroMQ reconnects to the
    proxy, which dials the listener again). stall() stops reading from every connection, old and
    new, in both directions, while keeping them open: the peer looks alive at the TCP level but
    takes nothing (a hung process, a full disk, a wedged middlebox). resume() lets bytes flow."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.port = free_port()
        self.lock = threading.Lock()
        self.flowing = threading.Event()
        self.flowing.set()
        self.pairs = []           # live [client, server] socket pairs
        self.cuts = 0             # cut_all() calls that found at least one connection
        self.accepted = 0
        self.bytes_up = 0         # dialer -> listener
        self._stop = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self):
        return f"tcp://127.0.0.1:{self.port}"

    @staticmethod
    def _kill_socket(s, rst=True):
        try:
            if rst:  # close with RST, as a middlebox dropping the connection state would
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass

    def cut_all(self, rst=True):
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                self._kill_socket(s, rst)
        if pairs:
            self.cuts += 1
        return len(pairs)

    def stall(self):
        self.flowing.clear()

    def resume(self):
        self.flowing.set()

    def close(self):
        self._stop = True
        self.flowing.set()
        self.cut_all(rst=False)
        try:
            self._listener.close()
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
            except OSError:
                self._kill_socket(client)
                continue
            client.setblocking(True)
            server.setblocking(True)
            pair = [client, server]
            with self.lock:
                self.pairs.append(pair)
                self.accepted += 1
            for src, dst, up in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(pair, src, dst, up), daemon=True)
                t.start()
            # Finished pump threads are not joined one by one; close() joins only the acceptor.

    def _pump(self, pair, src, dst, up):
        try:
            while not self._stop:
                if not self.flowing.is_set():
                    self.flowing.wait(0.1)   # stalled: read nothing, send nothing
                    continue
                r, _, _ = select.select([src], [], [], 0.1)
                if not r:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if up:
                    self.bytes_up += len(data)
        except (OSError, ValueError):
            pass
        finally:
            with self.lock:
                live = pair in self.pairs
                if live:
                    self.pairs.remove(pair)
            if live:
                for s in pair:
                    self._kill_socket(s, rst=False)


# ---- a numbered stream that retries until acknowledged ----------------------------------------
class Stream(threading.Thread):
    """Posts a numbered stream (texts and client ids f"{prefix}-{i}") in batches until halted.
    A batch that gets no 202 (connection refused or reset, timeout, 503 while the site is down
    or starting) is posted again with the same client ids until it does, so the stream stays in
    order; the 202 answers are recorded. A message counts as acknowledged only once a 202 named
    its id. Messages the daemon answered with "duplicate": true had been committed by an
    attempt whose answer was lost (a kill between the synced commit and the 202)."""

    def __init__(self, site, prefix="s", batch=20, pause=0.005, retry_for=90):
        super().__init__(daemon=True)
        self.site = site
        self.prefix = prefix
        self.batch = batch
        self.pause = pause
        self.retry_for = retry_for
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.texts = []          # acknowledged texts, in order
        self.ids = {}            # text -> event id from the 202
        self.failed_attempts = 0
        self.dup_answers = 0     # messages answered "duplicate" on a re-post
        self.error = None

    def n_acked(self):
        with self.lock:
            return len(self.texts)

    def run(self):
        i = 0
        try:
            while not self.halt.is_set():
                msgs = [{"channel": CHANNEL, "author": "alice", "id": f"{self.prefix}-{k}",
                         "text": f"{self.prefix}-{k}"}
                        for k in range(i, i + self.batch)]
                body = json.dumps(msgs).encode()
                end = time.monotonic() + self.retry_for
                attempt = 0
                while True:
                    attempt += 1
                    try:
                        st, ans = self.site.post(body, timeout=10)
                        ok = st == 202 and isinstance(ans, list) and len(ans) == len(msgs)
                    except (OSError, http.client.HTTPException, AttributeError):
                        # AttributeError: http.client after the server reset the connection
                        # while the request was being sent (relay_harness.http_request then
                        # asks a closed connection for the answer).
                        ok = False
                    if ok:
                        break
                    self.failed_attempts += 1
                    if time.monotonic() > end:
                        raise AssertionError(f"batch at {i} not acknowledged within "
                                             f"{self.retry_for}s ({attempt} attempts)")
                    time.sleep(0.02)
                with self.lock:
                    for m, a in zip(msgs, ans):
                        self.texts.append(m["text"])
                        self.ids[m["text"]] = a["id"]
                        if attempt > 1 and a.get("duplicate"):
                            self.dup_answers += 1
                i += self.batch
                if self.pause:
                    time.sleep(self.pause)
        except Exception as e:  # reported by finish()
            self.error = e

    def finish(self, timeout=120):
        self.halt.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError("the posting thread did not finish")
        if self.error:
            raise AssertionError(f"the posting thread failed: {self.error!r}")


def sink_records(site, channel=CHANNEL):
    """(id, text without padding, created_at) of every complete line of the sink, streaming."""
    out = []
    try:
        f = open(site.sink_path(channel), "rb")
    except FileNotFoundError:
        return out
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # partial last line, being written
            try:
                line = json.loads(raw)
            except ValueError:
                raise AssertionError(f"{site.name}: line {n} of the sink is not JSON: "
                                     f"{raw[:200]!r}")
            out.append((line["id"], line["text"].split(" ", 1)[0], line.get("created_at")))
    return out


def _preload():
    """LD_PRELOAD for libfaketime. An AddressSanitizer build (scripts/test-sanitizers.sh) insists
    on its runtime coming first in the library list, so libasan is preloaded ahead of it."""
    libs = [FAKETIME_LIB]
    try:
        out = subprocess.run(["ldd", relay_bin()], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" => ")
        if name.startswith("libasan.") and rest.split():
            libs.insert(0, rest.split()[0])
    return ":".join(libs)


def faketime_env(rc_path, offset="+0"):
    """Environment for a daemon whose CLOCK_REALTIME is shifted by the offset in rc_path (read
    on every call, so writing the file jumps the running daemon's clock). CLOCK_MONOTONIC is
    left alone, as a real clock step (NTP, an operator's `date -s`) leaves it alone."""
    with open(rc_path, "w") as f:
        f.write(offset + "\n")
    env = dict(os.environ)
    env.update({"LD_PRELOAD": _preload(), "FAKETIME_TIMESTAMP_FILE": rc_path,
                "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "NO_FAKE_STAT": "1"})
    env.pop("FAKETIME", None)  # would take priority over the file
    return env


def set_offset(rc_path, offset):
    tmp = rc_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(offset + "\n")
    os.replace(tmp, rc_path)  # atomic: the daemon never reads a half-written file


def parse_created(s):
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def log_clock_offsets(site):
    """Seconds between each log line's timestamp (the daemon's wall clock) and now."""
    now = time.time()
    out = []
    for line in site.log_text().splitlines():
        stamp = line.split(" ", 1)[0]
        try:
            out.append(parse_created(stamp) - now)
        except ValueError:
            pass
    return out


class FaultTest(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.seed, self.rng = seed()

    def fault_proxy(self, target):
        p = FaultProxy(target.zmq_port)
        self.proxies.append(p)
        return p

    def linked_via(self, eu_peer_keys=None, zmq=None):
        """europe dials aws through a FaultProxy; channel war-room both ways."""
        eu, aws = self.site("europe"), self.site("aws")
        px = self.fault_proxy(aws)
        eu.write_config({"aws": {"site": aws, "connect": px.url, "keys": eu_peer_keys or {}}},
                        {CHANNEL: ["aws"]}, zmq=zmq)
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]}, zmq=zmq)
        return eu, aws, px

    def check_stream(self, site, stream, where):
        """The sink holds exactly the stream's acknowledged messages, once each, in order, under
        the ids their 202 answers named. Returns the records."""
        self.wait_for(lambda: site.sink_count() >= len(stream.texts), WAIT,
                      f"{len(stream.texts)} lines in {site.name}'s sink ({where})",
                      lambda: f"it has {site.sink_count()}")
        recs = sink_records(site)
        ids = [r[0] for r in recs]
        texts = [r[1] for r in recs]
        want = [t.split(" ", 1)[0] for t in stream.texts]
        dup_ids = len(ids) - len(set(ids))
        dup_texts = len(texts) - len(set(texts))
        missing = set(want) - set(texts)
        extra = set(texts) - set(want)
        summary = (f"{where}: {len(recs)} lines, {len(want)} acknowledged; {dup_ids} duplicate "
                   f"ids, {dup_texts} duplicate texts, {len(missing)} missing (e.g. "
                   f"{sorted(missing)[:3]}), {len(extra)} unexpected (e.g. {sorted(extra)[:3]})")
        self.assertEqual((dup_ids, dup_texts, len(missing), len(extra)), (0, 0, 0, 0), summary)
        if texts != want:
            first = next(i for i, (a, b) in enumerate(zip(texts, want)) if a != b)
            self.fail(f"{summary}; order differs first at line {first}: {texts[first:first + 3]}"
                      f" vs {want[first:first + 3]}")
        wrong = [(t, stream.ids[full], i) for (i, t, _), full in zip(recs, stream.texts)
                 if stream.ids[full] != i]
        self.assertEqual(wrong[:3], [], f"{where}: {len(wrong)} lines carry another id than "
                                        f"their 202 named (text, acked id, sink id)")
        return recs

    # 1 -----------------------------------------------------------------------------------------
    def test_sigkill_at_many_random_points_sender_and_receiver(self):
        """60+ crash points (30 sender, 30 receiver; half under sanitizers) in one long stream.

        The sender or the receiver (in a random order) is SIGKILLed after a random 0.05-1.2 s
        of a continuous numbered stream and restarted; each restart reopens the RocksDB store
        (and cuts back the JSONL sink) the kill left behind. About one restart in four is itself
        killed 0-0.2 s after the process started (during store recovery), an extra crash point.
        Posts that get no 202 are re-posted with the same client ids."""
        eu, aws = self.site("europe"), self.site("aws")
        # Small frames and window: many frames, commits and sink batches between kills.
        eu.write_config({"aws": {"site": aws, "dial": True,
                                 "keys": {"max_frame_events": 100, "window": 4}}},
                        {CHANNEL: ["aws"]})
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]})
        eu.start()
        aws.start()
        stream = Stream(eu, prefix="c", batch=25, pause=0.004)
        stream.start()
        victims = ["sender"] * CRASH_POINTS + ["receiver"] * CRASH_POINTS
        self.rng.shuffle(victims)
        log = []   # (victim, acked messages, receiver lines) at each kill; "*": during start-up
        t0 = time.monotonic()
        try:
            for victim in victims:
                time.sleep(self.rng.uniform(0.05, 1.2))
                self.assertIsNone(stream.error, "the stream failed")
                self.assertTrue(stream.is_alive(), "the stream ended before the trials")
                site = eu if victim == "sender" else aws
                log.append((victim[0], stream.n_acked(), aws.sink_count()))
                site.kill9()
                if self.rng.random() < 0.25:
                    site.start(wait=False)
                    time.sleep(self.rng.uniform(0.0, 0.2))
                    log.append((victim[0] + "*", stream.n_acked(), aws.sink_count()))
                    site.kill9()
                if self.rng.random() < 0.3:
                    time.sleep(self.rng.uniform(0.0, 0.5))  # down for a moment
                site.start(timeout=60)
            trials_time = time.monotonic() - t0
            time.sleep(0.5)
        finally:
            stream.finish()
        n = len(log)
        at_start = sum(1 for v, _, _ in log if v.endswith("*"))
        self.assertGreaterEqual(n, 2 * CRASH_POINTS)
        # The kills were spread over the stream: it advanced between the first and the last.
        self.assertLess(log[0][1], log[-1][1], f"the stream did not advance: {log}")
        self.assertGreater(stream.failed_attempts, 0, "no post ever failed: the sender kills "
                                                     "did not interrupt the client")
        where = f"after {n} crash points (seed {self.seed}; victim, acked, aws lines: {log})"
        recs = self.check_stream(aws, stream, where)
        self.settle([eu, aws])
        recs2 = self.check_stream(aws, stream, where + ", after settling")
        self.assertEqual(len(recs2), len(recs))
        self.assertEqual(eu.sink_count(), 0, "echo back to the origin")
        cuts = aws.log_text().count("unrecorded batch")
        print(f"\n  [crash-point trials: {n} ({sum(1 for v in log if v[0][0] == 's')} sender, "
              f"{sum(1 for v in log if v[0][0] == 'r')} receiver; {at_start} of them during "
              f"start-up) in {trials_time:.0f}s, seed {self.seed}; {len(stream.texts)} messages "
              f"acknowledged, {stream.failed_attempts} failed posts re-posted, "
              f"{stream.dup_answers} re-posted messages had been committed before the kill; "
              f"receiver sink cut back {cuts}x]", end=" ", flush=True)

    # 2 -----------------------------------------------------------------------------------------
    def test_peer_flapping_every_few_hundred_ms(self):
        """The link is cut every 200-400 ms for 12 s while a stream flows: exactly once, in order.

        A proxy on the ZeroMQ link resets every connection (mostly RST, sometimes FIN) every
        200-400 ms for 12 s while a stream flows, then stops flapping."""
        eu, aws, px = self.linked_via()
        aws.start()
        eu.start()
        self.wait_for(lambda: eu.metric("relay_link_up", peer="aws") == 1, 30,
                      "europe's link to aws through the proxy")
        stream = Stream(eu, prefix="f", batch=20, pause=0.01)
        stream.start()
        try:
            time.sleep(1.0)
            lines_before = aws.sink_count()
            end = time.monotonic() + 12
            intervals = []
            while time.monotonic() < end:
                d = self.rng.uniform(0.2, 0.4)
                intervals.append(d)
                time.sleep(d)
                px.cut_all(rst=self.rng.random() < 0.7)
            lines_during = aws.sink_count() - lines_before
            acked_during = stream.n_acked()
            time.sleep(3.0)  # calm link, stream still flowing
        finally:
            stream.finish()
        self.assertGreaterEqual(px.cuts, 25, f"only {px.cuts} cuts found a live connection")
        where = (f"after {px.cuts} cuts every {min(intervals):.2f}-{max(intervals):.2f}s "
                 f"(seed {self.seed}; {px.accepted} connections through the proxy)")
        self.check_stream(aws, stream, where)
        self.settle([eu, aws])
        self.check_stream(aws, stream, where + ", after settling")
        rejected = aws.metrics()
        print(f"\n  [{px.cuts} cuts in 12s, {px.accepted} connections; {lines_during} lines "
              f"delivered while flapping ({acked_during} acked by then); "
              f"{len(stream.texts)} messages in all; replays rejected "
              f"{rejected.value('relay_frames_rejected_total', 0, reason='replay'):.0f}, "
              f"gaps {rejected.value('relay_frames_rejected_total', 0, reason='gap'):.0f}]",
              end=" ", flush=True)
        # Progress while flapping is not required for correctness, but a link that delivers
        # nothing between cuts 200-400 ms apart would never recover on a flaky network.
        self.assertGreater(lines_during, 0, "nothing was delivered while the link flapped")

    # 3 -----------------------------------------------------------------------------------------
    def test_peer_stops_reading_sender_keeps_accepting_with_bounded_memory(self):
        """A stalled peer: 1 GB ingested, 202 throughout, sender RSS bounded, then exactly once.

        (A third of the data under sanitizers.)

        The proxy stops reading (both ways, connections kept open) while the client ingests
        480,000 messages of 2 KiB (about 1 GB): every batch is answered 202 from the durable
        queue, the sender's RSS stays bounded and stops growing, nothing reaches aws, the link
        is declared down; then the proxy reads again and everything arrives exactly once."""
        eu, aws, px = self.linked_via()
        aws.start()
        eu.start()
        self.wait_for(lambda: eu.metric("relay_link_up", peer="aws") == 1, 30,
                      "europe's link to aws through the proxy")
        warm = messages(200, prefix="w")
        post_all(eu, warm, batch=100)
        self.wait_for(lambda: aws.sink_count() >= 200, 30, "the warm-up messages")
        rss_start = proc_status(eu.proc.pid).get("VmRSS", 0)

        px.stall()
        total, batch, pad = STALL_MESSAGES, 500, 2048
        padding = "x" * pad
        samples = []          # (bytes posted so far, sender VmRSS kB)
        posted = [0]
        done = threading.Event()

        def sampler():
            while not done.is_set():
                st = proc_status(eu.proc.pid)
                if st:
                    samples.append((posted[0], st["VmRSS"]))
                done.wait(0.1)
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        t0 = time.monotonic()
        try:
            for i in range(0, total, batch):
                msgs = [{"channel": CHANNEL, "author": "alice", "id": f"b-{k}",
                         "text": f"b-{k} {padding}"} for k in range(i, i + batch)]
                body = json.dumps(msgs).encode()
                st, ans = eu.post(body, timeout=60)
                self.assertEqual(st, 202, f"batch at {i} answered {st} while the peer stalled: "
                                          f"{str(ans)[:200]}")
                posted[0] += len(body)
            ingest_time = time.monotonic() - t0
            # Stay stalled a while longer: more than peer_timeout (5 s), so that the link is
            # declared down and the sender dials again into the stalled proxy.
            time.sleep(6)
            depth = eu.metric("relay_queue_depth", peer="aws")
            link_up = eu.metric("relay_link_up", peer="aws")
            stalled_lines = aws.sink_count()
        finally:
            done.set()
            th.join(5)
        hwm = proc_status(eu.proc.pid).get("VmHWM", 0)
        peak = max([r for _, r in samples] + [hwm])
        data = posted[0]
        # RSS once half of the data was in, and the most it grew after that.
        half = [r for b, r in samples if b >= data / 2]
        growth = max(half) - half[0] if half else 0
        self.assertEqual(depth, total, "the sender's queue does not hold every stalled message")
        self.assertEqual(stalled_lines, 200, "messages reached aws through a stalled proxy")
        self.assertEqual(link_up, 0, "the sender still thinks a peer that reads nothing is up")
        self.assertTrue(eu.healthy())
        # The bound. RocksDB holds the log in memtables of 256 MiB (max_total_wal_size 256 MiB
        # forces a flush); one can be flushing while the next fills: about 2 x 256 MiB plus the
        # daemon's own ~30 MiB. 640 MiB leaves room for that and is well below the ~1 GB that
        # "queue in memory" would take. And it must level off: over the second half of the
        # ingest (~500 MB) it may grow by at most 160 MiB.
        bound_kb, growth_kb = 640 * 1024, 160 * 1024
        if SANITIZED:
            # Shadow memory and the 256 MiB quarantine; and the sanitized run's ~340 MB do not
            # fill the 256 MiB memtable before its second half, so that half may still fill it.
            bound_kb, growth_kb = 2 * bound_kb + 256 * 1024, growth_kb + 512 * 1024
        print(f"\n  [stalled ingest: {total} messages, {data / 1e6:.0f} MB in {ingest_time:.1f}s; "
              f"sender RSS {rss_start // 1024} MiB before, peak {peak // 1024} MiB (VmHWM; "
              f"bound {bound_kb // 1024} MiB), grew {growth // 1024} MiB over the second half; "
              f"{px.accepted} connections to the stalled proxy]", end=" ", flush=True)
        self.assertLess(peak, bound_kb, f"sender peak RSS {peak // 1024} MiB with "
                                        f"{data / 1e6:.0f} MB queued (bytes posted, RSS kB: "
                                        f"{samples[::25]})")
        self.assertLess(growth, growth_kb, f"sender RSS still grows with the queue: "
                                           f"+{growth // 1024} MiB over the last "
                                           f"{data / 2e6:.0f} MB")
        if not SANITIZED:  # (the sanitized run queues less data than its bound)
            self.assertLess(peak * 1024, data / 1.5, "peak RSS is not well below the data volume")
        # Resume: the backlog drains, every message once, in order.
        px.resume()
        t1 = time.monotonic()
        self.wait_for(lambda: aws.sink_count() >= total + 200, WAIT,
                      f"{total + 200} lines at aws after the stall",
                      lambda: f"it has {aws.sink_count()}")
        drain = time.monotonic() - t1
        recs = sink_records(aws)
        want = [m["text"] for m in warm] + [f"b-{k}" for k in range(total)]
        texts = [r[1] for r in recs]
        ids = [r[0] for r in recs]
        self.assertEqual(len(set(ids)), len(ids), "duplicate ids at aws")
        self.assertEqual(len(texts), len(want), f"{len(texts)} lines, expected {len(want)}")
        self.assertTrue(texts == want, "aws sink differs from the stream (order, loss or dups)")
        self.settle([eu, aws])
        self.assertEqual(aws.sink_count(), total + 200)
        print(f"[drained in {drain:.1f}s; receiver peak RSS while draining "
              f"{proc_status(aws.proc.pid).get('VmHWM', 0) // 1024} MiB]", end=" ", flush=True)

    # 4 -----------------------------------------------------------------------------------------
    def faked_pair(self):
        if not os.path.exists(FAKETIME_LIB):
            self.skipTest(f"{FAKETIME_LIB} missing (Debian package faketime)")
        eu, aws = self.pair()
        self.rc = {s.name: os.path.join(s.dir, "faketime.rc") for s in (eu, aws)}
        self.env = {s.name: faketime_env(self.rc[s.name]) for s in (eu, aws)}
        return eu, aws

    def test_wall_clock_jumps_while_streaming(self):
        """Wall clocks of sender and receiver jump +1 h, +1 d, -1 h, -2 h while a stream flows.

        Both daemons run under libfaketime (CLOCK_REALTIME only); their clocks jump forward and
        backward (back past timestamps already used) at random moments, and each is SIGKILLed
        and restarted once under a jumped clock. Delivery continues, exactly once, in order;
        client-id de-duplication still answers re-posts after the jumps."""
        eu, aws = self.faked_pair()
        eu.start(env=self.env["europe"])
        aws.start(env=self.env["aws"])
        stream = Stream(eu, prefix="t", batch=20, pause=0.01)
        stream.start()
        plan = [("europe", "+1h"), ("aws", "+1d"), ("europe", "-1h"), ("aws", "-1h"),
                ("europe", "+1d"), ("aws", "+0"), ("europe", "-2h"), ("aws", "+1h"),
                ("europe", "+0"), ("aws", "+0")]
        sites = {"europe": eu, "aws": aws}
        applied = []
        try:
            time.sleep(0.5)
            for k, (who, off) in enumerate(plan):
                time.sleep(self.rng.uniform(0.4, 1.0))
                set_offset(self.rc[who], off)
                applied.append((who, off, stream.n_acked()))
                if k == 1:
                    # aws's clock really moved: it stamps the last contact with europe (a frame
                    # or a heartbeat, at least every second) with its wall clock.
                    self.wait_for(lambda: aws.metric("relay_last_contact_timestamp_seconds", 0,
                                                     peer="europe") > time.time() + 20 * 3600,
                                  10, "aws's clock to be ~1 day ahead (its last-contact time)")
                if k in (2, 3):
                    # A crash and restart under a jumped clock: aws while it is 1 day ahead,
                    # europe while it is 1 hour behind.
                    victim = sites["aws" if k == 2 else "europe"]
                    victim.kill9()
                    victim.start(env=self.env[victim.name], timeout=60)
            time.sleep(1.0)
        finally:
            stream.finish()
        where = f"after clock jumps {applied} (seed {self.seed})"
        recs = self.check_stream(aws, stream, where)
        self.settle([eu, aws])
        self.check_stream(aws, stream, where + ", after settling")
        # The jumps really happened: created_at (europe's wall clock at ingest) shows them.
        now = time.time()
        offsets = [parse_created(r[2]) - now for r in recs]
        self.assertTrue(any(o > 20 * 3600 for o in offsets), "no event stamped ~1 day ahead: "
                        "the fake clock did not apply")
        self.assertTrue(any(o < -1.5 * 3600 for o in offsets), "no event stamped ~2 h behind")
        # Client ids are still remembered after the jumps: a re-post gets the same ids back.
        first = [stream.texts[k] for k in range(20)]
        st, ans = eu.post([{"channel": CHANNEL, "author": "alice", "id": t, "text": t}
                           for t in first])
        self.assertEqual(st, 202)
        self.assertEqual([a["id"] for a in ans], [stream.ids[t] for t in first])
        self.assertTrue(all(a.get("duplicate") for a in ans), ans[:2])
        time.sleep(1.0)
        self.assertEqual(aws.sink_count(), len(stream.texts), "a re-post was delivered again")
        print(f"\n  [{len(applied)} clock jumps, {len(stream.texts)} messages; created_at offsets "
              f"seen from {min(offsets) / 3600:+.1f} h to {max(offsets) / 3600:+.1f} h]",
              end=" ", flush=True)

    def test_bundle_imported_after_receiver_clock_passes_dedup_ttl(self):
        """A second bundle of the same events, imported once aws's clock passed dedup_ttl: no dups.

        Sneakernet: the same events leave in two bundles (an export, then `export --all`
        because no ack came back yet). aws imports the first; then aws's wall clock is 8 days
        ahead (a clock step; or simply a disk that took 8 days), past dedup_ttl (7 d) but well
        inside the bundles' 30-day expiry. The second bundle must add nothing: aws has stored
        those sequences (its per-peer received ranges are kept forever)."""
        if not os.path.exists(FAKETIME_LIB):
            self.skipTest(f"{FAKETIME_LIB} missing (Debian package faketime)")
        eu, aws = self.site("europe"), self.site("aws")
        eu.write_config({"aws": {"site": aws}}, {CHANNEL: ["aws"]}, zmq_listen=False)
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]}, zmq_listen=False)
        rc = os.path.join(aws.dir, "faketime.rc")
        env = faketime_env(rc)
        disk1, disk2 = os.path.join(self.root, "usb1"), os.path.join(self.root, "usb2")
        os.makedirs(disk1)
        os.makedirs(disk2)
        eu.start()
        aws.start(env=env)
        msgs = messages(100, prefix="d")
        post_all(eu, msgs, batch=50)

        def export(*extra, out):
            r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--out", out, *extra)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            files = [l for l in r.stdout.splitlines() if l.strip()]
            self.assertTrue(files, r.stdout)
            return files
        export(out=disk1)
        export("--all", out=disk2)
        r = aws.cli("import", "--config", aws.conf, disk1)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_for(lambda: aws.sink_count() >= 100, 30, "100 lines at aws")
        set_offset(rc, "+8d")
        time.sleep(0.5)
        r = aws.cli("import", "--config", aws.conf, disk2)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        time.sleep(2.0)
        recs = sink_records(aws)
        self.assertEqual(aws.stop(), 0)  # its "stopped" line carries its clock
        self.assertTrue(any(o > 7.5 * 86400 for o in log_clock_offsets(aws)),
                        "aws's log shows no time 8 days ahead: the fake clock did not apply")
        ids = [x[0] for x in recs]
        self.assertEqual(len(ids) - len(set(ids)), 0,
                         f"the second bundle delivered {len(ids) - 100} events again after aws's "
                         f"clock passed dedup_ttl: {len(ids)} lines, {len(set(ids))} distinct ids "
                         f"(import said: {r.stdout.strip()[:200]})")
        self.assert_exactly_once([{"id": x[0], "text": x[1]} for x in recs],
                                 [m["text"] for m in msgs], "aws sink")

    def test_sender_store_rebuilt_with_clock_behind_loses_nothing(self):
        """Sender store rebuilt while its clock is 1 h behind: acknowledged messages must arrive.

        A new store starts its link sequences and event ids at the wall clock in microseconds,
        so that a site which lost its data folder (not its key) does not reuse them. If the
        rebuilt machine's clock is behind (one hour here: a VM restored from an image, an RTC
        not yet corrected by NTP), the new sequences are below what aws has already accepted.
        Messages acknowledged with 202 after the rebuild must still reach aws, or be refused;
        acknowledging and then dropping them as replays is a loss. aws's acknowledgements are
        then beyond anything the new log held: they are refused (an ack never moves a log it
        does not fit, issue 10), nothing is dropped, and the operator's `relay rebase` with the
        position the log names moves the queue above aws's cursor."""
        eu, aws = self.faked_pair()
        eu.start(env=self.env["europe"])
        aws.start(env=self.env["aws"])
        post_all(eu, messages(100, prefix="before"), batch=50)
        self.wait_for(lambda: aws.sink_count() >= 100, 30, "100 lines at aws")
        self.settle([eu, aws])
        self.assertEqual(eu.stop(), 0)
        shutil.rmtree(eu.data)
        set_offset(self.rc["europe"], "-1h")
        eu.start(env=self.env["europe"])
        after = messages(50, prefix="after")
        acked = []
        for m in after:
            st, body = eu.post(m)
            if st == 202:
                acked.append((m["text"], body["id"]))
        self.assertTrue(any(o < -3000 for o in log_clock_offsets(eu)),
                        "europe's log shows no time 1 h behind: the fake clock did not apply")
        # aws takes nothing (replays of its cursor) and says how far it has accepted; europe
        # refuses that acknowledgement and keeps every message.
        self.wait_for(lambda: eu.metric("relay_acks_refused_total", 0, peer="aws",
                                        reason="beyond_log") > 0, 30,
                      "europe to refuse aws's acknowledgement beyond its log")
        m = re.search(r"relay rebase --config \S+ --above (\d+)", eu.log_text())
        self.assertIsNotNone(m, "the refusal names the operator's step")
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == len(acked), 10,
                      f"all {len(acked)} messages to stay queued at europe",
                      lambda: eu.metric("relay_queue_depth", peer="aws"))
        self.assertEqual(aws.sink_count(), 100)
        # The operator's step, with europe stopped.
        self.assertEqual(eu.stop(), 0)
        r = eu.cli("rebase", "--config", eu.conf, "--above", m.group(1))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(f"moved {len(acked)} queued event(s)", r.stdout)
        eu.start(env=self.env["europe"])
        wait_for(lambda: aws.sink_count() >= 100 + len(acked), 30)
        got = {r[1] for r in sink_records(aws)}
        lost = [t for t, _ in acked if t not in got]
        replays = aws.metric("relay_frames_rejected_total", 0, reason="replay")
        self.assertEqual(len(lost), 0, f"{len(lost)} (e.g. {lost[:3]}) of {len(acked)} messages "
                                       f"acknowledged by the rebuilt europe (clock 1 h behind) "
                                       f"never reached aws; aws rejected {replays:.0f} frames as "
                                       f"replays; europe's queue depth is "
                                       f"{eu.metric('relay_queue_depth', peer='aws')}")
        # New messages after the move flow as usual; nothing arrives twice.
        post_all(eu, messages(10, prefix="later"), batch=10)
        self.wait_for(lambda: aws.sink_count() >= 110 + len(acked), 30, "the later messages")
        texts = [r[1] for r in sink_records(aws)]
        self.assertEqual(len(texts), len(set(texts)), "a message arrived twice")

    def test_mattermost_replay_after_relay_clock_steps_ahead_of_server(self):
        """Relay clock stepped 1 h ahead of its Mattermost server, one lost create answer: 1 post.

        A relay whose wall clock stepped 1 h ahead of its Mattermost server loses one create
        answer (503 after the post was made): the retry must find the post, not make a second.
        The replay notes the relay's wall clock before a create and, before retrying, looks the
        post up with `since = that time - 120 s`, which the server compares with its own clock.
        With the offset at +0 (or anything under 2 minutes) this passes, like
        test_mattermost.test_kill_between_create_and_mapping_makes_no_duplicate."""
        if not os.path.exists(FAKETIME_LIB):
            self.skipTest(f"{FAKETIME_LIB} missing (Debian package faketime)")
        from test_mattermost import ChatSite, control  # the emulator and its helpers
        eu, aws = ChatSite(self, "europe", "alice"), ChatSite(self, "aws", "bob")
        eu.configure(aws, dial=True)
        aws.configure(eu, dial=False)
        rc = os.path.join(aws.site.dir, "faketime.rc")
        eu.site.start()
        aws.site.start(env=faketime_env(rc))

        def copies(message):
            return [p for p in aws.rows() if p.get("message") == message
                    and not p.get("original_id") and not p.get("delete_at")]

        def arrived(message, timeout=30):
            self.wait_for(lambda: copies(message), timeout, f"'{message}' on aws's server",
                          lambda: [p.get("message") for p in aws.rows()])
        eu.say("warm up")
        arrived("warm up")
        set_offset(rc, "+1h")
        time.sleep(0.5)
        # aws's server makes the next post but answers 503 (the answer is lost).
        control(aws.emu, "POST", "faults", {"kind": "status", "status": 503, "process": True,
                                             "count": 1, "path_prefix": "/api/v4/posts",
                                             "method": "POST"})
        eu.say("exactly once please")
        eu.say("after the lost answer")
        arrived("after the lost answer", 60)
        time.sleep(1.0)
        made = copies("exactly once please")
        self.assertEqual(aws.site.stop(), 0)  # its "stopped" line carries its clock
        self.assertTrue(any(o > 3000 for o in log_clock_offsets(aws.site)),
                        "aws's log shows no time 1 h ahead: the fake clock did not apply")
        self.assertEqual(len(made), 1, f"{len(made)} posts on aws's server for one event "
                                       f"after a lost create answer, with aws's relay clock 1 h "
                                       f"ahead of its server")
