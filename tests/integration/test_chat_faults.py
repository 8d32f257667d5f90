"""Fault injection at the chat server (issue 6, hardening, item 3): two emulated Mattermost
servers bridged by two relays, one or both servers misbehaving for a while —

  * slow: every answer late but within the relay's timeout; answers later than the timeout
    (the request was carried out, or is carried out only after the client gave up);
  * 5xx: 500 (JSON AppError), 502 and 503 (a proxy's HTML page) on every kind of call the bridge
    makes (catch-up GET, create, patch, delete, reactions, file upload/info/download, user
    lookup, the WebSocket upgrade), with and without the request having been carried out;
  * garbage: truncated JSON, wrong types, HTML pages, empty and `null` bodies with 2xx, on the
    REST calls and as WebSocket frames.

In each case: the daemons keep running, the log names the problem, the calls are retried, and
once the server is healthy every change arrives exactly once (no loss, no duplicate, thread and
order kept), in both directions, and nothing garbled is ever replayed as a message or a file.

The faults come from the emulator's knobs (tests/mattermost_emulator/README.md, "Faults"):
`POST /__control/faults` (REST; `duration_ms`, `count`, `every`, `path_regex`, a list of
statuses, garbage `style`, `delay_phase`) and `POST /__control/ws/faults` (event stream).
The relays run with `timeout = 2s` and `poll_interval = 2s` unless a test says otherwise.
"""
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

from relay_harness import REPO, RelayTestCase, wait_for

sys.path.insert(0, os.path.join(REPO, "tests", "mattermost_emulator"))
from emulator import Emulator  # noqa: E402

BOT_TOKEN = "relaybottoken0000000000000"
TIMEOUT_MS = 2000            # [mattermost] timeout of both relays
CHANNEL = "war-room"

# Paths of the calls the bridge makes (regexes for the emulator's `path_regex`).
P_POSTS = r"^/api/v4/posts$"                                   # POST create
P_PATCH = r"^/api/v4/posts/[^/]+/patch$"                       # PUT edit
P_POST = r"^/api/v4/posts/[^/]+$"                              # DELETE
P_REACTION = r"^/api/v4/reactions$"                            # POST add
P_UNREACT = r"^/api/v4/users/[^/]+/posts/[^/]+/reactions/"     # DELETE remove
P_UPLOAD = r"^/api/v4/files$"                                  # POST upload
P_FILE = r"^/api/v4/files/[^/]+$"                              # GET download
P_FILE_INFO = r"^/api/v4/files/[^/]+/info$"                    # GET info
P_SINCE = r"^/api/v4/channels/[^/]+/posts$"                    # GET catch-up
P_USER = r"^/api/v4/users/[^/]+$"                              # GET user (author names)
P_WS = r"^/api/v4/websocket"                                   # GET upgrade

# What must never show up in a replayed message or file.
GARBAGE_MARKERS = ("<html", "<!DOCTYPE", "Sign in", "Bad Gateway", "Service Unavailable",
                   '{"id"', "emulator.fault")


def control(emu, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(emu.url + "/__control/" + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raw = e.read()
        # The REST answer of a control action (e.g. a 4xx from the state) is returned as is;
        # a refused control request is a bug of the test.
        if method == "POST" and path in ("faults", "ws/faults", "config"):
            raise AssertionError(f"control {method} {path} {body}: {e.code} {raw[:300]!r}")
    return json.loads(raw) if raw else None


class Chat:
    """A relay site with its own emulated Mattermost server and one human user on it."""

    def __init__(self, test, name, human, seed, emu_config=None):
        self.test = test
        self.human = human
        config = {"replica_lag_ms": 0}
        config.update(emu_config or {})
        self.emu = Emulator(users=[f"relay-bot:{BOT_TOKEN}:bot=true", f"{human}:{human}token"],
                            channels=[CHANNEL], config=config, seed=seed).start()
        test.addCleanup(self.emu.stop)
        self.channel_id = self.emu.channel(CHANNEL)["id"]
        self.bot_id = self.emu.user("relay-bot").id
        self.site = test.site(name)
        self.name = name
        self.token_file = os.path.join(self.site.dir, "mm.token")
        # 0600, like a key file: the relay refuses a token file others can read.
        with open(os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(BOT_TOKEN + "\n")

    def configure(self, peer, dial, poll_interval="2s", timeout=f"{TIMEOUT_MS}ms"):
        extra = (f"[channel.{CHANNEL}]\npeers = {peer.name}\nsink = mattermost\n"
                 f"mattermost_channel_id = {self.channel_id}\n\n"
                 f"[mattermost]\nurl = {self.emu.url}\ntoken_file = {self.token_file}\n"
                 f"catchup_overlap = 2s\npoll_interval = {poll_interval}\ntimeout = {timeout}\n")
        self.site.write_config({peer.name: {"site": peer.site, "dial": dial}}, {}, extra=extra)

    # -- faults ------------------------------------------------------------------------------
    def fault(self, **spec):
        return control(self.emu, "POST", "faults", spec)["id"]

    def ws_fault(self, **spec):
        return control(self.emu, "POST", "ws/faults", spec)["id"]

    def faults(self):
        return control(self.emu, "GET", "faults")["faults"]

    def ws_faults(self):
        return control(self.emu, "GET", "ws/faults")["faults"]

    def clear_faults(self):
        control(self.emu, "DELETE", "faults")
        control(self.emu, "DELETE", "ws/faults")

    def drop_ws(self, keep_buffer):
        return control(self.emu, "POST", "ws/drop", {"keep_buffer": keep_buffer})["dropped"]

    def requests(self):
        """The REST requests the relay made (the human acts through the control API)."""
        return self.emu.requests()

    def answered(self, method, path_regex, statuses):
        rx = re.compile(path_regex)
        return sum(1 for r in self.requests() if r["method"] == method
                   and rx.search(r["path"].split("?")[0]) and r["status"] in statuses)

    # -- the human on this server ------------------------------------------------------------
    def say(self, message, root_id="", file_ids=None, create_at=0):
        body = {"as": self.human, "channel_id": self.channel_id, "message": message}
        if root_id:
            body["root_id"] = root_id
        if create_at:
            body["create_at"] = create_at
        if file_ids:
            body["file_ids"] = file_ids
        return control(self.emu, "POST", "posts", body)

    def edit(self, post_id, message):
        return control(self.emu, "PUT", f"posts/{post_id}/patch",
                       {"as": self.human, "message": message})

    def delete(self, post_id):
        return control(self.emu, "DELETE", f"posts/{post_id}", {"as": self.human})

    def react(self, post_id, emoji, add=True):
        return control(self.emu, "POST" if add else "DELETE", "reactions",
                       {"as": self.human, "post_id": post_id, "emoji_name": emoji})

    def upload(self, name, content):
        info = control(self.emu, "POST", "files", {"as": self.human, "channel_id": self.channel_id,
                                                  "name": name, "content": content})
        return info["file_infos"][0]["id"]

    # -- what the server holds ---------------------------------------------------------------
    def rows(self):
        """Every stored row of the channel (deleted and archived included), by create_at."""
        return control(self.emu, "GET", f"state/channels/{self.channel_id}/posts")["posts"]

    def bot_rows(self):
        return [p for p in self.rows() if p.get("user_id") == self.bot_id]

    def from_peer(self, origin, live_only=True):
        """Current posts the relay created for events from `origin`, in create_at order."""
        out = []
        for p in self.rows():
            if p.get("original_id") or (p.get("props") or {}).get("relay_origin") != origin:
                continue
            if live_only and p.get("delete_at"):
                continue
            out.append(p)
        return out

    def copies(self, message):
        """Current (not archived) posts with this message, deleted ones included."""
        return [p for p in self.rows() if not p.get("original_id") and p.get("message") == message]

    def bot_reactions(self, post_id):
        rows = control(self.emu, "GET", f"state/reactions?post_id={post_id}")["reactions"]
        return {r["emoji_name"] for r in rows if r["user_id"] == self.bot_id and not r["delete_at"]}

    def file(self, file_id):
        """(name, bytes) of a stored file."""
        with self.emu.state.lock:
            f = self.emu.state.files[file_id]
            return f["info"]["name"], bytes(f["data"])

    def bot_files(self):
        with self.emu.state.lock:
            return [(f["info"]["name"], bytes(f["data"])) for f in self.emu.state.files.values()
                    if f["info"]["user_id"] == self.bot_id]


def in_creation_order(dst_posts, src_created):
    """Whether the relayed posts `dst_posts` were created on the peer's server in the order their
    originals were created (`src_created`: message -> create_at on the origin's server). Posts
    created in the same millisecond on either server have no order (create_at is all there is)."""
    keys = sorted((p["create_at"], src_created[p["message"]]) for p in dst_posts)
    return [k[1] for k in keys] == sorted(k[1] for k in keys)


def created_at(site):
    """message -> create_at of the current posts on a site's server."""
    return {p["message"]: p["create_at"] for p in site.rows() if not p.get("original_id")}


class Workload:
    """Every kind of change, made by the human on `src`'s server: a thread root and a reply, an
    edit, reactions added and removed, a post with an attachment, a post deleted, plain posts.
    `check` verifies what the peer's server ends up with.

    The workload waits at three points until the peer has the change so far (the root, the
    `eyes` reaction, the post to be deleted): so that each later change is one call of its own
    kind at the peer (an edit, a reaction removal, a delete) however the relay learns of it,
    and so that it does not run into the catch-up ordering bug that
    test_catch_up_after_websocket_5xx_keeps_threads_and_reactions exposes on its own."""

    def __init__(self, src, tag):
        self.src = src
        self.tag = tag
        t = tag
        self.root_text = f"{t} root"
        self.edited = f"{t} root (edited)"
        self.reply = f"{t} reply"
        self.file_post = f"{t} file"
        self.file_name = f"{t}.txt"
        self.file_content = f"content of the attachment from {t}"
        self.doomed = f"{t} doomed"
        self.plain = [f"{t} n{i}" for i in range(2)]
        # What the peer shows at the end, in order.
        self.order = [self.edited, self.reply, self.file_post] + self.plain
        self.allowed = set(self.order) | {self.root_text, self.doomed}

    def run(self, test, dst, timeout=60):
        s = self.src

        def sync(pred, what):
            test.wait_for(pred, timeout, f"{what} on {dst.name}'s server (workload of {s.name})",
                          lambda: dst.faults())

        root = s.say(self.root_text)
        sync(lambda: dst.copies(self.root_text), "the root")
        s.say(self.reply, root_id=root["id"])
        s.edit(root["id"], self.edited)
        s.react(root["id"], "thumbsup")
        s.react(root["id"], "eyes")
        def remote_root_reactions():
            copies = dst.copies(self.edited) or dst.copies(self.root_text)
            return dst.bot_reactions(copies[0]["id"]) if copies else set()
        sync(lambda: "eyes" in remote_root_reactions(), "the eyes reaction")
        s.react(root["id"], "eyes", add=False)
        fid = s.upload(self.file_name, self.file_content)
        s.say(self.file_post, file_ids=[fid])
        doomed = s.say(self.doomed)
        sync(lambda: dst.copies(self.doomed), "the post to be deleted")
        s.delete(doomed["id"])
        for text in self.plain:
            s.say(text)
        return self

    def arrived(self, dst):
        live = dst.from_peer(self.src.name)
        if sorted(p["message"] for p in live) != sorted(self.order):
            return False
        root = [p for p in live if p["message"] == self.edited]
        if len(root) != 1 or dst.bot_reactions(root[0]["id"]) != {"thumbsup"}:
            return False
        return not [p for p in dst.copies(self.doomed) if not p.get("delete_at")]

    def describe(self, dst):
        live = dst.from_peer(self.src.name)
        root = [p for p in live if p["message"] == self.edited]
        return (f"live on {dst.name}: {[p['message'] for p in live]}; reactions on the root: "
                f"{dst.bot_reactions(root[0]['id']) if root else None}; faults left: "
                f"{dst.faults()}")

    def check(self, test, dst):
        """Exactly once, in order, thread kept, edit/reactions/file/delete applied."""
        name = dst.name
        every = dst.from_peer(self.src.name, live_only=False)
        by_event = {}
        for p in every:
            by_event.setdefault(p["props"].get("relay_event_id"), []).append(p["message"])
        dups = {k: v for k, v in by_event.items() if len(v) > 1}
        test.assertEqual(dups, {}, f"{name}: several posts for one event (duplicate replay)")
        for text in self.order + [self.doomed]:
            test.assertEqual(len(dst.copies(text)), 1,
                             f"{name}: {len(dst.copies(text))} copies of {text!r}")
        live = dst.from_peer(self.src.name)
        test.assertEqual(sorted(p["message"] for p in live), sorted(self.order),
                         f"{name}: posts missing or extra")
        test.assertTrue(in_creation_order(live, created_at(self.src)),
                        f"{name}: posts out of order: {[p['message'] for p in live]}")
        root = next(p for p in live if p["message"] == self.edited)
        reply = next(p for p in live if p["message"] == self.reply)
        test.assertEqual(reply["root_id"], root["id"], f"{name}: the reply left its thread")
        test.assertEqual(dst.bot_reactions(root["id"]), {"thumbsup"}, f"{name}: reactions")
        test.assertEqual(root["props"].get("override_username"),
                         f"{self.src.human} ({self.src.name})", f"{name}: props after the edit")
        fpost = next(p for p in live if p["message"] == self.file_post)
        test.assertEqual(len(fpost.get("file_ids") or []), 1, f"{name}: the attachment")
        test.assertEqual(dst.file(fpost["file_ids"][0]),
                         (self.file_name, self.file_content.encode()),
                         f"{name}: the attachment's name or content")
        doomed = dst.copies(self.doomed)
        test.assertTrue(doomed[0]["delete_at"], f"{name}: the deleted post is still there")


class ChatFaultTest(RelayTestCase):
    """Two relays, each with its own emulated Mattermost: europe dials aws."""

    def chat_pair(self, eu_config=None, aws_config=None, poll_interval="2s"):
        eu = Chat(self, "europe", "alice", seed=11, emu_config=eu_config)
        aws = Chat(self, "aws", "bob", seed=12, emu_config=aws_config)
        eu.configure(aws, dial=True, poll_interval=poll_interval)
        aws.configure(eu, dial=False, poll_interval=poll_interval)
        eu.site.start()
        aws.site.start()
        self.chats = (eu, aws)
        # Both bridges are up: the bot's WebSocket is connected on each server.
        for c in (eu, aws):
            self.wait_for(lambda c=c: any(x["active"] and x["username"] == "relay-bot"
                                          for x in control(c.emu, "GET", "ws")["connections"]),
                          20, f"the relay's WebSocket on {c.name}'s server")
        return eu, aws

    def wait_post(self, dst, message, timeout=30, origin=None):
        """Waits for a relayed post with this message on dst; it must be the only copy."""
        def found():
            return [p for p in dst.copies(message) if (p.get("props") or {}).get("relay_event_id")
                    and (origin is None or p["props"].get("relay_origin") == origin)]
        self.wait_for(found, timeout, f"{message!r} on {dst.name}'s server",
                      lambda: [p["message"] for p in dst.bot_rows()][-10:])
        got = found()
        self.assertEqual(len(got), 1, f"{message!r} replayed {len(got)} times on {dst.name}")
        return got[0]

    def settle(self, quiet=1.5, timeout=20):
        """Waits until neither relay has written to its server for `quiet` seconds (late
        retries and duplicates would have landed by then)."""
        def writes():
            return tuple(sum(1 for r in c.requests() if r["method"] != "GET") for c in self.chats)
        end = time.monotonic() + timeout
        last, since = writes(), time.monotonic()
        while time.monotonic() < end:
            time.sleep(0.25)
            now = writes()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
        self.fail(f"the relays kept writing to their servers for {timeout}s")

    def assert_alive(self):
        for c in self.chats:
            self.assertTrue(c.site.running(), f"{c.name}'s relay exited:\n{c.site.log_tail()}")
            self.assertTrue(c.site.healthy(), f"{c.name}'s relay is not healthy")

    def assert_no_garbage(self, allowed):
        """Every row the relays' bots wrote (archived and deleted ones too) holds a real
        message, and every file they uploaded is a real attachment."""
        for c in self.chats:
            for p in c.bot_rows():
                self.assertIn(p.get("message"), allowed,
                              f"{c.name}: the relay wrote a message nobody sent")
                for marker in GARBAGE_MARKERS:
                    self.assertNotIn(marker, p.get("message") or "", f"{c.name}: garbage")
            for name, data in c.bot_files():
                for marker in GARBAGE_MARKERS:
                    self.assertNotIn(marker.encode(), data,
                                     f"{c.name}: garbage uploaded as the attachment {name!r}")

    def assert_all(self, checks):
        """[(ok, problem)]: fails once, naming every problem found."""
        problems = [problem for ok, problem in checks if not ok]
        if problems:
            self.fail(f"{len(problems)} problem(s):\n  - " + "\n  - ".join(problems))

    def assert_logged(self, chat, pattern, what):
        text = chat.site.log_text()
        self.assertRegex(text, pattern, f"{chat.name}'s log does not say {what}")

    def assert_no_replay_failures(self):
        for c in self.chats:
            self.assertEqual(c.site.metric("relay_mattermost_replay_failures_total"), 0,
                             f"{c.name} skipped events (each one is a lost change)")

    def both_ways(self, eu, aws, timeout=60):
        """The full workload from each side, checked on the other side."""
        w_eu = Workload(eu, "eu").run(self, aws)
        w_aws = Workload(aws, "aws").run(self, eu)
        for w, dst in ((w_eu, aws), (w_aws, eu)):
            self.wait_for(lambda w=w, dst=dst: w.arrived(dst), timeout,
                          f"{w.tag}'s changes on {dst.name}'s server",
                          lambda w=w, dst=dst: w.describe(dst))
        self.settle()
        w_eu.check(self, aws)
        w_aws.check(self, eu)
        self.assert_no_garbage(w_eu.allowed | w_aws.allowed)
        return w_eu, w_aws

    # ---- (a) slow ------------------------------------------------------------------------------

    def test_slow_but_within_the_timeout(self):
        """Every REST answer and WebSocket frame ~0.8 s late (timeout 2 s): nothing is retried,
        nothing times out, everything arrives once."""
        eu, aws = self.chat_pair()
        for c in (eu, aws):
            c.fault(kind="delay", delay_ms=800, duration_ms=60000)
            c.ws_fault(kind="delay", delay_ms=300, duration_ms=60000)
            c.drop_ws(keep_buffer=True)      # the upgrade and resume are slow too
        self.both_ways(eu, aws, timeout=90)
        for c in (eu, aws):
            self.assertGreater(c.answered("GET", P_WS, {101}), 1, "no slow reconnect happened")
            self.assertGreater(len(c.requests()), 20)
            log = c.site.log_text()
            self.assertNotIn("no answer within", log, f"{c.name}: a call timed out")
            self.assertNotIn("mattermost: ", log, f"{c.name}: a slow call was retried")
            self.assertNotIn("WebSocket connect failed", log, f"{c.name}: a slow upgrade failed")
            self.assertEqual(c.site.metric("relay_mattermost_retries_total"), 0)
        self.assert_no_replay_failures()
        self.assert_alive()

    def test_answers_later_than_the_timeout(self):
        """Each kind of call answers once 2.5 s late (timeout 2 s) — carried out at once, only the
        answer is late: the relay times out, says so, retries, and nothing is duplicated."""
        eu, aws = self.chat_pair()
        late = dict(kind="delay", delay_ms=2500, delay_phase="after", count=1)
        for path, method in ((P_POSTS, "POST"), (P_PATCH, "PUT"), (P_POST, "DELETE"),
                             (P_REACTION, "POST"), (P_UNREACT, "DELETE"), (P_UPLOAD, "POST")):
            aws.fault(path_regex=path, method=method, **late)
        for path in (P_SINCE, P_USER, P_FILE_INFO, P_FILE):
            eu.fault(path_regex=path, method="GET", **late)
        eu.fault(path_regex=P_WS, kind="delay", delay_ms=2500, count=1)
        eu.drop_ws(keep_buffer=True)
        w = Workload(eu, "eu").run(self, aws)
        self.wait_for(lambda: w.arrived(aws), 90, "eu's changes on aws's server",
                      lambda: w.describe(aws))
        self.settle()
        w.check(self, aws)
        self.assertEqual(eu.faults() + aws.faults(), [], "not every kind of call was slowed")
        self.assert_no_garbage(w.allowed)
        for c, call in ((aws, "POST /api/v4/posts"), (aws, "PUT /api/v4/posts/"),
                        (aws, "DELETE /api/v4/posts/"), (aws, "POST /api/v4/reactions"),
                        (aws, "POST /api/v4/files"), (eu, "GET /api/v4/channels/"),
                        (eu, "GET /api/v4/files/")):
            self.assert_logged(c, re.escape(call) + r"[^\n]*no answer within 2000 ms",
                               f"that {call} timed out")
        self.assert_logged(eu, r"WebSocket connect failed: [^\n]*no answer within 2000 ms",
                           "that the WebSocket upgrade timed out")
        aws.say("aws after the slow answers")     # and the other way round
        self.wait_post(eu, "aws after the slow answers")
        self.assert_no_replay_failures()
        self.assert_alive()

    def test_create_carried_out_after_the_client_gave_up(self):
        """Two ways a create succeeds although the relay sees it fail, and must not post twice:
        (1) the server is so slow that it creates the post only after the relay's timeout (2 s)
        and the relay's first retry; (2) a 503 after the create, on a server whose read replica
        lags 1.5 s behind (mattermost-api.md: catch-up reads "can lag"), so the relay's look-up
        of the lost post misses it."""
        eu, aws = self.chat_pair()
        # (1) The request waits 2.6 s in front of the server, then is carried out.
        aws.fault(kind="delay", delay_ms=2600, count=1, method="POST", path_regex=P_POSTS)
        eu.say("created late")
        self.wait_for(lambda: aws.copies("created late"), 30, "'created late' on aws")
        time.sleep(1.5)                      # the late create has landed by now
        # (2) A lost answer on a server with a lagging read replica.
        control(aws.emu, "POST", "config", {"replica_lag_ms": 1500})
        aws.fault(kind="status", status=503, process=True, count=1, method="POST",
                  path_regex=P_POSTS)
        eu.say("answer lost, replica lags")
        self.wait_for(lambda: aws.copies("answer lost, replica lags"), 30,
                      "'answer lost, replica lags' on aws")
        self.settle(quiet=2.5)
        self.assert_logged(aws, r"POST /api/v4/posts: no answer within 2000 ms",
                           "that the create timed out")
        self.assert_logged(aws, r"POST /api/v4/posts: HTTP 503", "that the create got a 503")
        self.assert_alive()
        self.assert_all([(len(aws.copies(text)) == 1,
                          f"{text!r} is on aws's server {len(aws.copies(text))} times")
                         for text in ("created late", "answer lost, replica lags")])

    # ---- (b) 5xx -------------------------------------------------------------------------------

    def test_server_down_with_5xx_for_a_while(self):
        """aws's server answers every request (REST and the WebSocket upgrade) with 500, 502 or
        503 for 5 s while both humans keep working; afterwards everything crosses once."""
        eu, aws = self.chat_pair()
        # Something on aws to reply to, react to, edit and delete during the outage.
        old = aws.say("aws before the outage")
        old2 = aws.say("aws to be deleted during the outage")
        local_old = self.wait_post(eu, "aws before the outage")
        self.wait_post(eu, "aws to be deleted during the outage")
        aws.fault(kind="status", status=[500, 502, 503], duration_ms=5000)
        aws.drop_ws(keep_buffer=False)       # as if the server restarted
        aws.say("aws during the outage 1")
        aws.say("aws reply during the outage", root_id=old["id"])
        aws.react(old["id"], "rocket")
        aws.edit(old["id"], "aws before the outage (edited)")
        aws.delete(old2["id"])
        aws.say("aws during the outage 2")
        w = Workload(eu, "eu").run(self, aws)     # its first step waits out the outage
        self.wait_for(lambda: w.arrived(aws), 60, "eu's changes on aws's server",
                      lambda: w.describe(aws))
        for text in ("aws during the outage 1", "aws reply during the outage",
                     "aws during the outage 2"):
            self.wait_post(eu, text, timeout=30)
        self.wait_for(lambda: eu.bot_reactions(local_old["id"]) == {"rocket"}, 30,
                      "the reaction made during the outage")
        # In aws's order of creation; posts created in the same millisecond have no order (the
        # server's create_at is all there is), so any order among them is right.
        created = created_at(aws)

        def arrived_in_order():
            live = eu.from_peer("aws")
            return (sorted(p["message"] for p in live) ==
                    sorted(["aws before the outage (edited)", "aws during the outage 1",
                            "aws reply during the outage", "aws during the outage 2"]) and
                    in_creation_order(live, created))
        self.wait_for(arrived_in_order, 30,
                      "aws's edit and delete made during the outage",
                      lambda: "europe has %s; aws has %s" % (
                          [(p["message"], p["create_at"]) for p in eu.from_peer("aws")], created))
        self.settle()
        w.check(self, aws)
        reply = eu.copies("aws reply during the outage")[0]
        self.assertEqual(reply["root_id"], local_old["id"], "the reply left its thread")
        for text in ("aws during the outage 1", "aws during the outage 2"):
            self.assertEqual(len(eu.copies(text)), 1)
        self.assert_no_garbage(w.allowed | {
            "aws before the outage", "aws before the outage (edited)",
            "aws to be deleted during the outage", "aws during the outage 1",
            "aws reply during the outage", "aws during the outage 2"})
        for status in (500, 502, 503):
            self.assertGreater(aws.answered("POST", P_POSTS, {status})
                               + aws.answered("GET", P_SINCE, {status})
                               + aws.answered("GET", P_WS, {status}), 0)
        self.assert_logged(aws, r"POST /api/v4/posts: HTTP 50[023]",
                           "which call failed and with which status")
        self.assert_logged(aws, r"HTTP 502: \"<html>", "what the 502 said")
        self.assert_logged(aws, r"HTTP 500: [^\n]*\[emulator\.fault\.injected\]",
                           "the server's error id")
        self.assert_logged(aws, r"WebSocket connect failed: websocket GET /api/v4/websocket"
                                r"[^:]*: HTTP 50[023]", "that the WebSocket upgrade got a 5xx")
        self.assertGreater(aws.site.metric("relay_mattermost_retries_total"), 0)
        self.assert_no_replay_failures()
        self.assert_alive()

    def test_every_kind_of_call_fails_with_5xx(self):
        """Each call the bridge makes fails three times: 502 and 503 (HTML from a proxy, nothing
        done), then 500 after the server did the work (answer lost). Writes at aws (replay),
        reads at europe (capture, incl. a WebSocket resume). Nothing is lost or doubled."""
        eu, aws = self.chat_pair()
        for path, method in ((P_POSTS, "POST"), (P_PATCH, "PUT"), (P_POST, "DELETE"),
                             (P_REACTION, "POST"), (P_UNREACT, "DELETE"), (P_UPLOAD, "POST")):
            aws.fault(kind="status", status=[502, 503], count=2, method=method, path_regex=path)
            aws.fault(kind="status", status=500, count=1, process=True, method=method,
                      path_regex=path)
        for path in (P_SINCE, P_USER, P_FILE_INFO, P_FILE, P_WS):
            eu.fault(kind="status", status=[502, 503, 500], count=3, method="GET",
                     path_regex=path)
        eu.drop_ws(keep_buffer=True)         # the resume goes through the 5xx too
        w = Workload(eu, "eu").run(self, aws)
        self.wait_for(lambda: w.arrived(aws), 90, "eu's changes on aws's server",
                      lambda: w.describe(aws))
        self.settle()
        w.check(self, aws)
        self.assertEqual(eu.faults() + aws.faults(), [],
                         "some kind of call never met its 5xx")
        # The 500s came after the work was done: the upload was done twice (an orphan file is
        # fine), every other effect once.
        self.assertEqual(sorted(n for n, _ in aws.bot_files()), ["eu.txt", "eu.txt"])
        aws.say("aws after the storm")
        self.wait_post(eu, "aws after the storm")
        self.assert_no_garbage(w.allowed | {"aws after the storm"})
        for c, call in ((aws, "POST /api/v4/posts"), (aws, "PUT /api/v4/posts/"),
                        (aws, "DELETE /api/v4/posts/"), (aws, "POST /api/v4/reactions"),
                        (aws, "DELETE /api/v4/users/"), (aws, "POST /api/v4/files"),
                        (eu, "GET /api/v4/channels/"), (eu, "GET /api/v4/users/"),
                        (eu, "GET /api/v4/files/")):
            self.assert_logged(c, re.escape(call) + r"[^\n]*: HTTP 50[023]",
                               f"that {call} failed with a 5xx")
        self.assert_logged(eu, r"WebSocket connect failed: [^\n]*HTTP 50[023]",
                           "that the WebSocket upgrade failed")
        self.assert_no_replay_failures()
        self.assert_alive()

    def test_websocket_down_rest_catch_up_continues(self):
        """Only the WebSocket fails (a proxy that does not pass upgrades: 502 for 14 s). The
        relay must keep capturing over REST every poll_interval (2 s) meanwhile, as
        docs/mattermost.md says, not wait for the WebSocket to come back."""
        eu, aws = self.chat_pair()
        eu.fault(kind="status", status=502, duration_ms=14000, path_regex=P_WS)
        eu.drop_ws(keep_buffer=False)
        t0 = time.monotonic()
        time.sleep(1.0)                      # the relay has noticed and is reconnecting
        eu.say("posted while the WebSocket is down")
        arrived = wait_for(lambda: [p for p in aws.copies("posted while the WebSocket is down")
                                    if p["user_id"] == aws.bot_id], 8)
        waited = time.monotonic() - t0
        self.assert_logged(eu, r"WebSocket connect failed: websocket GET /api/v4/websocket"
                               r"[^:]*: HTTP 502", "why the WebSocket cannot connect")
        self.assert_alive()
        self.assertTrue(arrived, f"a post made while only the WebSocket was down did not cross "
                                 f"within {waited:.0f}s (poll_interval 2s): capture stopped "
                                 f"until the WebSocket came back")
        self.wait_post(aws, "posted while the WebSocket is down")

    # ---- (c) garbage ---------------------------------------------------------------------------

    def test_garbage_answers_on_every_call(self):
        """Truncated JSON, JSON with every type wrong, HTML login pages, empty and `null`
        bodies with 200/201 on every kind of call (writes at aws, after the server did the work
        or without it; reads at europe; the catch-up look-up of a lost create at aws). The
        relay says what is wrong, retries, and never takes garbage for data."""
        eu, aws = self.chat_pair()
        g = dict(kind="garbage", count=1)
        for path, method, variants in (
                (P_POSTS, "POST", [dict(style="html", process=False), dict(style="cut",
                                                                            status=201)]),
                (P_PATCH, "PUT", [dict(style="empty", process=False), dict(style="wrong_types")]),
                (P_POST, "DELETE", [dict(style="html")]),
                (P_REACTION, "POST", [dict(style="null")]),
                (P_UNREACT, "DELETE", [dict(style="empty")]),
                (P_UPLOAD, "POST", [dict(style="wrong_types", status=201),
                                    dict(style="cut", status=201)]),
                (P_SINCE, "GET", [dict(style="truncated")])):   # catch-up or look-up of a create
            for v in variants:
                aws.fault(method=method, path_regex=path, **dict(g, **v))
        for path, styles in ((P_SINCE, ["wrong_types", "html", "null", "empty", "cut"]),
                             (P_USER, ["wrong_types", "html"]),
                             (P_FILE_INFO, ["wrong_types", "truncated"])):
            for style in styles:
                eu.fault(method="GET", path_regex=path, style=style, **g)
        eu.fault(kind="garbage", style="html", count=1, process=False,   # 200 to an upgrade
                 path_regex=P_WS)
        eu.drop_ws(keep_buffer=True)
        w = Workload(eu, "eu").run(self, aws)
        self.wait_for(lambda: w.arrived(aws), 90, "eu's changes on aws's server",
                      lambda: w.describe(aws))
        self.settle()
        w.check(self, aws)
        self.assertEqual(eu.faults() + aws.faults(), [], "some garbage was never served")
        self.assert_no_garbage(w.allowed)
        self.assert_logged(aws, r"POST /api/v4/posts: HTTP 200 reply: body is not valid JSON: "
                                r"\"<!DOCTYPE html>", "that the create's answer was an HTML page")
        self.assert_logged(aws, r"POST /api/v4/posts: HTTP 201 reply: body is not valid JSON",
                           "that the create's answer was cut short")
        self.assert_logged(aws, r"PUT /api/v4/posts/\w+/patch: HTTP 200 reply: post: field "
                                r"\"id\" is number, expected a string",
                           "which field of the edit's answer had the wrong type")
        self.assert_logged(aws, r"POST /api/v4/files: HTTP 201 reply: ",
                           "that the upload's answer was garbage")
        self.assert_logged(eu, r"GET /api/v4/channels/\w+/posts\?since=\d+: HTTP 200 reply: ",
                           "that the catch-up answer was garbage")
        self.assert_logged(eu, r"reply: post list is a JSON null, expected an object",
                           "that the catch-up answered null")
        self.assert_logged(eu, r"GET /api/v4/files/\w+/info: HTTP 200 reply: ",
                           "that the file info was garbage")
        self.assert_logged(eu, r"WebSocket connect failed: [^\n]*HTTP 200",
                           "that the upgrade was answered with a page")
        aws.say("aws after the garbage")          # and the other way round
        self.wait_post(eu, "aws after the garbage")
        self.assert_no_replay_failures()
        self.assert_alive()

    def test_200_bodies_that_are_not_the_api_answer(self):
        """A proxy in front of the server answers 200 with its own HTML page (or nothing)
        without passing the request on. The relay must not take that for success: the delete,
        the reactions and the attachments must still happen, with the real content."""
        eu, aws = self.chat_pair()
        target = eu.say("eu post to delete")
        liked = eu.say("eu post to react to")
        self.wait_post(aws, "eu post to delete")
        remote_liked = self.wait_post(aws, "eu post to react to")
        # Writes at aws answered by the proxy (nothing reaches the server).
        for path, method, style in ((P_POST, "DELETE", "html"), (P_REACTION, "POST", "empty"),
                                    (P_UNREACT, "DELETE", "html")):
            aws.fault(kind="garbage", style=style, count=1, process=False, method=method,
                      path_regex=path)
        # A download at europe answered by the proxy's page, another one cut short.
        eu.fault(kind="garbage", style="html", count=1, method="GET", path_regex=P_FILE)
        eu.fault(kind="garbage", style="cut", count=1, method="GET", path_regex=P_FILE)
        eu.react(liked["id"], "tada")
        eu.react(liked["id"], "heart")
        eu.react(liked["id"], "heart", add=False)
        eu.delete(target["id"])
        for i in (1, 2):
            fid = eu.upload(f"report{i}.txt", f"the real report number {i}")
            eu.say(f"eu report {i}", file_ids=[fid])
        for i in (1, 2):
            self.wait_post(aws, f"eu report {i}")
        self.settle()
        self.assert_alive()
        checks = [(aws.copies("eu post to delete")[0]["delete_at"],
                   "the deleted post is still live on aws (its DELETE was answered 200 by the "
                   "proxy, not by the server)"),
                  (aws.bot_reactions(remote_liked["id"]) == {"tada"},
                   f"the reactions on aws are {sorted(aws.bot_reactions(remote_liked['id']))}, "
                   f"expected ['tada'] (an add and a removal were answered 200 by the proxy)")]
        for i in (1, 2):
            post = aws.copies(f"eu report {i}")[0]
            got = [aws.file(f) for f in post["file_ids"]]
            checks.append((got == [(f"report{i}.txt", f"the real report number {i}".encode())],
                           f"attachment {i} on aws is {str(got)[:120]}, not the file that was "
                           f"posted (its download was answered by the proxy)"))
        self.assert_all(checks)

    def test_websocket_frames_garbled_in_transit(self):
        """WebSocket frames cut short, replaced by an HTML page, or with every type wrong, and
        a close with 1011 (server error) — each on a live connection: the relay drops the
        socket, resumes, and the server replays the event intact. poll_interval is 60 s here:
        the periodic catch-up cannot hide a loss."""
        eu, aws = self.chat_pair(poll_interval="60s")
        for style in ("truncated", "not_json", "wrong_types"):
            eu.ws_fault(kind="garbage", style=style, event="posted", user="relay-bot")
        eu.ws_fault(kind="close", close_code=1011, event="posted", user="relay-bot")
        texts = [f"eu frame {i}" for i in range(6)]
        for t in texts:              # one at a time: each garbled frame is its own incident
            eu.say(t)
            self.wait_post(aws, t, timeout=15)
        self.settle()
        self.assertEqual(eu.ws_faults(), [], "not every frame was garbled")
        self.assertEqual([p["message"] for p in aws.from_peer("europe")], texts,
                         "posts missing, doubled or out of order")
        self.assert_logged(eu, r"WebSocket lost \([^\n]*websocket event is not valid JSON",
                           "that a frame was not JSON")
        self.assert_logged(eu, r"WebSocket lost \([^\n]*field \"event\" is number, expected a "
                               r"string", "which field of the frame had the wrong type")
        self.assert_logged(eu, r"WebSocket lost \([^\n]*closed the connection \(code 1011",
                           "that the server closed with 1011")
        self.assert_no_garbage(set(texts))
        self.assert_alive()

    def test_websocket_event_payload_garbled(self):
        """A `posted` event whose embedded post is cut short, a `post_edited` whose post has
        every type wrong and a `reaction_added` whose reaction is cut short. The frames are fine,
        so the relay cannot resume past them: it must catch up over REST at once (like after a
        sequence gap), keeping the channel's order, and say what it could not read.
        poll_interval is 60 s (the default is 5 min)."""
        eu, aws = self.chat_pair(poll_interval="60s")
        root = eu.say("eu first")
        self.wait_post(aws, "eu first")
        eu.ws_fault(kind="garbage", style="bad_payload", event="posted", user="relay-bot")
        eu.ws_fault(kind="garbage", style="payload_types", event="post_edited",
                    user="relay-bot")
        eu.ws_fault(kind="garbage", style="bad_payload", event="reaction_added",
                    user="relay-bot")
        t0 = time.monotonic()
        eu.say("eu second (its event is garbled)")
        eu.say("eu third")
        eu.edit(root["id"], "eu first (edited, its event is garbled)")
        eu.react(root["id"], "wave")
        self.wait_post(aws, "eu third", timeout=15)
        arrived = wait_for(lambda: aws.copies("eu second (its event is garbled)"), 12)
        self.assert_alive()
        self.assertTrue(arrived, f"a post whose posted event was unreadable did not cross within "
                                 f"{time.monotonic() - t0:.0f}s: it waits for the periodic "
                                 f"catch-up (poll_interval)")
        self.assertEqual(eu.ws_faults(), [])
        self.wait_for(lambda: aws.copies("eu first (edited, its event is garbled)"), 12,
                      "the edit whose event was unreadable")
        remote_root = aws.copies("eu first (edited, its event is garbled)")[0]
        self.wait_for(lambda: aws.bot_reactions(remote_root["id"]) == {"wave"}, 12,
                      "the reaction whose event was unreadable")
        self.assertEqual([p["message"] for p in aws.from_peer("europe")],
                         ["eu first (edited, its event is garbled)",
                          "eu second (its event is garbled)", "eu third"],
                         "posts out of the channel's order")
        self.assert_logged(eu, r"unreadable posted event: post is not valid JSON",
                           "that a posted event could not be read")
        self.assert_logged(eu, r"unreadable post_edited event: post: field \"id\" is number",
                           "that a post_edited event could not be read")
        self.assert_logged(eu, r"unreadable reaction_added event",
                           "that a reaction_added event could not be read")

    def test_catch_up_after_websocket_5xx_keeps_threads_and_reactions(self):
        """While the WebSocket upgrade fails (503 for 4 s), a new thread root gets a reply and a
        reaction: the relay learns of them through the REST catch-up, which lists the root
        after its reply (a reply or a reaction bumps the root's update_at). The reply is made in
        the same millisecond as its root (a server's clock allows it: it failed one CI run by
        chance), so only the thread, not the time, can order them. The reply must still land in
        the root's thread at the peer, and the reaction must cross."""
        eu, aws = self.chat_pair()
        eu.fault(kind="status", status=503, duration_ms=4000, path_regex=P_WS)
        eu.drop_ws(keep_buffer=False)
        root = eu.say("eu root during the WebSocket outage")
        eu.say("eu reply during the WebSocket outage", root_id=root["id"],
               create_at=root["create_at"])
        eu.react(root["id"], "fire")
        remote_root = self.wait_post(aws, "eu root during the WebSocket outage", timeout=40)
        remote_reply = self.wait_post(aws, "eu reply during the WebSocket outage", timeout=10)
        self.settle()
        self.assert_logged(eu, r"WebSocket connect failed: [^\n]*HTTP 503",
                           "that the WebSocket upgrade failed")
        self.assert_alive()
        order = [p["message"] for p in aws.from_peer("europe")]
        self.assert_all([
            (remote_reply["root_id"] == remote_root["id"],
             "the reply was posted on aws as a new thread, not in its root's thread"),
            (order == ["eu root during the WebSocket outage",
                       "eu reply during the WebSocket outage"],
             f"posts on aws out of order: {order}"),
            (aws.bot_reactions(remote_root["id"]) == {"fire"},
             "the reaction on the new root was lost")])
