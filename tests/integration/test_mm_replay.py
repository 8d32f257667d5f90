"""Replay into a real server's limits (issue 11, item 5): a message longer than the server
takes (16383 code points) is split into consecutive posts in one thread, marked "(1/3)" etc.;
edits and deletes of a split post change every part; nothing is truncated."""

from test_mattermost import ChatPairCase, control

LIMIT = 16383  # model.PostMessageMaxRunesV2: the emulator refuses more, as the server does


def long_text(words, tag):
    # Multi-byte code points on purpose: the limit counts runes, not bytes.
    return " ".join(f"{tag}{i}-é€𝄞" for i in range(words))


def strip_marker(message):
    assert message.startswith("("), message[:20]
    return message.split(") ", 1)[1]


class SplitTest(ChatPairCase):
    def parts_of(self, chat, event_id):
        """The live posts carrying event `event_id`, in part order."""
        out = {}
        for p in chat.live():
            eid = (p.get("props") or {}).get("relay_event_id", "")
            if eid == event_id:
                out[1] = p
            elif eid.startswith(event_id + "#"):
                out[int(eid.split("#")[1])] = p
        return [out[k] for k in sorted(out)]

    def test_long_message_is_split_in_a_thread_and_edits_and_deletes_follow(self):
        eu, aws = self.chat_pair()
        text = long_text(4000, "w")  # about 40,000 code points: three parts
        self.assertGreater(len(text), 2 * LIMIT)
        status, body = eu.site.post({"channel": "war-room", "author": "carol", "text": text})
        self.assertEqual(status, 202, body)
        eid = body["id"]
        self.wait_for(lambda: len(self.parts_of(aws, eid)) == 3, 60, "three parts on aws",
                      lambda: [p["message"][:12] for p in self.parts_of(aws, eid)])
        parts = self.parts_of(aws, eid)
        self.assertEqual([p["message"][:6] for p in parts], ["(1/3) ", "(2/3) ", "(3/3) "])
        for p in parts:
            self.assertLessEqual(len(p["message"]), LIMIT)
        # Nothing lost or changed: the parts put back together are the text.
        self.assertEqual("".join(strip_marker(p["message"]) for p in parts), text)
        # One thread: the first part is its root, the others reply to it.
        self.assertEqual(parts[0]["root_id"], "")
        self.assertEqual({p["root_id"] for p in parts[1:]}, {parts[0]["id"]})

        # An edit to two parts patches two and deletes the third.
        shorter = long_text(2500, "v")
        status, body = eu.site.post({"channel": "war-room", "author": "carol", "kind": "edit",
                                     "ref": eid, "text": shorter})
        self.assertEqual(status, 202, body)
        self.wait_for(lambda: [p["message"][:6] for p in self.parts_of(aws, eid)]
                      == ["(1/2) ", "(2/2) "], 60, "the edit in two parts",
                      lambda: [p["message"][:12] for p in self.parts_of(aws, eid)])
        parts = self.parts_of(aws, eid)
        self.assertEqual("".join(strip_marker(p["message"]) for p in parts), shorter)
        # An edit that fits in one post: one post, no marker.
        status, body = eu.site.post({"channel": "war-room", "author": "carol", "kind": "edit",
                                     "ref": eid, "text": "short now"})
        self.assertEqual(status, 202, body)
        self.wait_for(lambda: [p["message"] for p in self.parts_of(aws, eid)] == ["short now"],
                      60, "the edit in one post",
                      lambda: [p["message"][:12] for p in self.parts_of(aws, eid)])
        # And back to three: the new parts go in the post's thread.
        status, body = eu.site.post({"channel": "war-room", "author": "carol", "kind": "edit",
                                     "ref": eid, "text": text})
        self.assertEqual(status, 202, body)
        self.wait_for(lambda: len(self.parts_of(aws, eid)) == 3, 60, "three parts again")
        parts = self.parts_of(aws, eid)
        self.assertEqual("".join(strip_marker(p["message"]) for p in parts), text)
        self.assertEqual({p["root_id"] for p in parts[1:]}, {parts[0]["id"]})

        # A delete removes every part.
        status, body = eu.site.post({"channel": "war-room", "author": "carol", "kind": "delete",
                                     "ref": eid, "text": ""})
        self.assertEqual(status, 202, body)
        self.wait_for(lambda: self.parts_of(aws, eid) == [], 60, "every part deleted")
        self.assert_no_skips(aws)

    def test_a_long_reply_stays_in_its_thread(self):
        eu, aws = self.chat_pair()
        eu.say("the root")
        remote_root = self.wait_post(aws, "the root")
        root_eid = remote_root["props"]["relay_event_id"]
        text = long_text(2500, "r")
        status, body = eu.site.post({"channel": "war-room", "author": "carol", "text": text,
                                     "thread": root_eid})
        self.assertEqual(status, 202, body)
        eid = body["id"]
        self.wait_for(lambda: len(self.parts_of(aws, eid)) == 2, 60, "two parts on aws")
        parts = self.parts_of(aws, eid)
        self.assertEqual({p["root_id"] for p in parts}, {remote_root["id"]})
        self.assertEqual("".join(strip_marker(p["message"]) for p in parts), text)

    def test_a_short_reply_edited_long_grows_in_its_thread_through_a_hold(self):
        """A reply that fitted in one post is edited to two parts while aws's server fails
        every new create for a while (the channel is held): the new part appears once the
        hold ends, in the reply's thread (never as a reply to a reply)."""
        eu, aws = self.chat_pair()
        eu.say("the root")
        remote_root = self.wait_post(aws, "the root")
        root_eid = remote_root["props"]["relay_event_id"]
        status, body = eu.site.post({"channel": "war-room", "author": "carol", "text": "short",
                                     "thread": root_eid})
        self.assertEqual(status, 202, body)
        eid = body["id"]
        self.wait_for(lambda: len(self.parts_of(aws, eid)) == 1, 60, "the short reply on aws")
        control(aws.emu, "POST", "faults", {"kind": "status", "status": 503, "count": 6,
                                             "method": "POST", "path_regex": "^/api/v4/posts$"})
        text = long_text(2500, "g")
        status, body = eu.site.post({"channel": "war-room", "author": "carol", "kind": "edit",
                                     "ref": eid, "text": text})
        self.assertEqual(status, 202, body)
        self.wait_for(lambda: len(self.parts_of(aws, eid)) == 2, 90, "the edit in two parts",
                      lambda: [p["message"][:12] for p in self.parts_of(aws, eid)])
        parts = self.parts_of(aws, eid)
        self.assertEqual({p["root_id"] for p in parts}, {remote_root["id"]})
        self.assertEqual("".join(strip_marker(p["message"]) for p in parts), text)
        self.assert_no_skips(aws)

    def assert_no_skips(self, chat):
        self.assertEqual(chat.site.metric("relay_mattermost_replay_failures_total"), 0,
                         chat.site.log_tail())
