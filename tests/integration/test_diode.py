"""One-way data diode over UDP: FEC against loss, resend requests by disk (issue 4)."""
import os
import random
import socket
import struct
import threading
import time

from relay_harness import RelayTestCase, free_port, messages, post_all


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
