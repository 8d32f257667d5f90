"""In-memory Mattermost server state and the REST semantics that act on it.

Everything here mirrors what the real server does (Mattermost 10.x, server/channels/{api4,app,
store/sqlstore} and server/public/model); comments name the real function a rule comes from.
The HTTP layer (emulator.py) decodes requests and calls the `State` methods, which return
(status, body) pairs or raise `ApiError`; WebSocket events are handed to `State.publish`, which
the emulator points at its hub.

Thread-safety: one re-entrant lock (`State.lock`) guards all state. Every public method takes it,
so a mutation and the WebSocket events it publishes are ordered identically for every client.
"""
import base64
import bisect
import copy
import mimetypes
import random
import re
import struct
import threading
import time

import gojson
from gojson import Struct

# ---------------------------------------------------------------------------------------------
# Ids, errors, configuration
# ---------------------------------------------------------------------------------------------

_STD_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_MM_B32 = "ybndrfg8ejkmcpqxot1uwisza345h769"  # model.NewId's alphabet (a subset of [a-z0-9])
_B32_TABLE = str.maketrans(_STD_B32, _MM_B32)


def new_id(rng):
    """model.NewId(): 16 random bytes, base32 with Mattermost's alphabet, 26 characters."""
    raw = rng.getrandbits(128).to_bytes(16, "big")
    return base64.b32encode(raw).decode("ascii").translate(_B32_TABLE)[:26]


def is_valid_id(value):
    """model.IsValidId: exactly 26 letters or digits."""
    return isinstance(value, str) and len(value) == 26 and value.isalnum()


MESSAGES = {
    "api.context.404.app_error": "Sorry, we could not find the page.",
    "api.context.session_expired.app_error": "Invalid or expired session, please login again.",
    "api.context.token_provided.app_error": "Session is not OAuth but token was provided in the "
                                            "query string.",
    "api.context.request_body_too_large.app_error": "The request body is too large.",
    "api.context.permissions.app_error": "You do not have the appropriate permissions.",
    "api.context.invalid_body_param.app_error": "Invalid or missing {Name} in request body.",
    "api.context.invalid_param.app_error": "Invalid {Name} parameter.",
    "api.context.invalid_url_param.app_error":
        "Invalid or missing {Name} parameter in request URL.",
    "api.post.create_post.root_id.app_error": "Invalid RootId parameter.",
    "api.post.create_post.channel_root_id.app_error": "Invalid ChannelId for RootId parameter.",
    "api.post.create_post.can_not_post_to_deleted.error": "Can not post to deleted channel.",
    "api.post.deduplicate_create_post.pending": "Rejected post since another client is making "
                                                "the same request.",
    "api.post.update_post.permissions_time_limit.app_error":
        "Post edit is only allowed for {timeLimit} seconds. Please ask your System Administrator "
        "for details.",
    "api.post.update_post.system_message.app_error": "Unable to update system message.",
    "api.post.update_post.permissions_details.app_error": "Already deleted id={id}.",
    "api.post.patch_post.can_not_update_post_in_deleted.error": "Can not update a post in a "
                                                                 "deleted channel.",
    "api.post.delete_post.can_not_delete_post_in_deleted.error": "Can not delete a post in a "
                                                                  "deleted channel.",
    "app.post.get.app_error": "Unable to get post.",
    "app.post.save.existing.app_error": "You cannot update an existing Post.",
    "app.channel.get.existing.app_error": "Unable to find the existing channel.",
    "app.user.missing_account.const": "Unable to find the user.",
    "model.post.is_valid.file_ids.app_error": "Invalid file ids.",
    "model.post.is_valid.message_length.app_error": "Post Message property is longer than the "
                                                    "maximum permitted length.",
    "model.post.is_valid.props.app_error": "Invalid props.",
    "model.post.is_valid.type.app_error": "Invalid type.",
    "api.reaction.save_reaction.invalid.app_error": "Reaction is not valid.",
    "api.reaction.save_reaction.user_id.app_error": "You cannot save reaction for the other user.",
    "model.reaction.is_valid.emoji_name.app_error": "Invalid emoji name.",
    "app.emoji.get_by_name.no_result": "Unable to find the emoji.",
    "app.reaction.save.save.too_many_reactions": "Reaction limit has been reached for this post. "
                                                 "Contact your System Administrator.",
    "api.reaction.save.archived_channel.app_error": "You cannot react in an archived channel.",
    "api.reaction.delete.archived_channel.app_error": "You cannot remove a reaction in an "
                                                      "archived channel.",
    "api.file.attachments.disabled.app_error": "File attachments have been disabled on this "
                                               "server.",
    "api.file.upload_file.read_request.app_error": "Unable to upload file(s). Error reading or "
                                                   "parsing request data.",
    "api.file.upload_file.incorrect_number_of_client_ids.app_error":
        "Unable to upload file(s). Have {NumClientIds} client_ids for {NumFiles} files.",
    "api.file.upload_file.multiple_channel_ids.app_error": "Unable to upload file(s). Multiple "
                                                           "conflicting channel_ids.",
    "api.file.upload_file.too_large_detailed.app_error": "Unable to upload file {Filename}. "
                                                         "{Length} bytes exceeds the maximum "
                                                         "allowed {Limit} bytes.",
    "app.file_info.get.app_error": "Unable to get the file info.",
    "web.incoming_webhook.disabled.app_error": "Incoming webhooks have been disabled by the "
                                               "system admin.",
    "web.incoming_webhook.invalid.app_error": "Invalid webhook.",
    "web.incoming_webhook.text.app_error": "No text specified.",
    "web.incoming_webhook.parse.app_error": "Unable to parse incoming data.",
    "web.incoming_webhook.channel.app_error": "Couldn't find the channel.",
    "api.web_socket.connect.upgrade.app_error": "Failed to upgrade websocket connection.",
    "api.user.get_user.not_found": "Unable to find the user.",
    "app.team.get.find.app_error": "Unable to find the existing team.",
    "emulator.fault.injected": "Fault injected by the emulator's control API.",
}


class ApiError(Exception):
    """A model.AppError: rendered as {id, message, detailed_error, request_id, status_code}."""

    def __init__(self, status, err_id, params=None, detailed=""):
        super().__init__(err_id)
        self.status = status
        self.err_id = err_id
        self.params = params or {}
        self.detailed = detailed

    @property
    def message(self):
        template = MESSAGES.get(self.err_id, self.err_id)
        try:
            return template.format(**self.params)
        except (KeyError, IndexError):
            return template

    def body(self, request_id):
        # model.AppError: request_id and status_code are omitempty; detailed_error is not.
        s = Struct(id=self.err_id, message=self.message, detailed_error=self.detailed)
        if request_id:
            s["request_id"] = request_id
        if self.status:
            s["status_code"] = self.status
        return s


def invalid_body(name, detailed=""):
    return ApiError(400, "api.context.invalid_body_param.app_error", {"Name": name}, detailed)


def invalid_url(name):
    return ApiError(400, "api.context.invalid_url_param.app_error", {"Name": name})


def forbidden(detailed=""):
    return ApiError(403, "api.context.permissions.app_error", {}, detailed)


DEFAULT_CONFIG = {
    # RateLimitSettings (off by default, as in a fresh Mattermost).
    "rate_limit": {"enabled": False, "per_sec": 10, "max_burst": 100},
    # FileSettings
    "enable_file_attachments": True,
    "max_file_size": 100 * 1024 * 1024,
    # The OpenAPI file says 5 files per post; the server's own check (PostFileidsMaxRunes = 300
    # runes of JSON) allows about 10. The emulator enforces this stricter, documented limit.
    "max_files_per_post": 5,
    # ServiceSettings
    "max_post_size": 16383,                 # model.PostMessageMaxRunesV2
    "post_edit_time_limit": -1,             # seconds; -1 = unlimited (the default)
    "enable_post_username_override": False,
    "enable_post_icon_override": False,
    "enable_incoming_webhooks": True,
    "unique_emoji_reaction_limit_per_post": 50,
    # Mattermost 11 re-adds from_bot/from_webhook/from_oauth_app/from_plugin/silent_notification
    # after a patch replaced props (PreserveIdentityPropsFrom); 10.x replaces the map verbatim.
    "preserve_identity_props_on_patch": False,
    # None accepts every name that matches the emoji regex; a list makes other names 404 like an
    # unknown custom emoji (app.emoji.get_by_name.no_result).
    "emoji_allowlist": None,
    # PreparePostForClient blanks `message` (and metadata) of posts with delete_at > 0.
    "blank_deleted_messages": True,
    "pending_post_id_ttl_ms": 30000,        # app.pendingPostIDsCacheTTL
    # The pending_post_id cache (app.seenPendingPostIdsCache) is shared by the cluster only when
    # it uses Redis as its cache; otherwise each node has its own. False: creates are spread
    # round-robin over `cluster_nodes` nodes, each with its own cache, so a retried create that
    # lands on another node is not de-duplicated.
    "pending_post_id_shared": True,
    "cluster_nodes": 2,
    # How long saving a created post takes (the store's INSERT). The pending_post_id is claimed
    # before it, so a repeat meanwhile is answered 500 api.post.deduplicate_create_post.pending;
    # other requests are served meanwhile. 0: the save is instant.
    "create_post_save_ms": 0,
    # Catch-up: GET /channels/{id}/posts?since=
    "since_limit": 1000,
    "since_seed": None,                      # seed of the "arbitrary subset" past since_limit
    # The real server silently ignores page/per_page/before/after when since > 0. "reject"
    # (default) answers 400 so that an adapter never relies on them; "ignore" is the real thing.
    "since_combined_params": "reject",
    # Reads (GET) see the state as of replica_lag_ms ago.
    "replica_lag_ms": 0,
    # WebSocket (server/channels/app/platform/web_conn.go)
    "ws_ping_interval_ms": 60000,
    "ws_pong_wait_ms": 100000,
    "ws_auth_timeout_ms": 5000,
    "ws_resume_window_ms": 5 * 60 * 1000,
    "ws_dead_queue_size": 128,
    "ws_send_queue_size": 256,
    "ws_max_message_bytes": 8 * 1024,       # model.SocketMaxMessageSizeKb
    "server_version": "10.11.0",
    # ServiceSettings.EnableDeveloper: off wipes detailed_error from every error body.
    "enable_developer": False,
    # ServiceSettings.MaximumPayloadSizeBytes (non-file API bodies; larger -> 413).
    "max_payload_bytes": 300000,
    # web.Handler: a token in ?access_token= is refused (401 api.context.token_provided.app_error)
    # unless its session is an OAuth session. False accepts every token there.
    "query_token_oauth_only": True,
}


def merge_config(base, changes):
    """Apply a partial config. Unknown keys are an error naming the key."""
    out = copy.deepcopy(base)
    for key, value in (changes or {}).items():
        if key not in DEFAULT_CONFIG:
            raise KeyError("unknown config key %r" % key)
        if key == "rate_limit":
            if not isinstance(value, dict):
                raise ValueError("rate_limit must be an object")
            for k in value:
                if k not in DEFAULT_CONFIG["rate_limit"]:
                    raise KeyError("unknown rate_limit key %r" % k)
            out["rate_limit"].update(value)
        else:
            out[key] = value
    if out["since_combined_params"] not in ("reject", "ignore"):
        raise ValueError("since_combined_params must be 'reject' or 'ignore'")
    return out


# ---------------------------------------------------------------------------------------------
# Small model helpers
# ---------------------------------------------------------------------------------------------

# model.ParseHashtags (\pL approximated by [^\W\d_]).
_PUNC_START = re.compile(r"^[^\w\s#]+|^_+")
_PUNC_END = re.compile(r"[^\w\s]+$|_+$")
_HASHTAG_START = re.compile(r"^#{2,}")
_VALID_HASHTAG = re.compile(r"^#[^\W\d_][\w\-.]*[^\W_]$")


def parse_hashtags(text):
    tags = []
    for word in text.split():
        word = _PUNC_START.sub("", word)
        word = _PUNC_END.sub("", word)
        word = _HASHTAG_START.sub("#", word)
        if _VALID_HASHTAG.match(word):
            tags.append(word)
    out = " ".join(tags)
    if len(out) > 1000:
        out = out[:999]
        cut = out.rfind(" ")
        out = out[:cut] if cut > 0 else ""
    return out


EMOJI_NAME_RE = re.compile(r"^[a-zA-Z0-9\-\+_]+$")     # model.Reaction.IsValid
EMOJI_PATH_RE = r"[A-Za-z0-9_\-+]+"                     # route of DELETE .../reactions/{name}

_VALID_TYPES = {
    "", "slack_attachment", "system_generic", "system_join_leave", "system_join_channel",
    "system_guest_join_channel", "system_leave_channel", "system_join_team", "system_leave_team",
    "system_auto_responder", "system_add_remove", "system_add_to_channel",
    "system_add_guest_to_chan", "system_remove_from_channel", "system_move_channel",
    "system_add_to_team", "system_remove_from_team", "system_header_change",
    "system_displayname_change", "system_convert_channel", "system_purpose_change",
    "system_channel_deleted", "system_channel_restored", "system_ephemeral",
    "system_change_chan_privacy", "system_wrangler", "system_gm_to_channel",
    "add_bot_teams_channels", "me", "reminder",
}

# Go's mime.TypeByExtension built-in table (takes precedence over /etc/mime.types).
_GO_MIME = {
    ".avif": "image/avif", ".css": "text/css; charset=utf-8", ".gif": "image/gif",
    ".htm": "text/html; charset=utf-8", ".html": "text/html; charset=utf-8",
    ".jpeg": "image/jpeg", ".jpg": "image/jpeg", ".js": "text/javascript; charset=utf-8",
    ".json": "application/json", ".mjs": "text/javascript; charset=utf-8",
    ".pdf": "application/pdf", ".png": "image/png", ".svg": "image/svg+xml",
    ".wasm": "application/wasm", ".webp": "image/webp",
    ".xml": "text/xml; charset=utf-8", ".txt": "text/plain; charset=utf-8",
}

# web.WriteFileResponse serves these inline, everything else as an attachment.
MEDIA_TYPES = {"image/jpeg", "image/png", "image/bmp", "image/gif", "image/tiff", "video/avi",
               "video/mpeg", "video/mp4", "audio/mpeg", "audio/wav"}


def mime_for(extension):
    ext = "." + extension.lower() if extension else ""
    if not ext:
        return ""
    if ext in _GO_MIME:
        return _GO_MIME[ext]
    guess = mimetypes.types_map.get(ext)
    return guess or ""


def image_size(data, mime):
    """(width, height) of PNG, GIF and JPEG images, else (0, 0)."""
    try:
        if mime == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if mime == "image/gif" and data[:4] == b"GIF8":
            return struct.unpack("<HH", data[6:10])
        if mime == "image/jpeg" and data[:2] == b"\xff\xd8":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    i += 1
                    continue
                marker = data[i + 1]
                seglen = struct.unpack(">H", data[i + 2:i + 4])[0]
                if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                              0xCE, 0xCF):
                    h, w = struct.unpack(">HH", data[i + 5:i + 9])
                    return (w, h)
                i += 2 + seglen
    except struct.error:
        pass
    return (0, 0)


def _want(body, key, kinds, name):
    """Type check one field the way Go's decoder would reject it."""
    if key not in body or body[key] is None:
        return
    value = body[key]
    ok = False
    for kind in kinds:
        if kind is int:
            ok = ok or (isinstance(value, int) and not isinstance(value, bool))
        elif kind is bool:
            ok = ok or isinstance(value, bool)
        else:
            ok = ok or isinstance(value, kind)
    if not ok:
        raise invalid_body(name, "json: cannot unmarshal %s into Go struct field %s of %s"
                           % (type(value).__name__, key, name))


def check_post_body(body, name="post"):
    if not isinstance(body, dict):
        raise invalid_body(name, "json: cannot unmarshal non-object into Go value of type "
                           "model.Post")
    for key in ("id", "user_id", "channel_id", "root_id", "original_id", "message", "type",
                "hashtags", "pending_post_id", "message_source", "remote_id"):
        _want(body, key, (str,), name)
    for key in ("create_at", "update_at", "edit_at", "delete_at", "reply_count", "last_reply_at"):
        _want(body, key, (int,), name)
    for key in ("is_pinned", "has_reactions"):
        _want(body, key, (bool,), name)
    _want(body, "file_ids", (list,), name)
    _want(body, "metadata", (dict,), name)
    _want(body, "participants", (list,), name)
    if isinstance(body.get("file_ids"), list) and not all(isinstance(x, str)
                                                          for x in body["file_ids"]):
        raise invalid_body(name, "json: cannot unmarshal file_ids")
    try:
        return gojson.decode_props(body.get("props"))
    except gojson.DecodeError as e:
        raise invalid_body(name, str(e))


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------

class User:
    def __init__(self, uid, username, is_admin=False, is_bot=False, create_at=0):
        self.id = uid
        self.username = username
        self.is_admin = is_admin
        self.is_bot = is_bot
        self.create_at = create_at

    def to_struct(self):
        roles = "system_admin system_user" if self.is_admin else "system_user"
        s = Struct(id=self.id, create_at=self.create_at, update_at=self.create_at, delete_at=0,
                   username=self.username, auth_data="", auth_service="",
                   email="%s@example.com" % self.username, email_verified=True, nickname="",
                   first_name="", last_name="", position="", roles=roles,
                   last_password_update=self.create_at, locale="en",
                   timezone={"automaticTimezone": "", "manualTimezone": "",
                             "useAutomaticTimezone": "true"})
        if self.is_bot:
            s["is_bot"] = True
        s["disable_welcome_email"] = False
        return s


class State:
    def __init__(self, seed=None, config=None):
        self.lock = threading.RLock()
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = merge_config(DEFAULT_CONFIG, config or {})
        self._since_rng = random.Random(self._since_seed())
        self.clock_offset_ms = 0
        self.publish = lambda event: None   # set by the emulator to its WebSocket hub
        self.users = {}          # id -> User
        self.tokens = {}         # token -> user id
        self.oauth_tokens = set()  # tokens whose session is an OAuth session
        self.teams = {}          # id -> dict
        self.channels = {}       # id -> dict
        self.members = {}        # channel id -> set of user ids
        self.hooks = {}          # incoming webhook id -> dict
        self._reset_content()
        self.default_team = self.create_team("main", "Main")

    def _reset_content(self):
        self.posts = {}          # id -> row (dict); rows carry "_reactions" (active reactions)
        self.channel_posts = {}  # channel id -> [post ids] in insertion order
        self.versions = {}       # id -> [(t_ms, snapshot or None)] for the replica-lag view
        self.reactions = {}      # (post_id, user_id, emoji) -> reaction dict (incl. deleted)
        self.files = {}          # id -> {"info": dict, "data": bytes}
        self.pending_ids = {}    # pending_post_id -> (post id or "", expires_at_ms)
        # Without a shared cache (pending_post_id_shared false) node n > 0 has its own;
        # node 0's is self.pending_ids.
        self.node_pending_ids = {}
        self._next_node = 0

    def reset(self, everything=False):
        with self.lock:
            self._reset_content()
            if everything:
                self.users.clear()
                self.tokens.clear()
                self.oauth_tokens.clear()
                self.teams.clear()
                self.channels.clear()
                self.members.clear()
                self.hooks.clear()
                self.default_team = self.create_team("main", "Main")

    def _since_seed(self):
        seed = self.config["since_seed"]
        return seed if seed is not None else self.seed

    # -- time --------------------------------------------------------------------------------

    def now(self):
        return int(time.time() * 1000) + self.clock_offset_ms

    # -- configuration -----------------------------------------------------------------------

    def set_config(self, changes):
        with self.lock:
            self.config = merge_config(self.config, changes)
            if "since_seed" in changes:
                self._since_rng = random.Random(self._since_seed())
            return self.config

    # -- users, teams, channels, webhooks ----------------------------------------------------

    def create_user(self, username, token=None, is_admin=False, is_bot=False, uid=None,
                    join_all=True, oauth=False):
        with self.lock:
            if not username or not isinstance(username, str):
                raise ValueError("username is required")
            if any(u.username == username for u in self.users.values()):
                raise ValueError("username %r already exists" % username)
            uid = uid or new_id(self.rng)
            if not is_valid_id(uid):
                raise ValueError("user id %r is not a valid 26-character id" % uid)
            user = User(uid, username, is_admin=is_admin, is_bot=is_bot, create_at=self.now())
            self.users[uid] = user
            if token:
                self.add_token(uid, token, oauth=oauth)
            if join_all:
                for members in self.members.values():
                    members.add(uid)
            return user

    def add_token(self, uid, token, oauth=False):
        with self.lock:
            if uid not in self.users:
                raise ValueError("unknown user %r" % uid)
            if not token or not isinstance(token, str):
                raise ValueError("token must be a non-empty string")
            self.tokens[token] = uid
            if oauth:
                self.oauth_tokens.add(token)
            else:
                self.oauth_tokens.discard(token)

    def revoke_token(self, token):
        with self.lock:
            self.oauth_tokens.discard(token)
            return self.tokens.pop(token, None) is not None

    def user_for_token(self, token):
        with self.lock:
            uid = self.tokens.get(token) if token else None
            return self.users.get(uid) if uid else None

    def find_user(self, ref):
        """A user by id or username (control API convenience)."""
        with self.lock:
            if ref in self.users:
                return self.users[ref]
            for u in self.users.values():
                if u.username == ref:
                    return u
            return None

    def create_team(self, name, display_name=None, tid=None):
        with self.lock:
            tid = tid or new_id(self.rng)
            now = self.now()
            team = {"id": tid, "name": name, "display_name": display_name or name,
                    "create_at": now}
            self.teams[tid] = team
            return team

    def create_channel(self, name, display_name=None, team_id=None, ctype="O", cid=None,
                       members=None):
        with self.lock:
            if not name or not isinstance(name, str):
                raise ValueError("channel name is required")
            cid = cid or new_id(self.rng)
            if not is_valid_id(cid):
                raise ValueError("channel id %r is not a valid 26-character id" % cid)
            if cid in self.channels:
                raise ValueError("channel id %r already exists" % cid)
            team_id = team_id or self.default_team["id"]
            if team_id not in self.teams:
                raise ValueError("unknown team %r" % team_id)
            if ctype not in ("O", "P"):
                raise ValueError("channel type must be 'O' or 'P'")
            now = self.now()
            ch = {"id": cid, "name": name, "display_name": display_name or name,
                  "team_id": team_id, "type": ctype, "create_at": now, "delete_at": 0,
                  "creator_id": ""}
            self.channels[cid] = ch
            if members is None:
                self.members[cid] = set(self.users)
            else:
                ids = set()
                for ref in members:
                    u = self.find_user(ref)
                    if u is None:
                        raise ValueError("unknown member %r" % ref)
                    ids.add(u.id)
                self.members[cid] = ids
            self.channel_posts.setdefault(cid, [])
            return ch

    # -- channel changes that make the server post a system message --------------------------
    # (server/channels/app/channel.go). Without an actor the change is made as a direct
    # database edit would make it: no system post. With one, the post the server makes:
    # type system_*, user_id = the actor (or the member), a `posted` event, like any post.

    def _system_post(self, actor, cid, ptype, message, props):
        return self.create_post(actor, {"channel_id": cid, "message": message, "type": ptype,
                                        "props": props}, system=True)[1]

    def add_channel_member(self, cid, user, actor=None):
        """app.AddChannelMember: postJoinChannelMessage when users join themselves,
        PostAddToChannelMessage when someone else adds them. Returns the system post or None."""
        with self.lock:
            if user.id in self.members[cid]:
                return None      # already a member: nothing saved, nothing posted
            self.members[cid].add(user.id)
            if actor is None:
                return None
            if actor.id == user.id:
                return self._system_post(user, cid, "system_join_channel",
                                         "%s joined the channel." % user.username,
                                         {"username": user.username})
            return self._system_post(actor, cid, "system_add_to_channel",
                                     "%s added to the channel by %s." % (user.username,
                                                                         actor.username),
                                     {"userId": actor.id, "username": actor.username,
                                      "addedUserId": user.id, "addedUsername": user.username})

    def remove_channel_member(self, cid, user, actor=None):
        """app.RemoveUserFromChannel / LeaveChannel: postRemoveFromChannelMessage (by the
        remover) or postLeaveChannelMessage (users leaving themselves), after the removal."""
        with self.lock:
            if user.id not in self.members[cid]:
                return None
            self.members[cid].discard(user.id)
            if actor is None:
                return None
            if actor.id == user.id:
                return self._system_post(user, cid, "system_leave_channel",
                                         "@%s left the channel." % user.username,
                                         {"username": user.username})
            return self._system_post(actor, cid, "system_remove_from_channel",
                                     "@%s removed from the channel." % user.username,
                                     {"removedUserId": user.id,
                                      "removedUsername": user.username})

    def update_channel_header(self, cid, header, actor=None):
        """api4.patchChannel -> PostUpdateChannelHeaderMessage when the header changed."""
        with self.lock:
            ch = self.channels[cid]
            old = ch.get("header", "")
            ch["header"] = header
            if actor is None or old == header:
                return None
            if old == "":
                message = "%s updated the channel header to: %s" % (actor.username, header)
            elif header == "":
                message = "%s removed the channel header (was: %s)" % (actor.username, old)
            else:
                message = "%s updated the channel header from: %s to: %s" % (actor.username,
                                                                              old, header)
            return self._system_post(actor, cid, "system_header_change", message,
                                     {"username": actor.username, "old_header": old,
                                      "new_header": header})

    def archive_channel(self, cid, actor=None):
        """app.DeleteChannel: postDeleteChannelMessage, then the channel's DeleteAt is set
        (posting to it is then 400 api.post.create_post.can_not_post_to_deleted.error)."""
        with self.lock:
            ch = self.channels[cid]
            post = None
            if ch["delete_at"]:
                return None
            if actor is not None:
                post = self._system_post(actor, cid, "system_channel_deleted",
                                         "%s archived the channel." % actor.username,
                                         {"username": actor.username})
            ch["delete_at"] = self.now()
            return post

    def restore_channel(self, cid, actor=None):
        """app.RestoreChannel: DeleteAt back to 0, then postRestoreChannelMessage."""
        with self.lock:
            ch = self.channels[cid]
            if not ch["delete_at"]:
                return None
            ch["delete_at"] = 0
            if actor is None:
                return None
            return self._system_post(actor, cid, "system_channel_restored",
                                     "%s unarchived the channel." % actor.username,
                                     {"username": actor.username})

    def channel_struct(self, ch):
        with self.lock:
            posts = [self.posts[i] for i in self.channel_posts.get(ch["id"], [])]
            live = [p for p in posts if p["delete_at"] == 0]
            last = max([p["create_at"] for p in posts], default=0)
            last_root = max([p["create_at"] for p in posts if p["root_id"] == ""], default=0)
            return Struct(id=ch["id"], create_at=ch["create_at"], update_at=ch["create_at"],
                          delete_at=ch["delete_at"], team_id=ch["team_id"], type=ch["type"],
                          display_name=ch["display_name"], name=ch["name"],
                          header=ch.get("header", ""), purpose=ch.get("purpose", ""), last_post_at=last, total_msg_count=len(live),
                          extra_update_at=0, creator_id=ch["creator_id"], scheme_id=None,
                          props=None, group_constrained=None, shared=None,
                          total_msg_count_root=len([p for p in live if p["root_id"] == ""]),
                          policy_id=None, last_root_post_at=last_root)

    def team_struct(self, team):
        return Struct(id=team["id"], create_at=team["create_at"], update_at=team["create_at"],
                      delete_at=0, display_name=team["display_name"], name=team["name"],
                      description="", email="", type="O", company_name="", allowed_domains="",
                      invite_id="", allow_open_invite=False, scheme_id=None,
                      group_constrained=None, policy_id=None)

    def create_hook(self, channel_id, user_ref=None, hid=None, channel_locked=False):
        with self.lock:
            if channel_id not in self.channels:
                raise ValueError("unknown channel %r" % channel_id)
            user = self.find_user(user_ref) if user_ref else None
            if user is None:
                admins = [u for u in self.users.values() if u.is_admin]
                user = admins[0] if admins else next(iter(self.users.values()), None)
            if user is None:
                raise ValueError("a webhook needs a creator: create a user first")
            hid = hid or new_id(self.rng)
            hook = {"id": hid, "channel_id": channel_id, "user_id": user.id,
                    "channel_locked": bool(channel_locked)}
            self.hooks[hid] = hook
            return hook

    # -- permissions (simplified role model, see README) -------------------------------------

    def is_member(self, uid, cid):
        return uid in self.members.get(cid, ())

    def can_read_channel(self, user, ch):
        return user.is_admin or ch["type"] == "O" or self.is_member(user.id, ch["id"])

    def can_write_channel(self, user, cid):
        return user.is_admin or self.is_member(user.id, cid)

    # -- versions and the replica-lag view ---------------------------------------------------

    def _record(self, pid):
        row = self.posts.get(pid)
        t = int(time.time() * 1000)
        history = self.versions.setdefault(pid, [])
        if history and history[-1][0] > t:
            t = history[-1][0]
        history.append((t, copy.deepcopy(row) if row is not None else None))

    def view(self, lagged):
        lag = self.config["replica_lag_ms"] if lagged else 0
        return View(self, int(time.time() * 1000) - lag if lag > 0 else None)

    # -- serialisation -----------------------------------------------------------------------

    def file_struct(self, info):
        s = Struct(id=info["id"], user_id=info["user_id"], post_id=info["post_id"],
                   channel_id=info["channel_id"], create_at=info["create_at"],
                   update_at=info["update_at"], delete_at=info["delete_at"], name=info["name"],
                   extension=info["extension"], size=info["size"], mime_type=info["mime_type"])
        # width, height and has_preview_image are omitempty in model.FileInfo.
        if info["width"]:
            s["width"] = info["width"]
        if info["height"]:
            s["height"] = info["height"]
        if info["has_preview_image"]:
            s["has_preview_image"] = True
        s["mini_preview"] = None
        s["remote_id"] = info["remote_id"]
        s["archived"] = False
        return s

    @staticmethod
    def reaction_struct(r):
        return Struct(user_id=r["user_id"], post_id=r["post_id"], emoji_name=r["emoji_name"],
                      create_at=r["create_at"], update_at=r["update_at"],
                      delete_at=r["delete_at"], remote_id=r["remote_id"],
                      channel_id=r["channel_id"])

    def post_struct(self, p, *, prepared, reply_count=0, thread=None, pending_post_id=""):
        """A model.Post as JSON. `prepared` = went through PreparePostForClient (metadata, and a
        blanked message for deleted rows); `thread` = (reply_count, last_reply_at, participants)
        of a collapsed-threads (CRT) response."""
        deleted = p["delete_at"] > 0
        message = p["message"]
        if prepared and deleted and self.config["blank_deleted_messages"]:
            message = ""
        s = Struct()
        for key in ("id", "create_at", "update_at", "edit_at", "delete_at", "is_pinned",
                    "user_id", "channel_id", "root_id", "original_id"):
            s[key] = p[key]
        s["message"] = message
        s["type"] = p["type"]
        s["props"] = p["props"]
        s["hashtags"] = p["hashtags"]
        s["file_ids"] = list(p["file_ids"])
        s["pending_post_id"] = pending_post_id
        if p["has_reactions"]:
            s["has_reactions"] = True
        if p["remote_id"] is not None:
            s["remote_id"] = p["remote_id"]
        if thread is not None:
            s["reply_count"], s["last_reply_at"] = thread[0], thread[1]
            s["participants"] = [Struct(id=u) for u in thread[2]] if thread[2] else None
        else:
            s["reply_count"] = reply_count
            s["last_reply_at"] = 0
            s["participants"] = None
        if prepared:
            meta = Struct()
            if not deleted:
                files = [f["info"] for f in self.files.values()
                         if f["info"]["post_id"] == p["id"] and f["info"]["delete_at"] == 0]
                if files:
                    pos = {fid: n for n, fid in enumerate(p["file_ids"])}
                    files.sort(key=lambda i: (i["create_at"], pos.get(i["id"], 0)))
                    meta["files"] = [self.file_struct(i) for i in files]
                reactions = p.get("_reactions") or []
                if p["has_reactions"] and reactions:
                    meta["reactions"] = [self.reaction_struct(r) for r in reactions]
            s["metadata"] = meta
        return s

    @staticmethod
    def post_list(order, posts, next_id="", prev_id=""):
        return Struct(order=order, posts=posts, next_post_id=next_id, prev_post_id=prev_id,
                      first_inaccessible_post_time=0)

    # -- internal post helpers ---------------------------------------------------------------

    def _channel_or_400(self, cid):
        ch = self.channels.get(cid) if isinstance(cid, str) else None
        if ch is None:
            raise ApiError(400, "api.context.invalid_param.app_error", {"Name": "post.channel_id"})
        return ch

    def _reply_count_of(self, view, p):
        """The ReplyCount subquery: replies of the post's thread that are not deleted."""
        return view.reply_counts(p["channel_id"]).get(p["root_id"] or p["id"], 0)

    def _set_reactions_snapshot(self, pid):
        p = self.posts[pid]
        active = [r for (rp, _u, _e), r in self.reactions.items() if rp == pid
                  and r["delete_at"] == 0]
        active.sort(key=lambda r: (r["create_at"], r["user_id"], r["emoji_name"]))
        p["_reactions"] = [dict(r) for r in active]

    def _attach_files(self, pid, cid, uid, file_ids):
        """FileInfoStore.AttachToPost per id; ids that fail are silently dropped (as upstream)."""
        attached = []
        for fid in file_ids:
            f = self.files.get(fid)
            if f is None:
                continue
            info = f["info"]
            if info["post_id"] != "" or info["user_id"] != uid or info["delete_at"] != 0:
                continue
            info["post_id"] = pid
            info["channel_id"] = cid
            attached.append(fid)
        return attached

    def _dedup(self, ids):
        seen, out = set(), []
        for x in ids:
            if x not in seen:
                seen.add(x)
                out.append(x)
        return out

    def _check_valid(self, p):
        """model.Post.IsValid (the parts a client can trip)."""
        if len(p["message"]) > self.config["max_post_size"]:
            raise ApiError(400, "model.post.is_valid.message_length.app_error",
                           {"Length": len(p["message"]),
                            "MaxLength": self.config["max_post_size"]}, "id=" + p["id"])
        if len(gojson.dumps(p["file_ids"])) > 300:
            raise ApiError(400, "model.post.is_valid.file_ids.app_error", {}, "id=" + p["id"])
        if len(gojson.dumps(p["props"])) > 800000:
            raise ApiError(400, "model.post.is_valid.props.app_error", {}, "id=" + p["id"])
        if p["type"] not in _VALID_TYPES and not p["type"].startswith("custom_"):
            raise ApiError(400, "model.post.is_valid.type.app_error", {}, "id=" + p["id"])

    def _check_file_count(self, file_ids, pid=""):
        if len(file_ids) > self.config["max_files_per_post"]:
            raise ApiError(400, "model.post.is_valid.file_ids.app_error", {},
                           "emulator: at most %d files per post (OpenAPI)"
                           % self.config["max_files_per_post"])

    # -- posts: create -----------------------------------------------------------------------

    def create_post(self, actor, body, allow_create_at=False, webhook=None, system=False):
        """POST /api/v4/posts (api4.createPost -> app.CreatePostAsUser -> app.CreatePost).
        `system`: a post the server itself makes (app.CreatePost called by the app layer for
        join/leave/header/archive messages): no permission or type checks."""
        with self.lock:
            props = check_post_body(body)
            body = dict(body)
            # SanitizeInput: the client cannot choose delete_at or remote_id.
            body["delete_at"] = 0
            remote_id = None if webhook else ""
            create_at = body.get("create_at") or 0
            if create_at and not (actor.is_admin or allow_create_at):
                create_at = 0  # needs manage_system
            cid = body.get("channel_id") or ""
            file_ids = self._dedup(body.get("file_ids") or [])
            # createPostChecks: create_post (and upload_file) permission on the channel.
            if not system and not self.can_write_channel(actor, cid):
                raise forbidden("userId=%s, permission=create_post" % actor.id)
            ch = self._channel_or_400(cid)
            ptype = body.get("type") or ""
            if ptype.startswith("system_") and not system:
                raise ApiError(400, "api.context.invalid_param.app_error", {"Name": "post.type"})
            if ch["delete_at"] and not system:
                raise ApiError(400, "api.post.create_post.can_not_post_to_deleted.error")
            if body.get("id"):
                raise ApiError(400, "app.post.save.existing.app_error", {},
                               "id=" + str(body["id"]))
            self._check_file_count(file_ids)
            ppid = body.get("pending_post_id") or ""
            now = self.now()
            pending_ids = self.pending_ids if system else self._pending_cache_for_this_request()
            # deduplicateCreatePost: a pending_post_id seen in the last 30 s returns that post.
            if ppid:
                entry = pending_ids.get(ppid)
                if entry and entry[1] <= now:
                    entry = None
                if entry:
                    if entry[0] == "":
                        raise ApiError(500, "api.post.deduplicate_create_post.pending")
                    found = self.posts.get(entry[0])
                    if found and self.can_read_channel(actor, self.channels[found["channel_id"]]):
                        view = self.view(False)
                        return 201, self.post_struct(found, prepared=False,
                                                     reply_count=self._reply_count_of(view,
                                                                                      found))
            root_id = body.get("root_id") or ""
            if root_id:
                root = self.posts.get(root_id)
                if root is None or root["delete_at"] != 0:
                    raise ApiError(400, "api.post.create_post.root_id.app_error")
                if root["channel_id"] != cid:
                    raise ApiError(400, "api.post.create_post.channel_root_id.app_error")
                if root["root_id"] != "":
                    raise ApiError(400, "api.post.create_post.root_id.app_error")
            props = dict(props or {})
            if actor.is_bot:
                props["from_bot"] = "true"
            if webhook is not None:
                props.update(webhook)
            pid = new_id(self.rng)
            p = {"id": pid, "create_at": create_at or now, "update_at": 0,
                 "edit_at": body.get("edit_at") or 0, "delete_at": 0,
                 "is_pinned": bool(body.get("is_pinned")), "user_id": actor.id,
                 "channel_id": cid, "root_id": root_id, "original_id": "",
                 "message": body.get("message") or "", "type": ptype, "props": props,
                 "hashtags": "", "file_ids": file_ids,
                 "has_reactions": bool(body.get("has_reactions")), "remote_id": remote_id,
                 "_reactions": []}
            p["update_at"] = p["create_at"]  # PreSave
            p["hashtags"] = parse_hashtags(p["message"])
            self._check_valid(p)
            if ppid:
                pending_ids[ppid] = ("", now + self.config["pending_post_id_ttl_ms"])
            save_ms = self.config.get("create_post_save_ms") or 0
            if save_ms:
                # The server saves outside any lock: other requests (a repeat of this
                # pending_post_id among them) are served while this one is in flight.
                self.lock.release()
                try:
                    time.sleep(save_ms / 1000.0)
                finally:
                    self.lock.acquire()
                now = self.now()
                if not create_at:
                    p["create_at"] = p["update_at"] = now
            try:
                p["file_ids"] = self._attach_files(pid, cid, actor.id, file_ids)
                self.posts[pid] = p
                self.channel_posts.setdefault(cid, []).append(pid)
                self._record(pid)
                if root_id:
                    # SaveMultiple: UPDATE Posts SET UpdateAt = <reply CreateAt> WHERE Id = root.
                    self.posts[root_id]["update_at"] = p["create_at"]
                    self._record(root_id)
            except Exception:
                pending_ids.pop(ppid, None)
                raise
            if ppid:
                pending_ids[ppid] = (pid, now + self.config["pending_post_id_ttl_ms"])
            view = self.view(False)
            reply_count = self._reply_count_of(view, p) if root_id else 0
            client = self.post_struct(p, prepared=True, reply_count=reply_count,
                                      pending_post_id=ppid)
            self._publish_posted(actor, ch, p, client)
            return 201, client

    def _pending_cache_for_this_request(self):
        """The pending_post_id cache of the node that serves this create: the shared one, or
        (no Redis) the next node's own, round-robin like a load balancer."""
        if self.config["pending_post_id_shared"]:
            return self.pending_ids
        nodes = max(1, int(self.config["cluster_nodes"]))
        node = self._next_node % nodes
        self._next_node += 1
        if node == 0:
            return self.pending_ids
        return self.node_pending_ids.setdefault(node, {})

    def _publish_posted(self, actor, ch, p, client):
        data = {"channel_display_name": ch["display_name"], "channel_name": ch["name"],
                "channel_type": ch["type"], "post": gojson.dumps(client),
                "sender_name": "@" + actor.username, "set_online": True,
                "team_id": ch["team_id"]}
        override = p["props"].get("override_username")
        if (self.config["enable_post_username_override"] and override is not None
                and p["props"].get("from_webhook") == "true"):
            data["sender_name"] = override
        if p["file_ids"]:
            data["otherFile"] = "true"
            for fid in p["file_ids"]:
                f = self.files.get(fid)
                if f and f["info"]["mime_type"].startswith("image/"):
                    data["image"] = "true"
        self.publish(Event("posted", data, channel_id=ch["id"]))

    # -- posts: read ---------------------------------------------------------------------

    def get_post(self, actor, pid, include_deleted=False):
        with self.lock:
            if not is_valid_id(pid):
                raise invalid_url("post_id")
            view = self.view(True)
            p = view.post(pid)
            if p is None or (p["delete_at"] and not (include_deleted and actor.is_admin)):
                raise ApiError(404, "app.post.get.app_error")
            ch = self.channels.get(p["channel_id"])
            if ch is None or not self.can_read_channel(actor, ch):
                raise forbidden()
            return 200, self.post_struct(p, prepared=True,
                                         reply_count=self._reply_count_of(view, p))

    def get_thread(self, actor, pid):
        """GET /posts/{id}/thread (non-CRT): the post plus its root and non-deleted replies."""
        with self.lock:
            if not is_valid_id(pid):
                raise invalid_url("post_id")
            view = self.view(True)
            p = view.post(pid)
            if p is None or p["delete_at"]:
                raise ApiError(404, "app.post.get.app_error")
            ch = self.channels.get(p["channel_id"])
            if not self.can_read_channel(actor, ch):
                raise forbidden()
            root = p["root_id"] or p["id"]
            rows = [q for q in view.channel(p["channel_id"]) if (q["id"] == root or
                    q["root_id"] == root) and q["delete_at"] == 0]
            order = [pid] + [q["id"] for q in rows if q["id"] != pid]
            posts = {q["id"]: self.post_struct(q, prepared=True,
                                               reply_count=self._reply_count_of(view, q))
                     for q in rows + [p]}
            return 200, self.post_list(order, posts)

    def channel_posts_query(self, actor, cid, query):
        """GET /api/v4/channels/{channel_id}/posts (api4.getPostsForChannel)."""
        with self.lock:
            if not is_valid_id(cid):
                raise invalid_url("channel_id")

            def boolean(name):
                return query.get(name, "").strip().lower() in ("1", "t", "true")

            after = query.get("after", "")
            before = query.get("before", "")
            if after and not is_valid_id(after):
                raise invalid_body("after")
            if before and not is_valid_id(before):
                raise invalid_body("before")
            since = 0
            if query.get("since", "") != "":
                try:
                    since = int(query["since"])
                except ValueError:
                    raise invalid_body("since", "strconv.ParseInt: parsing %r: invalid syntax"
                                       % query["since"])
            # web.ParamsFromRequest: unparsable or negative values fall back to the defaults.
            try:
                page = int(query.get("page", "0") or 0)
            except ValueError:
                page = 0
            try:
                per_page = int(query.get("per_page", "60") or 60)
            except ValueError:
                per_page = 60
            page = max(page, 0)
            if per_page < 0:
                per_page = 60
            per_page = min(per_page, 200)
            skip_threads = boolean("skipFetchThreads")
            crt = boolean("collapsedThreads")
            if boolean("include_deleted") and not actor.is_admin:
                raise forbidden("permission=read_deleted_posts")
            ch = self.channels.get(cid)
            if ch is None:
                raise ApiError(404, "app.channel.get.existing.app_error")
            if not self.can_read_channel(actor, ch):
                raise forbidden("permission=read_channel_content")
            view = self.view(True)
            if since > 0:
                combined = [k for k in ("page", "per_page", "before", "after") if k in query]
                if combined and self.config["since_combined_params"] == "reject":
                    raise invalid_body("since", "emulator: since cannot be combined with %s (the "
                                       "real server silently ignores them)" % ", ".join(combined))
                return 200, self._posts_since(view, cid, since, skip_threads, crt)
            if after or before:
                return 200, self._posts_around(view, cid, after or before, bool(before), page,
                                               per_page, skip_threads, crt)
            return 200, self._posts_page(view, cid, page, per_page, skip_threads, crt)

    def _thread_stats(self, rows):
        stats = {}
        for q in sorted(rows, key=lambda r: (r["create_at"], r["id"])):
            if q["root_id"] and q["delete_at"] == 0:
                st = stats.setdefault(q["root_id"], [0, 0, []])
                st[0] += 1
                st[1] = max(st[1], q["create_at"])
                if q["user_id"] not in st[2]:
                    st[2].append(q["user_id"])
        return stats

    @staticmethod
    def _newest_first(rows):
        return sorted(rows, key=lambda r: (r["create_at"], r["id"]), reverse=True)

    def _posts_since(self, view, cid, since, skip_threads, crt):
        rows = view.channel(cid)
        limit = self.config["since_limit"]
        if crt:
            # getPostsSinceCollapsedThreads: roots only, ORDER BY CreateAt DESC LIMIT 1000.
            stats = self._thread_stats(rows)
            roots = [q for q in rows if q["root_id"] == "" and q["update_at"] > since]
            roots = self._newest_first(roots)[:limit]
            posts = {}
            for q in roots:
                st = stats.get(q["id"], [0, 0, []])
                posts[q["id"]] = self.post_struct(q, prepared=True, thread=tuple(st))
            return self.post_list([q["id"] for q in roots], posts)
        # PostgreSQL: WITH cte AS (SELECT * FROM Posts WHERE UpdateAt > ? AND ChannelId = ?
        # LIMIT 1000) (SELECT * FROM cte) UNION (SELECT * FROM Posts WHERE Id IN (SELECT RootId
        # FROM cte)) ORDER BY CreateAt DESC. No ORDER BY inside the CTE: past 1000 rows the
        # subset is arbitrary, reproduced here as a (seedable) random sample.
        matching = [q for q in rows if q["update_at"] > since]
        if len(matching) > limit:
            matching = self._since_rng.sample(matching, limit)
        chosen = {q["id"]: q for q in matching}
        for q in matching:
            if q["root_id"] and q["root_id"] not in chosen:
                root = view.post(q["root_id"])
                if root is not None:
                    chosen[root["id"]] = root
        ordered = self._newest_first(chosen.values())
        posts = {}
        for q in ordered:
            count = self._reply_count_of(view, q) if skip_threads else 0
            posts[q["id"]] = self.post_struct(q, prepared=True, reply_count=count)
        order = [q["id"] for q in ordered if q["update_at"] > since]
        return self.post_list(order, posts)

    def _page_extras(self, view, rows, page_rows, skip_threads):
        """getParentsPosts: roots of the replies in the page, and (unless skipFetchThreads)
        every non-deleted reply of those threads."""
        roots = {q["root_id"] for q in page_rows if q["root_id"]}
        extra = []
        for q in rows:
            if q["delete_at"]:
                continue
            if q["id"] in roots or (not skip_threads and q["root_id"] in roots):
                extra.append(q)
        return extra

    def _cursor_ids(self, rows, order_rows):
        if not order_rows:
            return "", ""
        live = [q for q in rows if q["delete_at"] == 0]
        newest = order_rows[0]["create_at"]
        oldest = order_rows[-1]["create_at"]
        newer = sorted([q for q in live if q["create_at"] > newest],
                       key=lambda r: (r["create_at"], r["id"]))
        older = self._newest_first([q for q in live if q["create_at"] < oldest])
        return (newer[0]["id"] if newer else ""), (older[0]["id"] if older else "")

    def _posts_page(self, view, cid, page, per_page, skip_threads, crt):
        rows = view.channel(cid)
        live = [q for q in rows if q["delete_at"] == 0]
        if crt:
            stats = self._thread_stats(rows)
            live = [q for q in live if q["root_id"] == ""]
        ordered = self._newest_first(live)[page * per_page:page * per_page + per_page]
        posts = {}
        if crt:
            for q in ordered:
                posts[q["id"]] = self.post_struct(q, prepared=True,
                                                  thread=tuple(stats.get(q["id"], [0, 0, []])))
        else:
            for q in ordered + self._page_extras(view, rows, ordered, skip_threads):
                # getRootPosts computes ReplyCount only with skipFetchThreads=true.
                count = self._reply_count_of(view, q) if skip_threads else 0
                posts[q["id"]] = self.post_struct(q, prepared=True, reply_count=count)
        next_id, prev_id = self._cursor_ids(rows, ordered)
        return self.post_list([q["id"] for q in ordered], posts, next_id, prev_id)

    def _posts_around(self, view, cid, anchor_id, before, page, per_page, skip_threads, crt):
        rows = view.channel(cid)
        anchor = view.post(anchor_id)
        if anchor is None:
            return self.post_list([], {})
        live = [q for q in rows if q["delete_at"] == 0 and (not crt or q["root_id"] == "")]
        if before:
            cands = self._newest_first([q for q in live if q["create_at"] < anchor["create_at"]])
        else:
            cands = sorted([q for q in live if q["create_at"] > anchor["create_at"]],
                           key=lambda r: (r["create_at"], r["id"]))
        chosen = cands[page * per_page:page * per_page + per_page]
        if not before:
            chosen = list(reversed(chosen))
        stats = self._thread_stats(rows)
        posts = {}
        for q in chosen:
            if crt:
                posts[q["id"]] = self.post_struct(q, prepared=True,
                                                  thread=tuple(stats.get(q["id"], [0, 0, []])))
            else:
                posts[q["id"]] = self.post_struct(q, prepared=True,
                                                  reply_count=self._reply_count_of(view, q))
        if not crt:
            for q in self._page_extras(view, rows, chosen, skip_threads):
                posts.setdefault(q["id"], self.post_struct(
                    q, prepared=True, reply_count=self._reply_count_of(view, q)))
        next_id, prev_id = "", ""
        if before:
            next_id = anchor_id if page == 0 else ""
            if len(chosen) == per_page:
                prev_id = self._cursor_ids(rows, chosen)[1]
        else:
            prev_id = anchor_id if page == 0 else ""
            if len(chosen) == per_page:
                next_id = self._cursor_ids(rows, chosen)[0]
        return self.post_list([q["id"] for q in chosen], posts, next_id, prev_id)

    # -- posts: edit -----------------------------------------------------------------------

    def patch_post(self, actor, pid, body):
        """PUT /api/v4/posts/{id}/patch (api4.patchPost -> app.PatchPost -> app.UpdatePost)."""
        with self.lock:
            if not is_valid_id(pid):
                raise invalid_url("post_id")
            if not isinstance(body, dict):
                raise invalid_body("post")
            _want(body, "message", (str,), "post")
            _want(body, "is_pinned", (bool,), "post")
            _want(body, "has_reactions", (bool,), "post")
            _want(body, "file_ids", (list,), "post")
            try:
                props = gojson.decode_props(body.get("props"))
            except gojson.DecodeError as e:
                raise invalid_body("post", str(e))
            old = self.posts.get(pid)
            # postPatchChecks: an unknown or deleted post is a permission error, not a 404.
            if old is None or old["delete_at"]:
                raise forbidden("permission=edit_post")
            if old["user_id"] != actor.id and not actor.is_admin:
                raise forbidden("permission=edit_others_posts")
            if not self.can_write_channel(actor, old["channel_id"]):
                raise forbidden("permission=edit_post")
            limit = self.config["post_edit_time_limit"]
            if (limit != -1 and body.get("message") is not None
                    and self.now() > old["create_at"] + limit * 1000):
                raise ApiError(400, "api.post.update_post.permissions_time_limit.app_error",
                               {"timeLimit": limit})
            if self.channels[old["channel_id"]]["delete_at"]:
                raise ApiError(400, "api.post.patch_post.can_not_update_post_in_deleted.error")
            received = copy.deepcopy(old)
            if body.get("message") is not None:
                received["message"] = body["message"]
            if body.get("is_pinned") is not None:
                received["is_pinned"] = body["is_pinned"]
            if body.get("has_reactions") is not None:
                received["has_reactions"] = body["has_reactions"]
            if body.get("file_ids") is not None:
                received["file_ids"] = self._dedup(body["file_ids"])
            if body.get("props") is not None:
                received["props"] = props  # Post.Patch: the map is replaced, not merged
            return self._update(actor, old, received)

    def update_post(self, actor, pid, body):
        """PUT /api/v4/posts/{id}: the full update; missing fields become their zero value."""
        with self.lock:
            if not is_valid_id(pid):
                raise invalid_url("post_id")
            props = check_post_body(body)
            if body.get("id") != pid:
                raise invalid_body("id")
            old = self.posts.get(pid)
            if old is None or old["delete_at"]:
                raise forbidden("permission=edit_post")
            if old["user_id"] != actor.id and not actor.is_admin:
                raise forbidden("permission=edit_others_posts")
            limit = self.config["post_edit_time_limit"]
            message = body.get("message") or ""
            if (limit != -1 and self.now() > old["create_at"] + limit * 1000
                    and message != old["message"]):
                raise ApiError(400, "api.post.update_post.permissions_time_limit.app_error",
                               {"timeLimit": limit})
            received = copy.deepcopy(old)
            received["message"] = message
            received["is_pinned"] = bool(body.get("is_pinned"))
            received["has_reactions"] = bool(body.get("has_reactions"))
            if body.get("file_ids") is not None:
                received["file_ids"] = self._dedup(body["file_ids"])
            if body.get("props") is not None:
                received["props"] = props
            return self._update(actor, old, received)

    def _update(self, actor, old, received):
        """app.UpdatePost + SqlPostStore.Update."""
        if old["type"].startswith("system_"):
            raise ApiError(400, "api.post.update_post.system_message.app_error", {},
                           "id=" + old["id"])
        now = self.now()
        new = copy.deepcopy(old)
        if new["message"] != received["message"]:
            new["message"] = received["message"]
            new["edit_at"] = now
            new["hashtags"] = parse_hashtags(new["message"])
        new["is_pinned"] = received["is_pinned"]
        new["has_reactions"] = received["has_reactions"]
        new["props"] = received["props"]
        if self.config["preserve_identity_props_on_patch"]:
            for key in ("from_bot", "from_webhook", "from_oauth_app", "from_plugin",
                        "silent_notification"):
                if old["props"].get(key) is not None:
                    new["props"][key] = old["props"][key]
        if received["file_ids"] != old["file_ids"]:
            self._check_file_count(received["file_ids"])
            added = [f for f in received["file_ids"] if f not in old["file_ids"]]
            attached = set(self._attach_files(old["id"], old["channel_id"], old["user_id"],
                                              added))
            kept = [f for f in received["file_ids"] if f in old["file_ids"] or f in attached]
            for fid in old["file_ids"]:
                if fid not in kept and fid in self.files:
                    self.files[fid]["info"]["delete_at"] = now
            new["file_ids"] = kept
        if new["edit_at"] == old["edit_at"] and new["file_ids"] != old["file_ids"]:
            new["edit_at"] = now
        self._check_valid(new)
        # Store.Update: the edited post keeps its id; the old version becomes a new, deleted row.
        new["update_at"] = now
        archived = copy.deepcopy(old)
        archived["delete_at"] = now
        archived["update_at"] = now
        archived["original_id"] = old["id"]
        archived["id"] = new_id(self.rng)
        archived["_reactions"] = []
        self.posts[new["id"]] = new
        self.posts[archived["id"]] = archived
        self.channel_posts[new["channel_id"]].append(archived["id"])
        self._record(new["id"])
        self._record(archived["id"])
        if new["root_id"]:
            root = self.posts.get(new["root_id"])
            if root is not None and root["update_at"] < now:
                root["update_at"] = now
                self._record(root["id"])
        view = self.view(False)
        client = self.post_struct(new, prepared=True, reply_count=self._reply_count_of(view, new))
        self.publish(Event("post_edited", {"post": gojson.dumps(client)},
                           channel_id=new["channel_id"]))
        return 200, client

    # -- posts: delete -----------------------------------------------------------------------

    def delete_post(self, actor, pid):
        """DELETE /api/v4/posts/{id} (api4.deletePost -> app.DeletePost -> Store.Delete)."""
        with self.lock:
            if not is_valid_id(pid):
                raise invalid_url("post_id")
            p = self.posts.get(pid)
            if p is None or p["delete_at"]:
                raise ApiError(404, "app.post.get.app_error")
            if p["user_id"] == actor.id:
                if not self.can_write_channel(actor, p["channel_id"]):
                    raise forbidden("permission=delete_post")
            elif not actor.is_admin:
                raise forbidden("permission=delete_others_posts")
            if self.channels[p["channel_id"]]["delete_at"]:
                raise ApiError(400, "api.post.delete_post.can_not_delete_post_in_deleted.error")
            view = self.view(False)
            before = self.post_struct(p, prepared=False, reply_count=self._reply_count_of(view, p))
            now = self.now()
            # UPDATE Posts SET DeleteAt = now, UpdateAt = now, Props = jsonb_set(Props,
            # '{deleteBy}', user) WHERE Id = $id OR RootId = $id -- the whole thread, including
            # replies that were already deleted and archived edit copies of replies.
            for qid in list(self.channel_posts[p["channel_id"]]):
                q = self.posts[qid]
                if q["id"] == pid or q["root_id"] == pid:
                    q["delete_at"] = now
                    q["update_at"] = now
                    q["props"] = dict(q["props"])
                    q["props"]["deleteBy"] = actor.id
                    self._record(qid)
            for f in self.files.values():
                if f["info"]["post_id"] == pid:
                    f["info"]["delete_at"] = now
            # One post_deleted event for the deleted post only (none per reply): the payload is
            # the post as read before the delete (delete_at 0, no metadata). Non-admins get the
            # sanitized copy, admins the one with delete_by.
            post_json = gojson.dumps(before)
            self.publish(Event("post_deleted", {"post": post_json}, channel_id=p["channel_id"],
                               sanitized=True))
            self.publish(Event("post_deleted", {"delete_by": actor.id, "post": post_json},
                               channel_id=p["channel_id"], sensitive=True))
            return 200, Struct(status="OK")

    # -- reactions ----------------------------------------------------------------------

    def save_reaction(self, actor, body):
        """POST /api/v4/reactions (api4.saveReaction -> app.SaveReactionForPost)."""
        with self.lock:
            if not isinstance(body, dict):
                raise invalid_body("reaction")
            for key in ("user_id", "post_id", "emoji_name", "channel_id"):
                _want(body, key, (str,), "reaction")
            _want(body, "create_at", (int,), "reaction")
            uid = body.get("user_id") or ""
            pid = body.get("post_id") or ""
            name = body.get("emoji_name") or ""
            if not is_valid_id(uid) or not is_valid_id(pid) or not name or len(name) > 64:
                raise ApiError(400, "api.reaction.save_reaction.invalid.app_error")
            if uid != actor.id:
                raise ApiError(403, "api.reaction.save_reaction.user_id.app_error")
            p = self.posts.get(pid)
            # SessionHasPermissionToChannelByPost: an unknown post is a permission error.
            if p is None or not self.can_write_channel(actor, p["channel_id"]):
                raise forbidden("permission=add_reaction")
            if p["delete_at"]:
                raise ApiError(404, "app.post.get.app_error")
            if self.channels[p["channel_id"]]["delete_at"]:
                raise ApiError(403, "api.reaction.save.archived_channel.app_error")
            if not EMOJI_NAME_RE.match(name):
                raise ApiError(400, "model.reaction.is_valid.emoji_name.app_error", {},
                               "emoji_name=" + name)
            allow = self.config["emoji_allowlist"]
            if allow is not None and name not in allow:
                raise ApiError(404, "app.emoji.get_by_name.no_result", {}, "name=" + name)
            active = {r["emoji_name"] for r in p["_reactions"]}
            if name not in active and len(active) >= \
                    self.config["unique_emoji_reaction_limit_per_post"]:
                raise ApiError(400, "app.reaction.save.save.too_many_reactions")
            now = self.now()
            key = (pid, uid, name)
            existing = self.reactions.get(key)
            create_at = body.get("create_at") or now
            if existing is None:
                r = {"user_id": uid, "post_id": pid, "emoji_name": name, "create_at": create_at,
                     "update_at": now, "delete_at": 0, "remote_id": "",
                     "channel_id": p["channel_id"]}
                self.reactions[key] = r
            else:
                # The upsert keeps the stored CreateAt; the response echoes the new one.
                existing.update(update_at=now, delete_at=0)
                r = dict(existing, create_at=create_at)
            p["has_reactions"] = True
            p["update_at"] = now
            self._set_reactions_snapshot(pid)
            self._record(pid)
            out = self.reaction_struct(r)
            self.publish(Event("reaction_added", {"reaction": gojson.dumps(out)},
                               channel_id=p["channel_id"]))
            return 200, out

    def delete_reaction(self, actor, uid, pid, name):
        """DELETE /api/v4/users/{user_id}/posts/{post_id}/reactions/{emoji_name}."""
        with self.lock:
            if not is_valid_id(uid):
                raise invalid_url("user_id")
            if not is_valid_id(pid):
                raise invalid_url("post_id")
            p = self.posts.get(pid)
            if p is None or not self.can_write_channel(actor, p["channel_id"]):
                raise forbidden("permission=remove_reaction")
            if uid != actor.id and not actor.is_admin:
                raise forbidden("permission=remove_others_reactions")
            if p["delete_at"]:
                raise ApiError(404, "app.post.get.app_error")
            if self.channels[p["channel_id"]]["delete_at"]:
                raise ApiError(403, "api.reaction.delete.archived_channel.app_error")
            now = self.now()
            r = self.reactions.get((pid, uid, name))
            if r is not None and r["delete_at"] == 0:
                r["delete_at"] = now
                r["update_at"] = now
            self._set_reactions_snapshot(pid)
            # updatePostForReactionsOnDelete runs even when there was nothing to delete.
            p["has_reactions"] = bool(p["_reactions"])
            p["update_at"] = now
            self._record(pid)
            gone = {"user_id": uid, "post_id": pid, "emoji_name": name, "create_at": 0,
                    "update_at": now, "delete_at": now, "remote_id": None,
                    "channel_id": p["channel_id"]}
            self.publish(Event("reaction_removed",
                               {"reaction": gojson.dumps(self.reaction_struct(gone))},
                               channel_id=p["channel_id"]))
            return 200, Struct(status="OK")

    def get_reactions(self, actor, pid):
        with self.lock:
            if not is_valid_id(pid):
                raise invalid_url("post_id")
            p = self.view(True).post(pid)
            if p is None:
                raise forbidden("permission=read_channel_content")
            if not self.can_read_channel(actor, self.channels[p["channel_id"]]):
                raise forbidden("permission=read_channel_content")
            return 200, [self.reaction_struct(r) for r in p.get("_reactions") or []]

    # -- files ---------------------------------------------------------------------------

    def upload_files(self, actor, parts, channel_param, simple=None):
        """POST /api/v4/files. `parts`: [(form name, file name or None, bytes)] in order;
        `simple`: (file name, bytes, client_id) for a non-multipart upload."""
        with self.lock:
            if not self.config["enable_file_attachments"]:
                raise ApiError(403, "api.file.attachments.disabled.app_error")
            if simple is not None:
                name, data, client_id = simple
                if not is_valid_id(channel_param):
                    raise invalid_url("channel_id")
                if not name:
                    raise invalid_url("filename")
                uploads, client_ids = [(name, data)], ([client_id] if client_id else [])
                cid = channel_param
            else:
                cid = channel_param or ""
                client_ids, uploads = [], []
                for form, filename, data in parts:
                    if not form:
                        continue
                    if filename is None:
                        value = data[:10 * 1024].decode("utf-8", errors="replace")
                        if form == "channel_id":
                            if cid and value and cid != value:
                                raise ApiError(400, "api.file.upload_file.multiple_channel_ids."
                                               "app_error")
                            cid = value or cid
                        elif form == "client_ids":
                            client_ids.append(value)
                        else:
                            raise invalid_body(form)
                        continue
                    uploads.append((filename, data))
                if not cid:
                    raise invalid_body("channel_id")
                if not is_valid_id(cid):
                    raise invalid_url("channel_id")
                if client_ids and len(client_ids) != len(uploads):
                    raise ApiError(400, "api.file.upload_file.incorrect_number_of_client_ids."
                                   "app_error", {"NumClientIds": len(client_ids),
                                                 "NumFiles": len(uploads)})
            if not self.can_write_channel(actor, cid):
                raise forbidden("permission=upload_file")
            infos = []
            now = self.now()
            for filename, data in uploads:
                if len(data) > self.config["max_file_size"]:
                    raise ApiError(413, "api.file.upload_file.too_large_detailed.app_error",
                                   {"Filename": filename, "Length": len(data),
                                    "Limit": self.config["max_file_size"]})
                base = filename.replace("\\", "/").rsplit("/", 1)[-1]
                ext = base.rsplit(".", 1)[1].lower() if "." in base else ""
                mime = mime_for(ext)
                width, height = image_size(data, mime) if mime.startswith("image/") else (0, 0)
                info = {"id": new_id(self.rng), "user_id": actor.id, "post_id": "",
                        "channel_id": cid, "create_at": now, "update_at": now, "delete_at": 0,
                        "name": base, "extension": ext, "size": len(data), "mime_type": mime,
                        "width": width, "height": height,
                        "has_preview_image": mime.startswith("image/") and mime != "image/svg+xml",
                        "remote_id": ""}
                self.files[info["id"]] = {"info": info, "data": bytes(data)}
                infos.append(info)
            return 201, Struct(file_infos=[self.file_struct(i) for i in infos],
                               client_ids=list(client_ids))

    def _readable_file(self, actor, fid):
        if not is_valid_id(fid):
            raise invalid_url("file_id")
        f = self.files.get(fid)
        if f is None or f["info"]["delete_at"]:
            raise ApiError(404, "app.file_info.get.app_error", {}, "id=" + fid)
        info = f["info"]
        if info["user_id"] != actor.id:
            post = self.posts.get(info["post_id"]) if info["post_id"] else None
            ch = self.channels.get(post["channel_id"]) if post else None
            if ch is None or not self.can_read_channel(actor, ch):
                raise forbidden("permission=read_channel")
        return f

    def get_file(self, actor, fid):
        with self.lock:
            f = self._readable_file(actor, fid)
            return f["info"], f["data"]

    def get_file_info(self, actor, fid):
        with self.lock:
            return 200, self.file_struct(self._readable_file(actor, fid)["info"])

    # -- incoming webhooks -------------------------------------------------------------------

    def webhook_post(self, hook_id, payload):
        """POST /hooks/{id} (web.incomingWebhook -> app.HandleIncomingWebhook)."""
        with self.lock:
            if not self.config["enable_incoming_webhooks"]:
                raise ApiError(501, "web.incoming_webhook.disabled.app_error")
            hook = self.hooks.get(hook_id)
            if hook is None:
                raise ApiError(400, "web.incoming_webhook.invalid.app_error", {},
                               "id=" + hook_id)
            if not isinstance(payload, dict):
                raise ApiError(400, "web.incoming_webhook.parse.app_error")
            text = payload.get("text") or ""
            attachments = payload.get("attachments")
            if not text and not attachments:
                raise ApiError(400, "web.incoming_webhook.text.app_error")
            cid = hook["channel_id"]
            name = payload.get("channel") or ""
            if name and not hook["channel_locked"]:
                matches = [c for c in self.channels.values() if c["name"] == name.lstrip("~#")]
                if not matches:
                    raise ApiError(403, "web.incoming_webhook.channel.app_error")
                cid = matches[0]["id"]
            user = self.users[hook["user_id"]]
            props = gojson.to_go_any(payload.get("props") or {})
            if not isinstance(props, dict):
                raise ApiError(400, "web.incoming_webhook.parse.app_error")
            extra = {"from_webhook": "true"}
            if self.config["enable_post_username_override"]:
                extra["override_username"] = payload.get("username") or "webhook"
            if self.config["enable_post_icon_override"]:
                if payload.get("icon_url"):
                    extra["override_icon_url"] = payload["icon_url"]
                if payload.get("icon_emoji"):
                    extra["override_icon_emoji"] = payload["icon_emoji"]
            if attachments:
                extra["attachments"] = gojson.to_go_any(attachments)
            body = {"channel_id": cid, "message": text, "props": props,
                    "type": payload.get("type") or ("slack_attachment" if attachments else "")}
            # The hook's creator posts, even into a channel it is not a member of.
            poster = User(user.id, user.username, is_admin=True, is_bot=user.is_bot)
            self.create_post(poster, body, webhook=extra)
            return 200, "ok"

    # -- control-API inspection ------------------------------------------------------------

    def raw_post(self, p):
        out = {k: copy.deepcopy(v) for k, v in p.items() if not k.startswith("_")}
        out["reactions"] = [dict(r) for r in p.get("_reactions") or []]
        return out

    def inspect_channel(self, cid):
        with self.lock:
            if cid not in self.channels:
                raise KeyError(cid)
            rows = [self.posts[i] for i in self.channel_posts.get(cid, [])]
            rows.sort(key=lambda r: (r["create_at"], r["id"]))
            return [self.raw_post(p) for p in rows]


class View:
    """The post table as a read sees it: live, or (replica lag) as of `at` ms wall-clock."""

    def __init__(self, st, at):
        self.st = st
        self.at = at
        self._cache = {}

    def post(self, pid):
        if self.at is None:
            return self.st.posts.get(pid)
        if pid in self._cache:
            return self._cache[pid]
        history = self.st.versions.get(pid) or []
        i = bisect.bisect_right([t for t, _ in history], self.at)
        row = history[i - 1][1] if i > 0 else None
        self._cache[pid] = row
        return row

    def reply_counts(self, cid):
        key = ("counts", cid)
        if key not in self._cache:
            counts = {}
            for q in self.channel(cid):
                if q["root_id"] and q["delete_at"] == 0:
                    counts[q["root_id"]] = counts.get(q["root_id"], 0) + 1
            self._cache[key] = counts
        return self._cache[key]

    def channel(self, cid):
        ids = self.st.channel_posts.get(cid, [])
        if self.at is None:
            return [self.st.posts[i] for i in ids]
        out = []
        for i in ids:
            p = self.post(i)
            if p is not None:
                out.append(p)
        return out


class Event:
    """A model.WebSocketEvent before it is sequenced for one connection."""

    def __init__(self, event, data, channel_id="", user_id="", team_id="", omit_users=None,
                 connection_id="", omit_connection_id="", sanitized=False, sensitive=False,
                 precomputed=True):
        self.event = event
        self.data = data
        self.channel_id = channel_id
        self.user_id = user_id
        self.team_id = team_id
        self.omit_users = omit_users
        self.connection_id = connection_id
        self.omit_connection_id = omit_connection_id
        self.sanitized = sanitized
        self.sensitive = sensitive
        # Events that go through the hub are precomputed (WebSocketEvent.PrecomputeJSON) and
        # written as `{"event": ..., "data": ..., "broadcast": ..., "seq": N}` with spaces and
        # no newline; hello is encoded directly: compact, with a trailing newline.
        self.precomputed = precomputed

    def broadcast_struct(self):
        b = Struct(omit_users=self.omit_users, user_id=self.user_id, channel_id=self.channel_id,
                   team_id=self.team_id, connection_id=self.connection_id,
                   omit_connection_id=self.omit_connection_id)
        if self.sanitized:
            b["contains_sanitized_data"] = True
        if self.sensitive:
            b["contains_sensitive_data"] = True
        return b

    def encode(self, seq):
        if self.precomputed:
            return ('{"event": %s, "data": %s, "broadcast": %s, "seq": %d}'
                    % (gojson.go_str(self.event), gojson.dumps(self.data),
                       gojson.dumps(self.broadcast_struct()), seq))
        return gojson.dumps_encoder(Struct(event=self.event, data=self.data,
                                           broadcast=self.broadcast_struct(), seq=seq))
