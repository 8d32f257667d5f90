#include "config/config.h"

#include <algorithm>
#include <boost/program_options.hpp>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string_view>
#include <utility>

namespace relay::config {
namespace {

namespace fs = std::filesystem;
namespace po = boost::program_options;

constexpr std::size_t kMaxPeerNameLength = 32;  // also the site name
constexpr std::size_t kMaxChannelNameLength = 64;
constexpr std::uint64_t kMaxPort = 65535;
constexpr std::uint64_t kMinWindow = 1;
constexpr std::uint64_t kMaxWindow = 1024;
constexpr std::uint64_t kMinFrameEvents = 1;
constexpr std::uint64_t kMaxFrameEvents = 100000;
constexpr std::uint64_t kMinFrameBytes = std::uint64_t{1} << 10;
constexpr std::uint64_t kMaxFrameBytes = std::uint64_t{64} << 20;
// The Mattermost sink is parsed and validated, but the daemon has no adapter for it yet; while
// this is false every channel with sink = mattermost is reported as a problem.
constexpr bool kMattermostAvailable = true;

constexpr std::string_view kWhitespace = " \t\r\n\f\v";
constexpr std::string_view kUtf8Bom = "\xEF\xBB\xBF";

constexpr std::string_view kPeerPrefix = "peer.";
constexpr std::string_view kChannelPrefix = "channel.";
constexpr std::string_view kOriginPrefix = "origin.";

std::string_view Trim(std::string_view s) {
  const auto begin = s.find_first_not_of(kWhitespace);
  if (begin == std::string_view::npos) return {};
  const auto end = s.find_last_not_of(kWhitespace);
  return s.substr(begin, end - begin + 1);
}

std::string Quote(std::string_view s) { return "'" + std::string(s) + "'"; }

bool IsSpace(char c) { return kWhitespace.find(c) != std::string_view::npos; }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsLowerAlnum(char c) { return (c >= 'a' && c <= 'z') || IsDigit(c); }
bool IsAlnum(char c) { return IsLowerAlnum(c) || (c >= 'A' && c <= 'Z'); }

template <typename Pred>
bool AllOf(std::string_view s, Pred pred) {
  return std::all_of(s.begin(), s.end(), pred);
}

// [a-z0-9-]{1,32}: site and peer names.
bool IsValidPeerName(std::string_view name) {
  return !name.empty() && name.size() <= kMaxPeerNameLength &&
         AllOf(name, [](char c) { return IsLowerAlnum(c) || c == '-'; });
}

// [a-z0-9][a-z0-9._-]{0,63}
bool IsValidChannelName(std::string_view name) {
  return !name.empty() && name.size() <= kMaxChannelNameLength && IsLowerAlnum(name.front()) &&
         AllOf(name, [](char c) { return IsLowerAlnum(c) || c == '.' || c == '_' || c == '-'; });
}

constexpr std::string_view kPeerNameRule = "must be 1 to 32 characters from a-z, 0-9 and '-'";
constexpr std::string_view kChannelNameRule =
    "must be 1 to 64 characters from a-z, 0-9, '.', '_' and '-', starting with a-z or 0-9";

// A plain decimal number: digits only (no sign, no spaces).
Result<std::uint64_t> ParseUnsigned(std::string_view digits) {
  if (digits.empty() || !AllOf(digits, IsDigit)) {
    return Status::Error("expected a whole number, got " + Quote(digits));
  }
  std::uint64_t value = 0;
  const auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (error != std::errc() || end != digits.data() + digits.size()) {
    return Status::Error("number " + Quote(digits) + " is too large");
  }
  return value;
}

// Splits "64 KiB" into the leading digits and the (trimmed) rest.
std::pair<std::string_view, std::string_view> SplitNumber(std::string_view text) {
  std::size_t n = 0;
  while (n < text.size() && IsDigit(text[n])) ++n;
  return {text.substr(0, n), Trim(text.substr(n))};
}

struct Unit {
  std::string_view name;
  std::uint64_t factor;
};

constexpr Unit kDurationUnits[] = {
    {"ms", 1}, {"s", 1000}, {"m", 60 * 1000}, {"h", 60 * 60 * 1000}, {"d", 24 * 60 * 60 * 1000},
};

constexpr Unit kSizeUnits[] = {
    {"", 1},
    {"B", 1},
    {"K", std::uint64_t{1} << 10},
    {"KiB", std::uint64_t{1} << 10},
    {"M", std::uint64_t{1} << 20},
    {"MiB", std::uint64_t{1} << 20},
    {"G", std::uint64_t{1} << 30},
    {"GiB", std::uint64_t{1} << 30},
    {"T", std::uint64_t{1} << 40},
    {"TiB", std::uint64_t{1} << 40},
};

// "1024", "64KiB", "16 MiB" -> bytes. `what` names the kind of value in errors.
Result<std::uint64_t> ParseNumberWithUnit(const std::string& text, std::string_view what,
                                          const Unit* units, std::size_t unit_count,
                                          std::uint64_t max, std::string_view expected_units) {
  const auto fail = [&](const std::string& why) {
    return Status::Error("bad " + std::string(what) + " " + Quote(text) + ": " + why);
  };
  const auto [digits, unit_name] = SplitNumber(Trim(text));
  if (digits.empty()) return fail("no number at the start; " + std::string(expected_units));
  const auto number = ParseUnsigned(digits);
  if (!number) return fail(number.message());
  const Unit* unit = nullptr;
  for (std::size_t i = 0; i < unit_count; ++i) {
    if (units[i].name == unit_name) unit = &units[i];
  }
  if (unit == nullptr) {
    if (unit_name.empty()) return fail("missing unit (" + std::string(expected_units) + ")");
    return fail("unknown unit " + Quote(unit_name) + " (" + std::string(expected_units) + ")");
  }
  if (*number > max / unit->factor) return fail("too large");
  return *number * unit->factor;
}

// Whether `path` is `folder` or inside it (both lexically normal and absolute).
bool IsSameOrInside(std::string path, std::string folder) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  while (folder.size() > 1 && folder.back() == '/') folder.pop_back();
  if (folder == "/") return true;
  return path == folder || path.starts_with(folder + "/");
}

bool IsHostChar(char c) { return IsAlnum(c) || c == '.' || c == '-' || c == '_'; }
bool IsIpv6Char(char c) { return IsAlnum(c) || c == ':' || c == '.' || c == '%'; }

Result<Endpoint> ParseHostPort(std::string_view text, bool allow_wildcard) {
  const auto fail = [&](const std::string& why) {
    return Status::Error("bad endpoint " + Quote(text) + ": " + why);
  };
  if (text.empty()) return fail("expected host:port");
  std::string_view host;
  std::string_view port;
  if (text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string_view::npos) return fail("missing ']' after the IPv6 address");
    host = text.substr(1, close - 1);
    const auto rest = text.substr(close + 1);
    if (rest.empty() || rest.front() != ':') return fail("expected ':port' after ']'");
    port = rest.substr(1);
    if (host.find(':') == std::string_view::npos || !AllOf(host, IsIpv6Char)) {
      return fail("bad IPv6 address " + Quote(host));
    }
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return fail("missing ':port'");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) {
      return fail("an IPv6 address must be in brackets, e.g. '[::1]:7400'");
    }
    if (host.empty()) return fail("missing host before ':'");
    if (host == "*") {
      if (!allow_wildcard) return fail("'*' is not allowed here (use 0.0.0.0 or [::])");
    } else if (!AllOf(host, IsHostChar)) {
      return fail("bad host " + Quote(host));
    }
  }
  if (port.empty()) return fail("missing port after ':'");
  const auto number = ParseUnsigned(port);
  if (!number || *number > kMaxPort)
    return fail("bad port " + Quote(port) + " (expected 0..65535)");
  return Endpoint{std::string(host), static_cast<std::uint16_t>(*number)};
}

// "scheme://host:port" with a port in 1..65535.
Result<Endpoint> ParseUrlEndpoint(std::string_view value, std::string_view scheme,
                                  bool allow_wildcard) {
  const std::string prefix = std::string(scheme) + "://";
  const std::string expected =
      "expected " + prefix + (allow_wildcard ? "host:port or " + prefix + "*:port" : "host:port");
  if (value.substr(0, prefix.size()) != prefix) return Status::Error(expected);
  auto endpoint = ParseHostPort(value.substr(prefix.size()), allow_wildcard);
  if (!endpoint) return Status::Error(expected + ": " + endpoint.message());
  if (endpoint->port == 0) return Status::Error("port must be 1..65535");
  return endpoint;
}

std::string FormatMilliseconds(std::chrono::milliseconds ms) {
  return std::to_string(ms.count()) + "ms";
}

Status ReadFile(const std::string& path, std::string* out) {
  const std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"),
                                                             &std::fclose);
  if (!file) {
    return Status::Error("cannot open config file " + Quote(path) + ": " + std::strerror(errno));
  }
  char buffer[1 << 14];
  std::size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, file.get())) > 0) out->append(buffer, n);
  if (std::ferror(file.get())) {
    return Status::Error("cannot read config file " + Quote(path) + ": " + std::strerror(errno));
  }
  return Status::Ok();
}

struct Entry {
  std::string key;
  std::string value;
};

struct Section {
  std::string name;  // "site", "peer.aws", ...
  std::vector<Entry> entries;
};

enum class SectionKind {
  kSite,
  kIngest,
  kZmq,
  kDiode,
  kMattermost,
  kPeer,
  kChannel,
  kOrigin,
  kUnknown
};

SectionKind KindOf(std::string_view name) {
  if (name == "site") return SectionKind::kSite;
  if (name == "ingest") return SectionKind::kIngest;
  if (name == "zmq") return SectionKind::kZmq;
  if (name == "diode") return SectionKind::kDiode;
  if (name == "mattermost") return SectionKind::kMattermost;
  if (name.starts_with(kPeerPrefix)) return SectionKind::kPeer;
  if (name.starts_with(kChannelPrefix)) return SectionKind::kChannel;
  if (name.starts_with(kOriginPrefix)) return SectionKind::kOrigin;
  return SectionKind::kUnknown;
}

// One place a public identity is named: "[peer.aws] public_key", "[site] key_file", ...
struct KeyUse {
  std::string where;
  std::string value;  // quoted in messages: the key as written, or the key file's path
  const crypto::PublicIdentity* identity;
};

// What two identities share: "public key" (both keys), "signing key", "box key", or "" (none).
std::string_view SharedKey(const crypto::PublicIdentity& a, const crypto::PublicIdentity& b) {
  const bool sign = a.sign_pk == b.sign_pk;
  const bool box = a.box_pk == b.box_pk;
  if (sign && box) return "public key";
  if (sign) return "signing key";
  if (box) return "box key";
  return "";
}

struct RepeatedKey {
  std::size_t earlier, later;  // indexes into the uses
  std::string_view what;       // SharedKey
};

// Every use whose key appeared earlier in `uses`, with the first earlier use it repeats.
std::vector<RepeatedKey> FindRepeatedKeys(const std::vector<KeyUse>& uses) {
  std::vector<RepeatedKey> repeats;
  for (std::size_t j = 0; j < uses.size(); ++j) {
    for (std::size_t i = 0; i < j; ++i) {
      const std::string_view what = SharedKey(*uses[i].identity, *uses[j].identity);
      if (what.empty()) continue;
      repeats.push_back({i, j, what});
      break;  // one report per use
    }
  }
  return repeats;
}

// "<later where> = '<value>': same signing key as <earlier where>"
std::string RepeatedKeyMessage(const std::vector<KeyUse>& uses, const RepeatedKey& r) {
  return uses[r.later].where + " = " + Quote(uses[r.later].value) + ": same " +
         std::string(r.what) + " as " + uses[r.earlier].where;
}

// Loads one file: a line scan for syntax and comments, Boost.Program_options for the key/value
// pairs, then validation of every section. Problems are collected, never thrown.
class Loader {
 public:
  Loader(std::string display_name, Config* config)
      : display_name_(std::move(display_name)), config_(config) {}

  void Load(const std::string& text);
  const std::vector<std::string>& problems() const { return problems_; }

 private:
  std::string Prescan(std::string_view text);
  void ParseWithBoost(const std::string& cleaned);

  void Problem(const std::string& text) { problems_.push_back(display_name_ + ": " + text); }
  void LineProblem(int line, const std::string& text) {
    Problem("line " + std::to_string(line) + ": " + text);
  }
  void ValueProblem(const Section& section, const Entry& entry, std::string_view why) {
    Problem("[" + section.name + "] " + entry.key + " = " + Quote(entry.value) + ": " +
            std::string(why));
  }

  const Section* FindSection(std::string_view name) const;
  void CheckKeys(const Section& section, std::initializer_list<std::string_view> known);
  const Entry* Optional(const Section& section, std::string_view key);
  const Entry* Required(const Section& section, std::string_view key, std::string_view why = "");
  std::string ResolvePath(std::string_view value) const;
  void ReadPath(const Section& section, std::string_view key, bool required, std::string* out);
  void ReadDuration(const Section& section, std::string_view key, std::chrono::milliseconds* out);
  void ReadSize(const Section& section, std::string_view key, std::uint64_t min, std::uint64_t max,
                std::uint64_t* out);
  void ReadNumber(const Section& section, std::string_view key, std::uint64_t min,
                  std::uint64_t max, std::uint32_t* out);

  void ValidateSite(const Section& section);
  void ReadTransferDirs(const Section& section);
  void ValidateIngest(const Section& section);
  void ValidateZmq(const Section& section);
  void ValidateDiode(const Section& section);
  void ValidatePeer(const Section& section);
  void ValidateOrigin(const Section& section);
  void ValidateChannel(const Section& section);
  // A comma-separated list of [peer.NAME] names, each declared and listed once (not `self`,
  // when set); problems name the entry.
  std::vector<std::string> ReadSystemPostTypes(const Section& section, const Entry& entry);
  std::vector<std::string> ReadPeerList(const Section& section, const Entry& entry,
                                        std::string_view self = {});
  void ValidateMattermost(const Section* section);
  void CheckPeerKeys();

  std::string display_name_;
  Config* config_;
  std::vector<std::string> problems_;
  std::vector<Section> sections_;         // in file order, each name once
  std::set<std::string> declared_peers_;  // every [peer.X], valid or not (avoids cascades)
  std::map<std::string, std::string> jsonl_paths_;  // resolved path -> channel
  std::vector<std::string> mattermost_channels_;    // channels with sink = mattermost
  std::set<std::string> parsed_keys_;               // peers whose public_key parsed
};

// Handles what Boost does not, line by line, and returns text for Boost with every bad line
// blanked. Boost 1.74 treats '#' anywhere as the start of a comment (so "a#b" would silently
// become "a"), knows nothing of ';' comments, and throws at the first bad line. Here a '#' or ';'
// at the start of a line or after whitespace starts a comment; any other '#' is an error. Keys of
// unknown, nameless or repeated sections are dropped (their header is the one problem reported).
std::string Loader::Prescan(std::string_view text) {
  if (text.starts_with(kUtf8Bom)) text.remove_prefix(kUtf8Bom.size());
  std::string cleaned;
  std::map<std::string, int> seen;  // section -> line of its header
  bool in_section = false;
  bool skip = false;  // keys of the current section are dropped
  int line_number = 0;
  while (!text.empty()) {
    ++line_number;
    const auto newline = text.find('\n');
    std::string_view line = text.substr(0, newline);
    text.remove_prefix(newline == std::string_view::npos ? text.size() : newline + 1);

    for (std::size_t i = 0; i < line.size(); ++i) {
      if ((line[i] == '#' || line[i] == ';') && (i == 0 || IsSpace(line[i - 1]))) {
        line = line.substr(0, i);
        break;
      }
    }
    line = Trim(line);
    std::string out;
    if (line.empty()) {
      // blank or comment
    } else if (line.find('#') != std::string_view::npos) {
      LineProblem(line_number, Quote(line) +
                                   ": '#' starts a comment only at the start of a line "
                                   "or after whitespace");
    } else if (line.front() == '[') {
      in_section = true;
      skip = true;
      const bool closed = line.back() == ']';
      const std::string_view inner = Trim(line.substr(1, line.size() - (closed ? 2 : 1)));
      if (!closed) {
        LineProblem(line_number, "missing ']' in section header " + Quote(line));
      } else if (inner.empty()) {
        LineProblem(line_number, "empty section name " + Quote(line));
      } else if (inner == "peer" || inner == "peer." || inner == "channel" || inner == "channel." ||
                 inner == "origin" || inner == "origin.") {
        const std::string kind(inner.substr(0, inner.find('.')));
        LineProblem(line_number,
                    "section [" + std::string(inner) + "] has no name; use [" + kind + ".NAME]");
      } else if (inner.back() == '.') {
        // Boost would drop the final '.', and the keys would land in another section.
        LineProblem(line_number, "section name [" + std::string(inner) + "] ends with '.'");
      } else if (KindOf(inner) == SectionKind::kUnknown) {
        LineProblem(line_number, "unknown section [" + std::string(inner) + "]");
      } else if (const auto it = seen.find(std::string(inner)); it != seen.end()) {
        LineProblem(line_number, "section [" + std::string(inner) +
                                     "] appears again (first on line " +
                                     std::to_string(it->second) + ")");
      } else {
        seen.emplace(inner, line_number);
        sections_.push_back(Section{std::string(inner), {}});
        skip = false;
        out = "[" + std::string(inner) + "]";
      }
    } else if (const auto equals = line.find('='); equals == std::string_view::npos) {
      LineProblem(line_number, "expected 'key = value' or '[section]', got " + Quote(line));
    } else {
      const std::string_view key = Trim(line.substr(0, equals));
      if (key.empty()) {
        LineProblem(line_number, "missing key name before '=' in " + Quote(line));
      } else if (!AllOf(key, [](char c) { return IsAlnum(c) || c == '_' || c == '-'; })) {
        LineProblem(line_number, "bad key name " + Quote(key));
      } else if (!in_section) {
        LineProblem(line_number, "key " + Quote(key) + " is outside any section");
      } else if (!skip) {
        out = line;
      }
    }
    cleaned += out;
    cleaned += '\n';
  }
  return cleaned;
}

void Loader::ParseWithBoost(const std::string& cleaned) {
  std::istringstream stream(cleaned);
  po::parsed_options parsed(nullptr);
  try {
    const po::options_description no_registered_options;
    parsed = po::parse_config_file(stream, no_registered_options, /*allow_unregistered=*/true);
  } catch (const std::exception& e) {
    // Not expected after Prescan, but Boost's word is final.
    Problem(std::string("cannot parse: ") + e.what());
    return;
  }
  for (const po::option& option : parsed.options) {
    // Prescan admits only keys without '.' inside named sections, so the last '.' splits them.
    const auto dot = option.string_key.rfind('.');
    if (dot == std::string::npos) {
      Problem("key " + Quote(option.string_key) + " is outside any section");
      continue;
    }
    const std::string section_name = option.string_key.substr(0, dot);
    Entry entry{option.string_key.substr(dot + 1), option.value.empty() ? "" : option.value[0]};
    auto section = std::find_if(sections_.begin(), sections_.end(),
                                [&](const Section& s) { return s.name == section_name; });
    if (section == sections_.end()) {
      sections_.push_back(Section{section_name, {}});
      section = sections_.end() - 1;
    }
    const auto previous = std::find_if(section->entries.begin(), section->entries.end(),
                                       [&](const Entry& e) { return e.key == entry.key; });
    if (previous != section->entries.end()) {
      // The first value stays, so later checks do not report the same key again.
      Problem("duplicate key " + Quote(entry.key) + " in [" + section_name +
              "]: " + Quote(previous->value) + ", then " + Quote(entry.value));
      continue;
    }
    section->entries.push_back(std::move(entry));
  }
}

const Section* Loader::FindSection(std::string_view name) const {
  for (const Section& section : sections_) {
    if (section.name == name) return &section;
  }
  return nullptr;
}

void Loader::CheckKeys(const Section& section, std::initializer_list<std::string_view> known) {
  for (const Entry& entry : section.entries) {
    if (std::find(known.begin(), known.end(), entry.key) == known.end()) {
      Problem("unknown key " + Quote(entry.key) + " in [" + section.name + "]");
    }
  }
}

const Entry* FindEntry(const Section& section, std::string_view key) {
  for (const Entry& entry : section.entries) {
    if (entry.key == key) return &entry;
  }
  return nullptr;
}

// The entry for `key`, or null if absent. An empty value is reported and yields null.
const Entry* Loader::Optional(const Section& section, std::string_view key) {
  const Entry* entry = FindEntry(section, key);
  if (entry != nullptr && entry->value.empty()) {
    ValueProblem(section, *entry, "empty value (remove the line to use the default)");
    return nullptr;
  }
  return entry;
}

// Like Optional, but absence is a problem too; `why` says when the key is required.
const Entry* Loader::Required(const Section& section, std::string_view key, std::string_view why) {
  const Entry* entry = FindEntry(section, key);
  if (entry == nullptr) {
    Problem("missing required key " + Quote(key) + " in [" + section.name + "]" +
            (why.empty() ? "" : " (" + std::string(why) + ")"));
    return nullptr;
  }
  if (entry->value.empty()) {
    ValueProblem(section, *entry, "empty value");
    return nullptr;
  }
  return entry;
}

std::string Loader::ResolvePath(std::string_view value) const {
  const fs::path path(value);
  if (path.is_absolute()) return path.lexically_normal().string();
  return (fs::path(config_->dir) / path).lexically_normal().string();
}

void Loader::ReadPath(const Section& section, std::string_view key, bool required,
                      std::string* out) {
  const Entry* entry = required ? Required(section, key) : Optional(section, key);
  if (entry != nullptr) *out = ResolvePath(entry->value);
}

void Loader::ReadDuration(const Section& section, std::string_view key,
                          std::chrono::milliseconds* out) {
  const Entry* entry = Optional(section, key);
  if (entry == nullptr) return;
  const auto duration = ParseDuration(entry->value);
  if (!duration) {
    ValueProblem(section, *entry, duration.message());
  } else if (duration->count() <= 0) {
    ValueProblem(section, *entry, "must be more than 0");
  } else {
    *out = *duration;
  }
}

void Loader::ReadSize(const Section& section, std::string_view key, std::uint64_t min,
                      std::uint64_t max, std::uint64_t* out) {
  const Entry* entry = Optional(section, key);
  if (entry == nullptr) return;
  const auto size = ParseSize(entry->value);
  if (!size) {
    ValueProblem(section, *entry, size.message());
  } else if (*size < min || *size > max) {
    ValueProblem(section, *entry,
                 "must be from " + std::to_string(min) + " to " + std::to_string(max) + " bytes");
  } else {
    *out = *size;
  }
}

void Loader::ReadNumber(const Section& section, std::string_view key, std::uint64_t min,
                        std::uint64_t max, std::uint32_t* out) {
  const Entry* entry = Optional(section, key);
  if (entry == nullptr) return;
  const auto number = ParseUnsigned(entry->value);
  if (!number || *number < min || *number > max) {
    ValueProblem(
        section, *entry,
        "must be a whole number from " + std::to_string(min) + " to " + std::to_string(max));
  } else {
    *out = static_cast<std::uint32_t>(*number);
  }
}

// The items of a comma-separated value, each trimmed (empty ones kept: the caller names them).
std::vector<std::string> SplitCommas(std::string_view value) {
  std::vector<std::string> items;
  while (true) {
    const auto comma = value.find(',');
    items.emplace_back(Trim(value.substr(0, comma)));
    if (comma == std::string_view::npos) return items;
    value.remove_prefix(comma + 1);
  }
}

std::vector<std::string> Loader::ReadPeerList(const Section& section, const Entry& entry,
                                              std::string_view self) {
  std::vector<std::string> out;
  for (const std::string& name : SplitCommas(entry.value)) {
    if (name.empty()) {
      ValueProblem(section, entry, "empty peer name in the list");
    } else if (declared_peers_.count(name) == 0) {
      ValueProblem(section, entry,
                   "unknown peer " + Quote(name) + " (there is no [peer." + name + "] section)");
    } else if (name == self) {
      ValueProblem(section, entry, "peer " + Quote(name) + " cannot be listed for itself");
    } else if (std::find(out.begin(), out.end(), name) != out.end()) {
      ValueProblem(section, entry, "peer " + Quote(name) + " is listed twice");
    } else {
      out.push_back(name);
    }
  }
  return out;
}

std::vector<std::string> Loader::ReadSystemPostTypes(const Section& section, const Entry& entry) {
  std::vector<std::string> out;
  for (const std::string& type : SplitCommas(entry.value)) {
    const bool well_formed = type.size() > 7 && type.size() <= 64 &&
                             type.compare(0, 7, "system_") == 0 &&
                             std::all_of(type.begin(), type.end(),
                                         [](char c) { return (c >= 'a' && c <= 'z') || c == '_'; });
    if (!well_formed) {
      ValueProblem(section, entry,
                   "bad system post type " + Quote(type) +
                       " (expected Mattermost post types such as system_header_change, "
                       "comma-separated)");
    } else if (std::find(out.begin(), out.end(), type) != out.end()) {
      ValueProblem(section, entry, "system post type " + Quote(type) + " is listed twice");
    } else {
      out.push_back(type);
    }
  }
  return out;
}

void Loader::ValidateSite(const Section& section) {
  CheckKeys(section, {"name", "key_file", "data_dir", "dedup_ttl", "previous_key_file", "min_free",
                      "attachment_wait", "transfer_dirs"});
  ReadPath(section, "previous_key_file", /*required=*/false, &config_->previous_key_file);
  if (const Entry* name = Required(section, "name")) {
    if (IsValidPeerName(name->value)) {
      config_->site_name = name->value;
    } else {
      ValueProblem(section, *name, kPeerNameRule);
    }
  }
  ReadPath(section, "key_file", /*required=*/true, &config_->key_file);
  ReadPath(section, "data_dir", /*required=*/true, &config_->data_dir);
  ReadDuration(section, "dedup_ttl", &config_->dedup_ttl);
  ReadDuration(section, "attachment_wait", &config_->attachment_wait);
  ReadSize(section, "min_free", 0, std::numeric_limits<std::uint64_t>::max(), &config_->min_free);
  ReadTransferDirs(section);
}

void Loader::ReadTransferDirs(const Section& section) {
  const Entry* dirs = Optional(section, "transfer_dirs");
  if (dirs == nullptr) return;
  std::string_view rest = dirs->value;
  while (true) {
    const auto comma = rest.find(',');
    const std::string_view item = Trim(rest.substr(0, comma));
    if (item.empty()) {
      ValueProblem(section, *dirs, "empty folder in the list");
    } else {
      std::string path = ResolvePath(item);
      while (path.size() > 1 && path.back() == '/') path.pop_back();
      if (std::find(config_->transfer_dirs.begin(), config_->transfer_dirs.end(), path) !=
          config_->transfer_dirs.end()) {
        ValueProblem(section, *dirs, "folder " + Quote(item) + " is listed twice");
      } else if (!config_->data_dir.empty() && IsSameOrInside(path, config_->data_dir)) {
        ValueProblem(section, *dirs,
                     "folder " + Quote(path) + " is inside data_dir " + Quote(config_->data_dir) +
                         ": bundles never go into the store's own folder");
      } else {
        config_->transfer_dirs.push_back(path);
      }
    }
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
}

void Loader::ValidateIngest(const Section& section) {
  CheckKeys(section, {"listen", "max_body", "max_text", "max_pending", "token_file",
                      "allow_anonymous", "allowed_hosts"});
  if (const Entry* listen = Required(section, "listen")) {
    const auto endpoint = ParseEndpoint(listen->value);
    if (!endpoint) {
      ValueProblem(section, *listen, endpoint.message());
    } else if (endpoint->port == 0) {
      ValueProblem(section, *listen, "port must be 1..65535");
    } else {
      config_->ingest_listen = *endpoint;
    }
  }
  const std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
  ReadSize(section, "max_body", 1, max, &config_->ingest_max_body);
  ReadSize(section, "max_text", 1, max, &config_->ingest_max_text);
  if (config_->ingest_max_text > config_->ingest_max_body) {
    Problem("[ingest] max_text (" + std::to_string(config_->ingest_max_text) +
            " bytes) must not exceed max_body (" + std::to_string(config_->ingest_max_body) +
            " bytes)");
  }
  if (Optional(section, "max_pending")) {
    ReadSize(section, "max_pending", 1, max, &config_->ingest_max_pending);
    if (config_->ingest_max_pending < config_->ingest_max_body) {
      Problem("[ingest] max_pending (" + std::to_string(config_->ingest_max_pending) +
              " bytes) must be at least max_body (" + std::to_string(config_->ingest_max_body) +
              " bytes)");
    }
  } else {
    config_->ingest_max_pending = std::max<std::uint64_t>(64u << 20, config_->ingest_max_body);
  }
  // The API is authenticated unless the file says, in so many words, that it must not be.
  ReadPath(section, "token_file", /*required=*/false, &config_->ingest_token_file);
  if (const Entry* anonymous = Optional(section, "allow_anonymous")) {
    if (anonymous->value == "true" || anonymous->value == "yes") {
      config_->ingest_allow_anonymous = true;
      if (!config_->ingest_token_file.empty()) {
        ValueProblem(section, *anonymous,
                     "contradicts token_file (remove one: with a token_file the API is "
                     "authenticated)");
      }
    } else if (anonymous->value != "false" && anonymous->value != "no") {
      ValueProblem(section, *anonymous, "expected true or false");
    }
  }
  const Entry* listen = FindEntry(section, "listen");
  if (listen != nullptr && config_->ingest_token_file.empty() && !config_->ingest_allow_anonymous) {
    Problem("[ingest] listen = " + Quote(listen->value) +
            " is a TCP address and there is no token_file: anyone who can reach it could use "
            "the API. Set token_file = PATH (create the file with `relay token PATH`), or "
            "allow_anonymous = true (for demos only)");
  }
  if (const Entry* hosts = Optional(section, "allowed_hosts")) {
    std::string_view rest = hosts->value;
    while (true) {
      const auto comma = rest.find(',');
      const std::string name(Trim(rest.substr(0, comma)));
      if (name.empty()) {
        ValueProblem(section, *hosts, "empty host name in the list");
      } else if (!AllOf(name, IsHostChar) || name.front() == '-' || name.front() == '.') {
        ValueProblem(section, *hosts,
                     "bad host name " + Quote(name) +
                         " (a DNS name such as relay.example.internal; IP addresses are "
                         "accepted without listing them)");
      } else {
        config_->ingest_allowed_hosts.push_back(name);
      }
      if (comma == std::string_view::npos) break;
      rest.remove_prefix(comma + 1);
    }
  }
}

void Loader::ValidateZmq(const Section& section) {
  CheckKeys(section, {"listen", "heartbeat_interval", "peer_timeout"});
  if (const Entry* listen = Optional(section, "listen")) {
    const auto endpoint = ParseUrlEndpoint(listen->value, "tcp", /*allow_wildcard=*/true);
    if (endpoint) {
      config_->zmq_listen = listen->value;
    } else {
      ValueProblem(section, *listen, endpoint.message());
    }
  }
  ReadDuration(section, "heartbeat_interval", &config_->heartbeat_interval);
  ReadDuration(section, "peer_timeout", &config_->peer_timeout);
  if (config_->peer_timeout <= config_->heartbeat_interval) {
    Problem("[zmq] peer_timeout (" + FormatMilliseconds(config_->peer_timeout) +
            ") must exceed heartbeat_interval (" + FormatMilliseconds(config_->heartbeat_interval) +
            ")");
  }
}

void Loader::ValidateDiode(const Section& section) {
  CheckKeys(section, {"listen"});
  if (const Entry* listen = Optional(section, "listen")) {
    const auto endpoint = ParseUrlEndpoint(listen->value, "udp", /*allow_wildcard=*/false);
    if (endpoint) {
      config_->diode_listen = listen->value;
    } else {
      ValueProblem(section, *listen, endpoint.message());
    }
  }
}

void Loader::ValidatePeer(const Section& section) {
  PeerConfig peer;
  peer.name = section.name.substr(kPeerPrefix.size());
  if (!IsValidPeerName(peer.name)) {
    Problem("[" + section.name + "]: bad peer name " + Quote(peer.name) + ": " +
            std::string(kPeerNameRule));
  } else if (peer.name == config_->site_name) {
    Problem("[" + section.name + "]: a peer cannot have the site's own name " + Quote(peer.name));
  }
  CheckKeys(section, {"public_key",
                      "zmq_connect",
                      "files_dir",
                      "diode_send",
                      "window",
                      "max_frame_events",
                      "max_frame_bytes",
                      "diode_rate",
                      "diode_data_shards",
                      "diode_parity_shards",
                      "diode_interleave",
                      "diode_retention",
                      "files_auto",
                      "max_queue",
                      "files_interval",
                      "previous_public_key",
                      "previous_public_key_until",
                      "via",
                      "max_inbound",
                      "max_spool"});
  if (const Entry* via = Optional(section, "via"))
    peer.via = ReadPeerList(section, *via, peer.name);
  // A rotation must end: the previous key (possibly the reason for the rotation, if it leaked)
  // is accepted only until a stated time, never open-ended.
  const Entry* prev = Optional(section, "previous_public_key");
  const Entry* until = Optional(section, "previous_public_key_until");
  if (prev != nullptr) {
    auto identity = crypto::PublicIdentity::Parse(prev->value);
    if (identity) {
      peer.previous_public_key = *identity;
    } else {
      ValueProblem(section, *prev, "bad public key: " + identity.message());
    }
    if (until == nullptr && FindEntry(section, "previous_public_key_until") == nullptr) {
      Problem("[" + section.name +
              "] previous_public_key needs previous_public_key_until = <RFC 3339 time>, the "
              "moment the previous key stops being accepted (e.g. "
              "previous_public_key_until = 2026-12-31T00:00:00Z): a key rotation must end");
    }
  }
  if (until != nullptr) {
    auto time = ParseTime(until->value);
    if (!time) {
      ValueProblem(section, *until, time.message());
    } else if (prev == nullptr) {
      ValueProblem(section, *until, "only used with previous_public_key");
    } else {
      peer.previous_public_key_until = *time;
    }
  }
  if (const Entry* key = Required(section, "public_key")) {
    auto identity = crypto::PublicIdentity::Parse(key->value);
    if (!identity) {
      ValueProblem(section, *key, "bad public key: " + identity.message());
    } else {
      peer.public_key = *identity;
      parsed_keys_.insert(peer.name);
    }
  }
  if (const Entry* connect = Optional(section, "zmq_connect")) {
    const auto endpoint = ParseUrlEndpoint(connect->value, "tcp", /*allow_wildcard=*/false);
    if (endpoint) {
      peer.zmq_connect = connect->value;
    } else {
      ValueProblem(section, *connect, endpoint.message());
    }
  }
  ReadPath(section, "files_dir", /*required=*/false, &peer.files_dir);
  if (const Entry* send = Optional(section, "diode_send")) {
    const auto endpoint = ParseUrlEndpoint(send->value, "udp", /*allow_wildcard=*/false);
    if (endpoint) {
      peer.diode_send = send->value;
    } else {
      ValueProblem(section, *send, endpoint.message());
    }
  }
  ReadNumber(section, "window", kMinWindow, kMaxWindow, &peer.window);
  ReadNumber(section, "max_queue", 1, 2'000'000'000, &peer.max_queue);
  ReadNumber(section, "max_frame_events", kMinFrameEvents, kMaxFrameEvents, &peer.max_frame_events);
  ReadSize(section, "max_frame_bytes", kMinFrameBytes, kMaxFrameBytes, &peer.max_frame_bytes);
  ReadSize(section, "max_inbound", 1u << 20, std::numeric_limits<std::uint64_t>::max(),
           &peer.max_inbound);
  ReadSize(section, "max_spool", 1u << 20, std::numeric_limits<std::uint64_t>::max(),
           &peer.max_spool);
  ReadSize(section, "diode_rate", 1024, std::uint64_t{10} << 30, &peer.diode_rate);
  ReadNumber(section, "diode_data_shards", 1, 200, &peer.diode_data_shards);
  ReadNumber(section, "diode_parity_shards", 1, 55, &peer.diode_parity_shards);
  ReadNumber(section, "diode_interleave", 1, 64, &peer.diode_interleave);
  ReadDuration(section, "diode_retention", &peer.diode_retention);
  ReadDuration(section, "files_interval", &peer.files_interval);
  if (const Entry* automatic = Optional(section, "files_auto")) {
    if (automatic->value == "true" || automatic->value == "yes") {
      peer.files_auto = true;
      if (peer.files_dir.empty()) ValueProblem(section, *automatic, "needs files_dir");
    } else if (automatic->value != "false" && automatic->value != "no") {
      ValueProblem(section, *automatic, "expected true or false");
    }
  }
  config_->peers.push_back(std::move(peer));
}

void Loader::ValidateOrigin(const Section& section) {
  OriginConfig origin;
  origin.name = section.name.substr(kOriginPrefix.size());
  if (!IsValidPeerName(origin.name)) {
    Problem("[" + section.name + "]: bad site name " + Quote(origin.name) + ": " +
            std::string(kPeerNameRule));
  } else if (origin.name == config_->site_name) {
    Problem("[" + section.name + "]: this site's own name " + Quote(origin.name) +
            " cannot be an origin of events it receives");
  } else if (declared_peers_.count(origin.name) != 0) {
    Problem("[" + section.name + "]: '" + origin.name + "' is a [peer." + origin.name +
            "] already: its key is the peer's public_key (use [peer." + origin.name +
            "] via = ... for the peers that may forward its events)");
  }
  CheckKeys(section, {"public_key", "previous_public_key", "previous_public_key_until", "via"});
  if (const Entry* key = Required(section, "public_key")) {
    auto identity = crypto::PublicIdentity::Parse(key->value);
    if (identity) {
      origin.public_key = *identity;
    } else {
      ValueProblem(section, *key, "bad public key: " + identity.message());
    }
  }
  const Entry* until = Optional(section, "previous_public_key_until");
  if (const Entry* prev = Optional(section, "previous_public_key")) {
    auto identity = crypto::PublicIdentity::Parse(prev->value);
    if (identity) {
      origin.previous_public_key = *identity;
    } else {
      ValueProblem(section, *prev, "bad public key: " + identity.message());
    }
    if (until == nullptr && FindEntry(section, "previous_public_key_until") == nullptr)
      Problem("[" + section.name +
              "] previous_public_key needs previous_public_key_until = <RFC 3339 time>: a key "
              "rotation must end");
  }
  if (until != nullptr) {
    auto time = ParseTime(until->value);
    if (!time) {
      ValueProblem(section, *until, time.message());
    } else if (!origin.previous_public_key) {
      ValueProblem(section, *until, "only used with previous_public_key");
    } else {
      origin.previous_public_key_until = *time;
    }
  }
  if (const Entry* via = Required(section, "via", "the peers that may forward its events"))
    origin.via = ReadPeerList(section, *via);
  config_->origins.push_back(std::move(origin));
}

void Loader::ValidateChannel(const Section& section) {
  ChannelConfig channel;
  channel.name = section.name.substr(kChannelPrefix.size());
  if (!IsValidChannelName(channel.name)) {
    Problem("[" + section.name + "]: bad channel name " + Quote(channel.name) + ": " +
            std::string(kChannelNameRule));
  }
  CheckKeys(section, {"peers", "sink", "jsonl_path", "mattermost_channel_id", "webhook_url",
                      "mattermost_system_posts"});
  if (const Entry* peers = Required(section, "peers")) {
    channel.peers = ReadPeerList(section, *peers);
  }
  if (const Entry* sink = Optional(section, "sink")) {
    if (sink->value == "jsonl") {
      channel.sink = SinkKind::kJsonl;
    } else if (sink->value == "mattermost") {
      channel.sink = SinkKind::kMattermost;
    } else if (sink->value == "webhook") {
      channel.sink = SinkKind::kWebhook;
    } else {
      ValueProblem(
          section, *sink,
          "unknown sink " + Quote(sink->value) + " (expected jsonl, mattermost or webhook)");
    }
  }
  // Keys of the other sink are errors rather than silently ignored.
  const auto reject = [&](std::string_view key, std::string_view sink_name) {
    for (const Entry& entry : section.entries) {
      if (entry.key == key) {
        ValueProblem(section, entry, "only used with sink = " + std::string(sink_name));
      }
    }
  };
  if (channel.sink != SinkKind::kWebhook) reject("webhook_url", "webhook");
  if (channel.sink != SinkKind::kMattermost) reject("mattermost_system_posts", "mattermost");
  if (channel.sink == SinkKind::kWebhook) {
    reject("mattermost_channel_id", "mattermost");
    reject("jsonl_path", "jsonl");
    if (const Entry* url = Required(section, "webhook_url", "required when sink = webhook")) {
      const std::string_view value = url->value;
      const auto scheme_end = value.find("://");
      const std::string_view scheme = value.substr(0, scheme_end);
      if (scheme_end == std::string_view::npos || (scheme != "http" && scheme != "https") ||
          value.size() == scheme_end + 3) {
        ValueProblem(section, *url, "expected http://HOST/hooks/ID or https://...");
      } else {
        channel.webhook_url = url->value;
      }
    }
  } else if (channel.sink == SinkKind::kJsonl) {
    reject("mattermost_channel_id", "mattermost");
    if (const Entry* path = Required(section, "jsonl_path", "required when sink = jsonl")) {
      channel.jsonl_path = ResolvePath(path->value);
      const auto [it, inserted] = jsonl_paths_.emplace(channel.jsonl_path, channel.name);
      if (!inserted) {
        ValueProblem(section, *path, "the same file as [channel." + it->second + "] jsonl_path");
      }
    }
  } else {
    reject("jsonl_path", "jsonl");
    if (const Entry* id =
            Required(section, "mattermost_channel_id", "required when sink = mattermost")) {
      channel.mattermost_channel_id = id->value;
    }
    if (const Entry* kinds = Optional(section, "mattermost_system_posts")) {
      channel.mattermost_system_posts = ReadSystemPostTypes(section, *kinds);
    }
    mattermost_channels_.push_back(channel.name);
    if (!kMattermostAvailable) {
      Problem("[" + section.name +
              "] sink = mattermost: the Mattermost adapter is not available in this build yet");
    }
  }
  config_->channels.push_back(std::move(channel));
}

void Loader::ValidateMattermost(const Section* section) {
  const bool needed = !mattermost_channels_.empty();
  const std::string why = needed ? "required because [channel." + mattermost_channels_.front() +
                                       "] uses sink = mattermost"
                                 : "";
  if (section == nullptr) {
    if (needed) Problem("missing section [mattermost] (" + why + ")");
    return;
  }
  CheckKeys(*section,
            {"url", "token_file", "ca_file", "client_cert", "client_key", "timeout", "display_name",
             "icon_url", "max_file_bytes", "catchup_overlap", "poll_interval"});
  const Entry* url = needed ? Required(*section, "url", why) : Optional(*section, "url");
  if (url != nullptr) {
    const std::string_view value = url->value;
    const auto scheme_end = value.find("://");
    const std::string_view scheme = value.substr(0, scheme_end);
    if (scheme_end == std::string_view::npos || (scheme != "http" && scheme != "https") ||
        value.size() == scheme_end + 3) {
      ValueProblem(*section, *url, "expected http://HOST or https://HOST");
    } else {
      config_->mattermost_url = url->value;
    }
  }
  const Entry* token =
      needed ? Required(*section, "token_file", why) : Optional(*section, "token_file");
  if (token != nullptr) config_->mattermost_token_file = ResolvePath(token->value);
  ReadPath(*section, "ca_file", /*required=*/false, &config_->mattermost_ca_file);
  ReadPath(*section, "client_cert", /*required=*/false, &config_->mattermost_client_cert);
  ReadPath(*section, "client_key", /*required=*/false, &config_->mattermost_client_key);
  if (config_->mattermost_client_cert.empty() != config_->mattermost_client_key.empty()) {
    Problem("[mattermost]: client_cert and client_key go together (mutual TLS needs both)");
  }
  ReadDuration(*section, "timeout", &config_->mattermost_timeout);
  ReadDuration(*section, "catchup_overlap", &config_->mattermost_catchup_overlap);
  ReadDuration(*section, "poll_interval", &config_->mattermost_poll_interval);
  ReadSize(*section, "max_file_bytes", 1, std::uint64_t{1} << 30,
           &config_->mattermost_max_file_bytes);
  if (const Entry* name = Optional(*section, "display_name")) {
    if (name->value.find("{author}") == std::string::npos) {
      ValueProblem(*section, *name, "must contain {author}");
    } else {
      config_->mattermost_display_name = name->value;
    }
  }
  if (const Entry* icon = Optional(*section, "icon_url"))
    config_->mattermost_icon_url = icon->value;
}

// A signing or box key belongs to one site: two peers cannot share one, a peer's current key
// cannot be another's previous one, and a peer's previous key cannot be its current one. (This
// site's own keys are checked by CheckOwnKeys, which needs the key file.)
void Loader::CheckPeerKeys() {
  std::vector<KeyUse> uses;
  for (const PeerConfig& peer : config_->peers) {
    if (parsed_keys_.count(peer.name)) {
      uses.push_back(
          {"[peer." + peer.name + "] public_key", peer.public_key.ToString(), &peer.public_key});
    }
    if (peer.previous_public_key) {
      uses.push_back({"[peer." + peer.name + "] previous_public_key",
                      peer.previous_public_key->ToString(), &*peer.previous_public_key});
    }
  }
  for (const RepeatedKey& r : FindRepeatedKeys(uses)) {
    const std::string& earlier = uses[r.earlier].where;
    const std::string& later = uses[r.later].where;
    const bool same_peer = earlier.substr(0, earlier.find(']')) == later.substr(0, later.find(']'));
    Problem(RepeatedKeyMessage(uses, r) +
            (same_peer ? " (previous_public_key is the key being replaced, not the new one)"
                       : " (each site has its own keys: paste each peer's `relay pubkey` output)"));
  }
}

void Loader::Load(const std::string& text) {
  ParseWithBoost(Prescan(text));

  const Section* site = FindSection("site");
  if (site != nullptr) {
    ValidateSite(*site);
  } else {
    Problem("missing section [site]");
  }
  if (const Section* ingest = FindSection("ingest")) {
    ValidateIngest(*ingest);
  } else {
    Problem("missing section [ingest]");
  }
  if (const Section* zmq = FindSection("zmq")) ValidateZmq(*zmq);
  if (const Section* diode = FindSection("diode")) ValidateDiode(*diode);
  for (const Section& section : sections_) {
    if (KindOf(section.name) == SectionKind::kPeer) {
      declared_peers_.insert(section.name.substr(kPeerPrefix.size()));
    }
  }
  for (const Section& section : sections_) {
    if (KindOf(section.name) == SectionKind::kPeer) ValidatePeer(section);
  }
  CheckPeerKeys();
  for (const Section& section : sections_) {
    if (KindOf(section.name) == SectionKind::kOrigin) ValidateOrigin(section);
  }
  for (const Section& section : sections_) {
    if (KindOf(section.name) == SectionKind::kChannel) ValidateChannel(section);
  }
  ValidateMattermost(FindSection("mattermost"));
}

}  // namespace

const crypto::PublicIdentity* PeerConfig::PreviousKeyAt(
    std::chrono::system_clock::time_point now) const {
  if (!previous_public_key || !crypto::PreviousKeyAccepted(previous_public_key_until, now)) {
    return nullptr;
  }
  return &*previous_public_key;
}

bool PeerConfig::PreviousKeyExpiredAt(std::chrono::system_clock::time_point now) const {
  return previous_public_key && !crypto::PreviousKeyAccepted(previous_public_key_until, now);
}

Status CheckOwnKeys(const Config& config, const crypto::PublicIdentity& own,
                    const crypto::PublicIdentity* own_previous) {
  // This site's keys first, so that every repeat is reported at the peer that repeats them.
  std::vector<KeyUse> uses = {{"[site] key_file", config.key_file, &own}};
  if (own_previous != nullptr) {
    uses.push_back({"[site] previous_key_file", config.previous_key_file, own_previous});
  }
  const std::size_t own_count = uses.size();
  for (const PeerConfig& peer : config.peers) {
    uses.push_back(
        {"[peer." + peer.name + "] public_key", peer.public_key.ToString(), &peer.public_key});
    if (peer.previous_public_key) {
      uses.push_back({"[peer." + peer.name + "] previous_public_key",
                      peer.previous_public_key->ToString(), &*peer.previous_public_key});
    }
  }
  std::string message;
  for (const RepeatedKey& r : FindRepeatedKeys(uses)) {
    // Repeats among the peers alone are LoadConfig's to report. This site's keys come first, so
    // a peer key equal to one of them is reported against it.
    if (r.earlier >= own_count) continue;
    if (!message.empty()) message += '\n';
    message += config.path + ": " + RepeatedKeyMessage(uses, r);
    if (r.later < own_count) {
      message += " (previous_key_file is the key being replaced: the old key file)";
    } else {
      message += " ('" + uses[r.earlier].value +
                 "' is this site's own key; a peer's key is the output of `relay pubkey` on "
                 "that site)";
    }
  }
  if (message.empty()) return Status::Ok();
  return Status::Error(message);
}

const PeerConfig* Config::FindPeer(const std::string& name) const {
  for (const PeerConfig& peer : peers) {
    if (peer.name == name) return &peer;
  }
  return nullptr;
}

const OriginConfig* Config::FindOrigin(const std::string& name) const {
  for (const OriginConfig& origin : origins) {
    if (origin.name == name) return &origin;
  }
  return nullptr;
}

const ChannelConfig* Config::FindChannel(const std::string& name) const {
  for (const ChannelConfig& channel : channels) {
    if (channel.name == name) return &channel;
  }
  return nullptr;
}

Result<Config> LoadConfig(const std::string& path) {
  std::string text;
  if (Status status = ReadFile(path, &text); !status) return status;

  Config config;
  std::error_code error;
  const fs::path absolute = fs::absolute(path, error);
  if (error) {
    return Status::Error("cannot resolve config file path " + Quote(path) + ": " + error.message());
  }
  config.path = absolute.lexically_normal().string();
  config.dir = absolute.lexically_normal().parent_path().string();

  if (Status status = crypto::Init(); !status) return status.Wrap("cannot check public keys");

  Loader loader(path, &config);
  loader.Load(text);
  if (loader.problems().empty()) return config;
  std::string message;
  for (const std::string& problem : loader.problems()) {
    if (!message.empty()) message += '\n';
    message += problem;
  }
  return Status::Error(message);
}

Result<std::chrono::milliseconds> ParseDuration(const std::string& text) {
  const auto ms = ParseNumberWithUnit(
      text, "duration", kDurationUnits, std::size(kDurationUnits),
      static_cast<std::uint64_t>(std::numeric_limits<std::chrono::milliseconds::rep>::max()),
      "expected ms, s, m, h or d, e.g. '1500ms', '2s', '7d'");
  if (!ms) return ms.status();
  return std::chrono::milliseconds(static_cast<std::chrono::milliseconds::rep>(*ms));
}

Result<std::uint64_t> ParseSize(const std::string& text) {
  return ParseNumberWithUnit(text, "size", kSizeUnits, std::size(kSizeUnits),
                             std::numeric_limits<std::uint64_t>::max(),
                             "expected B, KiB, MiB, GiB or TiB, or K, M, G, T for the same; "
                             "no unit means bytes");
}

Result<Endpoint> ParseEndpoint(const std::string& text) {
  return ParseHostPort(text, /*allow_wildcard=*/false);
}

Result<std::chrono::system_clock::time_point> ParseTime(const std::string& text) {
  using namespace std::chrono;
  const auto fail = [&](const std::string& why) {
    return Status::Error("bad time " + Quote(text) + ": " + why +
                         " (expected an RFC 3339 time such as 2026-12-31T00:00:00Z)");
  };
  std::string_view rest = Trim(text);
  // Reads exactly `n` digits.
  const auto digits = [&](std::size_t n, int* out) {
    if (rest.size() < n || !AllOf(rest.substr(0, n), IsDigit)) return false;
    *out = 0;
    for (std::size_t i = 0; i < n; ++i) *out = *out * 10 + (rest[i] - '0');
    rest.remove_prefix(n);
    return true;
  };
  const auto literal = [&](std::string_view chars) {
    if (rest.empty() || chars.find(rest.front()) == std::string_view::npos) return false;
    rest.remove_prefix(1);
    return true;
  };
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0;
  if (!digits(4, &y) || !literal("-") || !digits(2, &mo) || !literal("-") || !digits(2, &d)) {
    return fail("the date must be YYYY-MM-DD");
  }
  if (!literal("Tt")) return fail("expected 'T' between the date and the time");
  if (!digits(2, &h) || !literal(":") || !digits(2, &mi) || !literal(":") || !digits(2, &sec)) {
    return fail("the time of day must be hh:mm:ss");
  }
  const year_month_day date{year{y}, month{static_cast<unsigned>(mo)},
                            day{static_cast<unsigned>(d)}};
  if (!date.ok()) return fail("there is no such date");
  if (h > 23 || mi > 59) return fail("there is no such time of day");
  if (sec > 59) return fail("seconds must be 00 to 59 (leap seconds are not accepted)");
  milliseconds fraction{0};
  if (literal(".")) {
    std::size_t n = 0;
    int ms = 0;
    while (n < rest.size() && IsDigit(rest[n])) {
      if (n < 3) ms = ms * 10 + (rest[n] - '0');
      ++n;
    }
    if (n == 0) return fail("expected digits after '.'");
    for (std::size_t i = n; i < 3; ++i) ms *= 10;
    fraction = milliseconds(ms);
    rest.remove_prefix(n);
  }
  minutes offset{0};
  if (!literal("Zz")) {
    if (rest.empty() || (rest.front() != '+' && rest.front() != '-')) {
      return fail("missing the offset from UTC (Z, +hh:mm or -hh:mm)");
    }
    const bool negative = rest.front() == '-';
    rest.remove_prefix(1);
    int oh = 0, om = 0;
    if (!digits(2, &oh) || !literal(":") || !digits(2, &om) || oh > 23 || om > 59) {
      return fail("the offset must be Z, +hh:mm or -hh:mm");
    }
    offset = minutes(oh * 60 + om);
    if (negative) offset = -offset;
  }
  if (!rest.empty()) return fail("unexpected " + Quote(rest) + " at the end");
  // The local time minus its offset is UTC. system_clock counts nanoseconds in 64 bits (years
  // 1678 to 2261): keep well inside, where FormatTime writes the same time back.
  const sys_time<milliseconds> time =
      sys_days(date) + hours(h) + minutes(mi) + seconds(sec) + fraction - offset;
  if (time < sys_days(year{1900} / January / 1) || time >= sys_days(year{2200} / January / 1)) {
    return fail("the time in UTC must be in the years 1900 to 2199");
  }
  return time_point_cast<system_clock::duration>(time);
}

std::string FormatTime(std::chrono::system_clock::time_point time) {
  using namespace std::chrono;
  const auto ms = time_point_cast<milliseconds>(time);
  const sys_days day_start = floor<days>(ms);
  const year_month_day date(day_start);
  const hh_mm_ss<milliseconds> clock(ms - day_start);
  char text[40];
  std::snprintf(text, sizeof text, "%04d-%02u-%02uT%02d:%02d:%02d", static_cast<int>(date.year()),
                static_cast<unsigned>(date.month()), static_cast<unsigned>(date.day()),
                static_cast<int>(clock.hours().count()), static_cast<int>(clock.minutes().count()),
                static_cast<int>(clock.seconds().count()));
  std::string out = text;
  if (clock.subseconds().count() != 0) {
    std::snprintf(text, sizeof text, ".%03d", static_cast<int>(clock.subseconds().count()));
    out += text;
  }
  return out + "Z";
}

}  // namespace relay::config
