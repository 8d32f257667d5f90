#include "chat/webhook.h"

#include <curl/curl.h>

#include <cstdlib>
#include <memory>

namespace relay::chat {
namespace {

std::size_t Collect(char* data, std::size_t size, std::size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

std::size_t Header(char* data, std::size_t size, std::size_t n, void* out) {
  std::string line(data, size * n);
  if (line.size() > 12 &&
      (line.compare(0, 12, "Retry-After:") == 0 || line.compare(0, 12, "retry-after:") == 0)) {
    *static_cast<long*>(out) = std::atol(line.c_str() + 12);
  }
  return size * n;
}

template <typename T>
void Set(CURL* c, CURLoption o, T v) {
  curl_easy_setopt(c, o, v);
}

}  // namespace

MmResult<bool> PostWebhook(const std::string& url, const std::string& json_body,
                           const MattermostOptions& options) {
  MmResult<bool> result;
  InitCurl();
  std::unique_ptr<CURL, void (*)(CURL*)> curl(curl_easy_init(), curl_easy_cleanup);
  if (!curl) {
    result.error.message = "webhook: curl_easy_init failed";
    return result;
  }
  CURL* c = curl.get();
  std::string body;
  long retry_after = 0;
  curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
  Set(c, CURLOPT_URL, url.c_str());
  Set(c, CURLOPT_POST, 1L);
  Set(c, CURLOPT_POSTFIELDS, json_body.c_str());
  Set(c, CURLOPT_POSTFIELDSIZE, static_cast<long>(json_body.size()));
  Set(c, CURLOPT_HTTPHEADER, headers);
  Set(c, CURLOPT_NOSIGNAL, 1L);
  Set(c, CURLOPT_TIMEOUT_MS, static_cast<long>(options.timeout.count()));
  Set(c, CURLOPT_WRITEFUNCTION, &Collect);
  Set(c, CURLOPT_WRITEDATA, &body);
  Set(c, CURLOPT_HEADERFUNCTION, &Header);
  Set(c, CURLOPT_HEADERDATA, &retry_after);
  if (!options.ca_file.empty()) Set(c, CURLOPT_CAINFO, options.ca_file.c_str());
  if (!options.client_cert.empty()) Set(c, CURLOPT_SSLCERT, options.client_cert.c_str());
  if (!options.client_key.empty()) Set(c, CURLOPT_SSLKEY, options.client_key.c_str());
  CURLcode rc = curl_easy_perform(c);
  curl_slist_free_all(headers);
  // The webhook URL holds its secret (the hook id): name only the scheme and host in errors.
  std::string where = url.substr(0, url.find('/', url.find("://") + 3));
  if (rc != CURLE_OK) {
    result.error.retryable = true;
    result.error.message = "webhook " + where + ": " + curl_easy_strerror(rc);
    return result;
  }
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  result.error.http_status = static_cast<int>(status);
  if (status >= 200 && status < 300) {
    result.value = true;
    return result;
  }
  result.error.retryable = status == 429 || status >= 500;
  if (status == 429)
    result.error.retry_after = std::chrono::seconds(retry_after > 0 ? retry_after : 1);
  result.error.message =
      "webhook " + where + " answered " + std::to_string(status) + ": " + body.substr(0, 200);
  return result;
}

}  // namespace relay::chat
