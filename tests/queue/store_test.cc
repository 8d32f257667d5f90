#include <rocksdb/db.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "queue/store.h"

#include "tests/test_util.h"

using relay::testing::TempDir;

using relay::queue::Store;
using relay::queue::WriteBatch;

namespace {}  // namespace

TEST_CASE("outbound log stores an event once for several peers and scans in order") {
  TempDir dir;
  auto store = Store::Open(dir.path().string());
  REQUIRE(store.ok());
  WriteBatch b(**store);
  const std::string d(32, 'd');  // a core's digest
  b.AppendOutbound(1, {"aws", "enclave"}, 2, d, "e1");
  b.AppendOutbound(2, {"aws"}, 2, d, "e2");
  b.AppendOutbound(3, {"enclave"}, 3, d, "e3");
  REQUIRE((*store)->Commit(b, true).ok());
  std::vector<std::string> for_aws;
  REQUIRE((*store)
              ->ScanOutbound(1,
                             [&](const relay::queue::OutboundEntry& e) {
                               if (e.HasPeer("aws")) for_aws.emplace_back(e.event);
                               return true;
                             })
              .ok());
  CHECK(for_aws == std::vector<std::string>{"e1", "e2"});
  std::vector<std::uint64_t> attestations;
  REQUIRE((*store)
              ->ScanOutbound(1,
                             [&](const relay::queue::OutboundEntry& e) {
                               attestations.push_back(e.attestation);
                               return true;
                             })
              .ok());
  CHECK(attestations == std::vector<std::uint64_t>{2, 2, 3});
  std::vector<std::string> peers;
  REQUIRE((*store)
              ->ScanOutbound(1,
                             [&](const relay::queue::OutboundEntry& e) {
                               peers = e.Peers();
                               return false;
                             })
              .ok());
  CHECK(peers == std::vector<std::string>{"aws", "enclave"});
  CHECK_FALSE(relay::queue::OutboundEntry{1,
                                          "\x01\x03"
                                          "aws",
                                          0, "", ""}
                  .HasPeer("aw"));

  WriteBatch del(**store);
  del.DeleteOutboundRange(1, 3);
  REQUIRE((*store)->Commit(del, false).ok());
  CHECK((*store)->FirstOutboundSeq() == std::optional<std::uint64_t>(3));
}

TEST_CASE("attestations are stored by key, read back, and deleted by range") {
  TempDir dir;
  auto store = Store::Open(dir.path().string());
  REQUIRE(store.ok());
  WriteBatch b(**store);
  b.PutAttestation(5, "att-5");
  b.PutAttestation(9, "att-9");
  REQUIRE((*store)->Commit(b, true).ok());
  auto five = (*store)->GetAttestation(5);
  REQUIRE(five.ok());
  CHECK(**five == "att-5");
  auto none = (*store)->GetAttestation(6);
  REQUIRE(none.ok());
  CHECK_FALSE(none->has_value());
  WriteBatch del(**store);
  del.DeleteAttestationRange(1, 6);
  REQUIRE((*store)->Commit(del, false).ok());
  CHECK_FALSE((*store)->GetAttestation(5)->has_value());
  CHECK(**(*store)->GetAttestation(9) == "att-9");
  std::vector<std::uint64_t> keys;
  REQUIRE((*store)
              ->ScanAttestations([&](std::uint64_t k, std::string_view) {
                keys.push_back(k);
                return true;
              })
              .ok());
  CHECK(keys == std::vector<std::uint64_t>{9});
  // The committer builds a value first and fills in its attestation key later.
  std::string value = relay::queue::EncodeOutboundValue({"aws"}, 0, std::string(32, 'd'), "event");
  relay::queue::SetOutboundAttestation(&value, 42);
  CHECK(relay::queue::OutboundValueEvent(value) == "event");
  WriteBatch put(**store);
  put.PutOutbound(7, value);
  REQUIRE((*store)->Commit(put, false).ok());
  std::uint64_t seen = 0;
  REQUIRE((*store)
              ->ScanOutbound(7,
                             [&](const relay::queue::OutboundEntry& e) {
                               seen = e.attestation;
                               return false;
                             })
              .ok());
  CHECK(seen == 42);
  std::string digest;
  REQUIRE((*store)
              ->ScanOutbound(7,
                             [&](const relay::queue::OutboundEntry& e) {
                               digest = std::string(e.digest);
                               return false;
                             })
              .ok());
  CHECK(digest == std::string(32, 'd'));
}

TEST_CASE("counters and entries survive reopening") {
  TempDir dir;
  {
    auto store = Store::Open(dir.path().string());
    REQUIRE(store.ok());
    WriteBatch b(**store);
    b.PutCounter("acked/aws", 77);
    b.PutCounter("acked/enclave", 5);
    b.PutInbound(10, "ten");
    REQUIRE((*store)->Commit(b, true).ok());
  }
  auto store = Store::Open(dir.path().string());
  REQUIRE(store.ok());
  CHECK((*store)->GetCounter("acked/aws") == 77);
  CHECK((*store)->GetCounter("missing", 9) == 9);
  auto list = (*store)->ListCounters("acked/");
  REQUIRE(list.size() == 2);
  CHECK(list[0].first == "acked/aws");
  std::string got;
  REQUIRE((*store)
              ->ScanInbound(0,
                            [&](std::uint64_t seq, std::string_view e) {
                              CHECK(seq == 10);
                              got = e;
                              return true;
                            })
              .ok());
  CHECK(got == "ten");
}

TEST_CASE("a store whose column families were made in another order is written to by name") {
  TempDir dir;
  {
    // The families in reverse order: other ids than a store relay creates.
    rocksdb::DBOptions options;
    options.create_if_missing = true;
    options.create_missing_column_families = true;
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{rocksdb::kDefaultColumnFamilyName, {}},
                                                        {"attest", {}},
                                                        {"meta", {}},
                                                        {"dedup", {}},
                                                        {"inbound", {}},
                                                        {"outbound", {}}};
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* raw = nullptr;
    REQUIRE(rocksdb::DB::Open(options, dir.path().string(), cfs, &handles, &raw).ok());
    REQUIRE(handles[1]->GetID() == 1);  // "attest", which relay creates last
    for (auto* h : handles) REQUIRE(raw->DestroyColumnFamilyHandle(h).ok());
    delete raw;
  }
  auto store = Store::Open(dir.path().string());
  REQUIRE(store.ok());
  WriteBatch b(**store);
  b.PutCounter("acked/aws", 7);
  b.PutInbound(3, "three");
  b.PutAttestation(4, "att");
  b.PutDedup("e:x", 1'000'000'000'000'000, "v");
  b.AppendOutbound(5, {"aws"}, 4, std::string(32, 'd'), "five");
  REQUIRE((*store)->Commit(b, true).ok());
  CHECK((*store)->GetCounter("acked/aws") == 7);
  CHECK((*store)->GetDedup("e:x", 0) == std::optional<std::string>("v"));
  auto att = (*store)->GetAttestation(4);
  REQUIRE(att.ok());
  CHECK(*att == std::optional<std::string>("att"));
  std::string inbound, outbound;
  REQUIRE((*store)
              ->ScanInbound(0,
                            [&](std::uint64_t, std::string_view e) {
                              inbound = e;
                              return true;
                            })
              .ok());
  REQUIRE((*store)
              ->ScanOutbound(1,
                             [&](const relay::queue::OutboundEntry& e) {
                               outbound = e.event;
                               return true;
                             })
              .ok());
  CHECK(inbound == "three");
  CHECK(outbound == "five");
}

TEST_CASE("a second open of a store in use fails with a clear error") {
  TempDir dir;
  auto first = Store::Open(dir.path().string());
  REQUIRE(first.ok());
  auto second = Store::Open(dir.path().string());
  REQUIRE_FALSE(second.ok());
  CHECK_THAT(second.message(), Catch::Contains(dir.path().string()));
}

TEST_CASE("dedup entries expire, and compaction drops expired ones") {
  TempDir dir;
  auto store = Store::Open(dir.path().string());
  REQUIRE(store.ok());
  auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::system_clock::now().time_since_epoch())
                 .count();
  WriteBatch b(**store);
  b.PutDedup("e:europe:1", 1000, "");
  b.PutDedup("c:client-7", now + 3'600'000, "europe:2");
  REQUIRE((*store)->Commit(b, true).ok());
  // Lookups honour the expiry with the caller's clock.
  CHECK((*store)->GetDedup("e:europe:1", 999).has_value());
  CHECK_FALSE((*store)->GetDedup("e:europe:1", 1000).has_value());
  CHECK((*store)->GetDedup("c:client-7", now) == std::optional<std::string>("europe:2"));
  // Compaction removes the expired entry for good (visible even with an old clock).
  REQUIRE((*store)->CompactDedup().ok());
  CHECK_FALSE((*store)->GetDedup("e:europe:1", 0).has_value());
  CHECK((*store)->GetDedup("c:client-7", 0).has_value());
}

TEST_CASE("batched dedup lookups answer each key") {
  TempDir dir;
  auto store = Store::Open(dir.path().string());
  REQUIRE(store.ok());
  WriteBatch b(**store);
  b.PutDedup("e:a", 5000, "");
  b.PutDedup("e:b", 100, "");
  REQUIRE((*store)->Commit(b, true).ok());
  auto known = (*store)->HasDedup({"e:a", "", "e:b", "e:c"}, 1000);
  CHECK(known == std::vector<bool>{true, false, false, false});
}
