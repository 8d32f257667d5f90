#pragma once
// Which Mattermost post props cross from one site's server to another's (docs/mattermost.md,
// "Props").
//
// A post's props are written by the origin's users, integrations, plugins and server, and the
// relay's bot replays them into the peer's server, which acts on several of them: it shows
// interactive buttons and menus that make it call an integration's URL when clicked
// (attachments[].actions, mm_blocks_actions), fetches image URLs for their size
// (attachments[].image_url, thumb_url, author_icon, footer_icon), shows another name, icon or bot
// badge (from_webhook, override_username, override_icon_url, override_icon_emoji,
// webhook_display_name, from_bot, from_oauth_app, from_plugin), and reads references to its own
// posts, users and channels (previewed_post, channel_mentions, add_channel_member, ...). None of
// that is the remote site's to decide, so only props that are safe to show are carried -- an
// allow-list, not a deny-list, so that props added by later Mattermost versions stay out too:
//
//   attachments               message attachments, reduced to what is shown as text: fallback,
//                             pretext, author_name, title, text, footer (strings), color (good,
//                             warning, danger or #rrggbb), ts (string or number), and fields
//                             (title and value as text, short as a boolean); an attachment left
//                             with no text is dropped
//   disable_group_highlight   booleans that only turn mention highlighting off
//   mentionHighlightDisabled
//
// The relay's own markers and the author's display name are set by the replaying site
// (MattermostBridge), never carried. Message text is carried as it is: links and images in it
// (also in attachment text) are treated by the receiving server as those of its own users.

#include <string>
#include <string_view>

namespace relay::chat {

// The props of `props_json` (a post's props object, as JSON text) that may be carried, as a JSON
// object text: "{}" when none are, or when the input is not a JSON object. Deterministic: the same
// input gives the same output (keys sorted).
std::string CarriedProps(std::string_view props_json);

}  // namespace relay::chat
