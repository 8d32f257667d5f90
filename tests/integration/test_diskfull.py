"""Disk full during ingest, on a real file system that fills up: the sending site's data_dir is a
small tmpfs mounted for the test (CTest runs this module under `unshare -m`, in its own mount
namespace, as root), and a filler file takes the space away and gives it back.

Checked: ingest answers 503 and never acknowledges what is not durable; the daemon keeps
running; when space returns it accepts again by itself (with [site] min_free before the disk is
full, and after RocksDB itself hit ENOSPC, through DB::Resume); after a SIGKILL everything that
was acknowledged is delivered to the peer exactly once, and nothing is delivered twice."""
import os
import subprocess

from relay_harness import CHANNEL, RelayTestCase, messages

BODY_TEXT = "d" * 60000  # ~1 MiB per batch of 16


def mount_tmpfs(path, size_mib):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"cannot mount a tmpfs at {path} (this module needs root in its own "
                             f"mount namespace: unshare -m): {r.stderr.strip()}")


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path, leave):
    """Writes a filler file so that about `leave` bytes stay free; returns its path."""
    filler = os.path.join(path, "filler")
    want = free_bytes(path) - leave
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        while want > 0:
            n = min(want, len(chunk))
            f.write(chunk[:n])
            want -= n
    return filler


class DiskFullTest(RelayTestCase):
    def batch(self, tag, n=16):
        return [{"channel": CHANNEL, "author": "a", "id": f"{tag}-{i}", "text": f"{tag}-{i} {BODY_TEXT}"}
                for i in range(n)]

    def post_until_refused(self, site, tag, reason, limit=200):
        """Posts ~1 MiB batches until one is refused with 503 whose error contains `reason`.
        Returns (acknowledged batches, refused batches)."""
        acked, refused = [], []
        for k in range(limit):
            b = self.batch(f"{tag}{k}")
            st, body = site.post(b, timeout=60)
            if st == 202:
                self.assertEqual(len(body), len(b))
                acked.append(b)
                continue
            self.assertEqual(st, 503, f"batch {k}: {body!r:.300}")
            refused.append(b)
            if reason in body["error"]:
                return acked, refused
        self.fail(f"no 503 with '{reason}' after {limit} batches; free: {free_bytes(site.data)}")

    def check_delivered(self, aws, acked, refused):
        want = {m["text"] for b in acked for m in b}
        maybe = {m["text"] for b in refused for m in b}
        lines = self.wait_sink(aws, len(want), 120)
        texts = [l["text"] for l in lines]
        self.assertEqual(len(texts), len(set(texts)), "a message was delivered twice")
        missing = want - set(texts)
        self.assertEqual(len(missing), 0, f"{len(missing)} acknowledged messages lost")
        self.assertTrue(set(texts) <= want | maybe, "delivered something never posted")

    def test_min_free_refuses_before_the_disk_is_full(self):
        eu, aws = self.pair(site={"min_free": "24MiB"})
        mount_tmpfs(eu.data, 96)
        eu.start()
        filler = fill(eu.data, 34 << 20)
        acked, refused = self.post_until_refused(eu, "a", "disk nearly full")
        self.assertGreater(len(acked), 0)
        self.assertGreater(free_bytes(eu.data), 0, "min_free let the disk fill up")
        st, body = eu.post(self.batch("again"))
        self.assertEqual(st, 503)
        self.assertIn("below [site] min_free", body["error"])
        refused.append(self.batch("again"))
        self.assertTrue(eu.healthy())
        self.assertGreaterEqual(eu.metric("relay_ingest_disk_low_total"), 2)
        self.assertIn("new messages are refused (503) until space is freed", eu.log_text())
        os.unlink(filler)
        st, body = eu.post(self.batch("later"))
        self.assertEqual(st, 202, body)
        acked.append(self.batch("later"))
        self.assertIn("has space again", eu.log_text())
        aws.start()
        self.check_delivered(aws, acked, refused)
        # Refused before anything was written: none of them is delivered.
        texts = set(l["text"] for l in aws.sink_lines())
        self.assertFalse(texts & {m["text"] for b in refused for m in b})

    def test_enospc_in_the_store_exits_for_a_restart_that_recovers(self):
        """With min_free = 0 the store itself hits ENOSPC. The failed commit is answered 503 and
        the daemon exits with 75 (crash-only recovery: RocksDB must not append to its WAL after
        a failed append); restarts while the disk is still full fail or exit again the same way;
        once there is space the restart recovers everything acknowledged."""
        eu, aws = self.pair(site={"min_free": "0"})
        mount_tmpfs(eu.data, 64)
        eu.start()
        filler = fill(eu.data, 12 << 20)
        acked, refused = [], []
        for k in range(200):
            b = self.batch(f"b{k}")
            try:
                st, body = eu.post(b, timeout=60)
            except OSError:  # the process exited while this request was in flight
                refused.append(b)
                break
            if st == 202:
                acked.append(b)
                continue
            self.assertEqual(st, 503, body)
            self.assertIn("store is out of disk space", body["error"])
            refused.append(b)
            break
        self.assertGreater(len(acked), 0)
        self.assertGreater(len(refused), 0, "the disk never filled")
        eu.proc.wait(timeout=30)
        self.assertEqual(eu.proc.returncode, 75, eu.log_tail())
        self.assertIn("fatal: store is out of disk space", eu.log_text())
        eu.kill9()  # closes the log
        # Still full: a restart either fails to open the store or serves until its first write
        # fails again; either way it does not lose or invent anything (checked at the end).
        try:
            eu.start(timeout=15)
            b = self.batch("stillfull")
            try:
                st, body = eu.post(b, timeout=30)
                (acked if st == 202 else refused).append(b)
            except OSError:
                refused.append(b)
        except AssertionError:
            pass  # exited before it was healthy (e.g. no space to replay the WAL)
        eu.kill9()
        os.unlink(filler)
        eu.start()
        for k in range(3):
            b = self.batch(f"after{k}")
            st, body = eu.post(b)
            self.assertEqual(st, 202, body)
            acked.append(b)
        eu.kill9()
        eu.start()
        aws.start()
        self.check_delivered(aws, acked, refused)


if __name__ == "__main__":
    import unittest
    unittest.main()
