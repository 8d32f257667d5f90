"""A channel's history and `relay backfill` (issue 11, item 1).

A channel relay has never seen starts bridging when it is first seen; its history crosses only
when an operator asks with `relay backfill`, exactly once, threads kept, resumable after a kill.
"""

import time

from relay_harness import run_cli
from test_mattermost import ChatPairCase


def make_history(chat, count, every_reply=10, start_ms=None):
    """`count` posts made in `chat`'s channel before any relay ran, oldest first, one ms apart
    (the last a minute ago); every `every_reply`-th is a reply to the root before it. Returns
    the texts in creation order and {reply text: root text}."""
    st = chat.emu.state
    human = st.find_user(chat.human)
    now = int(time.time() * 1000)
    first = start_ms if start_ms is not None else now - 60000 - count
    texts, parent_of = [], {}
    root = None
    for i in range(count):
        body = {"channel_id": chat.channel_id, "message": f"history {i}", "create_at": first + i}
        if root is not None and i % every_reply == every_reply - 1:
            body["root_id"] = root["id"]
            parent_of[body["message"]] = root["message"]
        _, post = st.create_post(human, body, allow_create_at=True)
        if "root_id" not in body:
            root = post
        texts.append(body["message"])
    return texts, parent_of


class BackfillTest(ChatPairCase):
    def relayed_texts(self, chat):
        return sorted(p["message"] for p in chat.relayed().values())

    def backfill(self, chat, *args, timeout=300):
        return run_cli(["backfill", "--config", chat.site.conf, "--channel", "war-room", *args],
                       timeout=timeout)

    def test_history_crosses_only_when_asked_once_with_its_threads(self):
        """10,000 posts of history (every tenth a reply): none crosses when the relays start; a
        new post does. `relay backfill` then carries all of them once, replies in their threads,
        and a second backfill carries nothing."""
        eu = self.make_pair_with_history(10000)
        texts, parent_of = self.history
        eu.say("live after start")
        self.wait_post(self.aws, "live after start")
        time.sleep(3)  # more than a poll interval and the overlap: a re-post would show by now
        self.assertEqual(self.relayed_texts(self.aws), ["live after start"],
                         "history crossed before it was asked for")

        t0 = time.monotonic()
        r = self.backfill(eu)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stdout, r"done: 10000 posts carried")
        want = sorted(texts + ["live after start"])
        self.wait_for(lambda: len(self.aws.relayed()) >= len(want), 300,
                      "the backfilled history on aws's server",
                      lambda: len(self.aws.relayed()))
        elapsed = time.monotonic() - t0
        print(f"[backfill of 10000 posts: CLI {r.stdout.strip().splitlines()[-1]!r}; on the peer's "
              f"server after {elapsed:.1f}s ({10000 / elapsed:.0f} posts/s end to end)]",
              end=" ", flush=True)
        relayed = self.aws.relayed()  # asserts one post per event
        self.assertEqual(sorted(p["message"] for p in relayed.values()), want)
        # Threads kept: each reply is in the thread of its root's copy.
        by_text = {p["message"]: p for p in relayed.values()}
        for reply, root in parent_of.items():
            self.assertEqual(by_text[reply]["root_id"], by_text[root]["id"],
                             f"'{reply}' is not in the thread of '{root}'")
        # Created at the peer in the order of the origin (create_at never goes back; within one
        # millisecond the server's order is not visible).
        stamps = [by_text[t]["create_at"] for t in texts]
        back = [texts[i + 1] for i in range(len(stamps) - 1) if stamps[i + 1] < stamps[i]]
        self.assertEqual(back, [], "posts created at the peer before the ones made before them")

        r = self.backfill(eu)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stdout, r"done: 10000 posts carried \(0 changes")
        time.sleep(3)
        self.assertEqual(len(self.aws.relayed()), len(want), "a second backfill re-posted")

    def test_since_and_a_kill_during_the_backfill(self):
        """`--since` limits the history carried; a daemon SIGKILLed during the backfill resumes
        it at start, and every post arrives exactly once."""
        eu = self.make_pair_with_history(3000, start_ms=1_700_000_000_000)
        texts, _ = self.history
        # history i was created at 1_700_000_000_000 + i: --since the 1000th post's time.
        since = "2023-11-14T22:13:21Z"  # 1_700_000_001_000
        r = self.backfill(eu, "--since", since, "--no-wait")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.wait_for(lambda: len(self.aws.relayed()) >= 200, 120, "the backfill under way",
                      lambda: len(self.aws.relayed()))
        eu.site.kill9()
        self.assertLess(len(self.aws.relayed()), 2000, "the backfill was over before the kill")
        eu.site.start()
        want = sorted(texts[1000:])
        self.wait_for(lambda: len(self.aws.relayed()) >= len(want), 300,
                      "the rest of the backfill after the restart",
                      lambda: len(self.aws.relayed()))
        time.sleep(3)
        self.assertEqual(self.relayed_texts(self.aws), want)
        self.assertRegex(eu.site.log_text(), r"mattermost backfill: channel 'war-room': done")

    def test_bad_requests_are_refused_by_name(self):
        eu = self.make_pair_with_history(1)
        r = run_cli(["backfill", "--config", eu.site.conf, "--channel", "nope"])
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("channel 'nope' is not a channel with sink = mattermost", r.stderr)
        r = self.backfill(eu, "--since", "last tuesday")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn('--since "last tuesday": expected a date', r.stderr)
        self.assertEqual(self.relayed_texts(self.aws), [])

    def make_pair_with_history(self, count, **kw):
        from test_mattermost import ChatSite
        eu = ChatSite(self, "europe", "alice")
        aws = ChatSite(self, "aws", "bob")
        self.history = make_history(eu, count, **kw)
        eu.configure(aws, dial=True)
        aws.configure(eu, dial=False)
        eu.site.start()
        aws.site.start()
        self.aws = aws
        return eu
