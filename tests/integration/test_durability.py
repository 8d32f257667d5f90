"""Durability with real crashes: SIGKILL of sender and receiver mid-stream, SIGTERM restarts,
a receiver that is down for a while. Every acknowledged message must arrive exactly once."""
import http.client
import os
import random
import shutil
import signal
import threading
import time

from relay_harness import CHANNEL, RelayTestCase, messages, post_all, wait_for

WAIT = 120  # the longest any delivery wait may take


class Poster(threading.Thread):
    """Posts msgs in batches (with client ids) to a site, recording which batches were
    acknowledged (202, with their ids) and which failed (error, non-202, or connection loss)."""

    def __init__(self, site, msgs, batch=100, pause=0.0):
        super().__init__(daemon=True)
        self.site = site
        self.batches = [msgs[i:i + batch] for i in range(0, len(msgs), batch)]
        self.pause = pause
        self.acked = {}      # batch index -> [event ids]
        self.failed = []     # batch indexes
        self.errors = []     # (batch index, what happened)
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.crash = None    # an unexpected exception that ended the thread

    def n_acked(self):
        with self.lock:
            return len(self.acked)

    def run(self):
        try:
            self._post_all()
        except BaseException as e:  # reported by finish(), not lost in a thread's stderr
            self.crash = e
            raise

    def _post_all(self):
        for i, b in enumerate(self.batches):
            if self.halt.is_set():
                with self.lock:
                    self.failed.extend(range(i, len(self.batches)))
                return
            try:
                st, body = self.site.post(b, timeout=15)
                ok = st == 202 and isinstance(body, list) and len(body) == len(b)
                what = None if ok else f"{st}: {str(body)[:120]}"
            except (OSError, http.client.HTTPException) as e:
                ok, what = False, repr(e)
            with self.lock:
                if ok:
                    self.acked[i] = [x["id"] for x in body]
                else:
                    self.failed.append(i)
                    self.errors.append((i, what))
            if self.pause:
                time.sleep(self.pause)

    def finish(self, timeout=120):
        self.join(timeout)
        if self.is_alive():
            raise AssertionError("the posting thread did not finish")
        if self.crash is not None:
            raise AssertionError(f"the posting thread failed: {self.crash!r}") from self.crash

    def repost_failed(self, site=None):
        """Posts every failed batch again (same client ids); each must now be acknowledged.
        Returns how many of the re-posted messages the daemon reported as duplicates."""
        site = site or self.site
        dups = 0
        for i in sorted(self.failed):
            st, body = site.post(self.batches[i], timeout=30)
            if st != 202:
                raise AssertionError(f"re-posting batch {i} answered {st}: {body!r:.200}")
            self.acked[i] = [x["id"] for x in body]
            dups += sum(1 for x in body if x.get("duplicate"))
        self.failed = []
        return dups


def seed():
    s = int(os.environ.get("RELAY_SEED") or random.SystemRandom().randrange(1 << 30))
    return s, random.Random(s)


class DurabilityTest(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.seed, self.rng = seed()

    def poll_until(self, pred, timeout, what):
        """A tight poll (2 ms) for kill triggers: the producers are fast."""
        end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > end:
                self.fail(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.002)

    def texts(self, msgs):
        return [m["text"] for m in msgs]

    def wait_all(self, site, n, channel=CHANNEL):
        return self.wait_sink(site, n, WAIT, channel)

    def check_ids(self, lines, poster, where):
        """Every acknowledged id is in the sink, for the right text."""
        by_text = {l["text"]: l["id"] for l in lines}
        wrong = []
        for i, ids in poster.acked.items():
            for m, eid in zip(poster.batches[i], ids):
                if by_text.get(m["text"]) != eid:
                    wrong.append((m["text"], eid, by_text.get(m["text"])))
        self.assertEqual(wrong[:5], [], f"{where}: {len(wrong)} acknowledged ids missing or "
                                        f"different (text, acked id, sink id)")

    # (a) -------------------------------------------------------------------------------------
    def test_sigkill_sender_mid_stream(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        # Two producers at full speed, so that the kill likely catches a batch that is being
        # committed (durable, but its 202 never sent): re-posting it must not duplicate it.
        plan = {p: messages(4000, prefix=p, ids=True) for p in ("a1", "a2")}
        posters = [Poster(eu, plan[p], batch=100) for p in plan]
        for p in posters:
            p.start()
        kill_after = self.rng.randint(8, 30)
        acked = lambda: sum(p.n_acked() for p in posters)
        self.poll_until(lambda: acked() >= kill_after, 60, f"{kill_after} batches acked")
        eu.kill9()
        for p in posters:
            p.finish()
        acked_before = [{i: list(ids) for i, ids in p.acked.items()} for p in posters]
        n_acked = sum(len(a) for a in acked_before)
        n_failed = sum(len(p.failed) for p in posters)
        self.assertGreater(n_failed, 0, "the kill came after the stream ended; nothing tested")
        self.assertGreaterEqual(n_acked, kill_after)
        eu.start()
        dups = sum(p.repost_failed() for p in posters)
        # Acknowledged batches posted again return the very same ids (the dedup index survived).
        for p, before in zip(posters, acked_before):
            for i in self.rng.sample(sorted(before), min(2, len(before))):
                st, body = eu.post(p.batches[i])
                self.assertEqual(st, 202)
                self.assertEqual([x["id"] for x in body], before[i])
                self.assertTrue(all(x.get("duplicate") for x in body), body[:2])
        total = sum(len(m) for m in plan.values())
        self.wait_all(aws, total)
        self.settle([eu, aws])
        lines = aws.sink_lines()
        where = (f"aws sink after killing europe at ~{kill_after} batches (seed {self.seed}, "
                 f"{n_acked} batches acked before, {n_failed} re-posted, {dups} messages of "
                 f"those already committed)")
        self.assertEqual(len(lines), total, where)
        for (name, msgs), p in zip(plan.items(), posters):
            mine = [l for l in lines if l["text"].startswith(name + "-")]
            self.assert_exactly_once(mine, self.texts(msgs), f"{where}, producer {name}")
            self.check_ids(lines, p, where)
        self.assertEqual(eu.sink_lines(), [])
        print(f"\n  [seed {self.seed}: kill at {n_acked} acked batches, {n_failed} failed, "
              f"{dups} re-posted messages were already committed]", end=" ")

    # (b) -------------------------------------------------------------------------------------
    def test_sigkill_receiver_mid_stream_three_times(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        msgs = messages(10000, prefix="b", ids=True)
        poster = Poster(eu, msgs, batch=100, pause=0.035)
        poster.start()
        progress = []
        for k in range(3):
            time.sleep(self.rng.uniform(0.3, 0.9))
            progress.append((poster.n_acked(), aws.sink_count()))
            aws.kill9()
            time.sleep(self.rng.uniform(0.0, 0.4))
            aws.start()
        poster.finish()
        self.assertEqual(poster.failed, [], f"the sender refused batches: {poster.errors[:3]}")
        self.assertLess(progress[0][0], len(poster.batches),
                        "the first kill came after the stream ended")
        self.wait_all(aws, len(msgs))
        self.settle([eu, aws])
        lines = aws.sink_lines()
        where = f"aws sink after 3 kills (seed {self.seed}; acked batches, sink lines at kills: {progress})"
        self.assert_exactly_once(lines, self.texts(msgs), where)
        self.check_ids(lines, poster, where)
        print(f"\n  [seed {self.seed}: kills at (acked batches, sink lines) {progress}]", end=" ")

    def test_sigkill_receiver_while_catching_up(self):
        # A backlog is queued at the sender; the receiver is killed repeatedly while it
        # takes the backlog in at full speed (frames being stored and lines being written).
        eu, aws = self.site("europe"), self.site("aws")
        # Small frames: many frames, commits and sink batches, so a kill lands mid-way.
        eu.write_config({"aws": {"site": aws, "dial": True,
                                 "keys": {"max_frame_events": 200, "window": 4}}},
                        {CHANNEL: ["aws"]})
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]})
        eu.start()
        msgs = messages(30000, prefix="c", ids=True)
        for m in msgs:
            m["text"] += " " + "." * 500
        post_all(eu, msgs, batch=500)
        # The sink grows by ~20 MB in all. Each kill comes when the file has grown by a random
        # amount since that start, watched with a tight stat() poll so that the kill lands in
        # the middle of the catch-up however fast it is.
        path = aws.sink_path()
        size = lambda: os.path.getsize(path) if os.path.exists(path) else 0
        progress = []
        for k in range(3):
            base = size()
            grow = self.rng.randint(100_000, 4_000_000)
            aws.start()
            end = time.monotonic() + 60
            while size() < base + grow and time.monotonic() < end:
                time.sleep(0.001)
            aws.kill9()
            progress.append(aws.sink_count())
            if progress[-1] >= len(msgs):
                break
        self.assertLess(progress[0], len(msgs), "the first kill came after the catch-up ended")
        aws.start()
        self.wait_all(aws, len(msgs))
        self.settle([eu, aws])
        where = f"aws sink (seed {self.seed}; sink lines at kills: {progress})"
        self.assert_exactly_once(aws.sink_lines(), self.texts(msgs), where)
        cuts = aws.log_text().count("unrecorded batch")
        print(f"\n  [seed {self.seed}: lines at kills {progress}; sink cut back {cuts}x]", end=" ")

    def test_sigkill_both_sites_mid_stream(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        eu_msgs = messages(4000, prefix="eu", ids=True)
        aws_msgs = messages(4000, prefix="aws", ids=True)
        p1 = Poster(eu, eu_msgs, batch=100, pause=0.01)
        p2 = Poster(aws, aws_msgs, batch=100, pause=0.01)
        p1.start()
        p2.start()
        at = self.rng.randint(5, 25)
        self.poll_until(lambda: p1.n_acked() >= at and p2.n_acked() >= at, 60, "batches acked")
        eu.kill9()
        aws.kill9()
        p1.finish()
        p2.finish()
        self.assertTrue(p1.failed or p2.failed, "the kill came after the stream ended")
        eu.start()
        aws.start()
        p1.repost_failed()
        p2.repost_failed()
        self.wait_all(aws, len(eu_msgs))
        self.wait_all(eu, len(aws_msgs))
        self.settle([eu, aws])
        self.assert_exactly_once(aws.sink_lines(), self.texts(eu_msgs), f"aws sink (seed {self.seed})")
        self.assert_exactly_once(eu.sink_lines(), self.texts(aws_msgs), f"europe sink (seed {self.seed})")
        self.check_ids(aws.sink_lines(), p1, "aws sink")
        self.check_ids(eu.sink_lines(), p2, "europe sink")

    # (c) -------------------------------------------------------------------------------------
    def test_sigterm_restart_both_exit_0_nothing_lost(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        eu_msgs = messages(6000, prefix="eu", ids=True)
        aws_msgs = messages(3000, prefix="aws", ids=True)
        p1 = Poster(eu, eu_msgs, batch=100, pause=0.01)
        p2 = Poster(aws, aws_msgs, batch=100, pause=0.02)
        p1.start()
        p2.start()
        self.poll_until(lambda: p1.n_acked() >= 20, 60, "20 batches acked")
        t0 = time.monotonic()
        for s in (eu, aws):
            s._signal(signal.SIGTERM)
        rc_eu, rc_aws = eu.stop(timeout=30), aws.stop(timeout=30)
        took = time.monotonic() - t0
        self.assertEqual((rc_eu, rc_aws), (0, 0), "SIGTERM must exit 0")
        self.assertLess(took, 20, "stopping took too long")
        p1.finish()
        p2.finish()
        self.assertIn("stopped", eu.log_text())
        eu.start()
        aws.start()
        p1.repost_failed()
        p2.repost_failed()
        self.wait_all(aws, len(eu_msgs))
        self.wait_all(eu, len(aws_msgs))
        self.settle([eu, aws])
        # A second clean restart with nothing in flight changes nothing.
        self.assertEqual((eu.stop(), aws.stop()), (0, 0))
        eu.start()
        aws.start()
        time.sleep(1.5)
        self.assert_exactly_once(aws.sink_lines(), self.texts(eu_msgs), "aws sink")
        self.assert_exactly_once(eu.sink_lines(), self.texts(aws_msgs), "europe sink")
        self.check_ids(aws.sink_lines(), p1, "aws sink")
        self.check_ids(eu.sink_lines(), p2, "europe sink")

    # (d) -------------------------------------------------------------------------------------
    def test_receiver_down_messages_queue_and_arrive_later(self):
        eu, aws = self.pair()
        eu.start()
        # aws has never been up: everything queues at europe.
        first = messages(1000, prefix="d1")
        post_all(eu, first, batch=100)
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 1000, 15,
                      "relay_queue_depth{peer=aws} == 1000",
                      lambda: eu.metric("relay_queue_depth", peer="aws"))
        self.assertEqual(eu.metric("relay_link_up", peer="aws"), 0)
        # The queue survives a crash of the sender.
        eu.kill9()
        eu.start()
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 1000, 15,
                      "the queue to be 1000 again after the crash",
                      lambda: eu.metric("relay_queue_depth", peer="aws"))
        aws.start()
        self.wait_all(aws, 1000)
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 0, 15,
                      "the queue to drain")
        # aws goes down again for a while; more messages queue, then arrive.
        self.assertEqual(aws.stop(), 0)
        second = messages(500, prefix="d2")
        post_all(eu, second, batch=50)
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 500, 15,
                      "relay_queue_depth{peer=aws} == 500 while aws is down",
                      lambda: eu.metric("relay_queue_depth", peer="aws"))
        time.sleep(2)  # "a while": more than a heartbeat
        self.assertEqual(aws.sink_count(), 1000)
        aws.start()
        self.wait_all(aws, 1500)
        self.settle([eu, aws])
        self.assert_exactly_once(aws.sink_lines(), self.texts(first + second), "aws sink")
        self.assertEqual(eu.metric("relay_queue_depth", peer="aws"), 0)

    # Forwarding hub -----------------------------------------------------------------------
    def test_sigkill_forwarding_hub_mid_stream(self):
        # aws -> europe -> enclave: europe stores and forwards in one commit; killing it
        # mid-stream must neither lose nor duplicate anything at europe or the enclave.
        eu, aws, enc = self.site("europe"), self.site("aws"), self.site("enclave")
        eu.write_config({"aws": {"site": aws, "dial": True}, "enclave": {"site": enc, "dial": True}},
                        {CHANNEL: ["aws", "enclave"]})
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]})
        enc.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]},
                         origins={"aws": {"site": aws, "via": ["europe"]}})
        for s in (eu, aws, enc):
            s.start()
        msgs = messages(6000, prefix="h", ids=True)
        poster = Poster(aws, msgs, batch=100, pause=0.03)
        poster.start()
        progress = []
        for k in range(2):
            time.sleep(self.rng.uniform(0.3, 1.0))
            progress.append((poster.n_acked(), eu.sink_count(), enc.sink_count()))
            eu.kill9()
            time.sleep(self.rng.uniform(0.0, 0.3))
            eu.start()
        poster.finish()
        self.assertEqual(poster.failed, [], poster.errors[:3])
        self.wait_all(eu, len(msgs))
        self.wait_all(enc, len(msgs))
        self.settle([eu, aws, enc])
        where = f"(seed {self.seed}; acked batches, europe, enclave lines at kills: {progress})"
        self.assert_exactly_once(eu.sink_lines(), self.texts(msgs), "europe sink " + where)
        self.assert_exactly_once(enc.sink_lines(), self.texts(msgs), "enclave sink " + where)
        self.check_ids(enc.sink_lines(), poster, "enclave sink")
        self.assertEqual(aws.sink_lines(), [], "echo back to the origin")

    # Store reset ---------------------------------------------------------------------------
    def test_sender_data_dir_lost_new_messages_still_delivered(self):
        # The disk holding europe's data_dir is replaced (the key file, kept elsewhere as
        # /etc/relay/europe.key is, survives). Messages acknowledged by the rebuilt europe must
        # reach aws -- or the daemon must refuse them; acknowledging and then silently
        # dropping them is a loss.
        eu, aws = self.pair()
        eu.start()
        aws.start()
        post_all(eu, messages(100, prefix="before"))
        self.wait_all(aws, 100)
        self.settle([eu, aws])
        self.assertEqual(eu.stop(), 0)
        before_ids = {l["id"] for l in aws.sink_lines()}
        shutil.rmtree(eu.data)
        eu.start()
        after = messages(50, prefix="after")
        acked = []
        for m in after:
            st, body = eu.post(m)
            if st == 202:
                acked.append((m["text"], body["id"]))
        reused = [eid for _, eid in acked if eid in before_ids]
        wait_for(lambda: aws.sink_count() >= 100 + len(acked), 10)
        got = {l["text"] for l in aws.sink_lines()}
        lost = [t for t, _ in acked if t not in got]
        if lost:
            self.fail(f"{len(lost)} of {len(acked)} messages acknowledged after the reset never "
                      f"reached aws; {len(reused)} of their ids repeat ids aws already delivered "
                      f"(e.g. {reused[:3]}); aws relay_frames_rejected_total{{reason=replay}} = "
                      f"{aws.metric('relay_frames_rejected_total', reason='replay')}")
        self.assertFalse(reused, f"event ids are reused after the reset: {reused[:3]}")
