// libFuzzer target: a whole torch.save file through the reader (Checkpoint:
// zip, data.pkl, storages, tensor byte ranges), the manifest of it
// (describe_file: FSDP metadata, object JSON) and its JSON round trip.
//
// Byte-level mutations of a zip rarely reach the pickle inside: a data.pkl whose
// length changes no longer matches the sizes in the headers. So a custom mutator
// unpacks a valid archive, mutates one record (usually data.pkl) with libFuzzer's
// own mutator and packs it again with our zip writer; inputs that do not parse
// are mutated as plain bytes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>

#include "ckpt/manifest/describe.hpp"
#include "fuzz_entry.hpp"

extern "C" std::size_t LLVMFuzzerMutate(std::uint8_t* data, std::size_t size, std::size_t max_size);

namespace {

std::size_t mutate_member(std::uint8_t* data, std::size_t size, std::size_t max_size, unsigned seed) {
  using namespace ckpt;
  ZipArchive zip(Bytes(reinterpret_cast<const std::byte*>(data), size), "mutator");
  if (zip.records().empty()) return 0;
  std::minstd_rand rng(seed);
  std::size_t chosen = rng() % zip.records().size();
  if (rng() % 4 != 0) {
    for (std::size_t i = 0; i < zip.records().size(); ++i) {
      const std::string& name = zip.records()[i].name;
      if (name.size() >= 8 && name.compare(name.size() - 8, 8, "data.pkl") == 0) chosen = i;
    }
  }
  std::vector<std::vector<std::byte>> members;
  for (const ZipRecord& record : zip.records()) {
    Bytes bytes = zip.data(record);
    members.emplace_back(bytes.begin(), bytes.end());
  }
  std::vector<std::byte>& target = members[chosen];
  std::size_t capacity = target.size() + 256;
  target.resize(capacity);
  std::size_t mutated = LLVMFuzzerMutate(reinterpret_cast<std::uint8_t*>(target.data()), capacity - 256, capacity);
  target.resize(mutated);
  std::vector<Bytes> spans(members.begin(), members.end());
  auto packed = fuzz::rewrite_zip(zip, spans);
  if (!packed || packed->size() > max_size) return 0;
  std::memcpy(data, packed->data(), packed->size());
  return packed->size();
}

}  // namespace

extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size, std::size_t max_size,
                                               unsigned int seed) {
  if (seed % 8 != 0) {
    try {
      if (std::size_t n = mutate_member(data, size, max_size, seed)) return n;
    } catch (const ckpt::Error&) {
    }
  }
  return LLVMFuzzerMutate(data, size, max_size);
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ckpt::fuzz::run_checkpoint(ckpt::Bytes(reinterpret_cast<const std::byte*>(data), size));
  return 0;
}
