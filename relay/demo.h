#pragma once
// `relay demo`: two sites on loopback in a temporary folder -- keys, configs, daemons -- with
// messages sent both ways, shown arriving in each JSONL sink, and a short summary. Exits 0 only
// when every message arrived exactly once; leaves nothing running.

namespace relay {

struct DemoOptions {
  int messages = 1000;  // sent each way
  bool keep = false;    // keep the temporary folder for inspection
};

int RunDemo(const DemoOptions& options);

}  // namespace relay
