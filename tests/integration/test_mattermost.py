"""Two emulated Mattermost servers bridged by two relays: full chat fidelity across crashes,
reconnects and downtime (issue 3). The emulator lives in tests/mattermost_emulator."""
import json
import os
import sys
import time
import urllib.request

from relay_harness import REPO, RelayTestCase, wait_for

sys.path.insert(0, os.path.join(REPO, "tests", "mattermost_emulator"))
from emulator import Emulator  # noqa: E402

BOT_TOKEN = "relaybottoken0000000000000"


def control(emu, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(emu.url + "/__control/" + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


class ChatSite:
    """A relay site with its own emulated Mattermost server."""

    def __init__(self, test, name, human):
        self.test = test
        self.human = human
        self.emu = Emulator(users=[f"relay-bot:{BOT_TOKEN}:bot=true", f"{human}:{human}token"],
                            channels=["war-room"], config={"replica_lag_ms": 0}, seed=7).start()
        test.addCleanup(self.emu.stop)
        self.channel_id = self.emu.channel("war-room")["id"]
        self.site = test.site(name)
        self.token_file = os.path.join(self.site.dir, "mm.token")
        # 0600, like a key file: the relay refuses a token file others can read.
        with open(os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(BOT_TOKEN + "\n")

    def configure(self, peer, dial):
        extra = (f"[channel.war-room]\npeers = {peer.site.name}\nsink = mattermost\n"
                 f"mattermost_channel_id = {self.channel_id}\n\n"
                 f"[mattermost]\nurl = {self.emu.url}\ntoken_file = {self.token_file}\n"
                 f"catchup_overlap = 2s\npoll_interval = 2s\ntimeout = 3s\n")
        self.site.write_config({peer.site.name: {"site": peer.site, "dial": dial}}, {}, extra=extra)

    # Acting as the human user on this server.
    def say(self, message, root_id="", file_ids=None, props=None):
        body = {"as": self.human, "channel_id": self.channel_id, "message": message}
        if root_id:
            body["root_id"] = root_id
        if file_ids:
            body["file_ids"] = file_ids
        if props is not None:
            body["props"] = props
        return control(self.emu, "POST", "posts", body)

    def edit(self, post_id, message, props=None):
        body = {"as": self.human, "message": message}
        if props is not None:
            body["props"] = props
        return control(self.emu, "PUT", f"posts/{post_id}/patch", body)

    def delete(self, post_id):
        return control(self.emu, "DELETE", f"posts/{post_id}", {"as": self.human})

    def react(self, post_id, emoji, add=True):
        return control(self.emu, "POST" if add else "DELETE", "reactions",
                       {"as": self.human, "post_id": post_id, "emoji_name": emoji})

    def upload(self, name, content):
        return control(self.emu, "POST", "files", {"as": self.human, "channel_id": self.channel_id,
                                                   "name": name, "content": content})

    def rows(self):
        """Every stored row of the channel (deleted and archived included)."""
        return control(self.emu, "GET", f"state/channels/{self.channel_id}/posts")["posts"]

    def live(self):
        """Current, non-deleted posts (no archived edit copies)."""
        return [p for p in self.rows() if not p.get("original_id") and not p.get("delete_at")]

    def relayed(self):
        """Current posts the relay created, keyed by the origin event id."""
        out = {}
        for p in self.rows():
            if p.get("original_id"):
                continue
            eid = (p.get("props") or {}).get("relay_event_id")
            if eid:
                self.test.assertNotIn(eid, out, f"two posts for event {eid}: duplicate replay")
                out[eid] = p
        return out

    def by_message(self, message):
        return [p for p in self.relayed().values() if p.get("message") == message]


class ChatPairCase(RelayTestCase):
    """Two chat sites bridged by two relays, and what the tests do with them (no tests here)."""

    def chat_pair(self):
        eu = ChatSite(self, "europe", "alice")
        aws = ChatSite(self, "aws", "bob")
        eu.configure(aws, dial=True)
        aws.configure(eu, dial=False)
        eu.site.start()
        aws.site.start()
        return eu, aws

    def wait_post(self, where, message, timeout=30):
        self.wait_for(lambda: where.by_message(message), timeout,
                      f"'{message}' on {where.site.name}'s server",
                      lambda: [p.get("message") for p in where.relayed().values()])
        found = where.by_message(message)
        self.assertEqual(len(found), 1, f"'{message}' replayed {len(found)} times")
        return found[0]

    def reactions_by(self, site, post_id, user_id):
        rows = control(site.emu, "GET", f"state/reactions?post_id={post_id}").get("reactions", [])
        return {r["emoji_name"] for r in rows if r["user_id"] == user_id and not r.get("delete_at")}

    def exercise(self, src, dst):
        """Every kind of change made on src's server appears on dst's server exactly once."""
        tag = src.site.name
        root = src.say(f"hello from {tag}")
        remote_root = self.wait_post(dst, f"hello from {tag}")
        props = remote_root["props"]
        self.assertEqual(props.get("from_webhook"), "true")
        self.assertEqual(props.get("override_username"), f"{src.human} ({tag})")
        self.assertEqual(props.get("relay_origin"), tag)
        eid = props["relay_event_id"]

        # A reply at the origin lands in the right thread at the peer.
        reply = src.say(f"reply from {tag}", root_id=root["id"])
        remote_reply = self.wait_post(dst, f"reply from {tag}")
        self.assertEqual(remote_reply["root_id"], remote_root["id"])

        # Edit crosses; props are replaced in full, so the relay's markers must be re-sent.
        src.edit(root["id"], f"hello from {tag} (edited)")
        self.wait_for(lambda: dst.relayed().get(eid, {}).get("message")
                      == f"hello from {tag} (edited)", 30, f"the edit from {tag}")
        self.assertEqual(dst.relayed()[eid]["props"].get("override_username"),
                         f"{src.human} ({tag})")

        # Reactions: one bot reaction per emoji at the peer, removed with the last reactor.
        bot = dst.emu.user("relay-bot").id
        src.react(root["id"], "thumbsup")
        self.wait_for(lambda: "thumbsup" in self.reactions_by(dst, remote_root["id"], bot), 30,
                      f"the reaction from {tag}")
        src.react(root["id"], "thumbsup", add=False)
        self.wait_for(lambda: "thumbsup" not in self.reactions_by(dst, remote_root["id"], bot),
                      30, f"the reaction from {tag} removed")

        # Attachments are carried whole.
        info = src.upload(f"plan-{tag}.txt", f"the plan from {tag}")
        fid = info["file_infos"][0]["id"]
        src.say(f"see attachment from {tag}", file_ids=[fid])
        with_file = self.wait_post(dst, f"see attachment from {tag}")
        self.assertEqual(len(with_file.get("file_ids") or []), 1)
        files = control(dst.emu, "GET", "state/files")
        files = files.get("files", files) if isinstance(files, dict) else files
        got = [f for f in files if f.get("id") in with_file["file_ids"]]
        self.assertEqual([f.get("name") for f in got], [f"plan-{tag}.txt"])
        self.assertEqual(got[0].get("size"), len(f"the plan from {tag}"))

        # Deleting the root deletes the thread at the peer too.
        src.delete(root["id"])
        self.wait_for(lambda: not {eid, remote_reply["props"]["relay_event_id"]} &
                      {(p.get("props") or {}).get("relay_event_id") for p in dst.live()},
                      30, f"the delete from {tag}")



class MattermostBridgeTest(ChatPairCase):
    def test_full_fidelity_both_ways(self):
        eu, aws = self.chat_pair()
        self.exercise(eu, aws)
        self.exercise(aws, eu)
        # Nothing echoes back: no server holds a relayed copy of its own site's posts.
        for s in (eu, aws):
            self.assertFalse([p for p in s.relayed().values()
                              if (p.get("props") or {}).get("relay_origin") == s.site.name])
            self.assertEqual(s.site.metric("relay_mattermost_replay_failures_total"), 0)

    def test_remote_reply_to_a_relayed_post_lands_in_the_origin_thread(self):
        eu, aws = self.chat_pair()
        root = eu.say("question from europe")
        remote_root = self.wait_post(aws, "question from europe")
        aws.say("answer from aws", root_id=remote_root["id"])
        back = self.wait_post(eu, "answer from aws")
        self.assertEqual(back["root_id"], root["id"])
        aws.react(remote_root["id"], "white_check_mark")
        bot = eu.emu.user("relay-bot").id
        self.wait_for(lambda: "white_check_mark" in self.reactions_by(eu, root["id"], bot), 30,
                      "a reaction on a relayed post reaching the original")

    def test_posts_made_while_relay_down_arrive_after_start(self):
        eu, aws = self.chat_pair()
        eu.say("before")
        self.wait_post(aws, "before")
        eu.site.kill9()
        for i in range(5):
            eu.say(f"while down {i}")
        time.sleep(0.5)
        eu.site.start()
        for i in range(5):
            self.wait_post(aws, f"while down {i}")

    def test_catch_up_beyond_the_servers_1000_row_cap(self):
        eu, aws = self.chat_pair()
        eu.say("first")
        self.wait_post(aws, "first")
        eu.site.stop()
        n = 1200
        for i in range(n):
            eu.say(f"backlog {i}")
        eu.site.start()
        self.wait_for(lambda: len(aws.relayed()) >= n + 1, 120, f"{n} backlog posts on aws",
                      lambda: f"{len(aws.relayed())} arrived")
        got = sorted(p["message"] for p in aws.relayed().values())
        self.assertEqual(got, sorted(["first"] + [f"backlog {i}" for i in range(n)]))

    def test_kill_between_create_and_mapping_makes_no_duplicate(self):
        eu, aws = self.chat_pair()
        eu.say("warm up")
        self.wait_post(aws, "warm up")
        # aws's server creates posts but its answers are lost (503 after processing): the relay
        # is killed while it retries, between "created" and "mapped".
        control(aws.emu, "POST", "faults", {"kind": "status", "status": 503, "process": True,
                                             "count": 1000, "path_prefix": "/api/v4/posts",
                                             "method": "POST"})
        eu.say("exactly once please")
        self.wait_for(lambda: any(p.get("message") == "exactly once please" for p in aws.rows()),
                      30, "the post created on aws's server")
        aws.site.kill9()
        control(aws.emu, "DELETE", "faults")
        aws.site.start()
        eu.say("after the crash")
        self.wait_post(aws, "after the crash")
        copies = [p for p in aws.rows() if p.get("message") == "exactly once please"
                  and not p.get("original_id")]
        self.assertEqual(len(copies), 1, f"{len(copies)} copies of the post on aws")

    def test_websocket_cut_events_during_gap_arrive(self):
        eu, aws = self.chat_pair()
        eu.say("before the cut")
        self.wait_post(aws, "before the cut")
        # The server forgets the connection (like a restart): missed events cannot be replayed.
        control(eu.emu, "POST", "ws/drop", {"keep_buffer": False})
        for i in range(3):
            eu.say(f"during the gap {i}")
        for i in range(3):
            self.wait_post(aws, f"during the gap {i}")
        # A sequence gap on a live connection is noticed and caught up too.
        control(eu.emu, "POST", "ws/skip_seq", {"count": 2})
        eu.say("after a seq gap")
        self.wait_post(aws, "after a seq gap")

    def test_429_storm_is_ridden_out(self):
        eu, aws = self.chat_pair()
        control(aws.emu, "POST", "faults", {"kind": "rate_limit", "count": 20, "retry_after": 1,
                                             "path_prefix": "/api/v4/posts"})
        for i in range(5):
            eu.say(f"storm {i}")
        for i in range(5):
            self.wait_post(aws, f"storm {i}", timeout=60)
        self.assertGreater(aws.site.metric("relay_mattermost_retries_total"), 0)


# Props an integration or a hostile site could put on a post: buttons that make the receiving
# server call back (actions, mm_blocks_actions), image URLs it would fetch, a forged author and
# badges, references to its own posts and users, a plugin's state.
HOSTILE_PROPS = {
    "attachments": [{
        "fallback": "approve change 12?",
        "text": "change 12 needs an approval",
        "color": "warning",
        "title": "Change 12",
        "title_link": "https://evil.example/change/12",
        "image_url": "http://169.254.169.254/latest/meta-data/",
        "thumb_url": "http://intranet.local/thumb.png",
        "author_name": "ops",
        "author_icon": "http://intranet.local/icon.png",
        "fields": [{"title": "risk", "value": "low", "short": True}],
        "actions": [{"id": "approve", "name": "Approve", "type": "button",
                     "integration": {"url": "https://evil.example/approve",
                                     "context": {"change": 12}}}],
    }],
    "mm_blocks_actions": [{"id": "x", "url": "https://evil.example/block"}],
    "from_webhook": "true",
    "override_username": "System Administrator",
    "override_icon_url": "https://evil.example/admin.png",
    "webhook_display_name": "Security Team",
    "from_bot": "true",
    "previewed_post": "p1aaaaaaaaaaaaaaaaaaaaaaaa",
    "add_channel_member": {"user_ids": ["u1aaaaaaaaaaaaaaaaaaaaaaaa"]},
    "relay_origin": "forged",
    "some_plugin_state": {"callback": "https://evil.example/plugin"},
    "disable_group_highlight": True,
}
# What of it may be shown at the other site.
SAFE_ATTACHMENTS = [{
    "fallback": "approve change 12?",
    "text": "change 12 needs an approval",
    "color": "warning",
    "title": "Change 12",
    "author_name": "ops",
    "fields": [{"title": "risk", "value": "low", "short": True}],
}]


class MattermostTrustTest(ChatPairCase):
    def check_carried(self, post, author, origin):
        props = post["props"]
        self.assertEqual(props.get("attachments"), SAFE_ATTACHMENTS, props)
        self.assertIs(props.get("disable_group_highlight"), True, props)
        # The receiving site's own markers and display name, not the forged ones.
        self.assertEqual(props.get("override_username"), f"{author} ({origin})", props)
        self.assertEqual(props.get("relay_origin"), origin, props)
        self.assertEqual(props.get("from_webhook"), "true", props)
        allowed = {"attachments", "disable_group_highlight", "mentionHighlightDisabled",
                   "relay_event_id", "relay_origin", "from_webhook", "override_username",
                   "from_bot"}
        self.assertEqual(set(props) - allowed, set(), props)
        self.assertNotIn("evil.example", json.dumps(props))
        self.assertNotIn("intranet.local", json.dumps(props))
        self.assertNotIn("169.254.169.254", json.dumps(props))

    def test_carried_props_pass_an_allow_list_both_ways(self):
        """Attack: a user or integration at one site posts with props that would make the other
        site's server show buttons calling back to an outside URL, fetch internal image URLs, or
        show a forged author; the safe outcome, in both directions and for edits too, is the
        post with its text and its attachments' text only, under the relay's own display name."""
        eu, aws = self.chat_pair()
        for src, dst in ((eu, aws), (aws, eu)):
            tag = src.site.name
            root = src.say(f"props from {tag}", props=HOSTILE_PROPS)
            post = self.wait_post(dst, f"props from {tag}")
            self.check_carried(post, src.human, tag)
            eid = post["props"]["relay_event_id"]
            # An edit replaces props in full: the same list applies.
            edited = dict(HOSTILE_PROPS, mentionHighlightDisabled=True)
            src.edit(root["id"], f"props from {tag} (edited)", props=edited)
            self.wait_for(lambda: dst.relayed().get(eid, {}).get("message")
                          == f"props from {tag} (edited)", 30, f"the edit from {tag}")
            again = dst.relayed()[eid]
            self.check_carried(again, src.human, tag)
            self.assertIs(again["props"].get("mentionHighlightDisabled"), True)
        for s in (eu, aws):
            self.assertEqual(s.site.metric("relay_mattermost_replay_failures_total"), 0)

    def test_props_forged_by_the_sending_site_are_filtered_where_they_land(self):
        """Attack: a peer site (or anyone who can post to its ingest API) sends events whose
        carried Mattermost props were never checked by its capture -- buttons calling back,
        internal image URLs, a forged author; the safe outcome is that the receiving relay
        applies the allow-list itself and the post shows only text."""
        eu, aws = self.chat_pair()
        status, body = eu.site.post({"channel": "war-room", "author": "mallory",
                                     "text": "forged props",
                                     "props": {"mm_props": json.dumps(HOSTILE_PROPS)}})
        self.assertEqual(status, 202, body)
        post = self.wait_post(aws, "forged props")
        self.check_carried(post, "mallory", "europe")

    def test_a_token_file_others_can_read_is_refused_by_name(self):
        """Attack: a local user reads a Mattermost token file left readable (0644) and acts as the
        relay's bot; the safe outcome is that relay refuses to use such a file -- the daemon does
        not start and check-config fails, both naming the file, its mode and the chmod fix,
        without printing the token."""
        eu = ChatSite(self, "europe", "alice")
        aws = ChatSite(self, "aws", "bob")
        eu.configure(aws, dial=True)
        os.chmod(eu.token_file, 0o644)
        expected = (f"[mattermost] token_file: the Mattermost token file '{eu.token_file}' has "
                    f"mode 0644: it must not be readable or writable by group or others "
                    f"(chmod 600 '{eu.token_file}')")
        r = eu.site.cli("check-config", "--config", eu.site.conf)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn(expected, r.stdout)
        self.assertNotIn(BOT_TOKEN, r.stdout + r.stderr)
        eu.site.start(wait=False)
        self.assertEqual(eu.site.proc.wait(timeout=30), 1)
        self.assertIn(expected, eu.site.log_text())
        self.assertNotIn(BOT_TOKEN, eu.site.log_text())
        # Fixed as the message says, the site starts and bridges.
        os.chmod(eu.token_file, 0o600)
        aws.configure(eu, dial=False)
        eu.site.start()
        aws.site.start()
        eu.say("after the chmod")
        self.wait_post(aws, "after the chmod")

    def test_the_token_is_not_in_logs_status_metrics_or_the_environment(self):
        """Attack: anyone who can read the journal, `relay status`, /metrics or the process's
        command line and environment looks for the bot's token; the safe outcome is that it is
        in none of them."""
        eu, aws = self.chat_pair()
        self.exercise(eu, aws)
        for s in (eu, aws):
            texts = [s.site.log_text(), s.site.cli("status", "--config", s.site.conf).stdout,
                     s.site.cli("status", "--config", s.site.conf, "--json").stdout,
                     s.site.get("/metrics")[1], s.site.get("/v1/status")[1]]
            for text in texts:
                self.assertNotIn(BOT_TOKEN, text)
            pid = s.site.proc.pid
            for name in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    self.assertNotIn(BOT_TOKEN.encode(), f.read())

    def test_the_token_is_kept_in_few_copies_in_memory(self):
        """Attack: root, or a debugger, reads a bridging daemon's memory for the token; the safe
        outcome is that it finds the one locked copy (crypto::Secret) and at most a few leftovers
        of the last WebSocket handshake, not a copy per request made (16 to 19 before curl's
        buffers were wiped)."""
        eu, aws = self.chat_pair()
        self.exercise(eu, aws)
        self.exercise(aws, eu)
        for s in (eu, aws):
            try:
                n = copies_in_memory(s.site.proc.pid, BOT_TOKEN.encode())
            except PermissionError as e:
                self.skipTest(f"cannot read the daemon's memory here: {e}")
            print(f"[{s.site.name}: {n} copies of the token in memory]", end=" ", flush=True)
            self.assertGreaterEqual(n, 1, "the scan found not even the token in use")
            self.assertLessEqual(n, 4, f"{n} copies of the token in {s.site.name}'s memory")


# Mappings larger than this are not the daemon's data but AddressSanitizer's shadow memory
# (terabytes reserved, never holding program bytes); they are skipped, everything else is read.
SHADOW_MAPPING = 64 << 30


def copies_in_memory(pid, needle):
    """How often `needle` occurs in the readable memory of process `pid` (needs ptrace access:
    root, since the daemon is not dumpable). Read in 16 MiB pieces that overlap by the needle's
    length less one: a copy across two pieces is counted, and by one of them only."""
    n = 0
    piece = 16 << 20
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if hi - lo > SHADOW_MAPPING:
                continue
            at = lo
            while at < hi:
                end = min(hi, at + piece)
                try:
                    mem.seek(at)
                    data = mem.read(min(hi, end + len(needle) - 1) - at)
                except OSError:
                    break  # a region that cannot be read (guard pages)
                n += data.count(needle)  # only copies that start before `end` fit in `data`
                at = end
    return n


class WebhookSinkTest(RelayTestCase):
    def test_new_posts_reach_an_incoming_webhook_once(self):
        eu = ChatSite(self, "europe", "alice")
        aws = ChatSite(self, "aws", "bob")
        hook = control(aws.emu, "POST", "hooks", {"channel_id": aws.channel_id, "user": "bob"})
        eu.configure(aws, dial=True)
        extra = (f"[channel.war-room]\npeers = europe\nsink = webhook\n"
                 f"webhook_url = {aws.emu.url}/hooks/{hook['id']}\n")
        aws.site.write_config({"europe": {"site": eu.site, "dial": False}}, {}, extra=extra)
        eu.site.start()
        aws.site.start()
        eu.say("to the webhook")
        root = eu.say("edits do not cross a webhook")
        self.wait_for(lambda: [p for p in aws.live() if p.get("message") == "to the webhook"], 30,
                      "the webhook post on aws")
        eu.edit(root["id"], "edited")
        eu.say("last")
        self.wait_for(lambda: [p for p in aws.live() if p.get("message") == "last"], 30, "'last'")
        posts = [p for p in aws.live() if (p.get("props") or {}).get("from_webhook") == "true"]
        self.assertEqual(sorted(p["message"] for p in posts),
                         ["edits do not cross a webhook", "last", "to the webhook"])
        self.assertEqual({(p.get("props") or {}).get("relay_origin") for p in posts}, {"europe"})
