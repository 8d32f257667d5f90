#include "chat/jsonl_sink.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "base/json.h"

namespace relay::chat {
namespace {

std::string Errno(const std::string& what, const std::string& path) {
  return what + " '" + path + "': " + std::strerror(errno);
}

}  // namespace

void AppendJsonlLine(const Event& e, std::string* out,
                     const std::vector<DeliveredFile>& blob_files) {
  out->append("{\"id\":");
  AppendJsonString(out, e.id);
  out->append(",\"origin_site\":");
  AppendJsonString(out, e.origin_site);
  out->append(",\"channel\":");
  AppendJsonString(out, e.channel);
  out->append(",\"author\":");
  AppendJsonString(out, e.author);
  out->append(",\"text\":");
  AppendJsonString(out, e.text);
  out->append(",\"thread\":");
  if (e.thread.empty()) {
    out->append("null");
  } else {
    AppendJsonString(out, e.thread);
  }
  out->append(",\"kind\":\"");
  out->append(EventKindName(e.kind));
  out->append("\",\"created_at\":\"");
  out->append(FormatTimestampMs(e.created_at_ms));
  out->push_back('"');
  if (!e.ref.empty()) {
    out->append(",\"ref\":");
    AppendJsonString(out, e.ref);
  }
  out->append(",\"hops\":[");
  for (std::size_t i = 0; i < e.hops.size(); ++i) {
    if (i) out->push_back(',');
    AppendJsonString(out, e.hops[i]);
  }
  out->push_back(']');
  if (!e.props.empty()) {
    out->append(",\"props\":{");
    for (std::size_t i = 0; i < e.props.size(); ++i) {
      if (i) out->push_back(',');
      AppendJsonString(out, e.props[i].first);
      out->push_back(':');
      AppendJsonString(out, e.props[i].second);
    }
    out->push_back('}');
  }
  if (!e.files.empty()) {
    out->append(",\"files\":[");
    for (std::size_t i = 0; i < e.files.size(); ++i) {
      if (i) out->push_back(',');
      out->append("{\"name\":");
      AppendJsonString(out, e.files[i].name);
      out->append(",\"mime_type\":");
      AppendJsonString(out, e.files[i].mime_type);
      if (e.files[i].is_blob()) {
        out->append(",\"size\":" + std::to_string(e.files[i].size));
        const DeliveredFile none{"", "not delivered"};
        const DeliveredFile& d = i < blob_files.size() ? blob_files[i] : none;
        if (!d.path.empty()) {
          out->append(",\"path\":");
          AppendJsonString(out, d.path);
        } else {
          out->append(",\"missing\":");
          AppendJsonString(out, d.missing);
        }
        out->push_back('}');
        continue;
      }
      out->append(",\"size\":" + std::to_string(e.files[i].data.size()) + ",\"data_base64\":\"");
      out->append(Base64(e.files[i].data));
      out->append("\"}");
    }
    out->push_back(']');
  }
  out->append("}\n");
}

Result<std::unique_ptr<JsonlFile>> JsonlFile::Open(const std::string& path) {
  std::error_code ec;
  auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec) return Status::Error("cannot create folder for sink '" + path + "': " + ec.message());
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0640);
  if (fd < 0) return Status::Error(Errno("cannot open sink file", path));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    Status s = Status::Error(Errno("cannot stat sink file", path));
    ::close(fd);
    return s;
  }
  return std::unique_ptr<JsonlFile>(
      new JsonlFile(path, fd, static_cast<std::uint64_t>(st.st_size)));
}

JsonlFile::JsonlFile(std::string path, int fd, std::uint64_t size)
    : path_(std::move(path)), fd_(fd), size_(size) {}

JsonlFile::~JsonlFile() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::uint64_t> JsonlFile::Recover(std::uint64_t recorded_size, std::string* note) {
  if (size_ > recorded_size) {
    if (ftruncate(fd_, static_cast<off_t>(recorded_size)) != 0)
      return Status::Error(Errno("cannot truncate sink file", path_));
    if (fdatasync(fd_) != 0) return Status::Error(Errno("cannot sync sink file", path_));
    *note = "cut " + std::to_string(size_ - recorded_size) +
            " bytes of an unrecorded batch from '" + path_ + "'; it is written again";
    size_ = recorded_size;
  } else if (size_ < recorded_size) {
    *note = "sink file '" + path_ + "' is shorter (" + std::to_string(size_) +
            " bytes) than recorded (" + std::to_string(recorded_size) +
            "); assuming it was rotated or truncated by an operator";
  }
  return size_;
}

Status JsonlFile::Append(std::string_view lines) {
  const char* p = lines.data();
  std::size_t left = lines.size();
  while (left > 0) {
    ssize_t n = ::pwrite(fd_, p, left, static_cast<off_t>(size_));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Error(Errno("cannot write sink file", path_));
    }
    p += n;
    left -= static_cast<std::size_t>(n);
    size_ += static_cast<std::uint64_t>(n);
  }
  return Status::Ok();
}

Status JsonlFile::Sync() {
  if (fdatasync(fd_) != 0) return Status::Error(Errno("cannot sync sink file", path_));
  return Status::Ok();
}

}  // namespace relay::chat
