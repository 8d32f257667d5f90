"""Sneakernet bundles: export -> carry -> import, with signed acknowledgement files (issue 4)."""
import os
import subprocess
import time

from relay_harness import RelayTestCase, messages, post_all, relay_bin


class SneakernetTest(RelayTestCase):
    def disk_pair(self):
        """europe and aws with no network between them: bundles only."""
        eu, aws = self.site("europe"), self.site("aws")
        eu.write_config({"aws": {"site": aws}}, {"war-room": ["aws"]}, zmq_listen=False)
        aws.write_config({"europe": {"site": eu}}, {"war-room": ["europe"]}, zmq_listen=False)
        self.disk = os.path.join(self.root, "usb")
        os.makedirs(self.disk)
        return eu, aws

    def export(self, site, peer, *extra, out=None):
        r = site.cli("export", "--config", site.conf, "--peer", peer, "--out", out or self.disk,
                     *extra)
        self.assertEqual(r.returncode, 0, r.stderr)
        return [l for l in r.stdout.splitlines() if l.strip()]

    def imp(self, site, *paths):
        return site.cli("import", "--config", site.conf, *paths)

    def test_export_import_thousands_and_reimport_is_a_no_op(self):
        eu, aws = self.disk_pair()
        eu.start()
        post_all(eu, messages(3000, prefix="disk"), batch=500)
        # A limit over what one bundle can hold (4 GiB) is refused, and nothing is written.
        r = eu.cli("export", "--config", eu.conf, "--peer", "aws", "--out", self.disk,
                   "--max-bytes", "5GiB")
        self.assertNotEqual(r.returncode, 0, r.stdout)
        self.assertIn("more than one bundle can hold", r.stdout + r.stderr)
        self.assertEqual(os.listdir(self.disk), [])
        files = self.export(eu, "aws", "--max-bytes", "256KiB")
        self.assertGreater(len(files), 1, "a 256 KiB limit must split 3000 messages")
        for f in files:  # header (112 bytes) + body within the limit + signature (64 bytes)
            self.assertLessEqual(os.path.getsize(f), 256 * 1024 + 112 + 64, f)
        eu.stop()
        # Import in reverse order while aws is not running (the store is opened by the CLI).
        r = self.imp(aws, *reversed(files))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        aws.start()
        self.wait_for(lambda: aws.sink_count() >= 3000, 60, "3000 lines in aws's sink")
        ids = [l["id"] for l in aws.sink_lines()]
        self.assertEqual(len(ids), 3000)
        self.assertEqual(len(set(ids)), 3000)
        self.assertEqual(sorted(l["text"] for l in aws.sink_lines()),
                         sorted(f"disk-{i}" for i in range(3000)))
        # Again, now through the running daemon: nothing is applied twice.
        r = self.imp(aws, self.disk)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("already imported", r.stdout)
        self.assertEqual(aws.sink_count(), 3000)

    def test_ack_file_frees_the_senders_queue(self):
        eu, aws = self.disk_pair()
        eu.start()
        aws.start()
        post_all(eu, messages(200, prefix="q"), batch=100)
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 200, 10,
                      "a queue of 200 for aws")
        files = self.export(eu, "aws")
        # Nothing new: a second export writes nothing; --all writes the unacknowledged again.
        self.assertEqual(self.export(eu, "aws"), [])
        again = os.path.join(self.root, "again")
        os.makedirs(again)
        self.assertTrue(self.export(eu, "aws", "--all", out=again))
        self.assertEqual(self.imp(aws, *files).returncode, 0)
        self.wait_for(lambda: aws.sink_count() == 200, 30, "200 lines at aws")
        self.assertEqual(self.imp(aws, again).returncode, 0)  # duplicates of the same events
        ack = self.export(aws, "europe", "--ack")
        self.assertEqual(len(ack), 1)
        self.assertTrue(ack[0].endswith(".ack"))
        r = self.imp(eu, ack[0])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("acknowledges everything through", r.stdout)
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 0, 10,
                      "the queue freed by the ack file")
        self.assertEqual(aws.sink_count(), 200)

    def test_bad_bundles_are_refused_by_name_and_change_nothing(self):
        eu, aws = self.disk_pair()
        rogue = self.site("rogue")
        rogue.write_config({"aws": {"site": aws}}, {"war-room": ["aws"]}, zmq_listen=False)
        enclave = self.site("enclave")
        eu.write_config({"aws": {"site": aws}, "enclave": {"site": enclave}},
                        {"war-room": ["aws", "enclave"]}, zmq_listen=False)
        for s in (eu, rogue):
            s.start()
        post_all(eu, messages(10, prefix="good"))
        post_all(rogue, messages(5, prefix="rogue"))
        good = self.export(eu, "aws")[0]
        foreign = self.export(eu, "enclave")[0]       # for another site
        unknown = self.export(rogue, "aws")[0]        # from a key aws does not know
        exp_dir = os.path.join(self.root, "exp")
        os.makedirs(exp_dir)
        expired = self.export(eu, "aws", "--all", "--ttl", "1ms", out=exp_dir)[0]
        data = open(good, "rb").read()
        tampered = os.path.join(self.disk, "tampered.bundle")
        with open(tampered, "wb") as f:
            f.write(data[:200] + bytes([data[200] ^ 1]) + data[201:])
        truncated = os.path.join(self.disk, "truncated.bundle")
        with open(truncated, "wb") as f:
            f.write(data[: len(data) // 2])
        cases = {tampered: "bad signature", truncated: "truncated", foreign: "addressed to",
                 unknown: "not a configured peer", expired: "expired"}
        for path, says in cases.items():
            r = self.imp(aws, path)
            self.assertEqual(r.returncode, 1, f"{path}: {r.stdout}{r.stderr}")
            self.assertIn(os.path.basename(path), r.stdout)
            self.assertIn("REFUSED", r.stdout)
            self.assertIn(says, r.stdout.lower() if says.islower() else r.stdout)
        self.assertEqual(aws.sink_count(), 0)
        # The good one still imports, also when given together with the bad ones.
        r = self.imp(aws, tampered, good, truncated)
        self.assertEqual(r.returncode, 1)
        self.assertIn("imported 10 new event(s)", r.stdout)
        aws.start()
        self.wait_for(lambda: aws.sink_count() == 10, 30, "the good bundle delivered")

    def test_sigkill_during_import_leaves_no_partial_state(self):
        eu, aws = self.disk_pair()
        eu.start()
        post_all(eu, messages(4000, prefix="k"), batch=500)
        files = self.export(eu, "aws", "--max-bytes", "512KiB")
        aws.start()
        p = subprocess.Popen([relay_bin(), "import", "--config", aws.conf] + files,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.05)
        aws.kill9()          # the daemon doing the import dies in the middle
        p.wait(timeout=60)
        aws.start()
        r = self.imp(aws, *files)  # whatever was not imported is imported now, nothing twice
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_for(lambda: aws.sink_count() >= 4000, 60, "4000 lines")
        ids = [l["id"] for l in aws.sink_lines()]
        self.assertEqual(len(ids), 4000)
        self.assertEqual(len(set(ids)), 4000)

    def test_sigkill_during_export_leaves_no_partial_bundle(self):
        eu, aws = self.disk_pair()
        eu.start()
        post_all(eu, messages(20000, prefix="x"), batch=1000)
        eu.stop()  # the CLI opens the store itself
        p = subprocess.Popen([relay_bin(), "export", "--config", eu.conf, "--peer", "aws",
                              "--out", self.disk, "--max-bytes", "64KiB"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline and len(os.listdir(self.disk)) < 5:
            time.sleep(0.005)
        p.kill()
        p.wait(timeout=30)
        # Only files under their final name count (a ".tmp-" file is an export in progress,
        # never imported from a folder).
        written = sorted(os.path.join(self.disk, f) for f in os.listdir(self.disk)
                         if f.endswith(".bundle") and not f.startswith(".tmp-"))
        self.assertTrue(written, "the export was killed before writing anything")
        # Every file under a final name is whole: each one imports.
        r = self.imp(aws, *written)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr)
        # Nothing was recorded as exported, so the next export writes everything again;
        # the events that already arrived are recognised.
        again = os.path.join(self.root, "again")
        os.makedirs(again)
        self.export(eu, "aws", out=again)
        r = self.imp(aws, again)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr)
        aws.start()
        self.wait_for(lambda: aws.sink_count() >= 20000, 90, "20000 lines")
        ids = [l["id"] for l in aws.sink_lines()]
        self.assertEqual(len(ids), 20000)
        self.assertEqual(len(set(ids)), 20000)

    def test_daemons_exchange_through_a_shared_files_dir_by_themselves(self):
        eu, aws = self.site("europe"), self.site("aws")
        shared = os.path.join(self.root, "transfer")
        os.makedirs(shared)
        auto = {"files_dir": shared, "files_auto": "true", "files_interval": "200ms"}
        eu.write_config({"aws": {"site": aws, "keys": auto}}, {"war-room": ["aws"]},
                        zmq_listen=False)
        aws.write_config({"europe": {"site": eu, "keys": auto}}, {"war-room": ["europe"]},
                         zmq_listen=False)
        eu.start()
        aws.start()
        post_all(eu, messages(500, prefix="auto"), batch=250)
        post_all(aws, messages(50, prefix="back"), batch=50)
        self.wait_for(lambda: aws.sink_count() == 500 and eu.sink_count() == 50, 60,
                      "both directions through the shared folder")
        # Acknowledgement files come back the same way and free both queues.
        self.wait_for(lambda: eu.metric("relay_queue_depth", peer="aws") == 0 and
                      aws.metric("relay_queue_depth", peer="europe") == 0, 30,
                      "queues freed by ack files")
        self.assertEqual(len({l["id"] for l in aws.sink_lines()}), 500)
