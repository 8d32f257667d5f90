"""CLI contract: keygen/pubkey, usage errors, --help, check-config, post and status."""
import json
import os
import stat

from relay_harness import CHANNEL, RelayTestCase, run_cli

SUBCOMMANDS = ["keygen", "pubkey", "token", "run", "check-config", "post", "status", "export",
               "import", "demo"]


class KeyFileTest(RelayTestCase):
    def test_keygen_creates_0600_and_refuses_to_overwrite(self):
        key = os.path.join(self.root, "site.key")
        r = run_cli(["keygen", key])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(os.path.isfile(key))
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        with open(key, "rb") as f:
            before = f.read()
        pub = run_cli(["pubkey", key]).stdout

        r = run_cli(["keygen", key])
        self.assertNotEqual(r.returncode, 0, "keygen overwrote an existing key file")
        self.assertIn("site.key", r.stderr, "the refusal must name the file")
        with open(key, "rb") as f:
            self.assertEqual(f.read(), before, "the existing key file was modified")
        self.assertEqual(run_cli(["pubkey", key]).stdout, pub)

    def test_keygen_mode_ignores_umask(self):
        key = os.path.join(self.root, "umask.key")
        old = os.umask(0)
        try:
            r = run_cli(["keygen", key])
        finally:
            os.umask(old)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)

    def test_pubkey_prints_one_line(self):
        key = os.path.join(self.root, "k.key")
        self.assertEqual(run_cli(["keygen", key]).returncode, 0)
        r = run_cli(["pubkey", key])
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertEqual(len(lines), 1, r.stdout)
        self.assertTrue(lines[0].startswith("relay1:"), lines[0])
        self.assertGreater(len(lines[0]), len("relay1:") + 40)
        self.assertEqual(lines[0], lines[0].strip())
        # Stable: the same file gives the same identity; another key gives another.
        self.assertEqual(run_cli(["pubkey", key]).stdout, r.stdout)
        key2 = os.path.join(self.root, "k2.key")
        run_cli(["keygen", key2])
        self.assertNotEqual(run_cli(["pubkey", key2]).stdout, r.stdout)

    def test_pubkey_missing_file(self):
        r = run_cli(["pubkey", os.path.join(self.root, "nope.key")])
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("nope.key", r.stderr)

    def test_daemon_refuses_key_readable_by_others(self):
        eu, aws = self.pair()
        os.chmod(eu.key, 0o644)
        r = run_cli(["run", "--config", eu.conf], timeout=30)
        self.assertNotEqual(r.returncode, 0, "the daemon ran with a 0644 key file")
        out = r.stdout + r.stderr
        self.assertIn("0644", out, out)
        self.assertIn("mode", out, out)
        self.assertIn(os.path.basename(eu.key), out)
        # Group-readable only is refused too; 0600 works.
        os.chmod(eu.key, 0o640)
        r = run_cli(["run", "--config", eu.conf], timeout=30)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("0640", r.stdout + r.stderr)
        os.chmod(eu.key, 0o600)
        eu.start()
        self.assertTrue(eu.healthy())


    def test_daemon_refuses_a_peer_with_its_own_key(self):
        # Whichever [peer.*] section holds this site's own public key, the daemon refuses to
        # start and names the peer.
        eu, aws = self.pair()
        enclave = self.site("enclave")
        for order in (["enclave", "aws"], ["aws", "enclave"]):
            with self.subTest(order=order):
                peers = {n: ({"site": aws} if n == "aws" else {"site": enclave, "public_key": eu.pub})
                         for n in order}
                eu.write_config(peers, {CHANNEL: order})
                eu.start(wait=False)
                try:
                    eu.proc.wait(timeout=5)
                except Exception:
                    pass
                running = eu.running()
                eu.kill9()
                self.assertFalse(running, f"the daemon runs with [peer.enclave] holding its own "
                                          f"key (peer sections in order {order})")
                self.assertNotEqual(eu.proc.returncode, 0)
                self.assertIn("enclave", eu.log_tail(3))


class TokenFileTest(RelayTestCase):
    def test_token_creates_0600_and_refuses_to_overwrite(self):
        path = os.path.join(self.root, "ingest.token")
        old = os.umask(0)
        try:
            r = run_cli(["token", path])
        finally:
            os.umask(old)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            text = f.read()
        self.assertRegex(text, r"^[0-9a-f]{64}\n$")
        self.assertNotIn(text.strip(), r.stdout + r.stderr, "the token was printed")
        self.assertIn("token_file", r.stderr)
        r = run_cli(["token", path])
        self.assertNotEqual(r.returncode, 0, "relay token overwrote a token file")
        self.assertIn("ingest.token", r.stderr)
        self.assertIn("refusing to overwrite", r.stderr)
        with open(path) as f:
            self.assertEqual(f.read(), text)
        other = os.path.join(self.root, "other.token")
        self.assertEqual(run_cli(["token", other]).returncode, 0)
        with open(other) as f:
            self.assertNotEqual(f.read(), text, "two tokens are the same")

    def test_daemon_and_cli_refuse_a_token_file_readable_by_others(self):
        eu, aws = self.pair()
        for mode in (0o644, 0o640, 0o604):
            with self.subTest(mode=oct(mode)):
                os.chmod(eu.token_file, mode)
                want = f"{mode:04o}"
                for args in (["run", "--config", eu.conf], ["check-config", "--config", eu.conf]):
                    r = run_cli(args, timeout=30)
                    out = r.stdout + r.stderr
                    self.assertEqual(r.returncode, 1, f"{args[0]} accepted mode {want}: {out}")
                    self.assertIn(f"has mode {want}", out)
                    self.assertIn(f"chmod 600 '{eu.token_file}'", out)
                    self.assertIn("token_file", out)
        os.chmod(eu.token_file, 0o600)
        eu.start()
        os.chmod(eu.token_file, 0o644)  # the CLI checks it as well
        r = run_cli(["post", "--config", eu.conf, "--channel", CHANNEL, "--author", "a", "x"])
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("has mode 0644", r.stderr)
        os.chmod(eu.token_file, 0o600)

    def test_bad_token_files_are_refused_by_name(self):
        eu, aws = self.pair()
        cases = [("", "holds a token of 0 characters"), ("short\n", "holds a token of 5 characters"),
                 ("a" * 40 + " b\n", "not allowed in a token"),
                 ("a" * 40 + "\n" + "b" * 40 + "\n", "more than one line")]
        for content, says in cases:
            with self.subTest(says=says):
                with open(eu.token_file, "w") as f:
                    f.write(content)
                os.chmod(eu.token_file, 0o600)
                r = run_cli(["run", "--config", eu.conf], timeout=30)
                self.assertEqual(r.returncode, 1)
                out = r.stdout + r.stderr
                self.assertIn(says, out)
                self.assertIn(eu.token_file, out)
        os.remove(eu.token_file)
        os.mkdir(eu.token_file)
        r = run_cli(["check-config", "--config", eu.conf])
        self.assertEqual(r.returncode, 1)
        self.assertIn("is not a regular file", r.stdout + r.stderr)

    def test_a_tcp_listen_needs_a_token_file_or_allow_anonymous(self):
        eu, aws = self.pair()
        eu.write_config({"aws": {"site": aws}}, {CHANNEL: ["aws"]},
                        ingest={"token_file": None, "allow_anonymous": None})
        r = run_cli(["check-config", "--config", eu.conf])
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 1, out)
        self.assertIn("is a TCP address and there is no token_file", out)
        self.assertIn("relay token PATH", out)
        self.assertIn("allow_anonymous = true", out)
        eu.write_config({"aws": {"site": aws}}, {CHANNEL: ["aws"]},
                        ingest={"allow_anonymous": "true"})
        r = run_cli(["check-config", "--config", eu.conf])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        eu.start()
        self.assertIn("allow_anonymous = true", eu.log_text())
        r = eu.request("GET", "/v1/status", token=False)
        self.assertEqual(r.status, 200, r.text)


class UsageTest(RelayTestCase):
    def test_unknown_subcommand_exits_2(self):
        r = run_cli(["no-such-subcommand"])
        self.assertEqual(r.returncode, 2)
        self.assertIn("no-such-subcommand", r.stderr)
        self.assertIn("usage", r.stderr.lower())

    def test_no_arguments_exits_2(self):
        r = run_cli([])
        self.assertEqual(r.returncode, 2)
        self.assertIn("usage", r.stderr.lower())

    def test_every_subcommand_has_help(self):
        for cmd in SUBCOMMANDS:
            with self.subTest(cmd=cmd):
                r = run_cli([cmd, "--help"])
                self.assertEqual(r.returncode, 0, f"relay {cmd} --help: {r.stderr}")
                self.assertIn("usage", r.stdout.lower())
                self.assertIn(cmd, r.stdout)
        r = run_cli(["--help"])
        self.assertEqual(r.returncode, 0)
        for cmd in SUBCOMMANDS:
            self.assertIn(cmd, r.stdout)

    def test_wrong_invocations_exit_2_with_usage(self):
        cases = [
            ["run"],                                   # --config missing
            ["check-config"],
            ["status"],
            ["keygen"],                                # FILE missing
            ["pubkey"],
            ["post", "--config", "x.conf", "--channel", "c", "hello"],  # --author missing
            ["run", "--config", "a.conf", "--no-such-option"],
            ["keygen", "a.key", "b.key"],              # one FILE only
            ["token"],                                 # FILE missing
            ["token", "a.token", "b.token"],
        ]
        for args in cases:
            with self.subTest(args=args):
                r = run_cli(args)
                self.assertEqual(r.returncode, 2, f"relay {' '.join(args)}: {r.stdout}{r.stderr}")
                self.assertIn("usage: relay " + args[0], r.stderr)
                self.assertEqual(r.stdout, "")

    def test_run_with_missing_config_file(self):
        missing = os.path.join(self.root, "missing.conf")
        r = run_cli(["run", "--config", missing], timeout=30)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("missing.conf", r.stdout + r.stderr)


class CheckConfigTest(RelayTestCase):
    def test_good_config(self):
        eu, aws = self.pair()
        for s in (eu, aws):
            r = run_cli(["check-config", "--config", s.conf])
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_bad_config_lists_every_problem(self):
        eu, aws = self.pair()
        text = eu.config_text({"aws": {"site": aws, "dial": True}}, {CHANNEL: ["aws"]})
        text = text.replace("name = europe", "name = europe\nnmae = typo")
        text = text.replace(f"public_key = {aws.pub}", "public_key = relay1:not-a-key")
        text = text.replace("peers = aws", "peers = aws, mars")
        with open(eu.conf, "w") as f:
            f.write(text)
        r = run_cli(["check-config", "--config", eu.conf])
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 1, out)
        problems = [l for l in out.splitlines() if l.strip()]
        self.assertGreaterEqual(len(problems), 3, out)
        self.assertTrue(any("nmae" in l for l in problems), f"unknown key not named:\n{out}")
        self.assertTrue(any("public_key" in l and "aws" in l for l in problems),
                        f"bad public key not named:\n{out}")
        self.assertTrue(any("mars" in l for l in problems), f"unknown peer not named:\n{out}")
        # One problem per line: the three are on different lines.
        lines = {i for i, l in enumerate(problems) if "nmae" in l}
        lines |= {i for i, l in enumerate(problems) if "mars" in l}
        self.assertGreaterEqual(len(lines), 2, out)
        # The daemon refuses the same file.
        r = run_cli(["run", "--config", eu.conf], timeout=30)
        self.assertEqual(r.returncode, 1)
        self.assertIn("nmae", r.stdout + r.stderr)

    def test_missing_config_file(self):
        r = run_cli(["check-config", "--config", os.path.join(self.root, "nope.conf")])
        self.assertEqual(r.returncode, 1)
        self.assertIn("nope.conf", r.stdout + r.stderr)


class RunningDaemonCliTest(RelayTestCase):
    def test_post_delivers_through_running_daemon(self):
        eu, aws = self.pair()
        eu.start()
        aws.start()
        r = run_cli(["post", "--config", eu.conf, "--channel", CHANNEL, "--author", "alice",
                     "hello from the cli"])
        self.assertEqual(r.returncode, 0, r.stderr)
        answer = json.loads(r.stdout)
        self.assertIn("id", answer)
        lines = self.wait_sink(aws, 1, 30)
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["id"], answer["id"])
        self.assertEqual(lines[0]["text"], "hello from the cli")
        self.assertEqual(lines[0]["author"], "alice")
        self.assertEqual(lines[0]["origin_site"], "europe")
        # --id is idempotent through the CLI too.
        args = ["post", "--config", aws.conf, "--channel", CHANNEL, "--author", "bob", "--id",
                "cli-1", "reply"]
        r1, r2 = run_cli(args), run_cli(args)
        self.assertEqual(r1.returncode, 0, r1.stderr)
        self.assertEqual(r2.returncode, 0, r2.stderr)
        self.assertEqual(json.loads(r1.stdout)["id"], json.loads(r2.stdout)["id"])
        lines = self.wait_sink(eu, 1, 30)
        self.assertEqual([l["text"] for l in lines], ["reply"])

    def test_post_errors(self):
        eu, aws = self.pair()
        # No daemon running: a clear error, non-zero exit.
        r = run_cli(["post", "--config", eu.conf, "--channel", CHANNEL, "--author", "a", "x"])
        self.assertNotEqual(r.returncode, 0)
        self.assertTrue(r.stderr.strip())
        eu.start()
        r = run_cli(["post", "--config", eu.conf, "--channel", "no-such-channel", "--author",
                     "a", "x"])
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("no-such-channel", r.stderr)
        self.assertIn("400", r.stderr)

    def test_status_prints_peers(self):
        eu, aws = self.pair()
        enclave = self.site("enclave")
        eu.write_config({"aws": {"site": aws, "dial": True}, "enclave": {"site": enclave}},
                        {CHANNEL: ["aws", "enclave"]})
        eu.start()
        aws.start()
        r = run_cli(["status", "--config", eu.conf, "--json"])
        self.assertEqual(r.returncode, 0, r.stderr)
        st = json.loads(r.stdout)
        self.assertEqual(st["site"], "europe")
        names = sorted(p["name"] for p in st["peers"])
        self.assertEqual(names, ["aws", "enclave"])
        # The aws link comes up; enclave, never started, stays down.
        def aws_up():
            s = json.loads(run_cli(["status", "--config", eu.conf, "--json"]).stdout)
            return {p["name"]: p for p in s["peers"]}["aws"]["link"] == "up"
        self.wait_for(aws_up, 30, "status to show the aws link up")
        s = json.loads(run_cli(["status", "--config", eu.conf, "--json"]).stdout)
        self.assertEqual({p["name"]: p for p in s["peers"]}["enclave"]["link"], "down")
        # The --json schema scripts rely on.
        for key, kind in (("site", str), ("identity", str), ("events_ingested", int),
                          ("events_delivered", int), ("inbound_backlog", int), ("peers", list)):
            self.assertIsInstance(s[key], kind, key)
        for p in s["peers"]:
            for key, kind in (("name", str), ("link", str), ("queue_depth", int),
                              ("acked_through", int), ("last_contact_ms", int),
                              ("frames_sent", int), ("frames_received", int)):
                self.assertIsInstance(p[key], kind, key)
        self.assertTrue(s["identity"].startswith("relay1:"))
        # Without --json the output still names the peers.
        r = run_cli(["status", "--config", eu.conf])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("aws", r.stdout)
        self.assertIn("enclave", r.stdout)
        # Daemon not running: non-zero and a message.
        eu.stop()
        r = run_cli(["status", "--config", eu.conf, "--json"])
        self.assertNotEqual(r.returncode, 0)
        self.assertTrue(r.stderr.strip())
