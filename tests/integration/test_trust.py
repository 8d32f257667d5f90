"""Trust boundaries between sites, attacked on live daemons (issue 10, items 1-3).

A site speaks only for itself: it cannot make another site's event appear, pre-empt another
site's event ids, alter what it forwards, or change what another site posted; and nothing a
peer sends can empty a queue. Each test attacks real daemons -- a relay running with another
site's name, or hostile bundles built by tests/tools/relay_forge with the key files the test
holds -- and checks the safe outcome: nothing forged is delivered, the refusal is counted by
reason, and the genuine traffic still flows.
"""
import json
import os
import time

from relay_harness import CHANNEL, RelayTestCase, forge, messages, post_all

FAST_LINK = {"heartbeat_interval": "200ms", "peer_timeout": "2s"}
U64_MAX = 2**64 - 1
ATTACKS = {"fed": 0, "refused": 0}  # forged inputs fed to live daemons, and those seen refused


def tearDownModule():
    print(f"\ntrust attacks: {ATTACKS['refused']} refused of {ATTACKS['fed']}", flush=True)


def counted(fed, refused):
    ATTACKS["fed"] += fed
    ATTACKS["refused"] += min(fed, int(refused))


def refused(site, reason):
    return site.metric("relay_frames_rejected_total", 0, reason=reason)


class TrustTestCase(RelayTestCase):
    def spec_file(self, name, frames):
        path = os.path.join(self.root, name + ".json")
        with open(path, "w") as f:
            json.dump({"frames": frames}, f)
        return path

    def forged_bundle(self, name, sender, recipient, frames):
        """A bundle signed by `sender`'s key for `recipient`, carrying `frames` (see
        relay_forge's spec), written to its own folder; returns the path."""
        folder = os.path.join(self.root, "disk-" + name)
        os.makedirs(folder, exist_ok=True)
        out = os.path.join(folder, f"{sender.name}-to-{recipient.name}-{name}.bundle")
        forge("bundle", "--key", sender.key, "--to", recipient.pub,
              "--spec", self.spec_file(name, frames), "--out", out)
        return out

    def forged_ack(self, name, sender, recipient, through, key=None):
        folder = os.path.join(self.root, "disk-" + name)
        os.makedirs(folder, exist_ok=True)
        out = os.path.join(folder, f"{sender.name}-to-{recipient.name}-{name}.ack")
        forge("ack", "--key", key or sender.key, "--to", recipient.pub, "--through", through,
              "--out", out)
        return out

    def imp(self, site, path):
        return site.cli("import", "--config", site.conf, path)

    def status(self, site):
        st, body = site.get("/v1/status")
        self.assertEqual(st, 200, body)
        return json.loads(body)

    def texts(self, site, channel=CHANNEL):
        return [l["text"] for l in site.sink_lines(channel)]


class OriginTest(TrustTestCase):
    def test_a_peer_cannot_pose_as_another_site(self):
        """Attack: a configured peer (gamma) runs a relay named 'aws' with its own key and posts
        as aws; outcome: europe delivers none of it (origin_not_allowed), nor when gamma may
        forward aws's events (then bad_origin_signature), and the real aws still gets through."""
        eu, aws, gamma = self.site("europe"), self.site("aws"), self.site("gamma")
        for via in ("", "gamma"):
            with self.subTest(via=via or "none"):
                aws_keys = {"via": via} if via else {}
                eu.write_config({"aws": {"site": aws, "keys": aws_keys}, "gamma": {"site": gamma}},
                                {CHANNEL: ["aws", "gamma"]}, zmq=FAST_LINK)
                aws.write_config({"europe": {"site": eu, "dial": True}}, {CHANNEL: ["europe"]},
                                 zmq=FAST_LINK, zmq_listen=False)
                # The impostor: site name 'aws', gamma's key, dialling europe.
                impostor_conf = gamma.config_text(
                    {"europe": {"site": eu, "dial": True}}, {CHANNEL: ["europe"]},
                    zmq_listen=False, zmq=FAST_LINK).replace("name = gamma", "name = aws", 1)
                with open(gamma.conf, "w") as f:
                    f.write(impostor_conf)
                eu.start(), aws.start(), gamma.start()
                before = refused(eu, "origin_not_allowed") + refused(eu, "bad_origin_signature")
                reason = "bad_origin_signature" if via else "origin_not_allowed"
                post_all(gamma, messages(20, author="mallory", prefix=f"forged-{via}"))
                self.wait_for(lambda: refused(eu, reason) >= before + 20, 30,
                              f"europe to refuse the 20 forged events ({reason})",
                              lambda: self.status(eu)["refused"])
                post_all(aws, messages(10, prefix=f"real-{via}"))
                self.wait_for(lambda: sum(t.startswith(f"real-{via}") for t in self.texts(eu))
                              == 10, 30, "the real aws's 10 messages at europe")
                got = self.texts(eu)
                self.assertEqual([t for t in got if t.startswith("forged")], [],
                                 "a forged message was delivered as aws's")
                counted(20, refused(eu, "origin_not_allowed") +
                        refused(eu, "bad_origin_signature") - before)
                self.assertEqual(aws.sink_count(), 0, "a forged event was forwarded to aws")
                for s in (eu, aws, gamma):
                    s.stop()

    def test_forged_ids_cannot_preempt_another_sites_events(self):
        """Attack: a peer (gamma) sends events with the ids aws will use next, signed with its
        own key; outcome: refused (bad_origin_signature), not remembered as seen, so aws's real
        events with those ids are all delivered."""
        eu, aws, gamma = self.site("europe"), self.site("aws"), self.site("gamma")
        eu.write_config({"aws": {"site": aws, "keys": {"via": "gamma"}}, "gamma": {"site": gamma}},
                        {CHANNEL: ["aws", "gamma"]}, zmq=FAST_LINK)
        aws.write_config({"europe": {"site": eu, "dial": True}}, {CHANNEL: ["europe"]},
                         zmq=FAST_LINK, zmq_listen=False)
        eu.start(), aws.start()
        st, body = aws.post({"channel": CHANNEL, "author": "bob", "text": "first"})
        self.assertEqual(st, 202, body)
        seq = int(body["id"].split(":")[1])
        self.wait_for(lambda: self.texts(eu) == ["first"], 30, "aws's first message at europe")
        forged = [{"seq": 100 + i, "origin": "aws", "origin_seq": seq + 1 + i,
                   "author": "bob", "text": f"forged-{i}", "hops": ["aws", "gamma"]}
                  for i in range(20)]
        bundle = self.forged_bundle("preempt", gamma, eu, [
            {"first": 1, "last": 120, "events": forged,
             "attestations": [{"key": gamma.key, "origin": "aws"}]}])
        r = self.imp(eu, bundle)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(refused(eu, "bad_origin_signature"), 20)
        counted(20, refused(eu, "bad_origin_signature"))
        ids = post_all(aws, messages(20, author="bob", prefix="real"))
        self.assertEqual(ids[0], f"aws:{seq + 1}", "aws's next ids are the ones forged")
        self.wait_for(lambda: len(self.texts(eu)) == 21, 30, "aws's 20 real messages at europe")
        self.assertEqual(self.texts(eu), ["first"] + [f"real-{i}" for i in range(20)])

    def test_unknown_origins_are_refused(self):
        """Attack: a peer sends events of a site this site has no key for; outcome: refused
        (unknown_origin), nothing delivered, the rest of the bundle taken."""
        eu, aws = self.site("europe"), self.site("aws")
        eu.write_config({"aws": {"site": aws}}, {CHANNEL: ["aws"]}, zmq_listen=False)
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]}, zmq_listen=False)
        bundle = self.forged_bundle("unknown", aws, eu, [
            {"first": 1, "last": 2, "events": [
                {"seq": 1, "origin": "zeta", "origin_seq": 5, "text": "from nowhere",
                 "hops": ["zeta", "aws"]},
                {"seq": 2, "origin": "aws", "origin_seq": 6, "text": "genuine"}],
             "attestations": [{"key": aws.key, "origin": "zeta", "covers": [0]},
                              {"key": aws.key, "origin": "aws", "covers": [1]}]}])
        eu.start()
        r = self.imp(eu, bundle)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_for(lambda: self.texts(eu) == ["genuine"], 30, "the genuine event only")
        self.assertEqual(refused(eu, "unknown_origin"), 1)
        counted(1, refused(eu, "unknown_origin"))


class TransitTest(TrustTestCase):
    """europe - aws - enclave: enclave knows europe by its key, reached through aws."""

    def setUp(self):
        super().setUp()
        self.eu, self.aws, self.enc = self.site("europe"), self.site("aws"), self.site("enclave")
        self.eu.write_config({"aws": {"site": self.aws}}, {CHANNEL: ["aws"]}, zmq_listen=False)
        self.aws.write_config({"europe": {"site": self.eu}, "enclave": {"site": self.enc}},
                              {CHANNEL: ["europe", "enclave"]}, zmq_listen=False)
        self.enc.write_config({"aws": {"site": self.aws}}, {CHANNEL: ["aws"]}, zmq_listen=False,
                              origins={"europe": {"site": self.eu, "via": ["aws"]}},
                              site={"dedup_ttl": "7d"})

    def test_a_transit_site_cannot_alter_what_it_forwards(self):
        """Attack: the transit site aws changes the text of europe's signed event before it
        forwards it; outcome: enclave refuses it (bad_origin_signature) and delivers the
        unaltered ones."""
        eu, aws, enc = self.eu, self.aws, self.enc
        bundle = self.forged_bundle("alter", aws, enc, [
            {"first": 1, "last": 2, "events": [
                {"seq": 1, "origin": "europe", "origin_seq": 10, "text": "pay 10 EUR",
                 "tamper_text": "pay 10000 EUR", "hops": ["europe", "aws"]},
                {"seq": 2, "origin": "europe", "origin_seq": 11, "text": "unaltered",
                 "hops": ["europe", "aws"]}],
             "attestations": [{"key": eu.key, "origin": "europe"}]}])
        enc.start()
        r = self.imp(enc, bundle)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_for(lambda: self.texts(enc) == ["unaltered"], 30, "the unaltered event only")
        self.assertEqual(refused(enc, "bad_origin_signature"), 1)
        self.assertNotIn("10000", json.dumps(enc.sink_lines()))
        counted(1, refused(enc, "bad_origin_signature"))

    def test_signed_events_cross_a_transit_site_unchanged(self):
        """Real daemons: europe's messages reach enclave through aws, each verified against
        europe's key at enclave; hops record the path; nothing is refused."""
        eu, aws, enc = self.eu, self.aws, self.enc
        eu.write_config({"aws": {"site": aws, "dial": True}}, {CHANNEL: ["aws"]}, zmq_listen=False)
        aws.write_config({"europe": {"site": eu}, "enclave": {"site": enc}},
                         {CHANNEL: ["europe", "enclave"]})
        enc.write_config({"aws": {"site": aws, "dial": True}}, {CHANNEL: ["aws"]}, zmq_listen=False,
                         origins={"europe": {"site": eu, "via": ["aws"]}})
        aws.start(), eu.start(), enc.start()
        post_all(eu, messages(300, prefix="signed"), batch=60)
        self.wait_for(lambda: enc.sink_count() == 300, 60, "300 lines at enclave")
        lines = enc.sink_lines()
        self.assertEqual([l["text"] for l in lines], [f"signed-{i}" for i in range(300)])
        self.assertEqual(self.status(enc)["refused"]["bad_origin_signature"], 0)
        if "hops" in lines[0]:
            self.assertEqual(lines[0]["hops"], ["europe", "aws"])

    def test_old_events_through_a_transit_site_are_refused_as_stale(self):
        """Attack: a transit site replays a genuine, signed event of europe older than enclave's
        dedup memory (which could no longer recognise it); outcome: refused as stale; the same
        age directly from its origin (checked by log position) is taken."""
        eu, aws, enc = self.eu, self.aws, self.enc
        old = int((time.time() - 8 * 86400) * 1000)
        bundle = self.forged_bundle("stale", aws, enc, [
            {"first": 1, "last": 1, "events": [
                {"seq": 1, "origin": "europe", "origin_seq": 3, "text": "last week",
                 "created_at": old, "hops": ["europe", "aws"]}],
             "attestations": [{"key": eu.key, "origin": "europe"}]}])
        direct = self.forged_bundle("direct-old", aws, enc, [
            {"first": 2, "last": 2, "events": [
                {"seq": 2, "origin": "aws", "origin_seq": 4, "text": "aws last week",
                 "created_at": old}],
             "attestations": [{"key": aws.key, "origin": "aws"}]}])
        enc.start()
        self.assertEqual(self.imp(enc, bundle).returncode, 0)
        self.assertEqual(self.imp(enc, direct).returncode, 0)
        self.wait_for(lambda: self.texts(enc) == ["aws last week"], 30, "the direct one only")
        self.assertEqual(refused(enc, "stale"), 1)
        counted(1, refused(enc, "stale"))


class OwnerTest(TrustTestCase):
    def test_only_the_owner_edits_deletes_or_unreacts(self):
        """Attack: aws edits and deletes europe's message and removes europe's reaction, both
        through its own API and with forged signed bundles to europe and enclave; outcome: its
        API answers 403 and stores nothing, 0 of 4 forged edits and deletes and no removal are
        applied at either receiving site (not_owner), and europe's own edit is delivered."""
        eu, aws, enc = self.site("europe"), self.site("aws"), self.site("enclave")
        eu.write_config({"aws": {"site": aws, "dial": True}, "enclave": {"site": enc, "dial": True}},
                        {CHANNEL: ["aws", "enclave"]}, zmq=FAST_LINK)
        aws.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]}, zmq=FAST_LINK,
                         origins={"enclave": {"site": enc, "via": ["europe"]}})
        enc.write_config({"europe": {"site": eu}}, {CHANNEL: ["europe"]}, zmq=FAST_LINK,
                         origins={"aws": {"site": aws, "via": ["europe"]}})
        for s in (eu, aws, enc):
            s.start()
        st, body = eu.post({"channel": CHANNEL, "author": "alice", "text": "the plan"})
        self.assertEqual(st, 202, body)
        plan = body["id"]
        st, _ = eu.post({"channel": CHANNEL, "author": "alice", "kind": "reaction_add",
                         "ref": plan, "text": "thumbsup"})
        self.assertEqual(st, 202)
        for s in (aws, enc):
            self.wait_sink(s, 2, 30)
        # Through aws's own API: refused with 403, nothing stored.
        before = aws.metric("relay_events_ingested_total")
        for kind in ("edit", "delete"):
            st, body = aws.post({"channel": CHANNEL, "author": "mallory", "kind": kind,
                                 "ref": plan, "text": "changed by aws"})
            self.assertEqual(st, 403, body)
            self.assertIn("only the site where a message was posted", body["error"])
            counted(1, st == 403)
        self.assertEqual(aws.metric("relay_events_ingested_total"), before)
        # Signed events of aws that change europe's message, sent as bundles to both receivers.
        forged = [
            {"seq": 1, "origin": "aws", "origin_seq": 1, "kind": "edit", "ref": plan,
             "text": "edited by aws"},
            {"seq": 2, "origin": "aws", "origin_seq": 2, "kind": "delete", "ref": plan},
            {"seq": 3, "origin": "aws", "origin_seq": 3, "kind": "reaction_remove", "ref": plan,
             "author": "alice", "text": "thumbsup"}]
        eu_lines, enc_lines = eu.sink_lines(), enc.sink_lines()
        to_eu = self.forged_bundle("owner-eu", aws, eu, [
            {"first": 1, "last": 3, "events": forged,
             "attestations": [{"key": aws.key, "origin": "aws"}]}])
        enc_forged = [dict(e, hops=["aws", "europe"]) for e in forged]
        base = self.status(eu)["log_head"] + 1000  # beyond what europe sent enclave
        to_enc = self.forged_bundle("owner-enc", eu, enc, [
            {"first": base, "last": base + 2,
             "events": [dict(e, seq=base + i) for i, e in enumerate(enc_forged)],
             "attestations": [{"key": aws.key, "origin": "aws"}]}])
        self.assertEqual(self.imp(eu, to_eu).returncode, 0)
        self.assertEqual(self.imp(enc, to_enc).returncode, 0)
        self.wait_for(lambda: refused(eu, "not_owner") == 3 and refused(enc, "not_owner") == 3,
                      30, "3 refusals (not_owner) at each receiving site",
                      lambda: (refused(eu, "not_owner"), refused(enc, "not_owner")))
        time.sleep(0.5)
        self.assertEqual(eu.sink_lines(), eu_lines, "a forged change was delivered at europe")
        self.assertEqual(enc.sink_lines(), enc_lines, "a forged change was delivered at enclave")
        counted(6, refused(eu, "not_owner") + refused(enc, "not_owner"))
        # The owner's own edit goes through.
        st, _ = eu.post({"channel": CHANNEL, "author": "alice", "kind": "edit", "ref": plan,
                         "text": "the plan, v2"})
        self.assertEqual(st, 202)
        for s in (aws, enc):
            self.wait_for(lambda s=s: any(l["text"] == "the plan, v2" for l in s.sink_lines()),
                          30, f"europe's edit at {s.name}")


class AckTest(TrustTestCase):
    """europe queues messages for aws while aws is away; forged acknowledgements arrive."""

    def setUp(self):
        super().setUp()
        self.eu, self.aws = self.site("europe"), self.site("aws")
        self.eu.write_config({"aws": {"site": self.aws, "dial": True}}, {CHANNEL: ["aws"]},
                             zmq=FAST_LINK, zmq_listen=False)
        self.aws.write_config({"europe": {"site": self.eu}}, {CHANNEL: ["europe"]}, zmq=FAST_LINK)
        self.eu.start()
        post_all(self.eu, messages(50, prefix="queued"))
        self.wait_for(lambda: self.eu.metric("relay_queue_depth", peer="aws") == 50, 10,
                      "50 events queued for aws")

    def deliver_everything(self):
        """aws comes up: every queued message and a new one arrive exactly once."""
        self.aws.start()
        post_all(self.eu, messages(5, prefix="later"))
        lines = self.wait_sink(self.aws, 55, 60)
        self.assert_exactly_once(lines, [f"queued-{i}" for i in range(50)] +
                                 [f"later-{i}" for i in range(5)], "aws sink")

    def test_an_ack_beyond_the_log_empties_nothing(self):
        """Attack: an acknowledgement through 2^64-1 signed with the peer's key (the review's
        log wipe); outcome: refused (beyond_log), nothing dropped, the queue still ships."""
        r = self.imp(self.eu, self.forged_ack("wipe", self.aws, self.eu, U64_MAX))
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("beyond anything it ever held", r.stdout)
        self.assertIn("relay rebase", r.stdout)
        self.assertEqual(self.eu.metric("relay_acks_refused_total", peer="aws", reason="beyond_log"), 1)
        counted(1, self.eu.metric("relay_acks_refused_total", peer="aws", reason="beyond_log"))
        self.assertEqual(self.status(self.eu)["peers"][0]["acked_through"], 0)
        self.deliver_everything()

    def test_an_ack_beyond_what_was_sent_is_refused(self):
        """Attack: an acknowledgement of queued events never sent to the peer (within the log);
        outcome: refused (beyond_sent), they are still sent."""
        head = self.status(self.eu)["log_head"]
        r = self.imp(self.eu, self.forged_ack("unsent", self.aws, self.eu, head))
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("beyond what was sent", r.stdout)
        self.assertEqual(self.eu.metric("relay_acks_refused_total", peer="aws", reason="beyond_sent"), 1)
        counted(1, self.eu.metric("relay_acks_refused_total", peer="aws", reason="beyond_sent"))
        self.deliver_everything()

    def test_an_ack_with_the_previous_key_moves_no_cursor(self):
        """Attack: whoever holds aws's retired key signs an acknowledgement of everything sent;
        outcome: refused (previous_key), nothing dropped."""
        old = os.path.join(self.root, "aws-old.key")
        r = self.eu.cli("keygen", old)
        self.assertEqual(r.returncode, 0, r.stderr)
        old_pub = self.eu.cli("pubkey", old).stdout.strip()
        self.eu.stop()
        self.eu.write_config({"aws": {"site": self.aws, "dial": True,
                                      "keys": {"previous_public_key": old_pub,
                                               "previous_public_key_until":
                                                   "2099-01-01T00:00:00Z"}}},
                             {CHANNEL: ["aws"]}, zmq=FAST_LINK, zmq_listen=False)
        self.eu.start()
        # Sent as a bundle, so the acknowledgement would be within what was sent.
        disk = os.path.join(self.root, "usb")
        os.makedirs(disk)
        r = self.eu.cli("export", "--config", self.eu.conf, "--peer", "aws", "--out", disk)
        self.assertEqual(r.returncode, 0, r.stderr)
        sent = self.status(self.eu)["peers"][0]["sent_through"]
        r = self.imp(self.eu, self.forged_ack("old-key", self.aws, self.eu, sent, key=old))
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("previous key", r.stdout)
        self.assertEqual(self.eu.metric("relay_acks_refused_total", peer="aws",
                                        reason="previous_key"), 1)
        counted(1, self.eu.metric("relay_acks_refused_total", peer="aws", reason="previous_key"))
        self.assertEqual(self.eu.metric("relay_queue_depth", peer="aws"), 50)
        self.deliver_everything()
