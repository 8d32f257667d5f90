"""Running under systemd (issue 5): the notify protocol, signals, and the unit file."""
import os
import shutil
import signal
import socket
import subprocess
import time

from relay_harness import REPO, RelayTestCase, messages, post_all, relay_bin


class NotifyTest(RelayTestCase):
    def notify_socket(self):
        path = os.path.join(self.root, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(0.2)
        self.addCleanup(sock.close)
        return path, sock

    def read_until(self, sock, want, timeout):
        """Collects notify messages until one holds `want` (bounded in time)."""
        seen = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                msg = sock.recv(4096).decode()
            except socket.timeout:
                continue
            seen.append(msg)
            if want in msg.split("\n"):
                return seen
        self.fail(f"no {want} within {timeout}s; got {seen}")

    def test_ready_status_watchdog_and_stopping(self):
        eu, aws = self.pair()
        path, sock = self.notify_socket()
        env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
        eu.start(wait=False, env=env)
        seen = self.read_until(sock, "READY=1", 20)
        # READY comes only once the daemon is serving: its API answers now.
        self.assertTrue(eu.healthy())
        ready = [m for m in seen if "READY=1" in m][0]
        self.assertIn("STATUS=ingested 0, delivered 0, aws ", ready)
        self.read_until(sock, "WATCHDOG=1", 3)  # every WatchdogSec/2 = 0.2 s
        eu.proc.send_signal(signal.SIGTERM)
        self.read_until(sock, "STOPPING=1", 10)
        self.assertEqual(eu.proc.wait(timeout=30), 0)

    def test_no_watchdog_messages_unless_asked(self):
        eu, aws = self.pair()
        path, sock = self.notify_socket()
        eu.start(wait=False, env=dict(os.environ, NOTIFY_SOCKET=path))
        self.read_until(sock, "READY=1", 20)
        end, msgs = time.monotonic() + 1.5, []
        while time.monotonic() < end:
            try:
                msgs.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
        self.assertFalse([m for m in msgs if "WATCHDOG=1" in m])
        self.assertEqual(eu.stop(), 0)

    def test_sighup_keeps_running_and_logs_a_status_line(self):
        eu, aws = self.pair()
        eu.start()
        eu.proc.send_signal(signal.SIGHUP)
        self.wait_for(lambda: "SIGHUP: ingested" in eu.log_text(), 10, "the SIGHUP status line")
        self.assertTrue(eu.healthy())
        self.assertEqual(eu.stop(), 0)

    def test_sigterm_in_a_stream_drains_quickly_and_loses_nothing(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        post_all(eu, messages(5000, prefix="t"), batch=500)
        t0 = time.monotonic()
        self.assertEqual(aws.stop(timeout=30), 0)
        self.assertLess(time.monotonic() - t0, 10, "SIGTERM must not wait for the whole backlog")
        aws.start()
        self.wait_for(lambda: aws.sink_count() >= 5000, 60, "5000 lines after the restart")
        ids = [l["id"] for l in aws.sink_lines()]
        self.assertEqual((len(ids), len(set(ids))), (5000, 5000))


class UnitFileTest(RelayTestCase):
    def test_systemd_analyze_verify_passes(self):
        if not shutil.which("systemd-analyze"):
            self.skipTest("systemd-analyze is not installed (scripts/install-deps.sh installs it)")
        unit_dir = os.path.join(self.root, "units")
        os.makedirs(unit_dir)
        text = open(os.path.join(REPO, "deploy", "relay@.service")).read()
        self.assertIn("Type=notify", text)
        for key in ("ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                    "ReadWritePaths=/var/lib/relay", "RestrictAddressFamilies=",
                    "CapabilityBoundingSet=", "User=relay", "WatchdogSec="):
            self.assertIn(key, text)
        # Verify the unit as shipped, with ExecStart pointing at the binary under test and the
        # man page it names on MANPATH.
        with open(os.path.join(unit_dir, "relay@.service"), "w") as f:
            f.write(text.replace("/usr/bin/relay", relay_bin()))
        man = os.path.join(self.root, "man", "man8")
        os.makedirs(man)
        page = os.path.join(REPO, "docs", "relay.8")
        if os.path.exists(page):
            shutil.copy(page, man)
        env = dict(os.environ, MANPATH=os.path.join(self.root, "man"))
        r = subprocess.run(["systemd-analyze", "verify", "relay@europe.service"], cwd=unit_dir,
                           capture_output=True, text=True, timeout=60, env=env)
        problems = [l for l in (r.stdout + r.stderr).splitlines()
                    if l.strip() and "relay@" in l]
        self.assertEqual(r.returncode, 0, "\n".join(problems) or r.stderr)
        self.assertFalse(problems, "\n".join(problems))
