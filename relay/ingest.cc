#include "relay/ingest.h"

#include <simdjson.h>

#include "base/log.h"

namespace relay {
namespace {

using simdjson::dom::element;
using simdjson::dom::element_type;

bool Fail(IngestError* error, int status, std::string message) {
  error->http_status = status;
  error->message = std::move(message);
  return false;
}

std::string Where(std::size_t index, bool batch) {
  return batch ? "message " + std::to_string(index) + ": " : std::string();
}

// Reads an optional string field into *out; "null" counts as absent.
bool StringField(element value, const char* name, std::string* out, std::string* problem) {
  if (value.type() == element_type::NULL_VALUE) return true;
  if (value.type() != element_type::STRING) {
    *problem = std::string("field '") + name + "' must be a string";
    return false;
  }
  std::string_view sv = value.get_string().value_unsafe();
  out->assign(sv.data(), sv.size());
  return true;
}

bool ParseOne(element obj, std::size_t index, bool batch, const config::Config& config,
              IngestMessage* msg, IngestError* error) {
  std::string where = Where(index, batch);
  if (obj.type() != element_type::OBJECT)
    return Fail(error, 400, where + "a message must be a JSON object");
  bool has_channel = false, has_author = false, has_text = false;
  std::string kind_name;
  simdjson::dom::object fields = obj.get_object().value_unsafe();
  for (auto field : fields) {
    std::string_view key = field.key;
    std::string problem;
    bool ok = true;
    if (key == "channel") {
      ok = StringField(field.value, "channel", &msg->channel, &problem);
      has_channel = ok && field.value.type() == element_type::STRING;
    } else if (key == "author") {
      ok = StringField(field.value, "author", &msg->author, &problem);
      has_author = ok && field.value.type() == element_type::STRING;
    } else if (key == "text") {
      ok = StringField(field.value, "text", &msg->text, &problem);
      has_text = ok && field.value.type() == element_type::STRING;
    } else if (key == "id") {
      ok = StringField(field.value, "id", &msg->client_id, &problem);
    } else if (key == "thread") {
      ok = StringField(field.value, "thread", &msg->thread, &problem);
    } else if (key == "ref") {
      ok = StringField(field.value, "ref", &msg->ref, &problem);
    } else if (key == "kind") {
      ok = StringField(field.value, "kind", &kind_name, &problem);
    } else if (key == "props") {
      if (field.value.type() == element_type::NULL_VALUE) continue;
      if (field.value.type() != element_type::OBJECT)
        return Fail(error, 400, where + "field 'props' must be an object of strings");
      simdjson::dom::object props = field.value.get_object().value_unsafe();
      for (auto prop : props) {
        if (prop.value.type() != element_type::STRING)
          return Fail(error, 400,
                      where + "props value '" + std::string(prop.key) + "' must be a string");
        if (prop.key.size() > kMaxFieldBytes)
          return Fail(error, 400, where + "a props key is longer than 256 bytes");
        msg->props.emplace_back(std::string(prop.key),
                                std::string(prop.value.get_string().value_unsafe()));
      }
    } else {
      return Fail(error, 400, where + "unknown field '" + std::string(key) + "'");
    }
    if (!ok) return Fail(error, 400, where + problem);
  }
  if (!has_channel) return Fail(error, 400, where + "missing field 'channel'");
  if (!has_author) return Fail(error, 400, where + "missing field 'author'");
  if (!has_text) return Fail(error, 400, where + "missing field 'text'");
  if (!config.FindChannel(msg->channel))
    return Fail(error, 400, where + "unknown channel '" + msg->channel + "'");
  if (msg->author.empty()) return Fail(error, 400, where + "field 'author' is empty");
  for (auto [name, value] : {std::pair<const char*, const std::string*>{"author", &msg->author},
                             {"id", &msg->client_id},
                             {"thread", &msg->thread},
                             {"ref", &msg->ref}}) {
    if (value->size() > kMaxFieldBytes)
      return Fail(error, 400,
                  where + "field '" + name + "' is longer than " + std::to_string(kMaxFieldBytes) +
                      " bytes");
  }
  if (msg->text.size() > config.ingest_max_text)
    return Fail(error, 413,
                where + "field 'text' has " + std::to_string(msg->text.size()) +
                    " bytes, more than the limit of " + std::to_string(config.ingest_max_text));
  if (!kind_name.empty() && !ParseEventKind(kind_name, &msg->kind))
    return Fail(error, 400, where + "unknown kind '" + kind_name + "'");
  if (msg->kind != EventKind::kPost && msg->ref.empty())
    return Fail(error, 400, where + "kind '" + kind_name + "' needs field 'ref'");
  // Only the site where a message was posted changes it (design.md, "Trust model"); reactions
  // may be added to and removed from anyone's message (a removal applies only to this site's own
  // reaction, which the receiver checks).
  if ((msg->kind == EventKind::kEdit || msg->kind == EventKind::kDelete) &&
      OriginOfEventId(msg->ref) != config.site_name)
    return Fail(error, 403,
                where + "kind '" + kind_name + "' applies to event '" + msg->ref +
                    "', which was posted at site '" + std::string(OriginOfEventId(msg->ref)) +
                    "': only the site where a message was posted can edit or delete it");
  return true;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The code unit of a \uXXXX escape starting at body[i] (the backslash), or -1 if it is not one.
long Utf16Escape(std::string_view body, std::size_t i) {
  if (i + 6 > body.size() || body[i + 1] != 'u') return -1;
  long v = 0;
  for (std::size_t j = i + 2; j < i + 6; ++j) {
    const int h = HexValue(body[j]);
    if (h < 0) return -1;
    v = v * 16 + h;
  }
  return v;
}

// simdjson says only "Problem while parsing a string": find the first bad string content (an
// escape JSON does not have, a lone UTF-16 surrogate, a raw control character) and say where.
std::string DescribeStringError(std::string_view body) {
  bool in_string = false;
  for (std::size_t i = 0; i < body.size(); ++i) {
    const auto c = static_cast<unsigned char>(body[i]);
    if (!in_string) {
      in_string = c == '"';
      continue;
    }
    const std::string at = " at byte " + std::to_string(i);
    if (c == '"') {
      in_string = false;
    } else if (c < 0x20) {
      return "a raw control character (byte " + std::to_string(c) + ") inside a string" + at +
             " (write it as a \\u escape)";
    } else if (c == '\\') {
      if (i + 1 >= body.size()) break;
      const char e = body[i + 1];
      if (e != 'u') {
        if (std::string_view("\"\\/bfnrt").find(e) == std::string_view::npos) {
          return std::string("an invalid escape \\") + log::Printable(std::string(1, e)) + at;
        }
        ++i;
        continue;
      }
      const long unit = Utf16Escape(body, i);
      if (unit < 0) return "a \\u escape without four hex digits" + at;
      const std::string text(body.substr(i, 6));
      if (unit >= 0xDC00 && unit <= 0xDFFF) {
        return "a lone UTF-16 low surrogate " + text + at + " (no high surrogate before it)";
      }
      if (unit >= 0xD800 && unit <= 0xDBFF) {
        const long low = Utf16Escape(body, i + 6);
        if (low < 0 && body.substr(i + 6, 2) == "\\u") {
          return "a \\u escape without four hex digits at byte " + std::to_string(i + 6);
        }
        if (low < 0xDC00 || low > 0xDFFF) {
          return "a lone UTF-16 high surrogate " + text + at +
                 " (not followed by a \\u escape of "
                 "a low surrogate, \\udc00 to \\udfff)";
        }
        i += 6;
      }
      i += 5;
    }
  }
  return "a string is not valid";  // simdjson saw something this scan does not
}

}  // namespace

bool ParseIngestBody(std::string_view body, const config::Config& config, IngestRequest* out,
                     IngestError* error) {
  // One parser per thread: the ingest API runs on one I/O thread, tests may use others.
  thread_local simdjson::dom::parser parser;
  element root;
  auto err = parser.parse(body.data(), body.size()).get(root);
  if (err == simdjson::STRING_ERROR || err == simdjson::UNESCAPED_CHARS) {
    return Fail(error, 400, "malformed JSON: " + DescribeStringError(body));
  }
  if (err) {
    return Fail(error, 400, std::string("malformed JSON: ") + simdjson::error_message(err));
  }
  if (root.type() == element_type::ARRAY) {
    out->batch = true;
    simdjson::dom::array array = root.get_array().value_unsafe();
    if (array.size() == 0) return Fail(error, 400, "empty batch: the array holds no message");
    out->messages.reserve(array.size());
    std::size_t i = 0;
    for (element item : array) {
      out->messages.emplace_back();
      if (!ParseOne(item, i++, true, config, &out->messages.back(), error)) return false;
    }
    return true;
  }
  out->batch = false;
  out->messages.emplace_back();
  return ParseOne(root, 0, false, config, &out->messages.back(), error);
}

}  // namespace relay
