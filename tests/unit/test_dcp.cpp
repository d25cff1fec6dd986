// Unit tests for the DCP `.metadata` reader (src/format/dcp.cpp).
//
// fixtures/tiny/dcp/ holds DCP directories written by torch 1.13's real DCP
// writer and `.metadata` copies re-pickled under torch 2.x class paths and
// fields (tests/e2e/dcp_sets.py, README-dcp.md); describe.json is what that
// script's --describe read from them with torch's own classes. Every set is
// read here and compared with it key by key.
#include <doctest/doctest.h>

#include <atomic>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/format/dcp.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/manifest/describe.hpp"
#include "temp_files.hpp"

namespace {

using json = nlohmann::ordered_json;  // keys in the order .metadata lists them

std::string fixture(const std::string& name) {
  return std::string(CKPT_TINY_FIXTURES) + "/dcp/" + name;
}

ckpt::DcpMetadata read_set(const std::string& set) {
  std::string path = fixture(set + "/.metadata");
  test_files::Buffer bytes = test_files::read_file(path);
  return ckpt::read_dcp_metadata(bytes, path);
}

std::string error_of(const test_files::Buffer& bytes) {
  try {
    (void)ckpt::read_dcp_metadata(bytes, "x/.metadata");
  } catch (const ckpt::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_SUITE("dcp") {
  TEST_CASE("DCP metadata: what encode_dcp_metadata writes reads back the same, in torch 2.x's classes") {
    for (const char* name : {"mixed", "v2_metadata", "blocks_2d", "item_files_dim1"}) {
      CAPTURE(name);
      ckpt::DcpMetadata metadata = read_set(name);
      std::vector<std::byte> bytes = ckpt::encode_dcp_metadata(metadata);
      ckpt::DcpMetadata again = ckpt::read_dcp_metadata(bytes, "x/.metadata");
      CHECK(again.metadata_class == "torch.distributed.checkpoint.metadata.Metadata");
      again.metadata_class = metadata.metadata_class;
      CHECK(again == metadata);  // positions included: tensors and objects interleave as they did
    }
  }

  TEST_CASE("DCP metadata: every fixture set reads as torch's classes read it") {
    std::ifstream in(fixture("describe.json"));
    json described = json::parse(in);
    REQUIRE(described.size() == 7);
    for (const json& set : described) {
      std::string name = set["set"];
      CAPTURE(name);
      ckpt::DcpMetadata metadata = read_set(name);
      // (describe reads the v2_* copies through torch 1.13's classes: their
      // .metadata names the torch 2.x path)
      CHECK(metadata.metadata_class == (name.starts_with("v2")
                                            ? std::string("torch.distributed.checkpoint.metadata.Metadata")
                                            : set["metadata_class"].get<std::string>()));
      std::size_t tensor = 0;
      std::size_t object = 0;
      for (const auto& [key, item] : set["keys"].items()) {
        CAPTURE(key);
        if (item["type"] == "tensor") {
          REQUIRE(tensor < metadata.tensors.size());
          const ckpt::DcpTensor& got = metadata.tensors[tensor++];
          CHECK(got.key == key);
          CHECK(ckpt::dtype_info(got.dtype).name == item["dtype"].get<std::string>());
          CHECK(got.size == item["size"].get<std::vector<std::int64_t>>());
          REQUIRE(got.chunks.size() == item["chunks"].size());
          for (std::size_t c = 0; c < got.chunks.size(); ++c) {
            CHECK(got.chunks[c].offsets == item["chunks"][c]["offsets"].get<std::vector<std::int64_t>>());
            CHECK(got.chunks[c].sizes == item["chunks"][c]["sizes"].get<std::vector<std::int64_t>>());
            // storage_data, matched by the box's offsets
            bool placed = false;
            for (const json& storage : item["storage"]) {
              if (storage["offset"].get<std::vector<std::int64_t>>() != got.chunks[c].offsets) continue;
              placed = true;
              CHECK(got.chunks[c].place.file == storage["file"].get<std::string>());
              CHECK(got.chunks[c].place.offset == storage["at"].get<std::uint64_t>());
              CHECK(got.chunks[c].place.length == storage["length"].get<std::uint64_t>());
            }
            CHECK(placed);
          }
        } else {
          REQUIRE(object < metadata.objects.size());
          const ckpt::DcpObject& got = metadata.objects[object++];
          CHECK(got.key == key);
          REQUIRE(item["storage"].size() == 1);
          CHECK(got.place.file == item["storage"][0]["file"].get<std::string>());
          CHECK(got.place.offset == item["storage"][0]["at"].get<std::uint64_t>());
          CHECK(got.place.length == item["storage"][0]["length"].get<std::uint64_t>());
        }
      }
      CHECK(tensor == metadata.tensors.size());
      CHECK(object == metadata.objects.size());
      if (set.contains("planner_data") && !set["planner_data"].is_null()) {
        REQUIRE(metadata.planner_data.size() == set["planner_data"].size());
        std::size_t i = 0;
        for (const auto& [key, path] : set["planner_data"].items()) {
          CHECK(metadata.planner_data[i].first == key);
          REQUIRE(metadata.planner_data[i].second.size() == path.size());
          for (std::size_t e = 0; e < path.size(); ++e) {
            const ckpt::DcpPathElement& element = metadata.planner_data[i].second[e];
            if (path[e].is_string()) {
              CHECK(std::get<std::string>(element) == path[e].get<std::string>());
            } else {
              CHECK(std::get<std::int64_t>(element) == path[e].get<std::int64_t>());
            }
          }
          ++i;
        }
      } else {
        CHECK(metadata.planner_data.empty());
      }
    }
  }

  TEST_CASE("DCP items: every chunk of every set is its box, its storage inside its item, its CRC right") {
    std::size_t chunks = 0;
    for (const char* set : {"mixed", "blocks_2d", "item_files_dim1", "rank_files_dim0"}) {
      CAPTURE(set);
      ckpt::DcpMetadata metadata = read_set(set);
      for (const ckpt::DcpTensor& tensor : metadata.tensors) {
        for (std::size_t c = 0; c < tensor.chunks.size(); ++c) {
          CAPTURE(tensor.key);
          CAPTURE(c);
          const ckpt::DcpChunk& chunk = tensor.chunks[c];
          test_files::Buffer file = test_files::read_file(fixture(std::string(set) + "/" + chunk.place.file));
          ckpt::DcpTensorItem item = ckpt::read_dcp_tensor_item(file, chunk.place.file, tensor, c);
          CHECK(item.dtype == tensor.dtype);
          CHECK(item.shape == chunk.sizes);
          CHECK(item.storage_offset_in_file >= chunk.place.offset);
          CHECK(item.storage_offset_in_file + item.storage_nbytes <= chunk.place.offset + chunk.place.length);
          ckpt::Bytes storage = ckpt::Bytes(file).subspan(item.storage_offset_in_file, item.storage_nbytes);
          CHECK(ckpt::crc32(storage) == item.record_crc32);
          ++chunks;
        }
      }
    }
    CHECK(chunks > 60);
    // The transposed plain tensor is written as it was: stride (1, 4) over its (6, 4) storage.
    ckpt::DcpMetadata mixed = read_set("mixed");
    for (const ckpt::DcpTensor& tensor : mixed.tensors) {
      if (tensor.key != "model.proj_t") continue;
      test_files::Buffer file = test_files::read_file(fixture("mixed/" + tensor.chunks[0].place.file));
      ckpt::DcpTensorItem item = ckpt::read_dcp_tensor_item(file, "f", tensor, 0);
      CHECK(item.stride == std::vector<std::int64_t>{1, 4});
      CHECK(item.storage_nbytes == 24 * 4);
    }
  }

  TEST_CASE("DCP items: a cut file, a range past its end or a flipped pickle is one Error with the absolute offset") {
    ckpt::DcpMetadata metadata = read_set("rank_files_dim0");
    const ckpt::DcpTensor& tensor = metadata.tensors[0];
    const ckpt::DcpChunk& chunk = tensor.chunks[1];  // the second item of its file: offsets are not 0
    REQUIRE(chunk.place.offset > 0);
    test_files::Buffer file = test_files::read_file(fixture("rank_files_dim0/" + chunk.place.file));
    auto error_at = [&](const test_files::Buffer& bytes) -> std::optional<ckpt::Error> {
      try {
        (void)ckpt::read_dcp_tensor_item(bytes, "d.distcp", tensor, 1);
      } catch (const ckpt::Error& e) {
        return e;
      }
      return std::nullopt;
    };
    test_files::Buffer cut(file.begin(), file.begin() + static_cast<std::ptrdiff_t>(chunk.place.offset + 10));
    auto past = error_at(cut);
    REQUIRE(past.has_value());
    CHECK(std::string(past->what()).find("past the end of the file") != std::string::npos);
    CHECK(past->kind() == ckpt::ErrorKind::IncompleteSet);
    // Every byte of the item's archive flipped in turn: an Error or the same
    // box (a flip in data bytes is for the CRC to find), never a crash.
    std::size_t refused = 0;
    for (std::uint64_t at = chunk.place.offset; at < chunk.place.offset + chunk.place.length; ++at) {
      test_files::Buffer flipped = file;
      flipped[at] ^= std::byte{0x55};
      auto error = error_at(flipped);
      if (!error) continue;
      ++refused;
      CAPTURE(at);
      CHECK(error->where().file == "d.distcp");
      CHECK(error->where().member.starts_with(tensor.key));
      if (error->where().byte_offset) CHECK(*error->where().byte_offset >= chunk.place.offset);
    }
    CHECK(refused > 100);
  }

  TEST_CASE("DCP metadata: torch 2.6's version field is read; 1.13's files have none") {
    CHECK(read_set("v2_metadata").version == "1.0.0");
    CHECK_FALSE(read_set("mixed").version.has_value());
    CHECK_FALSE(read_set("v2_0_metadata").version.has_value());
  }

  TEST_CASE("DCP metadata: each broken copy (dcp_sets.py --hostile) is one Error saying what is wrong") {
    std::ifstream in(fixture("hostile/expected.json"));
    json expected = json::parse(in);
    REQUIRE(expected.size() >= 8);
    for (const auto& [name, words] : expected.items()) {
      CAPTURE(name);
      std::string error = error_of(test_files::read_file(fixture("hostile/" + name + ".metadata")));
      CHECK_MESSAGE(error.find(words.get<std::string>()) != std::string::npos, error);
      CHECK(error.find("x/.metadata") != std::string::npos);
      CHECK(error.find('\n') == std::string::npos);
    }
  }

  TEST_CASE("DCP metadata: what is not one is one Error naming the file") {
    test_files::Buffer good = test_files::read_file(fixture("mixed/.metadata"));
    // Cut anywhere: a pickle error or a Metadata without its parts, never a crash.
    for (std::size_t cut = 0; cut < good.size(); cut += 97) {
      test_files::Buffer truncated(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut));
      std::string error = error_of(truncated);
      CAPTURE(cut);
      CHECK(error.find("x/.metadata") != std::string::npos);
    }
    // A torch.save pickle is not a Metadata.
    test_files::Buffer data_pkl =
        test_files::read_file(std::string(CKPT_TINY_FIXTURES) + "/mp1_dp3_bf16_ns_opt/checkpoint_last-shard0.pt");
    CHECK(error_of(data_pkl).find("x/.metadata") != std::string::npos);
  }

  TEST_CASE("FileDescriber::shared_value: made once per key for every thread, a failure thrown to each caller") {
    ckpt::FileDescriber describer;
    std::atomic<int> made{0};
    std::vector<std::thread> threads;
    std::vector<const void*> seen(8, nullptr);
    for (std::size_t t = 0; t < seen.size(); ++t) {
      threads.emplace_back([&, t] {
        seen[t] = describer
                      .shared_value("k",
                                    [&] {
                                      ++made;
                                      std::this_thread::sleep_for(std::chrono::milliseconds(20));
                                      return std::shared_ptr<const void>(std::make_shared<int>(7));
                                    })
                      .get();
      });
    }
    for (std::thread& thread : threads) thread.join();
    CHECK(made == 1);
    for (const void* value : seen) CHECK(value == seen[0]);
    CHECK(*static_cast<const int*>(seen[0]) == 7);
    int failures = 0;
    for (int i = 0; i < 2; ++i) {
      try {
        describer.shared_value("bad", [&]() -> std::shared_ptr<const void> {
          ++made;
          throw ckpt::Error("cannot");
        });
      } catch (const ckpt::Error& e) {
        failures += std::string(e.what()).find("cannot") != std::string::npos;
      }
    }
    CHECK(failures == 2);
    CHECK(made == 2);  // the failing key was tried once
  }
}
