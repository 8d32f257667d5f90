"""Ingest API: POST /v1/messages, /healthz, /metrics."""
import socket

from relay_harness import CHANNEL, RelayTestCase, messages, post_all

INGEST = {"max_body": "64KiB", "max_text": "4KiB"}


class IngestTest(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.eu, self.aws = self.pair(ingest=INGEST)

    def test_single_object(self):
        self.eu.start()
        r = self.eu.request("POST", "/v1/messages",
                            {"channel": CHANNEL, "author": "alice", "text": "hello"})
        self.assertEqual(r.status, 202, r.text)
        self.assertIn("application/json", r.headers.get("Content-Type", ""))
        self.assertIsInstance(r.json, dict, r.text)
        self.assertIsInstance(r.json.get("id"), str)
        self.assertTrue(r.json["id"])
        st, body = self.eu.post({"channel": CHANNEL, "author": "alice", "text": "again"})
        self.assertEqual(st, 202)
        self.assertNotEqual(body["id"], r.json["id"], "two messages got the same id")

    def test_batch_answers_ids_in_order(self):
        self.eu.start()
        self.aws.start()
        msgs = messages(50, prefix="batch")
        st, body = self.eu.post(msgs)
        self.assertEqual(st, 202, body)
        self.assertIsInstance(body, list)
        self.assertEqual(len(body), 50)
        ids = [x["id"] for x in body]
        self.assertEqual(len(set(ids)), 50, "ids in a batch are not distinct")
        lines = self.wait_sink(self.aws, 50, 30)
        self.assertEqual([l["id"] for l in lines], ids, "sink order/ids differ from the answer")
        self.assertEqual([l["text"] for l in lines], [m["text"] for m in msgs])
        # A batch of one is still an array answer.
        st, body = self.eu.post(messages(1, prefix="one"))
        self.assertEqual(st, 202)
        self.assertIsInstance(body, list)
        self.assertEqual(len(body), 1)

    def test_repeated_client_id_is_accepted_once(self):
        self.eu.start()
        self.aws.start()
        m = {"channel": CHANNEL, "author": "alice", "text": "only once", "id": "client-1"}
        st1, b1 = self.eu.post(m)
        st2, b2 = self.eu.post(m)
        self.assertEqual((st1, st2), (202, 202), (b1, b2))
        self.assertEqual(b1["id"], b2["id"])
        # Within one batch, and mixed with new messages.
        batch = [dict(m), {"channel": CHANNEL, "author": "bob", "text": "new", "id": "client-2"},
                 {"channel": CHANNEL, "author": "bob", "text": "new", "id": "client-2"}]
        st, body = self.eu.post(batch)
        self.assertEqual(st, 202, body)
        self.assertEqual(body[0]["id"], b1["id"])
        self.assertEqual(body[1]["id"], body[2]["id"])
        self.assertNotEqual(body[1]["id"], b1["id"])
        # Remembered across a restart.
        self.assertEqual(self.eu.stop(), 0)
        self.eu.start()
        st, b3 = self.eu.post(m)
        self.assertEqual(st, 202)
        self.assertEqual(b3["id"], b1["id"])
        self.eu.post({"channel": CHANNEL, "author": "z", "text": "marker"})
        self.wait_sink(self.aws, 3, 30)
        self.wait_for(lambda: self.eu.metric("relay_queue_depth", peer="aws") == 0, 10,
                      "the queue to drain")
        lines = self.aws.sink_lines()
        self.assertEqual([l["text"] for l in lines], ["only once", "new", "marker"])
        self.assertEqual(lines[0]["id"], b1["id"])
        self.assertEqual(self.eu.metric("relay_events_ingested_total"), 1.0)  # since restart

    def test_bad_requests_get_400_naming_the_problem_and_change_nothing(self):
        self.eu.start()
        good = {"channel": CHANNEL, "author": "alice", "text": "hi"}
        cases = [
            ("malformed JSON", b'{"channel": "war-room", "author": ', "json"),
            ("not JSON at all", b"hello", "json"),
            ("missing author", {"channel": CHANNEL, "text": "x"}, "author"),
            ("missing text", {"channel": CHANNEL, "author": "a"}, "text"),
            ("missing channel", {"author": "a", "text": "x"}, "channel"),
            ("text is a number", {"channel": CHANNEL, "author": "a", "text": 5}, "text"),
            ("author is a list", {"channel": CHANNEL, "author": ["a"], "text": "x"}, "author"),
            ("id is a number", dict(good, id=7), "id"),
            ("unknown channel", dict(good, channel="no-such-channel"), "no-such-channel"),
            ("unknown field", dict(good, colour="blue"), "colour"),
            ("a JSON string, not an object", b'"just a string"', "object"),
            ("a JSON number, not an object", b"42", "object"),
            ("empty batch", [], "empty"),
            ("bad message in a batch", [good, dict(good, text=None, author=3), good], "author"),
            ("unknown channel in a batch", [good, dict(good, channel="nope")], "nope"),
        ]
        before = self.eu.metrics()
        for what, body, needle in cases:
            with self.subTest(case=what):
                r = self.eu.request("POST", "/v1/messages", body)
                self.assertEqual(r.status, 400, f"{what}: {r.text}")
                self.assertIsInstance(r.json, dict, f"{what}: not a JSON object: {r.text}")
                self.assertIsInstance(r.json.get("error"), str, r.text)
                self.assertIn(needle.lower(), r.json["error"].lower(), f"{what}: {r.text}")
        after = self.eu.metrics()
        self.assertEqual(after.value("relay_events_ingested_total"),
                         before.value("relay_events_ingested_total"))
        self.assertEqual(after.value("relay_events_ingested_total"), 0.0)
        self.assertEqual(after.value("relay_store_commits_total"),
                         before.value("relay_store_commits_total"))
        # The daemon still works, and the peer only ever sees the good message.
        self.aws.start()
        st, body = self.eu.post(dict(good, text="the good one"))
        self.assertEqual(st, 202)
        lines = self.wait_sink(self.aws, 1, 30)
        self.wait_for(lambda: self.eu.metric("relay_queue_depth", peer="aws") == 0, 10,
                      "the queue to drain")
        self.assertEqual([l["text"] for l in self.aws.sink_lines()], ["the good one"])
        self.assertEqual(self.eu.metric("relay_events_ingested_total"), 1.0)

    def test_too_large_gets_413(self):
        self.eu.start()
        # Body over max_body (64 KiB): 100 messages of 1 KiB.
        big = messages(100)
        for m in big:
            m["text"] = "x" * 1024
        r = self.eu.request("POST", "/v1/messages", big)
        self.assertEqual(r.status, 413, r.text)
        self.assertIsInstance(r.json, dict, r.text)
        self.assertIn("error", r.json)
        # One megabyte body: still a clean 413, not a hang or a reset.
        r = self.eu.request("POST", "/v1/messages", b"[" + b" " * (1 << 20) + b"]")
        self.assertEqual(r.status, 413, r.text)
        # Text over max_text (4 KiB) in a body that is within max_body.
        r = self.eu.request("POST", "/v1/messages",
                            {"channel": CHANNEL, "author": "a", "text": "y" * 5000})
        self.assertEqual(r.status, 413, r.text)
        self.assertIn("text", r.json["error"])
        # Exactly at the limits is fine.
        st, _ = self.eu.post({"channel": CHANNEL, "author": "a", "text": "y" * 4096})
        self.assertEqual(st, 202)
        self.assertEqual(self.eu.metric("relay_events_ingested_total"), 1.0)
        self.assertTrue(self.eu.healthy())

    def test_healthz(self):
        self.eu.start()
        st, body = self.eu.get("/healthz")
        self.assertEqual(st, 200)
        st, _ = self.eu.get("/no-such-endpoint")
        self.assertEqual(st, 404)

    def test_metrics(self):
        self.eu.start()
        m = self.eu.metrics()
        types = m.types
        for fam, typ in [("relay_events_ingested_total", "counter"),
                         ("relay_events_delivered_total", "counter"),
                         ("relay_frames_sent_total", "counter"),
                         ("relay_frames_rejected_total", "counter"),
                         ("relay_queue_depth", "gauge")]:
            self.assertEqual(types.get(fam), typ, f"# TYPE of {fam}")
        for key in ['relay_events_ingested_total', 'relay_events_delivered_total',
                    'relay_frames_sent_total{peer="aws"}', 'relay_queue_depth{peer="aws"}',
                    'relay_frames_rejected_total{reason="bad_signature"}',
                    'relay_frames_rejected_total{reason="unknown_sender"}']:
            self.assertIn(key, m, f"{key} missing from /metrics")
        self.assertEqual(m.value("relay_events_ingested_total"), 0)
        # Every sample belongs to a family with a # TYPE line.
        for key in m:
            fam = key.split("{")[0]
            self.assertIn(fam, types, f"sample {key} has no # TYPE line")

        # 25 messages while aws is down: ingested and queued.
        post_all(self.eu, messages(25), batch=10)
        self.assertEqual(self.eu.metric("relay_events_ingested_total"), 25)
        self.wait_for(lambda: self.eu.metric("relay_queue_depth", peer="aws") == 25, 10,
                      "relay_queue_depth{peer=aws} == 25",
                      lambda: self.eu.metric("relay_queue_depth", peer="aws"))
        # aws comes up: frames are sent, the queue drains, aws counts the deliveries.
        self.aws.start()
        self.wait_sink(self.aws, 25, 30)
        self.wait_for(lambda: self.eu.metric("relay_queue_depth", peer="aws") == 0, 10,
                      "the queue to drain")
        self.assertGreaterEqual(self.eu.metric("relay_frames_sent_total", peer="aws"), 1)
        self.wait_for(lambda: self.aws.metric("relay_events_delivered_total") == 25, 10,
                      "aws relay_events_delivered_total == 25",
                      lambda: self.aws.metric("relay_events_delivered_total"))
        self.assertEqual(self.aws.metric("relay_frames_rejected_total", reason="bad_signature"), 0)

    def test_text_fidelity(self):
        self.eu.start()
        self.aws.start()
        texts = ['quotes " and \\ backslash', "line\nbreak\ttab", "unicode: é ü 中文 🚀",
                 "control \u0001 char", "", " leading and trailing spaces "]
        msgs = [{"channel": CHANNEL, "author": "Zoë \"Z\" O'Neil", "text": t} for t in texts]
        post_all(self.eu, msgs)
        lines = self.wait_sink(self.aws, len(texts), 30)
        self.assertEqual([l["text"] for l in lines], texts)
        self.assertEqual({l["author"] for l in lines}, {"Zoë \"Z\" O'Neil"})

    def test_garbage_http_does_not_hurt(self):
        self.eu.start()
        for payload in [b"GARBAGE\r\n\r\n", b"POST /v1/messages HTTP/1.1\r\nContent-Length: zz\r\n\r\n",
                        b"\x00\xff" * 500, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"]:
            s = socket.create_connection(("127.0.0.1", self.eu.ingest_port), timeout=5)
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                try:
                    s.recv(4096)
                except OSError:
                    pass
            finally:
                s.close()
        self.assertTrue(self.eu.healthy())
        st, _ = self.eu.post({"channel": CHANNEL, "author": "a", "text": "still fine"})
        self.assertEqual(st, 202)
