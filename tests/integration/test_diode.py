"""One-way data diode over UDP: FEC against loss, resend requests by disk (issue 4);
authenticated datagrams against forgery and replay (issue 10)."""
import os
import random
import socket
import struct
import threading
import time

from relay_harness import RelayTestCase, free_port, messages, post_all, run_cli


class LossyUdpProxy:
    """Forwards datagrams to a target, dropping, duplicating and reordering them at set rates.
    Bounded: it stops when closed (the test's cleanup)."""

    def __init__(self, target_port, loss=0.0, dup=0.0, reorder=0.0, seed=1):
        self.target = ("127.0.0.1", target_port)
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.rng = random.Random(seed)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.held = []
        self.counts = {"in": 0, "dropped": 0, "duplicated": 0, "reordered": 0}
        self.captured = []     # every datagram that came in, while capture is on
        self.capture = False
        self.drop_if = None    # callable(datagram) -> True to drop it (a targeted loss)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, data):
        self.out.sendto(data, self.target)

    def _run(self):
        while self.running:
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                for d in self.held:
                    self._send(d)
                self.held = []
                continue
            self.counts["in"] += 1
            if self.capture:
                self.captured.append(data)
            if self.drop_if is not None and self.drop_if(data):
                self.counts["dropped"] += 1
                continue
            r = self.rng.random()
            if r < self.loss:
                self.counts["dropped"] += 1
                continue
            if self.rng.random() < self.reorder:
                self.held.append(data)  # released later, after others
                self.counts["reordered"] += 1
                if len(self.held) > 16:
                    self._send(self.held.pop(self.rng.randrange(len(self.held))))
                continue
            self._send(data)
            if self.rng.random() < self.dup:
                self.counts["duplicated"] += 1
                self._send(data)

    def close(self):
        self.running = False
        self.thread.join(timeout=5)
        self.sock.close()
        self.out.close()


def parse_datagram(d):
    """The header fields of a diode datagram, version 1 (044873d and before) or 2
    (docs/wire-format.md, "Diode datagrams"): what anyone on the diode's network can read."""
    version, kind = d[4], d[5]
    if version == 1:
        stream, number = struct.unpack(">QQ", d[8:24])
        return {"version": 1, "type": kind, "stream": stream, "seq": None,
                "message_id" if kind == 1 else "last_message_id": number, "header": d[:8]}
    sender, recipient, stream, seq, number = struct.unpack(">QQQQQ", d[8:48])
    return {"version": version, "type": kind, "sender": sender, "recipient": recipient,
            "stream": stream, "seq": seq,
            "message_id" if kind == 1 else "last_message_id": number}


def forged_v1_message(stream, message_id):
    """The review's forgery: a 45-byte version 1 data datagram completing a one-byte message
    under `message_id` of `stream` (no tag: version 1 had none)."""
    d = b"RLYD" + bytes([1, 1, 0, 0]) + struct.pack(">QQIIIHHHH", stream, message_id, 1, 0, 1, 1,
                                                      4, 0, 1) + b"x"
    assert len(d) == 45
    return d


def forged_v2_message(real, message_id, seq, rng):
    """A version 2 data datagram shaped like `real` (same sender, recipient and stream) that
    completes a one-byte message under `message_id`, with a made-up tag (no key)."""
    f = parse_datagram(real)
    d = (b"RLYD" + bytes([2, 1, 0, 0]) +
         struct.pack(">QQQQQIIIHHHH", f["sender"], f["recipient"], f["stream"], seq, message_id,
                     1, 0, 1, 1, 4, 0, 1) + b"x" + rng.randbytes(16))
    assert len(d) == 68 + 1 + 16
    return d


def forged_heartbeat(real, last_message_id, rng, version=None):
    """A heartbeat of `real`'s stream announcing `last_message_id`, in `real`'s version or the
    one given (version 1 has no tag; version 2 gets a made-up one)."""
    f = parse_datagram(real)
    if (version or f["version"]) == 1:
        return b"RLYD" + bytes([1, 2, 0, 0]) + struct.pack(">QQQ", f["stream"], last_message_id,
                                                            0)
    return (b"RLYD" + bytes([2, 2, 0, 0]) +
            struct.pack(">QQQQQQ", f["sender"], f["recipient"], f["stream"], f["seq"] + 1,
                        last_message_id, 0) + rng.randbytes(16))


class DiodeTest(RelayTestCase):
    def diode_pair(self, loss, reorder=0.0, dup=0.0, keys=None):
        eu, enc = self.site("europe"), self.site("enclave")
        self.diode_port = free_port()
        self.proxy_obj = LossyUdpProxy(self.diode_port, loss=loss, reorder=reorder, dup=dup)
        self.addCleanup(self.proxy_obj.close)
        peer_keys = {"diode_send": f"udp://127.0.0.1:{self.proxy_obj.port}",
                     "diode_rate": "4MiB", "max_frame_events": "256"}
        peer_keys.update(keys or {})
        eu.write_config({"enclave": {"site": enc, "keys": peer_keys}}, {"war-room": ["enclave"]},
                        zmq_listen=False)
        enc.write_config({"europe": {"site": eu}}, {"war-room": ["europe"]}, zmq_listen=False,
                         extra=f"[diode]\nlisten = udp://127.0.0.1:{self.diode_port}\n")
        enc.start()
        eu.start()
        return eu, enc

    def post_one_by_one(self, site, prefix, n, start=0):
        """Posts n messages one request each (so each tends to travel in a frame of its own)."""
        for m in messages(n, prefix=prefix, start=start):
            st, body = site.post(m)
            self.assertEqual(st, 202, body)

    def real_data(self):
        """The data datagrams the proxy captured, parsed, with the datagram itself."""
        out = []
        for d in list(self.proxy_obj.captured):
            if len(d) > 8 and d[:4] == b"RLYD" and d[5] == 1:
                f = parse_datagram(d)
                f["bytes"] = d
                out.append(f)
        return out

    def rejected(self, site, reason):
        return site.metric("relay_diode_datagrams_rejected_total", 0, reason=reason)

    def check_exactly_once(self, site, texts):
        lines = site.sink_lines()
        ids = [l["id"] for l in lines]
        self.assertEqual(len(ids), len(set(ids)), "duplicate ids in the sink")
        self.assertEqual(sorted(l["text"] for l in lines), sorted(texts))

    def test_five_percent_loss_and_reordering_with_default_fec(self):
        eu, enc = self.diode_pair(loss=0.05, reorder=0.05, dup=0.02)
        n = 3000
        post_all(eu, messages(n, prefix="d"), batch=250)
        self.wait_for(lambda: enc.sink_count() >= n, 90, f"{n} messages through the diode",
                      lambda: f"{enc.sink_count()} arrived; proxy {self.proxy_obj.counts}; "
                              f"recovered {enc.metric('relay_diode_shards_recovered_total')}")
        time.sleep(0.5)
        self.check_exactly_once(enc, [f"d-{i}" for i in range(n)])
        self.assertGreater(self.proxy_obj.counts["dropped"], 0)
        # The gauges are refreshed once a second.
        self.wait_for(lambda: enc.metric("relay_diode_shards_recovered_total") > 0, 10,
                      "losses repaired by FEC (relay_diode_shards_recovered_total > 0)")

    def test_loss_beyond_fec_is_recovered_by_a_resend_request(self):
        eu, enc = self.diode_pair(loss=0.30, keys={"diode_parity_shards": "2"})
        n = 2000
        post_all(eu, messages(n, prefix="r"), batch=250)
        # Let the sender get everything on the wire once (it never hears back).
        self.wait_for(lambda: eu.metric("relay_diode_datagrams_sent_total") > 0 and
                      enc.metric("relay_diode_frames_missing") > 0, 60,
                      "frames lost beyond what FEC repairs")
        time.sleep(1.0)
        got = enc.sink_count()
        self.assertLess(got, n, "30% loss with 2 parity shards must lose something")
        # The enclave writes a resend request; a person carries it to europe.
        disk = os.path.join(self.root, "usb")
        os.makedirs(disk)
        r = enc.cli("export", "--config", enc.conf, "--peer", "europe", "--resend-request",
                    "--out", disk)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.proxy_obj.loss = 0.0  # the diode got better meanwhile
        r = eu.cli("import", "--config", eu.conf, disk)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("acknowledges everything through", r.stdout)
        self.wait_for(lambda: enc.sink_count() >= n, 90, "everything after the resend request",
                      lambda: f"{enc.sink_count()} arrived")
        time.sleep(0.5)
        self.check_exactly_once(enc, [f"r-{i}" for i in range(n)])
        self.assertGreater(eu.metric("relay_diode_resend_ranges_total"), 0)

    def test_forged_heartbeats_of_made_up_streams_change_no_state(self):
        """Attack: someone on the diode's network (no keys) floods the receiver with 5,000
        heartbeats of made-up streams announcing 2^40 frames each (version 1, untagged, and
        version 2 with made-up tags). Safe outcome: each is refused and counted before it
        creates any state (no stream dropped, nothing counted missing), and the real stream is
        delivered exactly once."""
        eu, enc = self.diode_pair(loss=0.0)
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(forger.close)
        rng = random.Random(7)
        for i in range(5000):
            stream = rng.getrandbits(64)
            if i % 2:
                hb = (b"RLYD" + bytes([1, 2, 0, 0]) + stream.to_bytes(8, "big") +
                      (1 << 40).to_bytes(8, "big") + bytes(8))
                self.assertEqual(len(hb), 32)  # version 1: docs of 044873d
            else:
                hb = (b"RLYD" + bytes([2, 2, 0, 0]) + rng.randbytes(16) +  # random site ids
                      struct.pack(">QQQQ", stream, 1, 1 << 40, 0) + rng.randbytes(16))
                self.assertEqual(len(hb), 72)  # docs/wire-format.md, "Diode datagrams"
            forger.sendto(hb, ("127.0.0.1", self.diode_port))
        n = 1000
        post_all(eu, messages(n, prefix="f"), batch=250)
        self.wait_for(lambda: enc.sink_count() >= n, 60, f"{n} messages through the diode",
                      lambda: f"{enc.sink_count()} arrived")
        time.sleep(1.2)  # the gauges are refreshed once a second
        self.check_exactly_once(enc, [f"f-{i}" for i in range(n)])
        self.assertEqual(enc.metric("relay_diode_streams_dropped_total"), 0)
        self.assertEqual(enc.metric("relay_diode_frames_missing"), 0)
        self.wait_for(lambda: self.rejected(enc, "unsupported_version") +
                      self.rejected(enc, "unknown_sender") + self.rejected(enc, "wrong_recipient")
                      >= 5000, 10, "5000 forged heartbeats refused",
                      lambda: enc.metrics().text)
        self.assertEqual(self.rejected(enc, "unsupported_version"), 2500)
        # Random site ids: neither this site's nor a peer's.
        self.assertEqual(self.rejected(enc, "wrong_recipient") +
                         self.rejected(enc, "unknown_sender"), 2500)
        self.assertIn("version 1 is not supported (this relay supports version 2)",
                      enc.log_text())
        self.assertTrue(enc.running(), "the receiver died")

    def test_forged_and_replayed_datagrams_while_real_messages_flow(self):
        """Attack: someone on the diode's network (no keys) forges datagrams shaped like the live
        stream's -- one-byte messages completing the next 30 real frame ids, as the review's
        45-byte version 1 datagrams and as version 2 with made-up tags, and heartbeats
        announcing 2^40 -- and replays every datagram it captured, while real messages flow.
        Safe outcome: every real message is delivered exactly once, no forged frame reaches
        verification, relay_diode_frames_missing stays 0, and each forged or replayed datagram
        is counted as refused by reason (bad_tag, unsupported_version, replay)."""
        eu, enc = self.diode_pair(loss=0.0)
        self.proxy_obj.capture = True
        self.post_one_by_one(eu, "a", 20)
        self.wait_sink(enc, 20, timeout=30)
        time.sleep(1.5)  # a heartbeat or two captured as well
        captured = list(self.proxy_obj.captured)
        real = self.real_data()
        self.assertTrue(real, "no data datagram captured")
        last = max(real, key=lambda f: f["message_id"])
        rng = random.Random(20261202)
        forged = {"v1": [], "v2": []}
        for i in range(1, 31):
            forged["v1"].append(forged_v1_message(last["stream"], last["message_id"] + i))
            if last["version"] == 2:
                forged["v2"].append(forged_v2_message(last["bytes"], last["message_id"] + i,
                                                      last["seq"] + 1000 + i, rng))
        forged["v1"].append(forged_heartbeat(last["bytes"], 1 << 40, rng, version=1))
        if last["version"] == 2:
            forged["v2"].append(forged_heartbeat(last["bytes"], 1 << 40, rng))
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(forger.close)
        target = ("127.0.0.1", self.diode_port)

        def attack():
            for d in forged["v1"] + forged["v2"]:
                forger.sendto(d, target)
            for d in captured:
                forger.sendto(d, target)

        attack()  # ahead of the next real frames, as in the review
        rounds = 1
        poster = threading.Thread(target=self.post_one_by_one, args=(eu, "b", 30))
        poster.start()
        while poster.is_alive():  # and again while they flow
            attack()
            rounds += 1
            time.sleep(0.2)
        poster.join()
        attack()
        rounds += 1
        expected = [f"a-{i}" for i in range(20)] + [f"b-{i}" for i in range(30)]
        self.wait_for(lambda: enc.sink_count() >= 50, 30,
                      "every real message despite the forged and replayed datagrams",
                      lambda: f"{enc.sink_count()} of 50 arrived; missing gauge "
                              f"{enc.metric('relay_diode_frames_missing')}")
        time.sleep(1.5)
        self.check_exactly_once(enc, expected)
        self.assertGreaterEqual(self.rejected(enc, "unsupported_version"),
                                rounds * len(forged["v1"]))
        self.assertGreaterEqual(self.rejected(enc, "bad_tag"), rounds * len(forged["v2"]))
        self.assertGreaterEqual(self.rejected(enc, "replay"), rounds * len(captured))
        self.assertEqual(enc.metric("relay_diode_frames_missing"), 0)
        self.assertEqual(enc.metric("relay_diode_streams_dropped_total"), 0)
        # Nothing forged got as far as frame verification.
        for reason in ("bad_magic", "truncated", "bad_signature", "unknown_sender"):
            self.assertEqual(enc.metric("relay_frames_rejected_total", 0, reason=reason), 0,
                             reason)
        self.assertTrue(enc.running(), "the receiver died")

    def test_replayed_old_stream_after_the_sender_restarts(self):
        """Attack: someone on the diode's network records the sender's stream, and replays it
        whole after the sender restarted (a new stream), and again after the receiver
        restarted. Safe outcome: the old stream is refused (stale_stream) without touching the
        live one's state, nothing is delivered twice, and nothing counts as missing."""
        eu, enc = self.diode_pair(loss=0.0)
        self.proxy_obj.capture = True
        post_all(eu, messages(200, prefix="o"), batch=50)
        self.wait_sink(enc, 200, timeout=30)
        time.sleep(1.2)
        old = list(self.proxy_obj.captured)
        self.proxy_obj.capture = False
        self.proxy_obj.captured = []
        eu.restart()
        post_all(eu, messages(200, prefix="n"), batch=50)
        self.wait_sink(enc, 400, timeout=30)
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(forger.close)
        for d in old:
            forger.sendto(d, ("127.0.0.1", self.diode_port))
        enc.restart()
        for d in old:
            forger.sendto(d, ("127.0.0.1", self.diode_port))
        post_all(eu, messages(200, prefix="p"), batch=50)
        self.wait_sink(enc, 600, timeout=30)
        time.sleep(1.5)
        self.check_exactly_once(enc, [f"{p}-{i}" for p in "onp" for i in range(200)])
        # Nothing counts as missing: neither the replays nor the receiver's restart (it keeps a
        # record of the live stream).
        self.assertEqual(enc.metric("relay_diode_frames_missing"), 0)
        # After its restart the receiver refuses the old stream from its stored floor: every
        # replayed datagram of the second round is stale (the first round's are, or replays).
        self.assertGreaterEqual(self.rejected(enc, "stale_stream"), len(old))
        self.assertTrue(enc.running(), "the receiver died")

    def test_forged_completion_cannot_hide_a_lost_frame(self):
        """Attack: someone on the diode's network drops every datagram of one real frame and
        forges its completion (and of the frames around it), as in the review. Safe outcome:
        the lost frame is counted in relay_diode_frames_missing (exactly one), a resend request
        carried back by disk recovers it, and every message is delivered exactly once."""
        eu, enc = self.diode_pair(loss=0.0)
        self.proxy_obj.capture = True
        self.post_one_by_one(eu, "c", 5)
        self.wait_sink(enc, 5, timeout=30)
        last = max(self.real_data(), key=lambda f: f["message_id"])
        target_id = last["message_id"] + 3

        def drop(d):
            return (len(d) > 8 and d[:4] == b"RLYD" and d[5] == 1 and
                    parse_datagram(d).get("message_id") == target_id)

        self.proxy_obj.drop_if = drop
        rng = random.Random(5)
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(forger.close)
        for i in range(1, 11):
            forger.sendto(forged_v1_message(last["stream"], last["message_id"] + i),
                          ("127.0.0.1", self.diode_port))
            if last["version"] == 2:
                forger.sendto(forged_v2_message(last["bytes"], last["message_id"] + i,
                                                last["seq"] + 1000 + i, rng),
                              ("127.0.0.1", self.diode_port))
        self.post_one_by_one(eu, "c", 10, start=5)
        self.wait_for(lambda: enc.metric("relay_diode_frames_missing") >= 1, 20,
                      "the dropped frame counted missing (relay_diode_frames_missing >= 1)",
                      lambda: f"{enc.sink_count()} of 15 arrived; "
                              f"dropped by the proxy {self.proxy_obj.counts['dropped']}")
        self.assertGreater(self.proxy_obj.counts["dropped"], 0)
        time.sleep(1.5)
        self.assertEqual(enc.metric("relay_diode_frames_missing"), 1)
        self.assertLess(enc.sink_count(), 15)
        # The enclave writes a resend request; a person carries it to europe.
        self.proxy_obj.drop_if = None
        disk = os.path.join(self.root, "usb")
        os.makedirs(disk)
        r = enc.cli("export", "--config", enc.conf, "--peer", "europe", "--resend-request",
                    "--out", disk)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = eu.cli("import", "--config", eu.conf, disk)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_for(lambda: enc.sink_count() >= 15, 30, "everything after the resend request",
                      lambda: f"{enc.sink_count()} arrived")
        time.sleep(0.5)
        self.check_exactly_once(enc, [f"c-{i}" for i in range(15)])

    def test_key_rotations_of_either_site_keep_the_diode_flowing(self):
        """Both sites rotate their keys in the order docs/diode.md gives; the datagrams (and
        frames) of each step verify with the keys configured then, and nothing is lost."""
        eu, enc = self.diode_pair(loss=0.0)
        post_all(eu, messages(50, prefix="r0"))
        self.wait_sink(enc, 50, timeout=30)

        def new_key(site, name):
            path = os.path.join(site.dir, name)
            self.assertEqual(run_cli(["keygen", path]).returncode, 0)
            return path, run_cli(["pubkey", path]).stdout.strip()

        def eu_conf(site_keys=None):
            eu.write_config({"enclave": {"site": enc, "keys": {
                "diode_send": f"udp://127.0.0.1:{self.proxy_obj.port}", "diode_rate": "4MiB"}}},
                {"war-room": ["enclave"]}, zmq_listen=False, site=site_keys)

        def enc_conf(site_keys=None, europe_keys=None):
            enc.write_config({"europe": {"site": eu, "keys": europe_keys or {}}},
                             {"war-room": ["europe"]}, zmq_listen=False, site=site_keys,
                             extra=f"[diode]\nlisten = udp://127.0.0.1:{self.diode_port}\n")

        # The sender rotates: the receiver learns the new key first (a diode queues nothing)...
        old_eu_key, old_eu_pub = eu.key, eu.pub
        eu_key2, eu_pub2 = new_key(eu, "europe-2.key")
        eu.pub = eu_pub2
        enc_conf(europe_keys={"previous_public_key": old_eu_pub,
                                "previous_public_key_until": "2099-01-01T00:00:00Z"})
        enc.restart()
        post_all(eu, messages(50, prefix="r1"))  # still sealed with europe's old key
        self.wait_sink(enc, 100, timeout=30)
        # ... then the sender switches.
        eu.key = eu_key2
        eu_conf(site_keys={"previous_key_file": old_eu_key})
        eu.restart()
        post_all(eu, messages(50, prefix="r2"))
        self.wait_sink(enc, 150, timeout=30)

        # The receiver rotates: it keeps its old key while europe still seals for it.
        old_enc_key = enc.key
        enc_key2, enc_pub2 = new_key(enc, "enclave-2.key")
        enc.key = enc_key2
        enc_conf(site_keys={"previous_key_file": old_enc_key},
                 europe_keys={"previous_public_key": old_eu_pub,
                                "previous_public_key_until": "2099-01-01T00:00:00Z"})
        enc.restart()
        post_all(eu, messages(50, prefix="r3"))  # europe still has the enclave's old key
        self.wait_sink(enc, 200, timeout=30)
        enc.pub = enc_pub2
        eu_conf(site_keys={"previous_key_file": old_eu_key})
        eu.restart()
        post_all(eu, messages(50, prefix="r4"))
        self.wait_sink(enc, 250, timeout=30)
        time.sleep(1.5)
        self.check_exactly_once(enc, [f"r{k}-{i}" for k in range(5) for i in range(50)])
        self.assertEqual(enc.metric("relay_diode_frames_missing"), 0)
        for reason in ("bad_tag", "unknown_sender", "wrong_recipient"):
            self.assertEqual(self.rejected(enc, reason), 0, reason)
