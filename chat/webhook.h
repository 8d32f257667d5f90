#pragma once
// Slack-compatible incoming webhooks (Mattermost POST /hooks/{id}): post-only, no post id comes
// back, so webhook-created posts cannot be edited, deleted or threaded later.

#include <string>

#include "chat/mattermost_client.h"

namespace relay::chat {

// POSTs `json_body` ({text, username, icon_url, props}) to `url`. TLS settings and the timeout
// come from `options` (url and token there are not used). 429/5xx/timeouts are retryable.
MmResult<bool> PostWebhook(const std::string& url, const std::string& json_body,
                           const MattermostOptions& options);

}  // namespace relay::chat
