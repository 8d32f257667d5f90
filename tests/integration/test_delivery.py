"""Delivery between real sites: order, exactly-once, routing, no echo, no duplicates."""
import re
import threading
import time

from relay_harness import CHANNEL, RelayTestCase, messages, post_all

SINK_FIELDS = ("id", "origin_site", "channel", "author", "text", "thread", "kind", "created_at")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)$")


def post_concurrently(jobs, batch=100):
    """jobs: [(site, msgs)]; posts each list from its own thread. Returns [ids] per job."""
    results = [None] * len(jobs)
    errors = []

    def work(i, site, msgs):
        try:
            results[i] = post_all(site, msgs, batch=batch)
        except BaseException as e:  # reported by the caller
            errors.append(f"{site.name}: {e!r}")

    threads = [threading.Thread(target=work, args=(i, s, m), daemon=True)
               for i, (s, m) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors or any(t.is_alive() for t in threads):
        raise AssertionError(f"posting failed: {errors or 'a poster hung'}")
    return results


class DeliveryTest(RelayTestCase):
    def by_origin(self, lines, origin):
        return [l for l in lines if l.get("origin_site") == origin]

    def wait_drained(self, sites, timeout=30):
        """Every site's queue to every peer is empty (everything acknowledged)."""
        def drained():
            for s in sites:
                m = s.metrics()
                for k, v in m.items():
                    if k.startswith("relay_queue_depth{") and v != 0:
                        return False
                if m.value("relay_inbound_backlog", 0) != 0:
                    return False
            return True
        self.wait_for(drained, timeout, "every queue to drain",
                      lambda: {s.name: {k: v for k, v in s.metrics().items()
                                        if k.startswith("relay_queue_depth")} for s in sites})

    def check_two_way(self, eu, aws, n, batch=100):
        eu_msgs = messages(n, author="alice", prefix="eu")
        aws_msgs = messages(n, author="bob", prefix="aws")
        t0 = time.monotonic()
        eu_ids, aws_ids = post_concurrently([(eu, eu_msgs), (aws, aws_msgs)], batch=batch)
        at_aws = self.wait_sink(aws, n, 120)
        at_eu = self.wait_sink(eu, n, 120)
        elapsed = time.monotonic() - t0
        self.wait_drained([eu, aws])
        at_aws, at_eu = aws.sink_lines(), eu.sink_lines()
        self.assert_exactly_once(at_aws, [m["text"] for m in eu_msgs], "aws sink")
        self.assert_exactly_once(at_eu, [m["text"] for m in aws_msgs], "europe sink")
        self.assertEqual([l["id"] for l in at_aws], eu_ids)
        self.assertEqual([l["id"] for l in at_eu], aws_ids)
        self.assertEqual(len(set(eu_ids) & set(aws_ids)), 0, "ids collide across sites")
        return at_eu, at_aws, elapsed

    def test_two_sites_both_directions(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        n = 2000
        at_eu, at_aws, elapsed = self.check_two_way(eu, aws, n)
        print(f"\n  [2 x {n} messages delivered in {elapsed:.2f}s]", end=" ")
        for lines, origin, author in ((at_aws, "europe", "alice"), (at_eu, "aws", "bob")):
            for l in lines:
                missing = [f for f in SINK_FIELDS if f not in l]
                self.assertEqual(missing, [], f"sink line lacks fields: {l}")
                self.assertEqual(l["origin_site"], origin)
                self.assertEqual(l["channel"], CHANNEL)
                self.assertEqual(l["author"], author)
                self.assertEqual(l["kind"], "post")
                self.assertIsNone(l["thread"])
                self.assertRegex(l["created_at"], ISO_UTC)
        self.assertEqual(eu.metric("relay_events_delivered_total"), n)
        self.assertEqual(aws.metric("relay_events_delivered_total"), n)
        self.assertEqual(eu.metric("relay_events_ingested_total"), n)
        # Nothing more arrives later (no late duplicates).
        time.sleep(1.0)
        self.assertEqual(aws.sink_count(), n)
        self.assertEqual(eu.sink_count(), n)

    def test_thread_field_carried(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        st, root = eu.post({"channel": CHANNEL, "author": "alice", "text": "root"})
        self.assertEqual(st, 202)
        root_id = root["id"]
        st, _ = eu.post({"channel": CHANNEL, "author": "alice", "text": "reply-eu",
                         "thread": root_id})
        self.assertEqual(st, 202)
        at_aws = self.wait_sink(aws, 2, 30)
        self.assertEqual(at_aws[0]["id"], root_id)
        self.assertIsNone(at_aws[0]["thread"])
        self.assertEqual(at_aws[1]["thread"], root_id)
        # A reply from the other site to the same thread root.
        st, _ = aws.post({"channel": CHANNEL, "author": "bob", "text": "reply-aws",
                          "thread": root_id})
        self.assertEqual(st, 202)
        at_eu = self.wait_sink(eu, 1, 30)
        self.assertEqual(at_eu[0]["text"], "reply-aws")
        self.assertEqual(at_eu[0]["thread"], root_id)

    def test_reverse_dial(self):
        eu, aws = self.pair(dialer="aws")
        aws.start()
        eu.start()
        self.check_two_way(eu, aws, 500)

    def test_both_sides_dial(self):
        eu, aws = self.site("europe"), self.site("aws")
        eu.write_config({"aws": {"site": aws, "dial": True}}, {CHANNEL: ["aws"]})
        aws.write_config({"europe": {"site": eu, "dial": True}}, {CHANNEL: ["europe"]})
        eu.start()
        aws.start()
        self.check_two_way(eu, aws, 500)

    def test_star_forwards_to_every_peer_without_echo(self):
        eu, aws, enc = self.site("europe"), self.site("aws"), self.site("enclave")
        # europe is the hub: the channel is bridged to both spokes; "ops" only to aws.
        eu.write_config({"aws": {"site": aws, "dial": True}, "enclave": {"site": enc, "dial": True}},
                        {CHANNEL: ["aws", "enclave"], "ops": ["aws"]})
        # Each spoke knows the other by its key, reached through the hub (origin signatures).
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"], "ops": ["europe"]},
                         origins={"enclave": {"site": enc, "via": ["europe"]}})
        enc.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"], "ops": ["europe"]},
                         origins={"aws": {"site": aws, "via": ["europe"]}})
        for s in (eu, aws, enc):
            s.start()
        n = 300
        plan = {s.name: messages(n, author=s.name, prefix=s.name) for s in (eu, aws, enc)}
        post_concurrently([(s, plan[s.name]) for s in (eu, aws, enc)], batch=50)
        ops = {s.name: messages(20, channel="ops", author=s.name, prefix="ops-" + s.name)
               for s in (eu, aws, enc)}
        post_concurrently([(s, ops[s.name]) for s in (eu, aws, enc)], batch=10)
        for s in (eu, aws, enc):
            self.wait_sink(s, 2 * n, 60)
        self.wait_sink(eu, 20, 30, channel="ops")
        self.wait_sink(aws, 20, 30, channel="ops")
        self.wait_drained([eu, aws, enc])
        for s in (eu, aws, enc):
            lines = s.sink_lines()
            self.assertEqual(self.by_origin(lines, s.name), [], f"{s.name} got its own messages back")
            self.assertEqual(len(lines), 2 * n, f"{s.name} sink has {len(lines)} lines")
            for other in (eu, aws, enc):
                if other is s:
                    continue
                self.assert_exactly_once(self.by_origin(lines, other.name),
                                         [m["text"] for m in plan[other.name]],
                                         f"{s.name} sink, from {other.name}")
        # "ops" is bridged europe <-> aws only: nothing crosses to or from the enclave.
        self.assert_exactly_once(aws.sink_lines("ops"), [m["text"] for m in ops["europe"]],
                                 "aws ops sink")
        self.assert_exactly_once(eu.sink_lines("ops"),
                                 [m["text"] for m in ops["aws"]], "europe ops sink")
        self.assertEqual(enc.sink_lines("ops"), [], "ops leaked to the enclave")
        self.assertEqual(eu.metric("relay_events_forwarded_total"), 2 * n)

    def test_triangle_no_duplicates_over_two_paths(self):
        eu, aws, enc = self.site("europe"), self.site("aws"), self.site("enclave")
        # Each site accepts a neighbour's events also through the third one (`via`): the
        # second path is a standby, its copies are dropped as duplicates.
        eu.write_config({"aws": {"site": aws, "dial": True, "keys": {"via": "enclave"}},
                         "enclave": {"site": enc, "dial": True, "keys": {"via": "aws"}}},
                        {CHANNEL: ["aws", "enclave"]})
        aws.write_config({"europe": {"site": eu, "keys": {"via": "enclave"}},
                          "enclave": {"site": enc, "dial": True, "keys": {"via": "europe"}}},
                         {CHANNEL: ["europe", "enclave"]})
        enc.write_config({"europe": {"site": eu, "keys": {"via": "aws"}},
                          "aws": {"site": aws, "keys": {"via": "europe"}}},
                         {CHANNEL: ["europe", "aws"]})
        for s in (eu, aws, enc):
            s.start()
        n = 400
        plan = {s.name: messages(n, author=s.name, prefix=s.name) for s in (eu, aws, enc)}
        post_concurrently([(s, plan[s.name]) for s in (eu, aws, enc)], batch=50)
        for s in (eu, aws, enc):
            self.wait_sink(s, 2 * n, 60)
        self.wait_drained([eu, aws, enc])
        time.sleep(1.0)  # any late copy over the longer path would show up now
        dedup = 0
        for s in (eu, aws, enc):
            lines = s.sink_lines()
            self.assertEqual(self.by_origin(lines, s.name), [], f"{s.name} got its own messages back")
            self.assertEqual(len(lines), 2 * n, f"{s.name} sink has {len(lines)} lines")
            for other in (eu, aws, enc):
                if other is not s:
                    self.assert_exactly_once(self.by_origin(lines, other.name),
                                             [m["text"] for m in plan[other.name]],
                                             f"{s.name} sink, from {other.name}")
            dedup += s.metric("relay_dedup_hits_total")
        # Each event reached each site twice (direct and forwarded); one copy was dropped.
        self.assertGreater(dedup, 0, "no duplicate was ever dropped: the two-path case was not hit")

    def test_chain_of_four_sites(self):
        # europe - aws - enclave - ship, each link bridging the channel: messages cross up to
        # three links, forwarded by the middle sites, and never come back.
        names = ["europe", "aws", "enclave", "ship"]
        sites = [self.site(n) for n in names]
        for i, s in enumerate(sites):
            peers, plist = {}, []
            if i > 0:
                peers[names[i - 1]] = {"site": sites[i - 1]}
                plist.append(names[i - 1])
            if i + 1 < len(sites):
                peers[names[i + 1]] = {"site": sites[i + 1], "dial": True}
                plist.append(names[i + 1])
            # The sites further along the chain sign their events: each is known by its key,
            # reached through the neighbour on its side.
            origins = {}
            for j, o in enumerate(sites):
                if abs(j - i) > 1:
                    origins[o.name] = {"site": o, "via": [names[i - 1] if j < i else names[i + 1]]}
            s.write_config(peers, {CHANNEL: plist}, origins=origins)
        for s in sites:
            s.start()
        n = 200
        plan = {s.name: messages(n, author=s.name, prefix=s.name) for s in sites}
        post_concurrently([(s, plan[s.name]) for s in sites], batch=40)
        for s in sites:
            self.wait_sink(s, 3 * n, 60)
        self.wait_drained(sites)
        time.sleep(0.5)
        for s in sites:
            lines = s.sink_lines()
            self.assertEqual(len(lines), 3 * n, f"{s.name} sink has {len(lines)} lines")
            self.assertEqual(self.by_origin(lines, s.name), [], f"{s.name} got its own messages")
            for other in sites:
                if other is not s:
                    self.assert_exactly_once(self.by_origin(lines, other.name),
                                             [m["text"] for m in plan[other.name]],
                                             f"{s.name} sink, from {other.name}")
        # The hop list records the path: ship sees europe's messages via aws and enclave.
        first_from_eu = self.by_origin(sites[3].sink_lines(), "europe")[0]
        if "hops" in first_from_eu:
            self.assertEqual(first_from_eu["hops"], ["europe", "aws", "enclave"])

    def test_large_messages_and_tiny_frames(self):
        eu, aws = self.site("europe"), self.site("aws")
        # europe -> aws: big messages with default frame limits; aws -> europe: frames of at
        # most 3 events (and 1 KiB, less than one message), one frame in flight at a time.
        eu.write_config({"aws": {"site": aws, "dial": True}}, {CHANNEL: ["aws"]})
        aws.write_config({"europe": {"site": eu, "keys": {"max_frame_events": 3, "window": 1,
                                                           "max_frame_bytes": "1KiB"}}},
                         {CHANNEL: ["europe"]})
        eu.start()
        aws.start()
        big = messages(240, prefix="big")
        for i, m in enumerate(big):
            m["text"] = f"big-{i}-" + chr(ord("a") + i % 26) * (60 * 1024)
        small = messages(300, prefix="small")
        for m in small:
            m["text"] += " " + "s" * 1500
        post_concurrently([(eu, big), (aws, small)], batch=20)
        self.wait_sink(aws, len(big), 120)
        self.wait_sink(eu, len(small), 120)
        self.wait_drained([eu, aws])
        self.assert_exactly_once(aws.sink_lines(), [m["text"] for m in big], "aws sink")
        self.assert_exactly_once(eu.sink_lines(), [m["text"] for m in small], "europe sink")
        self.assertGreaterEqual(aws.metric("relay_frames_sent_total", peer="europe"), 100)
