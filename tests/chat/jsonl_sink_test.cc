#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "chat/jsonl_sink.h"

#include "tests/test_util.h"

using relay::testing::TempDir;

namespace {
std::string Slurp(const std::string& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}
}  // namespace

TEST_CASE("a sink line holds every documented field") {
  relay::Event e;
  e.origin_site = "aws";
  e.origin_seq = 3;
  e.id = "aws:3";
  e.channel = "war-room";
  e.author = "bob";
  e.text = "line1\nline2";
  e.thread = "aws:1";
  e.created_at_ms = 0;
  e.hops = {"aws"};
  std::string line;
  relay::chat::AppendJsonlLine(e, &line);
  CHECK(line ==
        "{\"id\":\"aws:3\",\"origin_site\":\"aws\",\"channel\":\"war-room\",\"author\":\"bob\","
        "\"text\":\"line1\\nline2\",\"thread\":\"aws:1\",\"kind\":\"post\","
        "\"created_at\":\"1970-01-01T00:00:00.000Z\",\"hops\":[\"aws\"]}\n");
  e.thread.clear();
  line.clear();
  relay::chat::AppendJsonlLine(e, &line);
  CHECK_THAT(line, Catch::Contains("\"thread\":null"));
  e.files = {relay::Attachment::Inline("a.txt", "text/plain", "hi")};
  line.clear();
  relay::chat::AppendJsonlLine(e, &line);
  CHECK_THAT(
      line,
      Catch::Contains(
          R"("files":[{"name":"a.txt","mime_type":"text/plain","size":2,"data_base64":"aGk="}])"));
  // Blob attachments name the file the daemon placed, or say why it is missing.
  relay::Attachment blob;
  blob.name = "big.iso";
  blob.mime_type = "application/octet-stream";
  blob.size = 5000000;
  blob.blake2b = std::string(32, 'h');
  blob.blob_id = std::string(32, 'a');
  e.files = {blob, blob};
  line.clear();
  relay::chat::AppendJsonlLine(e, &line, {{"/s/x.jsonl.files/aws:3-0-big.iso", ""}, {"", "late"}});
  CHECK_THAT(line, Catch::Contains(R"("files":[{"name":"big.iso","mime_type":)"
                                   R"("application/octet-stream","size":5000000,)"
                                   R"("path":"/s/x.jsonl.files/aws:3-0-big.iso"},)"));
  CHECK_THAT(line, Catch::Contains(R"("size":5000000,"missing":"late"}])"));
  CHECK_THAT(line, !Catch::Contains("data_base64"));
}

TEST_CASE("recovery cuts an unrecorded batch and keeps a recorded one") {
  TempDir dir;
  std::string path = dir.path().string() + "/sub/war-room.jsonl";
  {
    auto f = relay::chat::JsonlFile::Open(path);
    REQUIRE(f.ok());
    REQUIRE((*f)->Append("{\"id\":\"a\"}\n").ok());
    REQUIRE((*f)->Sync().ok());
    CHECK((*f)->size() == 11);
    // A second batch is written but its size is never recorded (crash before the cursor).
    REQUIRE((*f)->Append("{\"id\":\"b\"}\n").ok());
  }
  auto f = relay::chat::JsonlFile::Open(path);
  REQUIRE(f.ok());
  std::string note;
  auto size = (*f)->Recover(11, &note);
  REQUIRE(size.ok());
  CHECK(*size == 11);
  CHECK_THAT(note, Catch::Contains("cut 11 bytes"));
  CHECK(Slurp(path) == "{\"id\":\"a\"}\n");
  // Appending after recovery continues at the recorded end.
  REQUIRE((*f)->Append("{\"id\":\"b\"}\n").ok());
  CHECK(Slurp(path) == "{\"id\":\"a\"}\n{\"id\":\"b\"}\n");

  note.clear();
  auto shorter = (*f)->Recover(1000, &note);
  REQUIRE(shorter.ok());
  CHECK(*shorter == 22);
  CHECK_THAT(note, Catch::Contains("shorter"));
}

TEST_CASE("opening a sink in a place that cannot hold a file fails clearly") {
  TempDir dir;
  std::string blocker = dir.path().string() + "/file";
  std::ofstream(blocker) << "x";
  auto f = relay::chat::JsonlFile::Open(blocker + "/war-room.jsonl");
  REQUIRE_FALSE(f.ok());
  CHECK_THAT(f.message(), Catch::Contains("war-room.jsonl"));
}
