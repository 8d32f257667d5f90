"""Link-level security: unknown keys and wrong keys are refused, counted, harmless; the ZeroMQ
link's CURVE security stands up to tampering, replay, strangers and junk on the wire."""
import os
import socket
import struct
import time

from relay_harness import (CHANNEL, CurveConnection, CurveError, RelayTestCase, Site, Sodium,
                           box_keypair, messages, post_all)

REASONS = ("truncated", "bad_magic", "unsupported_version", "unknown_sender", "wrong_recipient",
           "bad_signature", "decrypt_failed", "malformed", "replay", "gap")


def rejected(site, reason):
    return site.metric("relay_frames_rejected_total", 0, reason=reason)


def refused(site, reason):
    return site.metric("relay_link_refused_total", 0, reason=reason)


def frame_rejections(site):
    """Every relay_frames_rejected_total counter: what reached relay's own parsers."""
    m = site.metrics()
    return {r: m.value("relay_frames_rejected_total", 0, reason=r) for r in REASONS}


class SecurityTest(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.eu, self.aws = self.pair()

    def legit_traffic_flows(self, expect_at_aws=()):
        """europe -> aws and aws -> europe still work; aws's sink ends up holding exactly
        `expect_at_aws` followed by a fresh message from europe."""
        eu, aws = self.eu, self.aws
        st, body = eu.post({"channel": CHANNEL, "author": "alice", "text": "legit after"})
        self.assertEqual(st, 202, body)
        want = list(expect_at_aws) + ["legit after"]
        self.wait_sink(aws, len(want), 30)
        st, _ = aws.post({"channel": CHANNEL, "author": "bob", "text": "legit back"})
        self.assertEqual(st, 202)
        lines = self.wait_sink(eu, 1, 30)
        self.assertEqual([l["text"] for l in lines], ["legit back"])
        time.sleep(0.5)
        self.assert_exactly_once(aws.sink_lines(), want, "aws sink")

    def rogue_dials_aws(self, name):
        rogue = self.site(name)
        # The rogue believes aws is its peer and dials it; aws has never heard of the rogue.
        rogue.write_config({"aws": {"site": self.aws, "dial": True}}, {CHANNEL: ["aws"]})
        return rogue

    def test_unknown_sender_is_rejected(self):
        """Attack: a site whose key aws does not know dials aws and sends 200 messages; safe
        outcome: its connection is refused by ZAP (unknown_key) before any relay message is
        read, nothing is delivered or answered, europe's traffic is unaffected."""
        eu, aws = self.eu, self.aws
        eu.start()
        aws.start()
        before = refused(aws, "unknown_key")
        rogue = self.rogue_dials_aws("mallory")
        rogue.start()
        post_all(rogue, messages(200, author="mallory", prefix="evil"), batch=50)
        self.wait_for(lambda: refused(aws, "unknown_key") > before, 15,
                      "aws to refuse the rogue's key", lambda: refused(aws, "unknown_key"))
        self.wait_for(lambda: refused(rogue, "dial_failed") > 0, 15,
                      "the rogue to see its key refused")
        time.sleep(2.5)  # more than two heartbeat intervals of the rogue's attempts
        self.assertEqual(aws.sink_lines(), [], "the rogue's messages were delivered")
        self.assertEqual(rogue.metric("relay_link_up", peer="aws"), 0, "the rogue's link came up")
        self.assertEqual(rogue.metric("relay_queue_depth", peer="aws"), 200)
        self.assertEqual(rogue.metric("relay_frames_rejected_total", 0, reason="unknown_sender"),
                         0, "aws answered the rogue with a signed message")
        self.assertEqual(aws.metric("relay_frames_received_total", peer="europe"), 0)
        self.assertEqual(sum(frame_rejections(aws).values()), 0,
                         "a rogue's message reached relay's parser")
        self.assertIn("is not the box key of a configured peer", aws.log_text())
        self.assertIn("refused this site's CURVE key", rogue.log_text())
        self.assertTrue(aws.healthy())
        self.assertTrue(aws.running())
        self.legit_traffic_flows()
        self.assertEqual([l["origin_site"] for l in aws.sink_lines()], ["europe"])

    def test_unknown_sender_using_a_known_peer_name(self):
        """Attack: a site that calls itself "europe" but has its own key dials aws; safe outcome:
        refused by key (unknown_key), nothing delivered; the real europe then links up."""
        eu, aws = self.eu, self.aws
        aws.start()
        impostor_root = os.path.join(self.root, "impostor")
        os.makedirs(impostor_root)
        imp = Site(impostor_root, "europe")
        self.sites.append(imp)
        imp.write_config({"aws": {"site": aws, "dial": True}}, {CHANNEL: ["aws"]})
        imp.start()
        post_all(imp, messages(50, author="eve", prefix="fake"), batch=50)
        self.wait_for(lambda: refused(aws, "unknown_key") > 0, 15, "aws to refuse the impostor")
        time.sleep(1.5)
        self.assertEqual(aws.sink_lines(), [])
        self.assertEqual(aws.metric("relay_link_up", peer="europe"), 0)
        imp.kill9()
        eu.start()
        self.legit_traffic_flows()

    def test_wrong_public_key_for_peer_at_the_dialer(self):
        # europe's [peer.aws] holds the enclave's key: europe's CURVE client expects the
        # enclave's box key from aws, so the handshake cannot complete.
        eu, aws = self.eu, self.aws
        enclave = self.site("enclave")
        eu.write_config({"aws": {"site": aws, "dial": True, "public_key": enclave.pub}},
                        {CHANNEL: ["aws"]})
        eu.start()
        aws.start()
        msgs = messages(100, prefix="early")
        post_all(eu, msgs, batch=50)
        self.wait_for(lambda: refused(aws, "handshake_failed") > 0, 15,
                      "aws to count failed CURVE handshakes of europe's connections",
                      lambda: aws.metrics().text)
        self.wait_for(lambda: refused(eu, "dial_failed") > 0, 15, "europe to count them too")
        time.sleep(2.5)
        self.assertEqual(aws.sink_lines(), [], "delivered despite the wrong key")
        self.assertEqual(eu.metric("relay_link_up", peer="aws"), 0)
        self.assertEqual(eu.metric("relay_queue_depth", peer="aws"), 100)
        self.assertIn("its box key is not the public_key configured for it", eu.log_text())
        self.assertTrue(aws.healthy() and eu.healthy())
        # Fix the key: the queued messages (acknowledged to their producer) now arrive.
        self.assertEqual(eu.stop(), 0)
        eu.write_config({"aws": {"site": aws, "dial": True}}, {CHANNEL: ["aws"]})
        eu.start()
        self.legit_traffic_flows(expect_at_aws=[m["text"] for m in msgs])

    def test_wrong_public_key_for_peer_at_the_listener(self):
        # aws's [peer.europe] holds the enclave's key: europe's correct hello is from an
        # unknown sender as far as aws knows.
        eu, aws = self.eu, self.aws
        enclave = self.site("enclave")
        aws.write_config({"europe": {"site": eu, "public_key": enclave.pub}}, {CHANNEL: ["europe"]})
        eu.start()
        aws.start()
        msgs = messages(100, prefix="early")
        post_all(eu, msgs, batch=50)
        st, _ = aws.post({"channel": CHANNEL, "author": "bob", "text": "from aws"})
        self.assertEqual(st, 202)
        self.wait_for(lambda: refused(aws, "unknown_key") > 0, 15,
                      "aws to refuse europe's key", lambda: aws.metrics().text)
        self.wait_for(lambda: refused(eu, "dial_failed") > 0, 15, "europe to see it refused")
        time.sleep(2.5)
        self.assertEqual(aws.sink_lines(), [])
        self.assertEqual(eu.sink_lines(), [], "europe got a message from aws over a bad link")
        self.assertEqual(aws.metric("relay_link_up", peer="europe"), 0)
        self.assertTrue(aws.healthy() and eu.healthy())
        self.assertEqual(aws.stop(), 0)
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]})
        aws.start()
        st, _ = eu.post({"channel": CHANNEL, "author": "alice", "text": "legit after"})
        self.assertEqual(st, 202)
        want = [m["text"] for m in msgs] + ["legit after"]
        self.wait_sink(aws, len(want), 30)
        self.wait_sink(eu, 1, 30)
        time.sleep(0.5)
        self.assert_exactly_once(aws.sink_lines(), want, "aws sink")
        self.assert_exactly_once(eu.sink_lines(), ["from aws"], "europe sink")

    def test_garbage_on_the_zmq_port(self):
        """Attack: anyone sends garbage, an HTTP request and a plaintext (NULL) ZMTP greeting to
        the ZeroMQ port; safe outcome: the connections are closed, aws keeps running and
        delivering, nothing reaches relay's parsers."""
        eu, aws = self.eu, self.aws
        eu.start()
        aws.start()
        self.legit_traffic_flows()
        payloads = [b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096),
                    # A ZMTP 3 greeting followed by junk.
                    b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 16 + b"\x00" + b"\x00" * 31
                    + os.urandom(512)]
        for p in payloads:
            try:
                s = socket.create_connection(("127.0.0.1", aws.zmq_port), timeout=3)
                s.sendall(p)
                # Until aws closes it (or 3 s): closing first could end the connection before a
                # loaded daemon has read the greeting, and then there is no handshake to fail.
                try:
                    while s.recv(4096):
                        pass
                except OSError:
                    pass
                s.close()
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while refused(aws, "handshake_failed") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertTrue(aws.running(), "aws died on garbage")
        self.assertTrue(aws.healthy())
        st, _ = eu.post({"channel": CHANNEL, "author": "alice", "text": "after garbage"})
        self.assertEqual(st, 202)
        self.wait_sink(aws, 2, 30)
        self.assertEqual([l["text"] for l in aws.sink_lines()], ["legit after", "after garbage"])
        self.assertEqual(sum(frame_rejections(aws).values()), 0)
        self.assertGreater(refused(aws, "handshake_failed"), 0, "the NULL greeting was not seen")
        self.assertIn("relay link version 1 is not supported; this relay supports version 2",
                      aws.log_text())


FAST_LINK = {"heartbeat_interval": "500ms", "peer_timeout": "2s"}


class TamperedLinkTest(RelayTestCase):
    """europe dials aws through a proxy that can flip, truncate, drop and replay frames."""

    def setUp(self):
        super().setUp()
        self.eu, self.aws = self.site("europe"), self.site("aws")
        self.px = self.proxy(self.aws, self.eu)
        self.eu.write_config({"aws": {"site": self.aws, "connect": self.px.url}},
                             {CHANNEL: ["aws"]}, zmq=FAST_LINK)
        self.aws.write_config({"europe": {"site": self.eu}}, {CHANNEL: ["europe"]}, zmq=FAST_LINK)
        self.aws.start()
        self.eu.start()
        self.wait_link_up()

    def wait_link_up(self):
        self.wait_for(lambda: self.eu.metric("relay_link_up", peer="aws") == 1, 30,
                      "europe's link to aws (through the proxy) to come up")

    def test_tampered_and_truncated_frames_are_rejected(self):
        """Attack: a man in the middle holding both sites' keys (it terminates CURVE) flips and
        truncates europe's frames; safe outcome: refused as bad_signature / truncated, nothing
        delivered, everything arrives once when it stops."""
        eu, aws, px = self.eu, self.aws, self.px
        px.mode = "flip"
        msgs = messages(30, prefix="t")
        post_all(eu, msgs, batch=10)
        self.wait_for(lambda: rejected(aws, "bad_signature") > 0, 15,
                      "aws to count bad_signature rejections", lambda: aws.metrics().text)
        time.sleep(0.5)
        self.assertEqual(aws.sink_lines(), [], "a tampered frame was delivered")
        self.assertEqual(aws.metric("relay_frames_received_total", peer="europe"), 0)
        self.assertTrue(aws.healthy())
        # Truncated frames (europe sends again when no acknowledgement comes).
        px.mode = "truncate"
        self.wait_for(lambda: rejected(aws, "truncated") > 0, 20,
                      "aws to count truncated rejections", lambda: aws.metrics().text)
        time.sleep(0.5)
        self.assertEqual(aws.sink_lines(), [])
        self.assertIn("bad signature", aws.log_text().lower().replace("_", " "))
        # The link heals: everything arrives once, in order.
        px.mode = "pass"
        self.wait_sink(aws, len(msgs), 60)
        time.sleep(0.5)
        self.assert_exactly_once(aws.sink_lines(), [m["text"] for m in msgs], "aws sink")
        self.assertTrue(aws.running() and eu.running())

    def test_dropped_frames_are_sent_again(self):
        """Attack: a man in the middle holding both sites' keys drops europe's frames; safe
        outcome: nothing is lost, europe sends them again and each arrives once."""
        eu, aws, px = self.eu, self.aws, self.px
        px.mode = "drop"
        msgs = messages(40, prefix="d")
        post_all(eu, msgs, batch=10)
        self.wait_for(lambda: len(px.frames) >= 1, 15, "europe to send a frame")
        time.sleep(1.0)
        self.assertEqual(aws.sink_lines(), [])
        px.mode = "pass"
        self.wait_sink(aws, len(msgs), 60)
        time.sleep(0.5)
        self.assert_exactly_once(aws.sink_lines(), [m["text"] for m in msgs], "aws sink")

    def test_replayed_frames_are_rejected(self):
        """Attack: a man in the middle holding both sites' keys replays every frame it saw, also
        after aws restarted; safe outcome: each is refused as a replay, nothing delivered twice."""
        eu, aws, px = self.eu, self.aws, self.px
        first = messages(20, prefix="r1")
        post_all(eu, first, batch=5)
        self.wait_sink(aws, 20, 30)
        self.wait_for(lambda: eu.metric("relay_acked_through", peer="aws") >= 20, 15,
                      "europe to see the acknowledgement")
        recorded = list(px.frames)
        self.assertGreater(len(recorded), 0)
        # Replay every recorded frame on the live connection.
        for f in recorded:
            self.assertGreater(px.inject(f), 0, "no live connection to inject into")
        self.wait_for(lambda: rejected(aws, "replay") >= len(recorded), 15,
                      "aws to reject every replayed frame", lambda: rejected(aws, "replay"))
        time.sleep(0.5)
        self.assert_exactly_once(aws.sink_lines(), [m["text"] for m in first], "aws sink")
        # After a crash and restart of aws the accepted range is still remembered.
        aws.kill9()
        aws.start()
        self.wait_for(lambda: eu.metric("relay_link_up", peer="aws") == 1, 30,
                      "the link to come back")
        second = messages(10, prefix="r2")
        post_all(eu, second, batch=10)
        self.wait_sink(aws, 30, 30)
        for f in recorded:
            px.inject(f)
        self.wait_for(lambda: rejected(aws, "replay") >= len(recorded), 15,
                      "aws to reject the replayed frames after its restart",
                      lambda: rejected(aws, "replay"))
        time.sleep(0.5)
        self.assert_exactly_once(aws.sink_lines(), [m["text"] for m in first + second],
                                 "aws sink")
        self.assertTrue(aws.healthy())


class FlipEveryMessage:
    """A TcpProxy tamper function that follows the ZMTP framing of each dialer connection from
    its first byte and, while `active`, flips the last byte of every CURVE MESSAGE command (every
    encrypted message after the handshake: data, pings, everything). Flipping per ZMTP frame, not
    per TCP chunk, matters: one chunk often carries several messages, and CURVE authenticates each
    one, so a flip at the chunk's end would let the chunk's first messages through intact. The
    frame is matched by its name only: libzmq 4.3 sets the command flag on encrypted commands
    (pings) but not on encrypted data messages."""

    GREETING = 64

    def __init__(self):
        self.active = False
        self.flipped = 0
        self._streams = {}  # connection index -> [bytes seen, offset of the next frame]

    def __call__(self, index, offset, data):
        state = self._streams.setdefault(index, [bytearray(), self.GREETING])
        stream = state[0]
        stream.extend(data)
        out = bytearray(data)
        while True:
            start = state[1]
            if start + 2 > len(stream):
                break
            flags = stream[start]
            if flags & 0x02:
                if start + 9 > len(stream):
                    break
                size, header = struct.unpack(">Q", stream[start + 1:start + 9])[0], 9
            else:
                size, header = stream[start + 1], 2
            end = start + header + size
            if end > len(stream):
                break
            body = stream[start + header:end]
            if self.active and body.startswith(b"\x07MESSAGE") and end > offset:
                out[end - 1 - offset] ^= 0x40
                self.flipped += 1
            state[1] = end
        return bytes(out)


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class TransportAttackTest(RelayTestCase):
    """Attacks below relay's messages, on the bytes of the ZeroMQ link (CURVE)."""

    def setUp(self):
        super().setUp()
        self.eu, self.aws = self.site("europe"), self.site("aws")

    def through(self, proxy_url):
        self.eu.write_config({"aws": {"site": self.aws, "connect": proxy_url}},
                             {CHANNEL: ["aws"]}, zmq=FAST_LINK)
        self.aws.write_config({"europe": {"site": self.eu}}, {CHANNEL: ["europe"]}, zmq=FAST_LINK)
        self.aws.start()
        self.eu.start()

    def wait_up(self):
        self.wait_for(lambda: self.eu.metric("relay_link_up", peer="aws")
                      == 1 and self.aws.metric("relay_link_up", peer="europe") == 1, 30,
                      "the link to come up at both ends")

    def test_flipped_bytes_on_the_wire_are_refused_before_relay_sees_them(self):
        """Attack: anyone on the network path flips bytes of europe's connection after the
        handshake; safe outcome: CURVE refuses the altered message and drops the connection,
        nothing reaches relay's frame parser or the sink, the link recovers and every message
        arrives once."""
        eu, aws = self.eu, self.aws
        px = self.tcp_proxy(aws)
        px.tamper = flipper = FlipEveryMessage()  # parses every connection from its first byte
        self.through(px.url)
        self.wait_up()
        flipper.active = True
        msgs = messages(30, prefix="w")
        post_all(eu, msgs, batch=10)
        self.wait_for(lambda: refused(aws, "handshake_failed") >= 3, 30,
                      "aws to refuse altered CURVE messages", lambda: aws.metrics().text)
        self.assertEqual(aws.sink_lines(), [], "an altered message was delivered")
        self.assertEqual(sum(frame_rejections(aws).values()), 0,
                         "altered bytes reached relay's parser")
        self.assertIn("failed the CURVE handshake", aws.log_text())
        self.assertGreaterEqual(len(px.sent), 3, "europe did not reconnect after the drops")
        self.assertGreater(flipper.flipped, 0)
        flipper.active = False
        self.wait_sink(aws, len(msgs), 60)
        time.sleep(0.5)
        self.assert_exactly_once(aws.sink_lines(), [m["text"] for m in msgs], "aws sink")
        self.assertEqual(sum(frame_rejections(aws).values()), 0)

    def test_replayed_dialer_connection_gains_no_route_and_draws_no_frames(self):
        """Attack: anyone on the path records europe's whole connection (CURVE handshake, hello,
        pings, frames) and replays it byte for byte from a new TCP connection, as the issue's
        hijack did with a hello; safe outcome: the handshake fails (the listener's cookie is new
        for every connection), no route and no frames for the replayer, europe keeps its link
        and gets everything aws sends exactly once."""
        eu, aws = self.eu, self.aws
        px = self.tcp_proxy(aws)
        self.through(px.url)
        self.wait_up()
        post_all(eu, messages(20, prefix="e"))
        self.wait_sink(aws, 20, 30)
        time.sleep(1.0)  # a few pings too
        with px.lock:
            recorded = bytes(px.sent[-1])
        self.assertGreater(len(recorded), 1000)
        failed_before = refused(aws, "handshake_failed")
        unregistered_before = refused(aws, "unregistered")
        replies = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", aws.zmq_port), timeout=5)
            s.sendall(recorded[:64])  # the greeting, then the rest once aws has answered
            time.sleep(0.2)
            try:
                s.sendall(recorded[64:])
            except OSError:
                pass
            got = b""
            s.settimeout(0.5)
            end = time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not data:
                    break
                got += data
            s.close()
            replies.append(got)
        # While the replays come, aws sends to europe: none of it may go to the replayer.
        aws_msgs = messages(200, author="bob", prefix="a")
        post_all(aws, aws_msgs, batch=50)
        self.wait_sink(eu, len(aws_msgs), 30)
        time.sleep(0.5)
        self.assert_exactly_once(eu.sink_lines(), [m["text"] for m in aws_msgs], "europe sink")
        for got in replies:
            self.assertNotIn(b"\x07MESSAGE", got, "the replayer got a message")
            self.assertLess(len(got), 400, f"the replayer got {len(got)} bytes")
        self.assertGreaterEqual(refused(aws, "handshake_failed"), failed_before + 3)
        self.assertEqual(refused(aws, "unregistered"), unregistered_before)
        self.assertEqual(aws.metric("relay_link_up", peer="europe"), 1)
        self.assertEqual(len(px.sent), 1, "europe's own connection was disturbed")
        print(f"\n[replayed {len(recorded)} recorded bytes 3 times: answers of "
              f"{[len(g) for g in replies]} bytes, no message]", flush=True)

    def test_stranger_key_and_junk_connections_get_nothing_and_do_not_exhaust_the_listener(self):
        """Attack: anyone who can reach aws's ZeroMQ port completes CURVE with a key of its own,
        opens 300 silent connections and sends junk on 50 more; safe outcome: the stranger is
        refused by ZAP with nothing signed or encrypted for it, the silent connections are
        closed beyond 8 per address (and after the handshake timeout), aws's open files stay
        bounded, and europe still links up and delivers."""
        eu, aws = self.eu, self.aws
        self.through(aws.zmq_url)
        self.wait_up()
        aws_pk, _ = box_keypair(aws.key)
        # A stranger's key: the handshake itself completes up to ZAP, which refuses it.
        s = socket.create_connection(("127.0.0.1", aws.zmq_port), timeout=5)
        conn = CurveConnection(s)
        pk, sk = Sodium.keypair()
        with self.assertRaises(CurveError) as err:
            conn.client_handshake(aws_pk, pk, sk)
        self.assertIn("ERROR from the peer: 400", str(err.exception))
        s.close()
        self.wait_for(lambda: refused(aws, "unknown_key") >= 1, 10, "the ZAP refusal counted")
        base = fd_count(aws.proc.pid)
        socks, peak = [], base
        for i in range(300):
            try:
                socks.append(socket.create_connection(("127.0.0.1", aws.zmq_port), timeout=5))
            except OSError:
                break
            if i % 25 == 0:
                peak = max(peak, fd_count(aws.proc.pid))
        for i in range(50):
            try:
                j = socket.create_connection(("127.0.0.1", aws.zmq_port), timeout=5)
                j.sendall(os.urandom(200))
                socks.append(j)
            except OSError:
                pass
        self.wait_for(lambda: refused(aws, "connection_limit") >= 280, 20,
                      "aws to close the connections over its bound",
                      lambda: refused(aws, "connection_limit"))
        peak = max(peak, fd_count(aws.proc.pid))
        time.sleep(0.5)
        held = fd_count(aws.proc.pid)  # while the attacker still holds all its connections
        # europe reconnects (a restart) while the attacker holds its connections open.
        self.assertEqual(eu.stop(), 0)
        eu.start()
        self.wait_up()
        st, _ = eu.post({"channel": CHANNEL, "author": "alice", "text": "through the flood"})
        self.assertEqual(st, 202)
        self.wait_sink(aws, 1, 30)
        peak = max(peak, fd_count(aws.proc.pid))
        for j in socks:
            j.close()
        print(f"\n[aws open files: {base} before; with {len(socks)} attacking connections "
              f"held open: peak {peak} during the burst, {held} after it; closed by the bound: "
              f"{refused(aws, 'connection_limit'):.0f}]", flush=True)
        # At most 8 pending connections per address once the link thread has seen them; during
        # a burst, those accepted since its last pass come on top.
        self.assertLessEqual(held - base, 12, "aws holds the attacker's connections")
        self.assertLess(peak - base, 200, "aws's open files grew with the attack")
        self.assertTrue(aws.healthy())
        self.assertEqual(sum(frame_rejections(aws).values()), 0)
        self.assertEqual([l["text"] for l in aws.sink_lines()], ["through the flood"])
