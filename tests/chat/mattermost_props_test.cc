// The allow-list of Mattermost props carried between sites (chat/mattermost_props.h).
#include "chat/mattermost_props.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <string>

namespace {

using Json = nlohmann::json;
using relay::chat::CarriedProps;

Json Carried(const Json& props) { return Json::parse(CarriedProps(props.dump())); }

}  // namespace

TEST_CASE("props safe to show are carried") {
  const Json props = {{"disable_group_highlight", true},
                      {"mentionHighlightDisabled", false},
                      {"attachments",
                       {{{"fallback", "Build 42 failed"},
                         {"color", "danger"},
                         {"pretext", "CI"},
                         {"author_name", "jenkins"},
                         {"title", "Build 42"},
                         {"text", "see the log"},
                         {"fields",
                          {{{"title", "branch"}, {"value", "main"}, {"short", true}},
                           {{"title", "tests"}, {"value", 1234}}}},
                         {"footer", "ci.example"},
                         {"ts", 1764129324}}}}};
  const Json expected = {{"disable_group_highlight", true},
                         {"mentionHighlightDisabled", false},
                         {"attachments",
                          {{{"fallback", "Build 42 failed"},
                            {"color", "danger"},
                            {"pretext", "CI"},
                            {"author_name", "jenkins"},
                            {"title", "Build 42"},
                            {"text", "see the log"},
                            {"fields",
                             {{{"title", "branch"}, {"value", "main"}, {"short", true}},
                              {{"title", "tests"}, {"value", "1234"}}}},
                            {"footer", "ci.example"},
                            {"ts", 1764129324}}}}};
  CHECK(Carried(props) == expected);
  CHECK(Carried({{"attachments",
                  {{{"text", "x"}, {"color", "#A0b1C2"}}}}})["attachments"][0]["color"] ==
        "#A0b1C2");
}

TEST_CASE("props that change identity, call out or act are never carried") {
  const Json props = {
      // Identity and badges: the replaying site sets these itself.
      {"from_webhook", "true"},
      {"override_username", "admin"},
      {"override_icon_url", "https://evil.example/a.png"},
      {"override_icon_emoji", "lock"},
      {"webhook_display_name", "Security Team"},
      {"from_bot", "true"},
      {"from_oauth_app", "true"},
      {"from_plugin", "true"},
      {"ai_generated_by", "u1aaaaaaaaaaaaaaaaaaaaaaaa"},
      // Interactive and server-side behaviour.
      {"mm_blocks_actions", Json::array({{{"id", "a"}, {"url", "https://evil.example/cb"}}})},
      {"add_channel_member", {{"user_ids", {"u1"}}}},
      {"force_notification", true},
      {"previewed_post", "p1aaaaaaaaaaaaaaaaaaaaaaaa"},
      {"channel_mentions", {{"town-square", {{"display_name", "x"}, {"team_name", "t"}}}}},
      {"unsafe_links", "true"},
      {"boards", {{"id", "b"}}},
      {"card", "# secret"},
      // The relay's own markers: set by the replaying site, never taken from a remote post.
      {"relay_event_id", "europe:1"},
      {"relay_origin", "europe"},
      // Anything unknown (a plugin's props, props of later Mattermost versions).
      {"some_plugin_state", {{"callback", "https://evil.example"}}},
      // Right names, wrong types.
      {"disable_group_highlight", "true"},
      {"mentionHighlightDisabled", 1},
  };
  CHECK(CarriedProps(props.dump()) == "{}");
}

TEST_CASE("attachments lose their buttons, images, links and unknown fields") {
  const Json attachment = {
      {"id", 7},
      {"text", "approve the change?"},
      {"color", "javascript:alert(1)"},
      {"author_link", "https://evil.example/author"},
      {"author_icon", "http://10.0.0.1/icon.png"},
      {"title", "Change 12"},
      {"title_link", "https://evil.example/change"},
      {"image_url", "http://169.254.169.254/latest/meta-data/"},
      {"thumb_url", "http://intranet.local/thumb.png"},
      {"footer_icon", "http://intranet.local/f.png"},
      {"fields",
       {{{"title", "risk"}, {"value", {{"nested", "object"}}}, {"short", "yes"}},
        {{"value", "low"}, {"short", "no"}},
        "not an object"}},
      {"actions",
       {{{"id", "approve"},
         {"name", "Approve"},
         {"integration", {{"url", "https://evil.example/approve"}, {"context", {{"k", "v"}}}}}}}},
      {"ts", {{"not", "a time"}}},
      {"mrkdwn_in", {"text"}},
  };
  const Json carried = Carried({{"attachments", {attachment}}});
  const Json expected = {{"attachments",
                          {{{"text", "approve the change?"},
                            {"title", "Change 12"},
                            {"fields", {{{"title", "risk"}}, {{"value", "low"}}}}}}}};
  CHECK(carried == expected);

  // An attachment that was only buttons and images is dropped, and with it the prop.
  const Json only_buttons = {
      {"attachments",
       {{{"actions", {{{"name", "Click"}, {"integration", {{"url", "https://x"}}}}}},
         {"image_url", "https://x/i.png"},
         {"text", ""}},
        "not an object",
        nullptr}}};
  CHECK(CarriedProps(only_buttons.dump()) == "{}");
  CHECK(CarriedProps(Json({{"attachments", "a string"}}).dump()) == "{}");
}

TEST_CASE("input that is not a props object carries nothing") {
  for (const char* bad : {"", "null", "[]", "\"text\"", "42", "{", "{\"attachments\": [",
                          "{\"a\":\"\\ud800\"}", "\xff\xfe"}) {
    INFO(bad);
    CHECK(CarriedProps(bad) == "{}");
  }
  // The output is deterministic: the same props give the same text.
  const std::string text = R"({"mentionHighlightDisabled":true,"disable_group_highlight":true})";
  CHECK(CarriedProps(text) == CarriedProps(text));
  CHECK(CarriedProps(text) ==
        R"({"disable_group_highlight":true,"mentionHighlightDisabled":true})");
}
