"""Key rotation of a site without losing queued messages (issue 5, deployment example c), and the
end of a rotation: a peer's previous key is refused after previous_public_key_until (issue 10)."""
import base64
import json
import os
import time

from relay_harness import RelayTestCase, messages, post_all, run_cli
from test_faults import FAKETIME_LIB, faketime_env, set_offset


def rfc3339(seconds_from_now):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds_from_now))


class KeyRotationTest(RelayTestCase):
    def new_key(self, site, name):
        path = os.path.join(site.dir, name)
        self.assertEqual(run_cli(["keygen", path]).returncode, 0)
        return path, run_cli(["pubkey", path]).stdout.strip()

    def status(self, site):
        r = site.cli("status", "--config", site.conf, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout)

    def test_rotate_a_sites_key_without_losing_queued_messages(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        post_all(eu, messages(100, prefix="before"))
        post_all(aws, messages(20, prefix="aws-before", author="bob"))
        self.wait_for(lambda: aws.sink_count() == 100 and eu.sink_count() == 20, 30, "warm-up")

        # 1. aws rotates: a new key, the old one kept as previous_key_file.
        self.assertEqual(aws.stop(), 0)
        post_all(eu, messages(50, prefix="queued"))  # queued at europe while aws is down
        old_key, old_pub = aws.key, aws.pub
        new_key, new_pub = self.new_key(aws, "aws-2.key")
        aws.key, aws.pub = new_key, new_pub
        aws.write_config({"europe": {"site": eu}}, {"war-room": ["europe"]},
                         site={"previous_key_file": old_key})
        aws.start()
        post_all(aws, messages(30, prefix="aws-new", author="bob"))
        # europe still knows only the old key: what aws now signs is refused, and queued there.
        self.wait_for(lambda: eu.metric("relay_frames_rejected_total", reason="unknown_sender")
                      > 0, 30, "europe refusing the new, unknown key")

        # 2. europe learns the new key, keeping the old one for messages signed before, for a day.
        self.assertEqual(eu.stop(), 0)
        until = rfc3339(24 * 3600)
        eu.write_config({"aws": {"site": aws, "dial": True,
                                 "keys": {"previous_public_key": old_pub,
                                          "previous_public_key_until": until}}},
                        {"war-room": ["aws"]})
        eu.start()
        self.wait_for(lambda: aws.sink_count() == 150 and eu.sink_count() == 50, 60,
                      "everything queued on both sides after the rotation",
                      lambda: f"aws {aws.sink_count()}/150, europe {eu.sink_count()}/50")
        for site, n in ((aws, 150), (eu, 50)):
            ids = [l["id"] for l in site.sink_lines()]
            self.assertEqual((len(ids), len(set(ids))), (n, n))
        self.assertEqual(sorted(l["text"] for l in aws.sink_lines() if l["text"].startswith("q")),
                         sorted(f"queued-{i}" for i in range(50)))
        # The operator is told the rotation is still open, at start and in `relay status`.
        self.assertIn(f"[peer.aws] previous_public_key", eu.log_text())
        self.assertIn(f"is still accepted until {until}", eu.log_text())
        st = self.status(eu)
        self.assertEqual(st["peers"][0]["previous_key"]["until"], until)
        self.assertTrue(st["peers"][0]["previous_key"]["accepted"])
        self.assertTrue(any("still accepted until" in w for w in st["warnings"]), st)
        r = eu.cli("status", "--config", eu.conf)
        self.assertIn("previous_public_key", r.stdout)

        # 3. Once every peer has the new key, the previous ones are dropped.
        self.assertEqual(aws.stop(), 0)
        aws.write_config({"europe": {"site": eu}}, {"war-room": ["europe"]})
        aws.start()
        post_all(eu, messages(10, prefix="after"))
        self.wait_for(lambda: aws.sink_count() == 160, 30, "messages after the rotation")

    def signing_with_the_previous_key(self, zmq):
        """aws still signs with its old key (key_file) while europe already has its new key as
        public_key and the old one as previous_public_key. aws holds the new key as its
        previous_key_file, so it opens what europe seals for the new key."""
        eu, aws = self.site("europe"), self.site("aws")
        new_key, new_pub = self.new_key(aws, "aws-new.key")
        old_pub = aws.pub

        def configure(until):
            eu.write_config({"aws": {"site": aws, "dial": zmq, "public_key": new_pub,
                                     "keys": {"previous_public_key": old_pub,
                                              "previous_public_key_until": until}}},
                            {"war-room": ["aws"]}, zmq_listen=zmq)
        configure(rfc3339(24 * 3600))
        aws.write_config({"europe": {"site": eu}}, {"war-room": ["europe"]}, zmq_listen=zmq,
                         site={"previous_key_file": new_key})
        return eu, aws, configure, new_key, new_pub, old_pub

    def test_bundles_and_ack_files_signed_with_the_previous_key_are_refused_after_until(self):
        """Attack: whoever holds a peer's retired key after its rotation ended (the key the
        rotation was for, if it leaked) writes bundles and ack files with it; the safe outcome is
        that each is refused by name and counted (previous_key_expired), nothing is delivered,
        europe's queue for aws is not freed, and the same events still arrive exactly once once
        aws signs with its new key."""
        eu, aws, configure, new_key, new_pub, old_pub = self.signing_with_the_previous_key(False)
        disk = os.path.join(self.root, "usb")
        os.makedirs(disk)

        def export(site, peer, out, *extra):
            os.makedirs(out, exist_ok=True)
            r = site.cli("export", "--config", site.conf, "--peer", peer, "--out", out, *extra)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            return [l for l in r.stdout.splitlines() if l.strip()]

        def imp(site, *paths):
            return site.cli("import", "--config", site.conf, *paths)

        eu.start()
        aws.start()
        # Before previous_public_key_until: bundles signed with the old key work; an ack file
        # signed with it is refused all the same, since a previous key moves no cursor (issue 10).
        post_all(eu, messages(20, prefix="eu"))
        self.assertEqual(imp(aws, *export(eu, "aws", os.path.join(disk, "1"))).returncode, 0)
        self.wait_for(lambda: aws.sink_count() == 20, 30, "europe's bundle at aws")
        post_all(aws, messages(10, prefix="aws", author="bob"))
        r = imp(eu, *export(aws, "europe", os.path.join(disk, "2")))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_for(lambda: eu.sink_count() == 10, 30, "aws's bundle at europe")
        r = imp(eu, *export(aws, "europe", os.path.join(disk, "3"), "--ack"))
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("signed with its previous key, which may not move its cursor", r.stdout)
        self.assertEqual(eu.metric("relay_acks_refused_total", peer="aws", reason="previous_key"),
                         1)
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 20, 10,
                      "europe's queue kept in spite of the ack file signed with the previous key")

        # The rotation has ended (a config written with a time in the past).
        self.assertEqual(eu.stop(), 0)
        until = "2020-01-01T00:00:00Z"
        configure(until)
        eu.start()
        self.assertIn(f"previous_public_key ({fingerprint(old_pub)}) expired at {until}",
                      eu.log_text())
        post_all(eu, messages(5, prefix="eu-late"))
        self.assertEqual(imp(aws, *export(eu, "aws", os.path.join(disk, "4"))).returncode, 0)
        self.wait_for(lambda: aws.sink_count() == 25, 30, "europe's later bundle at aws")
        post_all(aws, messages(7, prefix="aws-late", author="bob"))
        bundles = export(aws, "europe", os.path.join(disk, "5"))
        r = imp(eu, *bundles)
        self.assertNotEqual(r.returncode, 0, r.stdout)
        self.assertIn("bundle from peer 'aws' refused: signed with its previous key", r.stdout)
        self.assertIn(f"accepted only until {until} ([peer.aws] previous_public_key_until)",
                      r.stdout)
        ack = export(aws, "europe", os.path.join(disk, "6"), "--ack")
        r = imp(eu, *ack)
        self.assertNotEqual(r.returncode, 0, r.stdout)
        self.assertIn("signed with its previous key", r.stdout)
        self.assertEqual(eu.metric("relay_frames_rejected_total", reason="previous_key_expired"),
                         2)
        self.assertEqual(eu.metric("relay_frames_rejected_total", reason="unknown_sender"), 0)
        time.sleep(1)
        self.assertEqual(eu.sink_count(), 10, "nothing signed with the expired key is delivered")
        self.assertEqual(eu.metric("relay_queue_depth", peer="aws"), 25,
                         "an ack file signed with the expired key frees nothing")
        st = self.status(eu)
        self.assertFalse(st["peers"][0]["previous_key"]["accepted"])
        self.assertTrue(any(f"expired at {until}" in w for w in st["warnings"]), st)

        # aws completes its rotation: the same events, signed with the new key, arrive once.
        self.assertEqual(aws.stop(), 0)
        aws.key, aws.pub = new_key, new_pub
        aws.write_config({"europe": {"site": eu}}, {"war-room": ["europe"]}, zmq_listen=False)
        again = export(aws, "europe", os.path.join(disk, "7"), "--all")
        r = imp(eu, *again)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_for(lambda: eu.sink_count() == 17, 30, "aws's events after its rotation")
        self.assert_exactly_once(eu.sink_lines(), [f"aws-{i}" for i in range(10)] +
                                 [f"aws-late-{i}" for i in range(7)], "europe")
        r = imp(eu, *export(aws, "europe", os.path.join(disk, "8"), "--ack"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 0, 10,
                      "europe's queue freed by aws's ack signed with the new key")

    def test_link_refuses_the_previous_key_once_until_passes(self):
        """Attack: a peer's retired key keeps signing on the ZeroMQ link after the rotation's end
        (previous_public_key_until passes while the link is up); the safe outcome is that its
        frames and control messages are refused and counted (previous_key_expired), nothing more
        is delivered, the events stay queued at the sender, and they arrive exactly once after
        the sender switches to its new key."""
        if not os.path.exists(FAKETIME_LIB):
            self.skipTest(f"{FAKETIME_LIB} missing (Debian package faketime)")
        eu, aws, configure, new_key, new_pub, old_pub = self.signing_with_the_previous_key(True)
        until = rfc3339(24 * 3600)
        configure(until)
        rc = os.path.join(eu.dir, "faketime.rc")
        eu.start(env=faketime_env(rc))
        aws.start()
        post_all(aws, messages(10, prefix="aws", author="bob"))
        post_all(eu, messages(10, prefix="eu"))
        self.wait_for(lambda: eu.sink_count() == 10 and aws.sink_count() == 10, 30,
                      "both ways while the previous key is accepted")
        self.assertEqual(eu.metric("relay_frames_rejected_total", reason="previous_key_expired"),
                         0)

        # europe's clock passes previous_public_key_until while the link is up.
        set_offset(rc, "+2d")
        self.wait_for(lambda: eu.metric("relay_frames_rejected_total",
                                        reason="previous_key_expired") > 0, 15,
                      "europe refusing aws's heartbeats signed with the expired key")
        self.wait_for(lambda: f"expired at {until}" in eu.log_text(), 10,
                      "the log line saying the previous key expired")
        post_all(aws, messages(10, prefix="aws-late", author="bob"))
        self.wait_for(lambda: "a frame from peer 'aws' refused: signed with its previous key"
                      in eu.log_text(), 10, "europe refusing aws's frames")
        self.wait_for(lambda: aws.metric("relay_queue_depth", peer="europe") >= 10, 10,
                      "aws keeping its late messages queued")
        time.sleep(3)
        self.assertEqual(eu.sink_count(), 10, "nothing signed with the expired key is delivered")
        self.assertGreaterEqual(aws.metric("relay_queue_depth", peer="europe"), 10)
        self.assertEqual(eu.metric("relay_frames_rejected_total", reason="unknown_sender"), 0)

        # aws completes its rotation: its queue flows again, exactly once.
        self.assertEqual(aws.stop(), 0)
        aws.key, aws.pub = new_key, new_pub
        aws.write_config({"europe": {"site": eu}}, {"war-room": ["europe"]})
        aws.start()
        self.wait_for(lambda: eu.sink_count() == 20, 60, "aws's late messages after its rotation")
        self.assert_exactly_once(eu.sink_lines(), [f"aws-{i}" for i in range(10)] +
                                 [f"aws-late-{i}" for i in range(10)], "europe")


def fingerprint(public_key):
    """The 16 hex digits relay prints for a public identity: the start of its signing key."""
    text = public_key.split(":", 1)[1]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))[:8].hex()


class OwnKeyCheckTest(RelayTestCase):
    def test_check_config_names_a_peer_holding_this_sites_own_or_previous_key(self):
        eu, aws = self.pair()
        old = os.path.join(eu.dir, "europe-old.key")
        self.assertEqual(run_cli(["keygen", old]).returncode, 0)
        old_pub = run_cli(["pubkey", old]).stdout.strip()
        mars = self.site("mars")
        eu.write_config({"aws": {"site": aws, "public_key": eu.pub},
                         "mars": {"site": mars, "keys": {
                             "previous_public_key": old_pub,
                             "previous_public_key_until": rfc3339(3600)}}},
                        {"war-room": ["aws"]}, site={"previous_key_file": old})
        r = eu.cli("check-config", "--config", eu.conf)
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 1, out)
        self.assertIn(f"[peer.aws] public_key = '{eu.pub}': same public key as [site] key_file "
                      f"('{eu.key}' is this site's own key", out)
        self.assertIn(f"[peer.mars] previous_public_key = '{old_pub}': same public key as [site] "
                      f"previous_key_file ('{old}' is this site's own key", out)
        # The daemon refuses to start with the same words.
        eu.start(wait=False)
        self.assertEqual(eu.proc.wait(timeout=30), 1)
        self.assertIn("[peer.aws] public_key", eu.log_text())
        self.assertIn("same public key as [site] key_file", eu.log_text())
        # With the peer's own key it passes.
        eu.write_config({"aws": {"site": aws}}, {"war-room": ["aws"]})
        r = eu.cli("check-config", "--config", eu.conf)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
