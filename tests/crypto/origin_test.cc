#include "crypto/origin.h"

#include <catch2/catch.hpp>
#include <string>
#include <vector>

namespace relay::crypto {
namespace {

std::vector<Digest> Digests(const std::string& prefix, int n) {
  std::vector<Digest> out;
  for (int i = 0; i < n; ++i) out.push_back(EventDigest(prefix + std::to_string(i)));
  return out;
}

TEST_CASE("an attestation verifies only with its origin's key, unaltered") {
  const SiteKey eu = SiteKey::Generate(), aws = SiteKey::Generate();
  const auto d = Digests("e", 3);
  const std::string bytes = SealAttestation(eu, "europe", d.data(), d.size());
  auto a = ParseAttestation(bytes);
  REQUIRE(a.ok());
  CHECK(a->origin_site == "europe");
  REQUIRE(a->count() == 3);
  CHECK(a->digest(2) == d[2]);
  CHECK(VerifyAttestation(*a, eu.identity().sign_pk));
  CHECK_FALSE(VerifyAttestation(*a, aws.identity().sign_pk));
  std::string altered = bytes;
  altered[altered.size() - 70] ^= 1;  // a listed digest
  auto b = ParseAttestation(altered);
  REQUIRE(b.ok());
  CHECK_FALSE(VerifyAttestation(*b, eu.identity().sign_pk));
}

TEST_CASE("the attestation index finds the attestation of the event's origin") {
  const SiteKey eu = SiteKey::Generate(), gamma = SiteKey::Generate();
  const auto d1 = Digests("one", 5), d2 = Digests("two", 4), dg = Digests("gamma", 2);
  const std::string s1 = SealAttestation(eu, "europe", d1.data(), d1.size());
  const std::string s2 = SealAttestation(eu, "europe", d2.data(), d2.size());
  const std::string sg = SealAttestation(gamma, "gamma", dg.data(), dg.size());
  AttestationIndex index;
  index.Add(*ParseAttestation(s1), 10);
  index.Add(*ParseAttestation(s2), 11);
  index.Add(*ParseAttestation(sg), 12);
  SECTION("in the order listed (the guess)") {
    for (const Digest& d : d1) CHECK(index.Find(d, "europe") == 10u);
    for (const Digest& d : d2) CHECK(index.Find(d, "europe") == 11u);
    CHECK(index.Find(dg[0], "gamma") == 12u);
  }
  SECTION("out of order, again, and interleaved (the index)") {
    CHECK(index.Find(d2[3], "europe") == 11u);
    CHECK(index.Find(d1[2], "europe") == 10u);
    CHECK(index.Find(d1[2], "europe") == 10u);
    CHECK(index.Find(dg[1], "gamma") == 12u);
    CHECK(index.Find(d1[3], "europe") == 10u);
    CHECK(index.Find(d2[0], "europe") == 11u);
  }
  SECTION("never for another origin, nor for a digest not listed") {
    CHECK_FALSE(index.Find(d1[0], "gamma"));
    CHECK_FALSE(index.Find(dg[0], "europe"));
    CHECK_FALSE(index.Find(EventDigest("other"), "europe"));
  }
  SECTION("cleared, it knows nothing") {
    index.Clear();
    CHECK_FALSE(index.Find(d1[0], "europe"));
    index.Add(*ParseAttestation(s2), 3);
    CHECK_FALSE(index.Find(d1[1], "europe"));
    CHECK(index.Find(d2[1], "europe") == 3u);
  }
}

TEST_CASE("the attestation index works past its guesses") {
  const SiteKey eu = SiteKey::Generate();
  std::vector<std::string> sealed;
  std::vector<std::vector<Digest>> lists;
  for (int i = 0; i < 12; ++i) {
    lists.push_back(Digests("a" + std::to_string(i) + "-", 3));
    sealed.push_back(SealAttestation(eu, "europe", lists.back().data(), lists.back().size()));
  }
  AttestationIndex index;
  for (std::size_t i = 0; i < sealed.size(); ++i) index.Add(*ParseAttestation(sealed[i]), i);
  for (std::size_t i = sealed.size(); i-- > 0;)
    for (const Digest& d : lists[i]) CHECK(index.Find(d, "europe") == i);
}

}  // namespace
}  // namespace relay::crypto
