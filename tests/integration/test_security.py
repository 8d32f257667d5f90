"""Link-level security: unknown senders and wrong keys are rejected, counted, harmless."""
import os
import socket
import time

from relay_harness import CHANNEL, RelayTestCase, Site, messages, post_all


def rejected(site, reason):
    return site.metric("relay_frames_rejected_total", 0, reason=reason)


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
        eu, aws = self.eu, self.aws
        eu.start()
        aws.start()
        before = rejected(aws, "unknown_sender")
        rogue = self.rogue_dials_aws("mallory")
        rogue.start()
        post_all(rogue, messages(200, author="mallory", prefix="evil"), batch=50)
        self.wait_for(lambda: rejected(aws, "unknown_sender") > before, 15,
                      "aws to count unknown_sender rejections",
                      lambda: rejected(aws, "unknown_sender"))
        time.sleep(2.5)  # more than two heartbeat intervals of the rogue's attempts
        self.assertEqual(aws.sink_lines(), [], "the rogue's messages were delivered")
        self.assertEqual(rogue.metric("relay_link_up", peer="aws"), 0, "the rogue's link came up")
        self.assertEqual(rogue.metric("relay_queue_depth", peer="aws"), 200)
        self.assertEqual(aws.metric("relay_frames_received_total", peer="europe"), 0)
        self.assertTrue(aws.healthy())
        self.assertTrue(aws.running())
        self.legit_traffic_flows()
        self.assertEqual([l["origin_site"] for l in aws.sink_lines()], ["europe"])

    def test_unknown_sender_using_a_known_peer_name(self):
        # A site that calls itself "europe" but has its own key is still unknown to aws.
        eu, aws = self.eu, self.aws
        aws.start()
        impostor_root = os.path.join(self.root, "impostor")
        os.makedirs(impostor_root)
        imp = Site(impostor_root, "europe")
        self.sites.append(imp)
        imp.write_config({"aws": {"site": aws, "dial": True}}, {CHANNEL: ["aws"]})
        imp.start()
        post_all(imp, messages(50, author="eve", prefix="fake"), batch=50)
        self.wait_for(lambda: rejected(aws, "unknown_sender") > 0, 15,
                      "aws to count unknown_sender rejections")
        time.sleep(1.5)
        self.assertEqual(aws.sink_lines(), [])
        imp.kill9()
        eu.start()
        self.legit_traffic_flows()

    def test_wrong_public_key_for_peer_at_the_dialer(self):
        # europe's [peer.aws] holds the enclave's key: europe seals its hello for the enclave.
        eu, aws = self.eu, self.aws
        enclave = self.site("enclave")
        eu.write_config({"aws": {"site": aws, "dial": True, "public_key": enclave.pub}},
                        {CHANNEL: ["aws"]})
        eu.start()
        aws.start()
        msgs = messages(100, prefix="early")
        post_all(eu, msgs, batch=50)
        self.wait_for(lambda: rejected(aws, "wrong_recipient") > 0, 15,
                      "aws to count wrong_recipient rejections of europe's messages",
                      lambda: aws.metrics().text)
        time.sleep(2.5)
        self.assertEqual(aws.sink_lines(), [], "delivered despite the wrong key")
        self.assertEqual(eu.metric("relay_link_up", peer="aws"), 0)
        self.assertEqual(eu.metric("relay_queue_depth", peer="aws"), 100)
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
        self.wait_for(lambda: rejected(aws, "unknown_sender") > 0, 15,
                      "aws to count unknown_sender rejections", lambda: aws.metrics().text)
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
                s = socket.create_connection(("127.0.0.1", aws.zmq_port), timeout=5)
                s.sendall(p)
                time.sleep(0.05)
                s.close()
            except OSError:
                pass
        time.sleep(0.5)
        self.assertTrue(aws.running(), "aws died on garbage")
        self.assertTrue(aws.healthy())
        st, _ = eu.post({"channel": CHANNEL, "author": "alice", "text": "after garbage"})
        self.assertEqual(st, 202)
        self.wait_sink(aws, 2, 30)
        self.assertEqual([l["text"] for l in aws.sink_lines()], ["legit after", "after garbage"])


FAST_LINK = {"heartbeat_interval": "500ms", "peer_timeout": "2s"}


class TamperedLinkTest(RelayTestCase):
    """europe dials aws through a proxy that can flip, truncate, drop and replay frames."""

    def setUp(self):
        super().setUp()
        self.eu, self.aws = self.site("europe"), self.site("aws")
        self.px = self.proxy(self.aws)
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
