#include "relay/blob_spool.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <utime.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <vector>

#include "tests/test_util.h"

namespace {

using relay::BlobState;
using relay::testing::TempDir;

std::string Random(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::string Hash(const std::string& bytes) {
  relay::Blake2b h;
  h.Update(bytes);
  return h.Final();
}

relay::Attachment BlobOf(const std::string& bytes) {
  relay::Attachment a;
  a.name = "big.bin";
  a.size = bytes.size();
  a.blake2b = Hash(bytes);
  a.blob_id = relay::BlobIdFor("europe", "file1");
  return a;
}

}  // namespace

TEST_CASE("blob hash is BLAKE2b-256 and streaming gives the one-shot result") {
  REQUIRE(sodium_init() >= 0);
  const std::string data = Random(3'000'000, 1);
  unsigned char want[32];
  crypto_generichash(want, sizeof want, reinterpret_cast<const unsigned char*>(data.data()),
                     data.size(), nullptr, 0);
  relay::Blake2b h;
  h.Update(std::string_view(data).substr(0, 12345));
  h.Update(std::string_view(data).substr(12345));
  CHECK(h.Final() == std::string(reinterpret_cast<char*>(want), 32));
  TempDir dir;
  auto file = relay::HashFile(dir.Write("f", data));
  REQUIRE(file.ok());
  CHECK(*file == Hash(data));
}

TEST_CASE("blob ids are deterministic, valid and differ by origin and source") {
  const std::string a = relay::BlobIdFor("europe", "abc");
  CHECK(relay::IsValidBlobId(a));
  CHECK(a == relay::BlobIdFor("europe", "abc"));
  CHECK(a != relay::BlobIdFor("europe", "abd"));
  CHECK(a != relay::BlobIdFor("europ", "eabc"));  // the separator keeps the parts apart
}

TEST_CASE("file names from the wire cannot leave their folder") {
  CHECK(relay::SanitizeFileName("report.pdf") == "report.pdf");
  CHECK(relay::SanitizeFileName("../../etc/passwd") == "_.._etc_passwd");
  CHECK(relay::SanitizeFileName("..") == "file");
  CHECK(relay::SanitizeFileName(".hidden") == "hidden");
  CHECK(relay::SanitizeFileName("") == "file");
  CHECK(relay::SanitizeFileName(std::string("a\0b\nc", 5)) == "a_b_c");
  CHECK(relay::SanitizeFileName(std::string(500, 'x')).size() == 120);
  // A cut never leaves half a UTF-8 character.
  std::string accents;
  for (int i = 0; i < 100; ++i) accents += "\xc3\xa9";
  std::string cut = relay::SanitizeFileName(accents);
  CHECK(cut.size() == 120);
  CHECK(relay::SanitizeFileName("x" + accents).size() == 119);
  CHECK(relay::SpoolInPath("/d", "../evil", "0123456789abcdef0123456789abcdef") ==
        "/d/spool/in/_evil/0123456789abcdef0123456789abcdef");
}

TEST_CASE("chunking and reassembly: out of order, repeated, then verified") {
  REQUIRE(sodium_init() >= 0);
  TempDir dir;
  const std::string data = Random(5 * relay::kMaxChunkBytes + 777, 2);
  const std::string src = dir.Write("src", data);
  std::vector<std::pair<std::uint64_t, std::string>> chunks;
  REQUIRE(relay::ForEachChunk(src, data.size(), [&](std::uint64_t off, std::string& bytes) {
            chunks.emplace_back(off, std::move(bytes));
            return relay::Status::Ok();
          }).ok());
  REQUIRE(chunks.size() == 6);
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    CHECK(chunks[i].first == i * relay::kMaxChunkBytes);
    CHECK(chunks[i].second.size() == (i < 5 ? relay::kMaxChunkBytes : 777));
  }
  const relay::Attachment a = BlobOf(data);
  const std::string spool = relay::SpoolInPath(dir.path().string(), "europe", a.blob_id);
  auto now = relay::BlobWaiter::Clock::now();
  relay::BlobWaiter waiter(std::chrono::seconds(60), [&] { return now; });
  std::string why;
  CHECK(waiter.Check("europe:9", spool, a, &why) == BlobState::kWaiting);
  CHECK_THAT(why, Catch::Contains("no chunk"));

  // The last chunk first (the file then has its full size, with a hole), then the rest with
  // one chunk twice (a re-capture or a resent frame).
  relay::ChunkWriter w;
  REQUIRE(w.Write(spool, chunks[5].first, chunks[5].second).ok());
  REQUIRE(w.Sync().ok());
  CHECK(waiter.Check("europe:9", spool, a, &why) == BlobState::kWaiting);
  for (std::size_t i : {2, 0, 2, 1, 4})
    REQUIRE(w.Write(spool, chunks[i].first, chunks[i].second).ok());
  REQUIRE(w.Sync().ok());
  CHECK(waiter.Check("europe:9", spool, a, &why) == BlobState::kWaiting);
  CHECK_THAT(why, Catch::Contains("hash"));
  REQUIRE(w.Write(spool, chunks[3].first, chunks[3].second).ok());
  REQUIRE(w.Sync().ok());
  // The same size: only the changed modification time makes the waiter hash it again.
  struct stat st {};
  REQUIRE(::stat(spool.c_str(), &st) == 0);
  timespec times[2] = {st.st_atim, st.st_mtim};
  times[1].tv_sec += 5;
  REQUIRE(::utimensat(AT_FDCWD, spool.c_str(), times, 0) == 0);
  CHECK(waiter.Check("europe:9", spool, a, &why) == BlobState::kReady);
  CHECK(ReadAll(spool) == data);

  // Placed next to a sink: the spool file is gone, the target complete.
  const std::string target = dir.File("sink.jsonl.files/europe:9-0-big.bin");
  REQUIRE(relay::MoveBlob(spool, target).ok());
  CHECK_FALSE(std::filesystem::exists(spool));
  CHECK(ReadAll(target) == data);
}

TEST_CASE("a blob that does not complete in time is reported missing") {
  TempDir dir;
  const std::string data = Random(100, 3);
  const relay::Attachment a = BlobOf(data);
  auto now = relay::BlobWaiter::Clock::now();
  relay::BlobWaiter waiter(std::chrono::seconds(60), [&] { return now; });
  std::string why;
  const std::string spool = dir.File("nothing-here");
  CHECK(waiter.Check("e:1", spool, a, &why) == BlobState::kWaiting);
  now += std::chrono::seconds(59);
  CHECK(waiter.Check("e:1", spool, a, &why) == BlobState::kWaiting);
  now += std::chrono::seconds(1);
  CHECK(waiter.Check("e:1", spool, a, &why) == BlobState::kMissing);
  // Another event starts its own clock; a forgotten one too.
  CHECK(waiter.Check("e:2", spool, a, &why) == BlobState::kWaiting);
  waiter.Forget("e:1");
  CHECK(waiter.Check("e:1", spool, a, &why) == BlobState::kWaiting);
}

TEST_CASE("orphaned spool files are collected after the TTL, fresh ones kept") {
  TempDir dir;
  const std::string root = dir.path().string() + "/spool/in";
  std::filesystem::create_directories(root + "/europe");
  std::filesystem::create_directories(root + "/aws");
  const std::string old_file = root + "/europe/" + std::string(32, 'a');
  const std::string new_file = root + "/aws/" + std::string(32, 'b');
  std::ofstream(old_file) << "x";
  std::ofstream(new_file) << "y";
  utimbuf old_time{1000, 1000};
  REQUIRE(::utime(old_file.c_str(), &old_time) == 0);
  CHECK(relay::CollectSpool(root, std::chrono::hours(24)) == 1);
  CHECK_FALSE(std::filesystem::exists(old_file));
  CHECK_FALSE(std::filesystem::exists(root + "/europe"));  // emptied folder removed
  CHECK(std::filesystem::exists(new_file));
  CHECK(relay::CollectSpool(dir.File("absent"), std::chrono::hours(1)) == 0);
}

TEST_CASE("the chunk writer keeps a bounded number of files open") {
  TempDir dir;
  relay::ChunkWriter w;
  const std::size_t blobs = relay::ChunkWriter::kMaxOpenFiles + 8;
  for (std::size_t i = 0; i < blobs; ++i) {
    REQUIRE(w.Write(dir.path().string() + "/in/aws/blob-" + std::to_string(i), 0,
                    "chunk " + std::to_string(i))
                .ok());
    CHECK(w.open_files() <= relay::ChunkWriter::kMaxOpenFiles);
  }
  CHECK(w.open_files() == relay::ChunkWriter::kMaxOpenFiles);
  REQUIRE(w.Sync().ok());
  CHECK(w.open_files() == 0);
  // Every chunk is there, those of the files closed early included.
  for (std::size_t i = 0; i < blobs; ++i)
    CHECK(ReadAll(dir.path().string() + "/in/aws/blob-" + std::to_string(i)) ==
          "chunk " + std::to_string(i));
}
