#include "chat/mattermost_props.h"

#include <algorithm>
#include <cctype>
#include <nlohmann/json.hpp>

namespace relay::chat {
namespace {

using Json = nlohmann::json;

// Attachment fields shown as text (model.MessageAttachment); the URL fields are left out.
constexpr std::string_view kAttachmentText[] = {"fallback", "pretext", "author_name",
                                                "title",    "text",    "footer"};

bool IsHexColor(const std::string& s) {
  return s.size() == 7 && s[0] == '#' &&
         std::all_of(s.begin() + 1, s.end(), [](char c) { return std::isxdigit(c) != 0; });
}

// One attachment reduced to its text, or null when nothing shown is left.
Json CarriedAttachment(const Json& in) {
  if (!in.is_object()) return nullptr;
  Json out = Json::object();
  for (std::string_view key : kAttachmentText) {
    const auto it = in.find(key);
    if (it != in.end() && it->is_string() && !it->get_ref<const std::string&>().empty()) {
      out[std::string(key)] = *it;
    }
  }
  if (const auto fields = in.find("fields"); fields != in.end() && fields->is_array()) {
    Json kept = Json::array();
    for (const Json& field : *fields) {
      if (!field.is_object()) continue;
      Json f = Json::object();
      if (const auto t = field.find("title"); t != field.end() && t->is_string()) f["title"] = *t;
      if (const auto v = field.find("value"); v != field.end()) {
        // Mattermost shows a field's value as text (StringifyMessageAttachmentFieldValue).
        if (v->is_string()) {
          f["value"] = *v;
        } else if (v->is_number()) {
          f["value"] = v->dump();
        }
      }
      if (f.empty()) continue;
      if (const auto s = field.find("short"); s != field.end() && s->is_boolean()) f["short"] = *s;
      kept.push_back(std::move(f));
    }
    if (!kept.empty()) out["fields"] = std::move(kept);
  }
  if (out.empty()) return nullptr;  // only buttons, images or links: nothing to show
  if (const auto color = in.find("color"); color != in.end() && color->is_string()) {
    const std::string& c = color->get_ref<const std::string&>();
    if (c == "good" || c == "warning" || c == "danger" || IsHexColor(c)) out["color"] = c;
  }
  if (const auto ts = in.find("ts"); ts != in.end() && (ts->is_string() || ts->is_number())) {
    out["ts"] = *ts;
  }
  return out;
}

}  // namespace

std::string CarriedProps(std::string_view props_json) {
  const Json props = Json::parse(props_json, nullptr, /*allow_exceptions=*/false);
  if (!props.is_object()) return "{}";
  Json out = Json::object();
  for (const char* flag : {"disable_group_highlight", "mentionHighlightDisabled"}) {
    const auto it = props.find(flag);
    if (it != props.end() && it->is_boolean()) out[flag] = *it;
  }
  if (const auto attachments = props.find("attachments");
      attachments != props.end() && attachments->is_array()) {
    Json kept = Json::array();
    for (const Json& a : *attachments) {
      Json carried = CarriedAttachment(a);
      if (!carried.is_null()) kept.push_back(std::move(carried));
    }
    if (!kept.empty()) out["attachments"] = std::move(kept);
  }
  // Strings came through a JSON parser, but replace rather than throw on bad UTF-8 anyway.
  return out.dump(-1, ' ', false, Json::error_handler_t::replace);
}

}  // namespace relay::chat
