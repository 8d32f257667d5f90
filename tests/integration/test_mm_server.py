"""The Mattermost adapter against the real-server behaviours of mattermost-api.md ("Real-server
behaviours that an emulator easily misses"), issue 11 item 11: channels with history, catch-up
that never skips, system posts, temporary errors at the receiving server, clocks that differ and
creates whose answers are lost. Two emulated servers, two relays (the harness of
test_mattermost.py)."""
import json
import time

from test_mattermost import BOT_TOKEN, ChatPairCase, ChatSite, control

# The relays' catch-up settings in these tests (ChatSite.configure): poll_interval 2s,
# catchup_overlap 2s, timeout 3s. QUIET is long enough for two catch-ups to have run.
QUIET = 5


class MMSite(ChatSite):
    """A ChatSite with more bridged channels and extra config keys."""

    def __init__(self, test, name, human, channels=("war-room",)):
        super().__init__(test, name, human)
        self.channel_ids = {"war-room": self.channel_id}
        for c in channels:
            if c not in self.channel_ids:
                self.channel_ids[c] = self.emu.create_channel(c)["id"]

    def configure(self, peer, dial, channel_keys="", mm_keys=""):
        extra = ""
        for name, cid in self.channel_ids.items():
            extra += (f"[channel.{name}]\npeers = {peer.site.name}\nsink = mattermost\n"
                      f"mattermost_channel_id = {cid}\n{channel_keys}\n")
        extra += (f"[mattermost]\nurl = {self.emu.url}\ntoken_file = {self.token_file}\n"
                  f"catchup_overlap = 2s\npoll_interval = 2s\ntimeout = 3s\n{mm_keys}")
        self.site.write_config({peer.site.name: {"site": peer.site, "dial": dial}}, {},
                               extra=extra)

    def post_as(self, message, root_id="", create_at=None, channel="war-room", user=None):
        body = {"as": user or self.human, "channel_id": self.channel_ids[channel],
                "message": message}
        if root_id:
            body["root_id"] = root_id
        if create_at:
            body["create_at"] = create_at
        out = control(self.emu, "POST", "posts", body)
        assert out and out.get("id"), out
        return out

    def relayed(self):
        """As ChatSite.relayed (current relayed posts of war-room by event id), with a short
        message when an event was replayed twice."""
        out = {}
        for p in self.rows():
            eid = (p.get("props") or {}).get("relay_event_id")
            if eid and not p.get("original_id"):
                if eid in out:
                    self.test.fail(f"two posts for event {eid} ('{p['message']}') at "
                                   f"{self.site.name}: duplicate replay")
                out[eid] = p
        return out

    def rows_of(self, channel):
        return control(self.emu, "GET", f"state/channels/{self.channel_ids[channel]}/posts")[
            "posts"]

    def relayed_in(self, channel):
        """Current posts the relay created in that channel (no archived copies, no deletes)."""
        return [p for p in self.rows_of(channel) if not p.get("original_id")
                and not p.get("delete_at") and (p.get("props") or {}).get("relay_event_id")]

    def mm_status(self, channel):
        """This channel's entry in `relay status --json`'s "mattermost" section, or None."""
        r = self.site.cli("status", "--config", self.site.conf, "--json")
        try:
            st = json.loads(r.stdout)
        except ValueError:
            return None
        for c in ((st.get("mattermost") or {}).get("channels") or []):
            if c.get("name") == channel:
                return c
        return None

    def blocked_metric(self, channel):
        return self.site.metric("relay_mattermost_channel_blocked", None, channel=channel)


class ServerCase(ChatPairCase):
    def mm_pair(self, channels=("war-room",), channel_keys="", start=True):
        eu = MMSite(self, "europe", "alice", channels)
        aws = MMSite(self, "aws", "bob", channels)
        eu.configure(aws, dial=True, channel_keys=channel_keys)
        aws.configure(eu, dial=False, channel_keys=channel_keys)
        if start:
            self.start_pair(eu, aws)
        return eu, aws

    def start_pair(self, eu, aws):
        eu.site.start()
        aws.site.start()
        # "Start at now" begins when the relay first sees the channel; give its first
        # catch-up a moment so that posts made from here on are unambiguously new.
        time.sleep(2)

    def messages_at(self, site, channel="war-room"):
        """Messages of the relayed posts in that channel, in creation order."""
        return [p["message"] for p in site.relayed_in(channel)]

    def assert_messages(self, site, expected, what, channel="war-room"):
        got = self.messages_at(site, channel)
        missing = [m for m in expected if m not in got]
        extra = [m for m in got if m not in expected]
        dups = sorted({m for m in got if got.count(m) > 1})
        summary = (f"{what}: {len(got)} relayed posts at {site.site.name}, expected "
                   f"{len(expected)}; {len(missing)} missing (first {missing[:5]}), "
                   f"{len(extra)} unexpected (first {extra[:5]}), duplicated {dups[:5]}")
        self.assertEqual((missing, extra, dups), ([], [], []), summary)
        self.assertEqual(len(got), len(expected), summary)


# ---------------------------------------------------------------------------------------------
# 1. Channels have history: bridging starts at "now" for a channel never seen before.
# ---------------------------------------------------------------------------------------------

class StartAtNowTest(ServerCase):
    def test_history_does_not_cross_and_later_changes_to_it_do_not_either(self):
        """A channel with 50 posts of history (roots with replies, days old and seconds old) is
        bridged for the first time: none of it, nor a later edit of it or reaction on it,
        reaches the peer; new posts and a new reply do, and a new reply to a history root
        arrives as a top-level post. A restart does not bring history either."""
        eu, aws = self.mm_pair(start=False)
        day = 86400 * 1000
        now = int(time.time() * 1000)
        history, roots = [], []
        for i in range(40):
            # Days old, except the last ten: made seconds before the relay's first start.
            at = now - 3 * day + i * 60000 if i < 30 else None
            p = eu.post_as(f"history {i}", create_at=at)
            history.append(p)
            roots.append(p)
        for i in range(10):
            root = roots[i * 4]
            at = root["create_at"] + 1000 if i < 5 else None
            history.append(eu.post_as(f"history reply {i}", root_id=root["id"], create_at=at))
        self.assertEqual(len(history), 50)
        time.sleep(1.0)
        self.start_pair(eu, aws)

        new_root = eu.say("new root after start")
        eu.say("new reply after start", root_id=new_root["id"])
        eu.edit(roots[3]["id"], "history 3 (edited after start)")
        eu.edit(roots[35]["id"], "history 35 (edited after start)")
        eu.react(roots[5]["id"], "thumbsup")
        eu.react(roots[38]["id"], "eyes")
        eu.say("late reply to a history root", root_id=roots[0]["id"])
        eu.say("marker 1")
        self.wait_post(aws, "marker 1")
        time.sleep(QUIET)
        expected = ["new root after start", "new reply after start",
                    "late reply to a history root", "marker 1"]
        self.assert_messages(aws, expected, "after the first start")
        by_msg = {p["message"]: p for p in aws.relayed_in("war-room")}
        self.assertEqual(by_msg["new reply after start"]["root_id"],
                         by_msg["new root after start"]["id"], "the new reply is not threaded")
        self.assertEqual(by_msg["late reply to a history root"]["root_id"], "",
                         "a reply to a root the peer never got must arrive as a top-level post")
        bot = aws.emu.user("relay-bot").id
        reactions = [r for r in control(aws.emu, "GET", "state/reactions")["reactions"]
                     if r["user_id"] == bot]
        self.assertEqual(reactions, [], "a reaction on a history post crossed")

        # A restart does not re-read history either.
        eu.site.stop()
        eu.site.start()
        time.sleep(2)
        eu.say("marker 2")
        self.wait_post(aws, "marker 2")
        time.sleep(QUIET)
        self.assert_messages(aws, expected + ["marker 2"], "after a restart")


# ---------------------------------------------------------------------------------------------
# 2. Catch-up never skips: past the 1000-row cap, with replies to old threads and edits.
# ---------------------------------------------------------------------------------------------

class CatchUpNeverSkipsTest(ServerCase):
    def bridged_roots(self, eu, aws, n):
        roots = [eu.say(f"old root {i}") for i in range(n)]
        for i in range(n):
            self.wait_post(aws, f"old root {i}")
        return roots

    def check_threads(self, eu, aws, replies):
        """Each reply (message -> origin root message) sits in its root's thread at aws."""
        at = {p["message"]: p for p in aws.relayed_in("war-room")}
        wrong = [m for m, root in replies.items()
                 if at.get(m, {}).get("root_id") != at.get(root, {}).get("id", "?")]
        self.assertEqual(wrong[:5], [], f"{len(wrong)} replies not in their root's thread")

    def test_1200_changes_while_the_relay_is_down(self):
        """Relay europe is stopped; meanwhile its server gets 1,200 changes: 800 new posts,
        300 replies to threads whose roots were bridged before (the roots come back in `posts`,
        not always in `order`) and 100 edits of new posts. After the restart every new post
        and reply is at aws exactly once, replies in their threads, edits applied."""
        eu, aws = self.mm_pair(start=False)
        for i in range(5):
            eu.post_as(f"history {i}")
        time.sleep(1.0)
        self.start_pair(eu, aws)
        roots = self.bridged_roots(eu, aws, 10)
        eu.site.stop()

        expected = [f"old root {i}" for i in range(10)]
        replies = {}
        new_posts = []
        for i in range(1100):
            if i % 11 in (3, 7, 10):       # 300 replies to the old threads
                root = roots[i % 10]
                msg = f"outage reply {i}"
                eu.say(msg, root_id=root["id"])
                replies[msg] = root["message"]
            else:                          # 800 new posts
                msg = f"outage post {i}"
                new_posts.append((eu.say(msg), msg))
            expected.append(msg)
        self.assertEqual(len(replies), 300)
        for k in range(100):               # 100 edits of new posts
            post, msg = new_posts[k * 8]
            eu.edit(post["id"], msg + " (edited)")
            expected[expected.index(msg)] = msg + " (edited)"
        eu.site.start()
        self.wait_for(lambda: len(aws.relayed_in("war-room")) >= len(expected), 120,
                      f"{len(expected)} posts at aws",
                      lambda: f"{len(aws.relayed_in('war-room'))} arrived")
        # Edits may come after the post: wait for the last few to be applied.
        self.wait_for(lambda: sum(m.endswith("(edited)") for m in self.messages_at(aws)) >= 100,
                      30, "the 100 edits at aws",
                      lambda: sum(m.endswith("(edited)") for m in self.messages_at(aws)))
        time.sleep(QUIET)
        self.assert_messages(aws, expected, "after the outage")
        self.check_threads(eu, aws, replies)


# ---------------------------------------------------------------------------------------------
# 3. System posts are stored posts.
# ---------------------------------------------------------------------------------------------

class SystemPostsTest(ServerCase):
    def make_system_posts(self, eu):
        control(eu.emu, "POST", "users", {"username": "carol", "token": "caroltoken",
                                           "join_all": False})
        # system_add_to_channel (alice adds carol), system_join_channel (dave joins himself),
        # system_header_change, system_leave_channel, system_remove_from_channel.
        cid = eu.channel_id
        control(eu.emu, "POST", f"channels/{cid}/members", {"user": "carol", "as": "alice"})
        control(eu.emu, "POST", "users", {"username": "dave", "token": "davetoken",
                                           "join_all": False})
        control(eu.emu, "POST", f"channels/{cid}/members", {"user": "dave", "as": "dave"})
        time.sleep(0.01)
        header = control(eu.emu, "POST", f"channels/{cid}/header",
                         {"header": "incident 42: all hands", "as": "alice"})["post"]
        time.sleep(0.01)
        control(eu.emu, "DELETE", f"channels/{cid}/members/dave?as=dave")
        control(eu.emu, "DELETE", f"channels/{cid}/members/carol?as=alice")
        types = sorted(p["type"] for p in eu.rows() if p["type"])
        self.assertEqual(types, ["system_add_to_channel", "system_header_change",
                                 "system_join_channel", "system_leave_channel",
                                 "system_remove_from_channel"])
        return header

    def test_system_posts_do_not_cross_as_chat(self):
        """Join/add/leave/remove and header-change posts at europe are not replayed at aws."""
        eu, aws = self.mm_pair()
        eu.say("before")
        self.wait_post(aws, "before")
        self.make_system_posts(eu)
        eu.say("after")
        self.wait_post(aws, "after")
        time.sleep(QUIET)
        self.assert_messages(aws, ["before", "after"], "system posts made at europe")

    def test_configured_kinds_cross_as_notices(self):
        """mattermost_system_posts = system_header_change: the header change arrives at aws as
        "[notice] <the origin's system message>"; the other kinds still do not cross."""
        eu, aws = self.mm_pair(channel_keys="mattermost_system_posts = system_header_change\n")
        eu.say("before")
        self.wait_post(aws, "before")
        header = self.make_system_posts(eu)
        self.assertEqual(header["message"],
                         "alice updated the channel header to: incident 42: all hands")
        eu.say("after")
        self.wait_post(aws, "after")
        time.sleep(QUIET)
        notice = "[notice] " + header["message"]
        self.assert_messages(aws, ["before", notice, "after"], "with system_header_change")
        self.assertEqual(self.messages_at(aws), ["before", notice, "after"], "order at aws")


# ---------------------------------------------------------------------------------------------
# 4. Errors at the receiving server are temporary: nothing is dropped.
# ---------------------------------------------------------------------------------------------

class TemporaryErrorsTest(ServerCase):
    BLOCK_S = 6        # the error window lasts at least this long after the 3 posts were made

    def ride_out(self, block, release, status_word, second_channel=True):
        channels = ("war-room", "ops") if second_channel else ("war-room",)
        eu, aws = self.mm_pair(channels=channels)
        eu.say("warm up")
        self.wait_post(aws, "warm up")
        if second_channel:
            eu.post_as("ops warm up", channel="ops")
            self.wait_for(lambda: "ops warm up" in self.messages_at(aws, "ops"), 30,
                          "'ops warm up' at aws")
        block(aws)
        t0 = time.monotonic()
        texts = [f"during the error {i}" for i in range(3)]
        for t in texts:
            eu.say(t)
        if second_channel:
            eu.post_as("ops while war-room is blocked", channel="ops")
        # While blocked: the channel is reported blocked, naming the HTTP status (recorded
        # here, asserted after the delivery check).
        seen = {"status": None, "metric": None}

        def reported():
            seen["status"] = aws.mm_status("war-room") or seen["status"]
            seen["metric"] = aws.blocked_metric("war-room")
            st = seen["status"] or {}
            return st.get("blocked") is True and seen["metric"] == 1
        ok = self.wait_for_quiet(reported, 15)
        blocked_status = dict(seen["status"] or {})
        blocked_metric = seen["metric"]
        ops_during = None
        if second_channel:
            self.wait_for_quiet(lambda: "ops while war-room is blocked"
                                in self.messages_at(aws, "ops"), 15)
            ops_during = "ops while war-room is blocked" in self.messages_at(aws, "ops")
        leftover = self.BLOCK_S - (time.monotonic() - t0)
        if leftover > 0:
            time.sleep(leftover)
        nothing_yet = [m for m in self.messages_at(aws) if m in texts]
        release(aws)
        self.wait_for(lambda: all(t in self.messages_at(aws) for t in texts), 30,
                      "the 3 posts made during the error window at aws",
                      lambda: f"at aws: {self.messages_at(aws)}")
        time.sleep(QUIET)
        self.assert_messages(aws, ["warm up"] + texts, "after the error window")
        self.assertEqual(self.messages_at(aws), ["warm up"] + texts, "order at aws")
        self.assertEqual(nothing_yet, [], "posts were delivered during the error window "
                                          "(the block did not hold)")
        # Reported while it lasted, and cleared after.
        self.assertTrue(ok, f"while blocked: status entry {blocked_status}, "
                            f"relay_mattermost_channel_blocked {blocked_metric}")
        self.assertIn(status_word, blocked_status.get("reason", ""), blocked_status)
        self.wait_for(lambda: (aws.mm_status("war-room") or {}).get("blocked") is False
                      and aws.blocked_metric("war-room") == 0, 15,
                      "war-room no longer blocked in status and /metrics",
                      lambda: (aws.mm_status("war-room"), aws.blocked_metric("war-room")))
        if second_channel:
            self.assertTrue(ops_during, "the ops channel was not delivered while war-room "
                                        "was blocked")
            self.assertEqual((aws.mm_status("ops") or {}).get("blocked"), False)

    def wait_for_quiet(self, pred, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if pred():
                    return True
            except Exception:
                pass
            time.sleep(0.3)
        return False

    def test_401_token_revoked_then_restored(self):
        """The bot's token at aws is revoked for a while (every request 401): the 3 posts made
        at europe meanwhile arrive once it is restored, in order, once each."""
        self.ride_out(
            lambda aws: control(aws.emu, "DELETE", f"tokens/{BOT_TOKEN}"),
            lambda aws: control(aws.emu, "POST", "tokens",
                                {"user": "relay-bot", "token": BOT_TOKEN}),
            "401", second_channel=False)

    def test_403_bot_removed_from_the_channel_then_added_back(self):
        """The bot is removed from aws's war-room (its creates there are 403) and added back
        later; ops keeps flowing meanwhile."""
        self.ride_out(
            lambda aws: control(aws.emu, "DELETE",
                                f"channels/{aws.channel_id}/members/relay-bot?as=bob"),
            lambda aws: control(aws.emu, "POST", f"channels/{aws.channel_id}/members",
                                {"user": "relay-bot", "as": "bob"}),
            "403")

    def test_400_channel_archived_then_restored(self):
        """aws's war-room is archived (creates: 400 api.post.create_post.can_not_post_to_deleted)
        and restored later; ops keeps flowing meanwhile."""
        self.ride_out(
            lambda aws: control(aws.emu, "POST", f"channels/{aws.channel_id}/archive",
                                {"as": "bob"}),
            lambda aws: control(aws.emu, "POST", f"channels/{aws.channel_id}/unarchive",
                                {"as": "bob"}),
            "400")


# ---------------------------------------------------------------------------------------------
# 5. Exactly once with clocks off, lost answers, and a second node.
# ---------------------------------------------------------------------------------------------

class ExactlyOnceTest(ServerCase):
    def copies(self, aws, message):
        return [p for p in aws.rows() if p["message"] == message
                and not p.get("original_id") and not p.get("delete_at")]

    def drop_one_answer(self, eu, aws, message):
        """aws's server carries out the next create, then drops the connection unanswered."""
        control(aws.emu, "POST", "faults", {"kind": "drop", "process": True, "count": 1,
                                             "method": "POST", "path_prefix": "/api/v4/posts"})
        eu.say(message)

    def lost_across_a_restart(self, eu, aws, message):
        """Every answer to creates at aws is lost (503 after the work) until aws's relay is
        killed; 31 s pass on the servers' clocks (the pending_post_id window is over) before
        it restarts: only its look-up by relay_event_id can find the post."""
        control(aws.emu, "POST", "faults", {"kind": "status", "status": 503, "process": True,
                                             "count": 1000, "method": "POST",
                                             "path_prefix": "/api/v4/posts"})
        eu.say(message)
        self.wait_for(lambda: self.copies(aws, message), 30, f"'{message}' on aws's server")
        aws.site.kill9()
        control(aws.emu, "DELETE", "faults")
        for s in (eu, aws):
            control(s.emu, "POST", "clock", {"advance_ms": 31000})
        aws.site.start()

    def clocks_off(self, offset_ms):
        eu, aws = self.mm_pair(start=False)
        for s in (eu, aws):
            control(s.emu, "POST", "clock", {"offset_ms": offset_ms})
        # History by the servers' clocks: made just before the first start.
        for i in range(3):
            eu.post_as(f"history {i}")
        time.sleep(1.0)
        self.start_pair(eu, aws)
        eu.say("first after start")
        self.wait_post(aws, "first after start", timeout=20)
        self.drop_one_answer(eu, aws, "answer lost once")
        # Delivery is in order: once this one is there, the lost answer has been dealt with.
        eu.say("after the lost answer")
        self.wait_post(aws, "after the lost answer", timeout=30)
        self.lost_across_a_restart(eu, aws, "answer lost until a restart")
        eu.say("last")
        self.wait_post(aws, "last", timeout=45)
        time.sleep(QUIET)
        where = f"(servers' clocks {offset_ms:+d} ms from the relays')"
        for m in ("answer lost once", "answer lost until a restart"):
            n = len(self.copies(aws, m))
            self.assertEqual(n, 1, f"{n} copies of '{m}' on aws {where}")
        self.assert_messages(aws, ["first after start", "answer lost once",
                                   "after the lost answer", "answer lost until a restart",
                                   "last"], where)

    def test_server_clocks_5_minutes_behind(self):
        """The servers' clocks are 5 minutes behind the relay hosts': history (by server time)
        stays out, the first post after start crosses, and creates whose answers are lost (once;
        and until a restart past the pending_post_id window) give exactly one post each."""
        self.clocks_off(-300000)

    def test_server_clocks_5_minutes_ahead(self):
        """The same with the servers' clocks 5 minutes ahead of the relay hosts'."""
        self.clocks_off(300000)

    def test_lost_answer_retried_on_another_node(self):
        """aws's servers have no shared pending_post_id cache (no Redis, two nodes): the retry
        of a create whose answer was lost lands on the other node and is not de-duplicated
        there; still exactly one post."""
        eu, aws = self.mm_pair(start=False)
        aws.emu.set_config(pending_post_id_shared=False, cluster_nodes=2)
        self.start_pair(eu, aws)
        eu.say("warm up")
        self.wait_post(aws, "warm up")
        self.drop_one_answer(eu, aws, "exactly once please")
        eu.say("and the next one")
        self.wait_for(lambda: self.copies(aws, "and the next one"), 45,
                      "'and the next one' on aws's server",
                      lambda: [p["message"] for p in aws.rows()])
        time.sleep(QUIET)
        n = len(self.copies(aws, "exactly once please"))
        self.assertEqual(n, 1, f"{n} copies of the post on aws (pending_post_id cache per node)")
        self.assert_messages(aws, ["warm up", "exactly once please", "and the next one"],
                             "after the lost answer")
