"""Key rotation of a site without losing queued messages (issue 5, deployment example c)."""
import os

from relay_harness import RelayTestCase, messages, post_all, run_cli


class KeyRotationTest(RelayTestCase):
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
        new_key = os.path.join(aws.dir, "aws-2.key")
        self.assertEqual(run_cli(["keygen", new_key]).returncode, 0)
        new_pub = run_cli(["pubkey", new_key]).stdout.strip()
        aws.key, aws.pub = new_key, new_pub
        aws.write_config({"europe": {"site": eu}}, {"war-room": ["europe"]},
                         site={"previous_key_file": old_key})
        aws.start()
        post_all(aws, messages(30, prefix="aws-new", author="bob"))
        # europe still knows only the old key: what aws now signs is refused, and queued there.
        self.wait_for(lambda: eu.metric("relay_frames_rejected_total", reason="unknown_sender")
                      > 0, 30, "europe refusing the new, unknown key")

        # 2. europe learns the new key, keeping the old one for messages signed before.
        self.assertEqual(eu.stop(), 0)
        eu.write_config({"aws": {"site": aws, "dial": True,
                                 "keys": {"previous_public_key": old_pub}}},
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

        # 3. Once every peer has the new key, the previous ones are dropped.
        self.assertEqual(aws.stop(), 0)
        aws.write_config({"europe": {"site": eu}}, {"war-room": ["europe"]})
        aws.start()
        post_all(eu, messages(10, prefix="after"))
        self.wait_for(lambda: aws.sink_count() == 160, 30, "messages after the rotation")
