#!/usr/bin/env python3
"""Demo: two emulated Mattermost servers ("europe" and "aws") bridged by two relay daemons.

Plays a short conversation through the emulators' control API, acting as the people in the chat
(alice on europe, bob on aws): a post, a reply in its thread, an edit, a reaction, a file, a post
that is deleted again, and two posts made while aws's relay is stopped. Waits for every change to
show up on the other server, prints both channels as a person would read them, and checks that
nothing arrived twice. Exit 0 only when every expected effect appeared.

Python 3 standard library only; the emulator comes from tests/mattermost_emulator.

    python3 scripts/mattermost_demo.py [--relay PATH] [--keep]
"""
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "mattermost_emulator"))
from emulator import Emulator  # noqa: E402

CHANNEL = "war-room"
BOT_TOKEN = "relaybotdemotoken000000000"
STEP_TIMEOUT = 30.0
_T0 = time.monotonic()


def now():
    return time.monotonic() - _T0


def say(line=""):
    print(line, flush=True)


# ---- small helpers ---------------------------------------------------------------------------

def wait_until(pred, timeout=None):
    """Polls pred() until it returns something truthy or `timeout` seconds (STEP_TIMEOUT)
    pass; returns the last value."""
    end = time.monotonic() + (STEP_TIMEOUT if timeout is None else timeout)
    delay = 0.02
    while True:
        try:
            v = pred()
        except (OSError, ValueError, KeyError):
            v = None
        if v or time.monotonic() >= end:
            return v
        time.sleep(min(delay, max(0.0, end - time.monotonic())))
        delay = min(delay * 1.5, 0.25)


def _port_range():
    """Ports below the kernel's ephemeral range: no outgoing connection can take one of them
    between our choice and the relay's bind."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        lo = 32768
    return (max(10000, lo - 12000), lo - 1) if lo > 12000 else (1025, 65535)


_used_ports = set()


def free_port():
    lo, hi = _port_range()
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(500):
        port = rng.randint(lo, hi)
        if port in _used_ports:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        _used_ports.add(port)
        return port
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    _used_ports.add(port)
    return port


def http_get(port, path, timeout=2):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def stable_binary(src, folder, wait=120):
    """A private copy (hard link when possible) of the relay binary, taken once it has not
    changed for 2 s and runs: someone may re-link build/relay/relay while the demo runs."""
    start = time.monotonic()
    end = start + wait
    dst = os.path.join(folder, "relay")
    while time.monotonic() < end:
        try:
            st = os.stat(src)
        except OSError:
            if time.monotonic() - start > 10:  # not being re-linked: just not there
                break
            time.sleep(0.5)
            continue
        if not os.access(src, os.X_OK) or time.time() - st.st_mtime < 2:
            time.sleep(0.5)
            continue
        try:
            if os.path.exists(dst):
                os.unlink(dst)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            same = (os.stat(src).st_mtime, os.stat(src).st_size) == (st.st_mtime, st.st_size)
            ok = same and subprocess.run([dst, "--help"], capture_output=True,
                                         timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return dst
        time.sleep(0.5)
    raise RuntimeError(f"no usable relay binary at {src} "
                       f"(build it with scripts/build.sh, or pass --relay)")


def run_cli(binary, *args):
    r = subprocess.run([binary] + list(args), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"relay {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


# ---- one site: an emulated Mattermost server and the relay that bridges it -------------------

class Site:
    def __init__(self, root, name, human, binary):
        self.name = name
        self.human = human
        self.binary = binary
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        self.human_token = f"{human}token".ljust(26, "0")
        self.emu = Emulator(users=[f"relay-bot:{BOT_TOKEN}:bot=true",
                                   f"{human}:{self.human_token}"],
                            channels=[CHANNEL], config={"replica_lag_ms": 0}).start()
        self.channel_id = self.emu.channel(CHANNEL)["id"]
        self.key = os.path.join(self.dir, name + ".key")
        self.conf = os.path.join(self.dir, name + ".conf")
        self.token_file = os.path.join(self.dir, "mattermost.token")
        self.api_token_file = os.path.join(self.dir, "ingest.token")  # relay's own API token
        self.log_path = os.path.join(self.dir, "relay.log")
        self.ingest_port = free_port()
        self.zmq_port = free_port()
        self.proc = None
        self._log = None
        self.started_wall_ms = 0
        try:
            run_cli(binary, "keygen", self.key)
            self.pub = run_cli(binary, "pubkey", self.key).strip()
            run_cli(binary, "token", self.api_token_file)
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(BOT_TOKEN + "\n")
            os.chmod(self.token_file, 0o600)
        except BaseException:
            self.emu.stop()
            raise

    def write_config(self, peer, dial):
        lines = [f"# relay Mattermost demo: site '{self.name}'",
                 "[site]", f"name = {self.name}", f"key_file = {self.key}",
                 f"data_dir = {os.path.join(self.dir, 'data')}", "",
                 "[ingest]", f"listen = 127.0.0.1:{self.ingest_port}",
                 f"token_file = {self.api_token_file}", "",
                 "[zmq]", f"listen = tcp://127.0.0.1:{self.zmq_port}", "",
                 f"[peer.{peer.name}]", f"public_key = {peer.pub}"]
        if dial:
            lines.append(f"zmq_connect = tcp://127.0.0.1:{peer.zmq_port}")
        lines += ["", f"[channel.{CHANNEL}]", f"peers = {peer.name}", "sink = mattermost",
                  f"mattermost_channel_id = {self.channel_id}", "",
                  "[mattermost]", f"url = {self.emu.url}", f"token_file = {self.token_file}",
                  "catchup_overlap = 2s", "poll_interval = 5s", ""]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines))

    # -- the relay process ---------------------------------------------------------------------
    def start(self, timeout=30):
        self._log = open(self.log_path, "ab")
        self._log.write(f"---- demo: start {time.strftime('%H:%M:%S')} ----\n".encode())
        self._log.flush()
        self.started_wall_ms = int(time.time() * 1000)
        self.proc = subprocess.Popen([self.binary, "run", "--config", self.conf],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: relay exited with {self.proc.returncode} "
                                   f"before it was healthy; log:\n{self.log_tail()}")
            try:
                if http_get(self.ingest_port, "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: /healthz not 200 within {timeout} s; log:\n"
                           f"{self.log_tail()}")

    def stop(self, grace=10):
        """SIGTERM, SIGKILL after `grace` seconds. Returns (exit code, seconds it took)."""
        if self.proc is None:
            return None, 0.0
        t = time.monotonic()
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        if self._log:
            self._log.close()
            self._log = None
        rc, self.proc = self.proc.returncode, None
        return rc, time.monotonic() - t

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n=30):
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- the person, through the control API ---------------------------------------------------
    def control(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.emu.url + "/__control/" + path, data=data,
                                     method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.name}: {method} {path} answered {e.code}: "
                               f"{e.read()[:300]!r}")
        return json.loads(raw) if raw else None

    def post(self, message, root_id="", file_ids=None):
        body = {"as": self.human, "channel_id": self.channel_id, "message": message}
        if root_id:
            body["root_id"] = root_id
        if file_ids:
            body["file_ids"] = file_ids
        return self.control("POST", "posts", body)

    def edit(self, post_id, message):
        return self.control("PUT", f"posts/{post_id}/patch", {"as": self.human, "message": message})

    def delete(self, post_id):
        return self.control("DELETE", f"posts/{post_id}", {"as": self.human})

    def react(self, post_id, emoji):
        return self.control("POST", "reactions",
                            {"as": self.human, "post_id": post_id, "emoji_name": emoji})

    def upload(self, name, content):
        r = self.control("POST", "files", {"as": self.human, "channel_id": self.channel_id,
                                           "name": name, "content": content})
        return r["file_infos"][0]["id"]

    # -- what the server holds -----------------------------------------------------------------
    def rows(self):
        """Every stored row of the channel (live, deleted, archived edit copies)."""
        return self.control("GET", f"state/channels/{self.channel_id}/posts")["posts"]

    def current(self):
        """Current posts (deleted ones included, archived edit copies left out)."""
        return [p for p in self.rows() if not p.get("original_id")]

    def relayed(self, message):
        """The current post the relay made with this message, if exactly one exists."""
        found = [p for p in self.current()
                 if (p.get("props") or {}).get("relay_event_id") and p.get("message") == message]
        return found[0] if len(found) == 1 else None

    def post_row(self, post_id):
        return self.control("GET", f"state/posts/{post_id}")

    def usernames(self):
        return {u["id"]: u["username"] for u in self.control("GET", "users")["users"]}

    def files(self):
        return {f["id"]: f for f in self.control("GET", "state/files")["files"]}

    def download(self, file_id):
        """The file's bytes through the REST API, as the person's client would fetch them."""
        req = urllib.request.Request(f"{self.emu.url}/api/v4/files/{file_id}",
                                     headers={"Authorization": f"Bearer {self.human_token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()


# ---- the transcript ---------------------------------------------------------------------------

def shown_author(p, names):
    props = p.get("props") or {}
    if props.get("from_webhook") == "true" and props.get("override_username"):
        return props["override_username"]
    return names.get(p.get("user_id"), p.get("user_id"))


def transcript(site):
    names = site.usernames()
    files = site.files()
    posts = site.current()
    number = {p["id"]: i + 1 for i, p in enumerate(posts)}
    say(f"{site.name}'s Mattermost ({site.emu.url}), channel ~{CHANNEL}:")
    for i, p in enumerate(posts, 1):
        author = shown_author(p, names)
        if p.get("delete_at"):
            text = f'(deleted) was "{p.get("message", "")}"'
        else:
            text = json.dumps(p.get("message", ""), ensure_ascii=False)
        notes = []
        if p.get("root_id"):
            root = p["root_id"]
            notes.append(f"(reply to #{number[root]})" if root in number else f"(reply to {root})")
        if p.get("edit_at", 0) > 0 and not p.get("delete_at"):
            notes.append("(edited)")
        reactions = {}
        for r in p.get("reactions") or []:
            reactions.setdefault(r["emoji_name"], []).append(names.get(r["user_id"], r["user_id"]))
        for emoji, who in sorted(reactions.items()):
            notes.append(f"[:{emoji}: {', '.join(sorted(who))}]")
        for fid in p.get("file_ids") or []:
            f = files.get(fid)
            notes.append(f"[file {f['name']}, {f['size']} bytes]" if f else f"[file {fid}]")
        say(f"  #{i} {author + ':':<16} {text} {' '.join(notes)}".rstrip())


# ---- the conversation -------------------------------------------------------------------------

class Demo:
    def __init__(self, eu, aws):
        self.eu, self.aws = eu, aws
        self.missing = []
        self.crossed = 0
        self.first_action = None
        self.last_effect = None

    def act(self, site, what):
        if self.first_action is None:
            self.first_action = time.monotonic()
        say(f"[{now():6.2f}s] {site.name:<6} {site.human} {what}")

    def expect(self, where, what, pred, t_action=None):
        """Waits for an effect on `where`; prints when it appeared. Returns pred()'s value."""
        t_action = t_action or time.monotonic()
        v = wait_until(pred)
        if v:
            self.crossed += 1
            self.last_effect = time.monotonic()
            say(f"{'':10}-> {where.name}: {what} ({time.monotonic() - t_action:.2f} s)")
        else:
            self.missing.append(f"{where.name}: {what}")
            say(f"{'':10}-> MISSING on {where.name} after {STEP_TIMEOUT:.0f} s: {what}")
        return v

    def skip(self, where, what, why):
        self.missing.append(f"{where.name}: {what} (not tried: {why})")
        say(f"{'':10}-> SKIPPED on {where.name}: {what} ({why})")

    def play(self):
        eu, aws = self.eu, self.aws
        msg_root = "Heads up: the eu-west database failed over at 09:12, investigating."
        msg_root_edit = "Heads up: the eu-west database failed over at 09:12, stable again now."
        msg_reply = "Seeing a spike of errors in us-east at the same time, checking."
        msg_file = "Failover timeline attached."
        file_name, file_body = "failover-timeline.txt", ("09:12 primary lost\n"
                                                         "09:13 replica promoted\n"
                                                         "09:20 traffic back to normal\n")
        msg_oops = "oops, wrong channel"
        msg_down = ["Postmortem at 15:00 UTC in the usual room.",
                    "Bob, please bring the us-east graphs."]

        # 1. alice starts a thread on europe.
        self.act(eu, f'posts "{msg_root}"')
        root = eu.post(msg_root)
        remote_root = self.expect(aws, "alice's post, shown as \"alice (europe)\"",
                                  lambda: aws.relayed(msg_root))

        # 2. bob answers in that thread on aws (on the copy he sees there).
        remote_reply = None
        if remote_root:
            self.act(aws, f'replies in the thread "{msg_reply}"')
            reply = aws.post(msg_reply, root_id=remote_root["id"])
            remote_reply = self.expect(
                eu, "bob's reply, in alice's thread",
                lambda: (lambda p: p if p and p.get("root_id") == root["id"] else None)(
                    eu.relayed(msg_reply)))
        else:
            self.skip(eu, "bob's reply", "alice's post never reached aws")

        # 3. alice corrects her message.
        self.act(eu, "edits her post")
        eu.edit(root["id"], msg_root_edit)
        if remote_root:
            self.expect(aws, "the edit",
                        lambda: (lambda p: p.get("message") == msg_root_edit and p.get("edit_at")
                                 and p)(aws.post_row(remote_root["id"])))
        else:
            self.skip(aws, "the edit", "alice's post never reached aws")

        # 4. bob gives alice's message a thumbs up.
        if remote_root:
            self.act(aws, "reacts :thumbsup: to alice's post")
            aws.react(remote_root["id"], "thumbsup")
            self.expect(eu, ":thumbsup: on alice's post (by the relay bot)",
                        lambda: any(r["emoji_name"] == "thumbsup"
                                    for r in eu.post_row(root["id"]).get("reactions") or []))
        else:
            self.skip(eu, "the reaction", "alice's post never reached aws")

        # 5. alice shares a file.
        self.act(eu, f'uploads {file_name} and posts "{msg_file}"')
        fid = eu.upload(file_name, file_body)
        eu.post(msg_file, file_ids=[fid])

        def file_arrived():
            p = aws.relayed(msg_file)
            if not p or len(p.get("file_ids") or []) != 1:
                return None
            f = aws.files().get(p["file_ids"][0])
            return f and f["name"] == file_name and aws.download(f["id"]) == file_body.encode()
        self.expect(aws, f"the post with {file_name} (same name and bytes)", file_arrived)

        # 6. bob posts something, then deletes it.
        self.act(aws, f'posts "{msg_oops}"')
        oops = aws.post(msg_oops)
        remote_oops = self.expect(eu, "bob's post", lambda: eu.relayed(msg_oops))
        self.act(aws, "deletes that post")
        aws.delete(oops["id"])
        if remote_oops:
            self.expect(eu, "the delete",
                        lambda: eu.post_row(remote_oops["id"]).get("delete_at", 0) > 0)
        else:
            self.skip(eu, "the delete", "bob's post never reached europe")

        # 7. aws's relay is down while alice writes; it catches up once it is back.
        say(f"[{now():6.2f}s] aws    relay stopped (SIGTERM)")
        rc, took = aws.stop()
        say(f"{'':10}   exited with {rc} after {took:.2f} s")
        for m in msg_down:
            self.act(eu, f'posts "{m}"')
            eu.post(m)
        time.sleep(1.0)
        early = [m for m in msg_down if aws.relayed(m)]
        say(f"{'':10}   on aws's server while its relay is down: "
            f"{len(early)} of {len(msg_down)} messages")
        say(f"[{now():6.2f}s] aws    relay started again")
        t_restart = time.monotonic()
        aws.start()
        say(f"{'':10}   healthy after {time.monotonic() - t_restart:.2f} s")
        for m in msg_down:
            p = self.expect(aws, f'"{m}"', lambda m=m: aws.relayed(m), t_action=t_restart)
            if p:
                after = (p["create_at"] - aws.started_wall_ms) / 1000.0
                say(f"{'':13}created on aws's server {after:.2f} s after its relay started")
                if after < 0:
                    self.missing.append(f"aws: \"{m}\" was created before the relay restarted")
        if early:
            self.missing.append(f"aws: {len(early)} message(s) arrived while its relay was down")

    def check(self):
        """No duplicates, no echoes, and exactly the posts and reactions the conversation makes."""
        problems = []
        expected = {  # site: (current posts, made by the relay, deleted)
            "europe": (6, 2, 1),
            "aws": (6, 4, 1),
        }
        for site in (self.eu, self.aws):
            posts = site.current()
            seen = {}
            for p in posts:
                props = p.get("props") or {}
                eid = props.get("relay_event_id")
                if eid:
                    if eid in seen:
                        problems.append(f"{site.name}: event {eid} is on two posts "
                                        f"({seen[eid]} and {p['id']})")
                    seen[eid] = p["id"]
                    if props.get("relay_origin") == site.name:
                        problems.append(f"{site.name}: post {p['id']} is an echo of its own post")
            want_total, want_relayed, want_deleted = expected[site.name]
            deleted = sum(1 for p in posts if p.get("delete_at"))
            if (len(posts), len(seen), deleted) != (want_total, want_relayed, want_deleted):
                problems.append(f"{site.name}: {len(posts)} posts ({len(seen)} relayed, "
                                f"{deleted} deleted), expected {want_total} ({want_relayed} "
                                f"relayed, {want_deleted} deleted)")
            reactions = [(r["emoji_name"]) for p in posts for r in p.get("reactions") or []]
            if reactions != ["thumbsup"]:
                problems.append(f"{site.name}: reactions {reactions}, expected one :thumbsup:")
        return problems


def log_findings(site):
    lines = [l for l in site.log_text().splitlines() if " warning: " in l or " error: " in l]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--relay", help="relay binary (default: $RELAY_BIN or build/relay/relay)")
    ap.add_argument("--keep", action="store_true", help="keep the demo folder")
    args = ap.parse_args()
    src = os.path.abspath(args.relay or os.environ.get("RELAY_BIN")
                          or os.path.join(REPO, "build", "relay", "relay"))

    def terminated(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminated)  # clean up (relays, folder) when killed

    root = tempfile.mkdtemp(prefix="relay-mm-demo-")
    sites = []
    rc = 1
    try:
        binary = stable_binary(src, root)
        eu = Site(root, "europe", "alice", binary)
        sites.append(eu)
        aws = Site(root, "aws", "bob", binary)
        sites.append(aws)
        eu.write_config(aws, dial=True)
        aws.write_config(eu, dial=False)
        say(f"relay Mattermost demo: two emulated Mattermost servers, two relays, in {root}")
        say(f"  europe  Mattermost {eu.emu.url} (alice)  relay ingest 127.0.0.1:{eu.ingest_port}"
            f"  dials aws over ZeroMQ")
        say(f"  aws     Mattermost {aws.emu.url} (bob)    relay ingest 127.0.0.1:{aws.ingest_port}"
            f"  zmq listen 127.0.0.1:{aws.zmq_port}")
        for s in sites:
            s.start()
        say(f"both relays healthy after {now():.2f} s; channel ~{CHANNEL} is bridged\n")

        demo = Demo(eu, aws)
        demo.play()
        secs = (demo.last_effect or time.monotonic()) - (demo.first_action or time.monotonic())
        time.sleep(1.0)  # anything late (a duplicate) shows up in the check below
        problems = demo.check()

        say()
        transcript(eu)
        say()
        transcript(aws)
        say()
        for s in sites:
            found = log_findings(s)
            say(f"{s.name}'s relay log ({s.log_path}): {len(found)} warning/error line(s)")
            for l in found[:5]:
                say(f"  {l}")
            if len(found) > 5:
                say(f"  ... ({len(found) - 5} more)")
        for p in problems:
            say(f"check: {p}")
        for m in demo.missing:
            say(f"missing: {m}")
        ok = not demo.missing and not problems
        say(f"\nsummary: {demo.crossed} changes crossed in {secs:.2f} s; "
            f"no duplicates: {'yes' if not problems else 'NO'}; "
            f"everything arrived: {'yes' if not demo.missing else 'NO'}")
        rc = 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted")
        rc = 130
    except SystemExit as e:
        say("terminated")
        rc = e.code
    except Exception as e:  # a setup failure: say what, then clean up
        print(f"mattermost demo: {e}", file=sys.stderr)
        for s in sites:
            if s.proc is not None:
                print(f"--- {s.name}'s relay log (tail) ---\n{s.log_tail()}", file=sys.stderr)
        rc = 1
    finally:
        for s in sites:
            try:
                s.stop()
            except Exception as e:
                print(f"cleanup of {s.name}'s relay: {e}", file=sys.stderr)
            try:
                s.emu.stop()
            except Exception as e:
                print(f"cleanup of {s.name}'s emulator: {e}", file=sys.stderr)
        if args.keep:
            say(f"demo folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
