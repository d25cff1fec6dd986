// Unit tests for FSDP layouts as pure data (src/layout/fsdp.cpp): unflattening
// sharded weights (consolidate_part) and optimizer state
// (consolidate_optimizer_state), and flattening named parameters into each
// rank's padded flat shard (flatten_fsdp). Manifests are built in memory; where
// bytes matter the reference model of layout_fixtures.hpp says where every byte
// of a tensor must come from.
#include <doctest/doctest.h>

#include <functional>

#include "ckpt/manifest/manifest_json.hpp"
#include "layout_fixtures.hpp"

namespace {

using namespace layout_fixtures;

// Where elements [first, first + count) of an instance's flat parameter live in
// shards laid out by shard_file (chunked, or whole on rank 0 for no_broadcast
// instances): rank d's flat tensor is in manifest file file_of(d) at offset_of(d).
Ids flat_ids(const InstanceSpec& spec, int world, std::uint64_t itemsize, std::int64_t first, std::int64_t count,
             const std::function<std::uint32_t(int)>& file_of, const std::function<std::uint64_t(int)>& offset_of) {
  std::int64_t total = total_numel(spec);
  std::int64_t chunk = spec.no_broadcast ? total : (total + world - 1) / world;
  Ids out;
  for (std::int64_t e = first; e < first + count; ++e) {
    int rank = static_cast<int>(e / chunk);
    auto index = static_cast<std::uint64_t>(e - rank * chunk);
    for (std::uint64_t b = 0; b < itemsize; ++b)
      out.push_back(byte_id(file_of(rank), offset_of(rank) + index * itemsize + b));
  }
  return out;
}

// The named parameters' first elements in their flat parameter.
std::vector<std::int64_t> starts_of(const InstanceSpec& spec) {
  std::vector<std::int64_t> out;
  std::int64_t at = 0;
  for (const Shape& shape : spec.shapes) {
    out.push_back(at);
    at += product(shape);
  }
  return out;
}

// The layout and parameters of the flatten tests. Three instances:
//   decoder.layers.0: fc1.weight [2,3], fc1.bias [2], fc2.weight [3,2]  (14 elements)
//   root:             decoder.embed_tokens.weight [4,2],
//                     decoder.final_layer_norm.weight [2]                 (10 elements)
//   decoder.layers.1: fc1.bias [1]                                      (1 element)
// Parameters come from two files and are not all contiguous: fc2.weight is
// columns 1-2 of a [3, 4] matrix (a strided piece), embed_tokens two runs of
// two files. A tie, a buffer and an unrelated key are ignored.
struct FlattenInputs {
  ckpt::FsdpMetadata layout;
  std::vector<NamedTensor> params;
  std::vector<InstanceSpec> specs{
      {"decoder.layers.0", {"fc1.weight", "fc1.bias", "fc2.weight"}, {{2, 3}, {2}, {3, 2}}, false, {}},
      {"", {"decoder.embed_tokens.weight", "decoder.final_layer_norm.weight"}, {{4, 2}, {2}}, false, {}},
      {"decoder.layers.1", {"fc1.bias"}, {{1}}, false, {}},
  };

  FlattenInputs() {
    for (const InstanceSpec& spec : specs) layout.instances.push_back(instance_meta(spec, 1, 0));
    layout.buffer_names = {"decoder.version"};
    params.push_back(alias("decoder.output_projection.weight", "decoder.embed_tokens.weight"));
    params.push_back(named("decoder.layers.0.fc1.bias", {2}, 0, 200));
    params.push_back(named("decoder.layers.0.fc1.weight", {2, 3}, 0, 100));
    NamedTensor fc2;
    fc2.name = "decoder.layers.0.fc2.weight";
    fc2.source = source(DType::Float32, {3, 2}, {strided(1, 304, 0, 8, 3, 16, 8)});
    params.push_back(fc2);
    NamedTensor embed;
    embed.name = "decoder.embed_tokens.weight";
    embed.source = runs_source(DType::Float32, {4, 2}, {{1, 500, 12}, {0, 700, 20}});
    params.push_back(embed);
    params.push_back(named("decoder.final_layer_norm.weight", {2}, 1, 900));
    params.push_back(named("decoder.version", {1}, 0, 40));
    params.push_back(named("decoder.layers.1.fc1.bias", {1}, 1, 960));
    params.push_back(named("decoder.layers.9.fc1.bias", {5}, 1, 980));
  }
  std::string full_name(std::size_t instance, std::size_t k) const {
    const InstanceSpec& spec = specs[instance];
    return spec.fsdp_path.empty() ? spec.names[k] : cat(spec.fsdp_path + ".", spec.names[k]);
  }
  // The instance's parameters' bytes one after the other, by plain loops.
  Ids flat(std::size_t instance) const {
    if (instance == 0) {
      return ids_join({ids_run(0, 100, 24), ids_run(0, 200, 8), ids_matrix(1, 304, 3, 8, 16)});
    }
    if (instance == 1) return ids_join({ids_run(1, 500, 12), ids_run(0, 700, 20), ids_run(1, 900, 8)});
    return ids_run(1, 960, 4);
  }
};

}  // namespace

TEST_SUITE("fsdp_layout") {
  // ================================================================ consolidate_part

  TEST_CASE("consolidate_part: 2 instances on 3 ranks with padding, parameters straddling shards") {
    ThreeRankPart part;
    std::vector<NamedTensor> tensors = ckpt::consolidate_part(part.manifest, part.shard_files);

    // Instances in metadata order, names in order, then ties, then buffers.
    CHECK(names_of(tensors) == std::vector<std::string>{
                                   "decoder.layers.0.fc1.weight",
                                   "decoder.layers.0.fc1.bias",
                                   "decoder.layers.0.fc2.bias",
                                   "decoder.embed_tokens.weight",
                                   "decoder.final_layer_norm.weight",
                                   "decoder.output_projection.weight",
                                   "decoder.version",
                               });
    // Manifest indices: rank 0 -> 1, rank 1 -> 2, rank 2 -> 0.
    // layer flat (chunk 3): rank 0 @64 elements 0-2, rank 1 @320 elements 3-5, rank 2 @576 elements 6-7 (+pad)
    // fc1.weight = elements 0-3: straddles ranks 0 and 1.
    const NamedTensor& fc1_weight = find(tensors, "decoder.layers.0.fc1.weight");
    CHECK(describe(fc1_weight.source) == "[0]1@64+12 [12]2@320+4");
    CHECK(shape_of(fc1_weight.source.shape) == "[2, 2]");
    CHECK(fc1_weight.source.dtype == DType::Float32);
    CHECK_FALSE(fc1_weight.alias_of.has_value());
    const NamedTensor& fc1_bias = find(tensors, "decoder.layers.0.fc1.bias");
    CHECK(describe(fc1_bias.source) == "[0]2@324+8");
    CHECK(shape_of(fc1_bias.source.shape) == "[2]");
    const NamedTensor& fc2_bias = find(tensors, "decoder.layers.0.fc2.bias");
    CHECK(describe(fc2_bias.source) == "[0]0@576+8");  // rank 2's real elements, its padding excluded
    // root flat (chunk 4): rank 0 @1024, rank 1 @1536, rank 2 @2048 (2 real + 2 pad)
    const NamedTensor& embed = find(tensors, "decoder.embed_tokens.weight");
    CHECK(describe(embed.source) == "[0]1@1024+16 [16]2@1536+16");
    CHECK(shape_of(embed.source.shape) == "[4, 2]");
    const NamedTensor& norm = find(tensors, "decoder.final_layer_norm.weight");
    CHECK(describe(norm.source) == "[0]0@2048+8");
    CHECK(shape_of(norm.source.shape) == "[2]");
    // The tie restored from the root's shared_param_info: no bytes of its own.
    const NamedTensor& tied = find(tensors, "decoder.output_projection.weight");
    REQUIRE(tied.alias_of.has_value());
    CHECK(*tied.alias_of == "decoder.embed_tokens.weight");
    CHECK(tied.source.pieces.empty());
    // Buffers from shard 0 (rank 0 = manifest index 1), not from the first file of the manifest.
    const NamedTensor& version = find(tensors, "decoder.version");
    CHECK(describe(version.source) == "[0]1@4000+4");
    CHECK_FALSE(version.alias_of.has_value());

    // Every real element of every flat parameter is used exactly once; no padding.
    std::uint64_t real_bytes = 0;
    for (const NamedTensor& tensor : tensors) {
      if (tensor.alias_of || tensor.name == "decoder.version") continue;
      std::uint64_t sum = 0;
      for (const ckpt::Piece& piece : tensor.source.pieces) {
        CHECK(piece.source != Piece::kZeros);
        sum += piece.nbytes * piece.rows;
      }
      CHECK(sum == tensor.source.nbytes());
      real_bytes += sum;
    }
    CHECK(real_bytes == (8 + 10) * 4);

    // And every byte comes from where the chunk rule puts it.
    auto file_of = [&](int rank) {
      return static_cast<std::uint32_t>(part.shard_files[static_cast<std::size_t>(rank)]);
    };
    for (std::size_t i = 0; i < part.instances.size(); ++i) {
      const InstanceSpec& spec = part.instances[i];
      auto offset_of = [&](int rank) -> std::uint64_t {
        auto r = static_cast<std::uint64_t>(rank);
        return i == 0 ? 64 + 256 * r : 1024 + 512 * r;
      };
      std::vector<std::int64_t> starts = starts_of(spec);
      for (std::size_t k = 0; k < spec.names.size(); ++k) {
        std::string name = spec.fsdp_path.empty() ? spec.names[k] : cat(spec.fsdp_path + ".", spec.names[k]);
        CAPTURE(name);
        Ids want = flat_ids(spec, 3, 4, starts[k], product(spec.shapes[k]), file_of, offset_of);
        CHECK(difference(ids_of(find(tensors, name).source), want) == "");
      }
    }
  }

  TEST_CASE("consolidate_part: root instance first gives the same tensors, root first") {
    ThreeRankPart part;
    for (ckpt::ManifestFile& file : part.manifest.files) {
      std::swap(file.fsdp.edit().instances[0], file.fsdp.edit().instances[1]);
    }
    std::vector<NamedTensor> tensors = ckpt::consolidate_part(part.manifest, part.shard_files);
    CHECK(names_of(tensors) == std::vector<std::string>{
                                   "decoder.embed_tokens.weight",
                                   "decoder.final_layer_norm.weight",
                                   "decoder.layers.0.fc1.weight",
                                   "decoder.layers.0.fc1.bias",
                                   "decoder.layers.0.fc2.bias",
                                   "decoder.output_projection.weight",
                                   "decoder.version",
                               });
    CHECK(describe(find(tensors, "decoder.embed_tokens.weight").source) == "[0]1@1024+16 [16]2@1536+16");
    CHECK(describe(find(tensors, "decoder.layers.0.fc1.weight").source) == "[0]1@64+12 [12]2@320+4");
    CHECK(find(tensors, "decoder.output_projection.weight").alias_of ==
          std::optional<std::string>("decoder.embed_tokens.weight"));
  }

  TEST_CASE("consolidate_part: bf16 on 4 ranks, the last rank holding only padding") {
    // 5 elements on 4 ranks: chunk 2, ranks hold 2, 2, 1 (+1), 0 (+2).
    std::vector<InstanceSpec> instances{
        {"decoder.layers.1", {"fc1.bias", "fc2.bias"}, {{3}, {2}}, false, {}},
        // 1 element on 4 ranks: rank 0 holds it, ranks 1-3 are padding only.
        {"decoder.layers.2", {"final_layer_norm.bias"}, {{1}}, false, {}},
    };
    ckpt::Manifest manifest;
    for (int rank = 0; rank < 4; ++rank) {
      auto r = static_cast<std::uint64_t>(rank);
      manifest.files.push_back(
          shard_file(shard_path(rank), instances, 4, rank, {128 * (r + 1), 4096 + 64 * r}, DType::BFloat16, {}));
    }
    REQUIRE(manifest.files[3].fsdp->instances[0].flat_params[0].padding == 2);
    REQUIRE(manifest.files[3].tensors.edit()[0].shape == Shape{2});
    std::vector<NamedTensor> tensors = ckpt::consolidate_part(manifest, {0, 1, 2, 3});
    CHECK(names_of(tensors) == std::vector<std::string>{"decoder.layers.1.fc1.bias", "decoder.layers.1.fc2.bias",
                                                        "decoder.layers.2.final_layer_norm.bias"});
    // fc1.bias = elements 0-2: rank 0's two, rank 1's first.
    CHECK(describe(find(tensors, "decoder.layers.1.fc1.bias").source) == "[0]0@128+4 [4]1@256+2");
    // fc2.bias = elements 3-4: rank 1's second, rank 2's only real one.
    CHECK(describe(find(tensors, "decoder.layers.1.fc2.bias").source) == "[0]1@258+2 [2]2@384+2");
    CHECK(find(tensors, "decoder.layers.1.fc2.bias").source.dtype == DType::BFloat16);
    CHECK(describe(find(tensors, "decoder.layers.2.final_layer_norm.bias").source) == "[0]0@4096+2");
    for (const NamedTensor& tensor : tensors) {
      for (const ckpt::Piece& piece : tensor.source.pieces) CHECK(piece.source != 3u);  // rank 3: padding only
    }
  }

  TEST_CASE("consolidate_part: a parameter spread over three shards, world size 1") {
    // One parameter of 7 elements on 3 ranks (chunk 3: 3, 3, 1 + 2 padding).
    std::vector<InstanceSpec> instances{{"decoder.layers.0", {"fc1.weight"}, {{7}}, false, {}}};
    ckpt::Manifest manifest;
    for (int rank = 0; rank < 3; ++rank) {
      manifest.files.push_back(shard_file(shard_path(rank), instances, 3, rank, {1000}, DType::Float32, {}));
    }
    std::vector<NamedTensor> tensors = ckpt::consolidate_part(manifest, {0, 1, 2});
    REQUIRE(tensors.size() == 1);
    CHECK(describe(tensors[0].source) == "[0]0@1000+12 [12]1@1000+12 [24]2@1000+4");

    // World size 1: the single shard, no padding, one piece.
    ckpt::Manifest single;
    single.files.push_back(shard_file(shard_path(0), instances, 1, 0, {512}, DType::Float32, {}));
    tensors = ckpt::consolidate_part(single, {0});
    REQUIRE(tensors.size() == 1);
    CHECK(describe(tensors[0].source) == "[0]0@512+28");
    CHECK(shape_of(tensors[0].source.shape) == "[7]");
  }

  TEST_CASE("consolidate_part: no_broadcast_optim_state instances are taken whole from shard 0") {
    std::vector<InstanceSpec> instances{
        {"decoder.layers.0", {"fc1.weight", "fc1.bias"}, {{2, 3}, {2}}, true, {}},
        {"decoder.layers.1", {"fc1.bias"}, {{4}}, false, {}},
    };
    ckpt::Manifest manifest;
    for (int rank = 0; rank < 3; ++rank) {
      auto r = static_cast<std::uint64_t>(rank);
      manifest.files.push_back(
          shard_file(shard_path(rank), instances, 3, rank, {100 + 1000 * r, 500 + 1000 * r}, DType::Float32, {}));
    }
    // Every rank holds all 8 elements, unpadded.
    REQUIRE(manifest.files[2].tensors.edit()[0].shape == Shape{8});
    REQUIRE(manifest.files[2].fsdp->instances[0].flat_params[0].padding == 0);
    std::vector<NamedTensor> tensors = ckpt::consolidate_part(manifest, {0, 1, 2});
    CHECK(names_of(tensors) == std::vector<std::string>{"decoder.layers.0.fc1.weight", "decoder.layers.0.fc1.bias",
                                                        "decoder.layers.1.fc1.bias"});
    CHECK(describe(find(tensors, "decoder.layers.0.fc1.weight").source) == "[0]0@100+24");
    CHECK(describe(find(tensors, "decoder.layers.0.fc1.bias").source) == "[0]0@124+8");
    // The other instance is still sharded (4 elements on 3 ranks: 2, 2, 0 + 2).
    CHECK(describe(find(tensors, "decoder.layers.1.fc1.bias").source) == "[0]0@500+8 [8]1@1500+8");
  }

  TEST_CASE("consolidate_part: shards that do not fit together are errors naming file and tensor") {
    SUBCASE("shards disagree on names") {
      ThreeRankPart part;
      part.rank_file(1).fsdp.edit().instances[0].flat_params[0].names[2] = "fc3.bias";
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, part.shard_files); });
      REQUIRE(error.has_value());
      CHECK(error->where().file == shard_path(1));
      CHECK(error->where().member == "model/decoder.layers.0.flat_param_0");
      CHECK_KIND(*error, ckpt::ErrorKind::IncompleteSet);
    }
    SUBCASE("a shard without metadata") {
      ThreeRankPart part;
      part.rank_file(2).fsdp.reset();
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, part.shard_files); });
      REQUIRE(error.has_value());
      CHECK(error->where().file == shard_path(2));
    }
    SUBCASE("a flat parameter missing from a shard") {
      ThreeRankPart part;
      part.rank_file(2).remove_tensors_if([](const ckpt::StoredTensor& t) { return t.path == "model/flat_param_0"; });
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, part.shard_files); });
      REQUIRE(error.has_value());
      CHECK(error->where().file == shard_path(2));
      CHECK(error->where().member == "model/flat_param_0");
      CHECK_KIND(*error, ckpt::ErrorKind::IncompleteSet);
    }
    SUBCASE("padding exceeds the elements held") {
      ThreeRankPart part;
      part.rank_file(2).fsdp.edit().instances[1].flat_params[0].padding = 5;  // holds 4
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, part.shard_files); });
      REQUIRE(error.has_value());
      CHECK(error->where().file == shard_path(2));
      CHECK(error->where().member == "model/flat_param_0");
      CHECK(error->where().byte_offset == std::optional<std::uint64_t>(2048));
      CHECK(contains(error->message(), "padding 5 exceeds the 4 elements held"));
    }
    SUBCASE("unpadded totals do not match numels: too little padding") {
      ThreeRankPart part;
      part.rank_file(2).fsdp.edit().instances[1].flat_params[0].padding = 1;  // 4 + 4 + 3 = 11, metadata says 10
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, part.shard_files); });
      REQUIRE(error.has_value());
      CHECK(error->where().member == "model/flat_param_0");
      CHECK(contains(error->message(), "hold 11 unpadded elements"));
      CHECK(contains(error->message(), "names 10"));
    }
    SUBCASE("unpadded totals do not match numels: a shard left out") {
      ThreeRankPart part;
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, {1, 2}); });
      REQUIRE(error.has_value());
      CHECK(error->where().member == "model/decoder.layers.0.flat_param_0");
      CHECK_KIND(*error, ckpt::ErrorKind::IncompleteSet);
    }
    SUBCASE("unpadded totals do not match numels: a shard with a longer flat tensor") {
      ThreeRankPart part;
      part.flat_tensor(1, "decoder.layers.0.flat_param_0").shape = {4};
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, part.shard_files); });
      REQUIRE(error.has_value());
      CHECK_KIND(*error, ckpt::ErrorKind::IncompleteSet);
    }
    SUBCASE("dtype differs between shards") {
      ThreeRankPart part;
      part.flat_tensor(1, "decoder.layers.0.flat_param_0").dtype = DType::Float16;
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, part.shard_files); });
      REQUIRE(error.has_value());
      CHECK(error->where().file == shard_path(1));
      CHECK_KIND(*error, ckpt::ErrorKind::IncompleteSet);
    }
    SUBCASE("a flat parameter that is not one-dimensional") {
      ThreeRankPart part;
      ckpt::StoredTensor& flat = part.flat_tensor(0, "decoder.layers.0.flat_param_0");
      flat.shape = {1, 3};
      flat.stride = {3, 1};
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, part.shard_files); });
      REQUIRE(error.has_value());
      CHECK(error->where().file == shard_path(0));
      CHECK_KIND(*error, ckpt::ErrorKind::BadInput);
    }
    SUBCASE("one parameter named twice") {
      ThreeRankPart part;
      for (ckpt::ManifestFile& file : part.manifest.files)
        file.fsdp.edit().instances[0].flat_params[0].names[1] = "fc1.weight";
      auto error = error_of([&] { ckpt::consolidate_part(part.manifest, part.shard_files); });
      REQUIRE(error.has_value());
      CHECK(contains(error->message(), "named twice: decoder.layers.0.fc1.weight"));
    }
    SUBCASE("no shard files") {
      ThreeRankPart part;
      CHECK_THROWS_AS(ckpt::consolidate_part(part.manifest, {}), ckpt::InternalError);
    }
  }

  TEST_CASE("consolidate_part: flat metadata whose names, shapes and numels differ in length is an error") {
    // Regression test for a bug found by these tests (fixed): the lengths were
    // trusted, so a manifest read from JSON (manifest_from_json does not check
    // them) silently dropped parameters or indexed past the vectors' ends.
    std::vector<InstanceSpec> instances{{"decoder.layers.0", {"fc1.weight", "fc1.bias"}, {{2, 2}, {2}}, false, {}}};
    auto manifest_with = [&](const std::function<void(ckpt::FlatParamMeta&)>& edit) {
      ckpt::Manifest manifest;
      manifest.files.push_back(shard_file(shard_path(0), instances, 1, 0, {64}, DType::Float32, {}));
      edit(manifest.files[0].fsdp.edit().instances[0].flat_params[0]);
      return manifest;
    };
    struct Case {
      const char* what;
      std::function<void(ckpt::FlatParamMeta&)> edit;
    };
    const Case cases[] = {
        {"numels outnumber names", [](ckpt::FlatParamMeta& flat) { flat.names.pop_back(); }},
        {"names outnumber numels", [](ckpt::FlatParamMeta& flat) { flat.numels.pop_back(); }},
        {"names outnumber shapes", [](ckpt::FlatParamMeta& flat) { flat.shapes.pop_back(); }},
    };
    for (const Case& c : cases) {
      std::string what = c.what;
      CAPTURE(what);
      ckpt::Manifest manifest = manifest_with(c.edit);
      auto error = error_of([&] { ckpt::consolidate_part(manifest, {0}); });
      REQUIRE(error.has_value());
      CHECK(error->where().file == shard_path(0));
      CHECK(error->where().member == "model/decoder.layers.0.flat_param_0");
      CHECK_KIND(*error, ckpt::ErrorKind::BadInput);
    }
  }

  TEST_CASE("consolidate_part: unflattened files give their model tensors as they are") {
    ckpt::Manifest manifest;
    manifest.files.emplace_back();  // another file at index 0: the part is file 1
    manifest.files[0].path = "/ckpt/other.pt";
    add(manifest.files[0], contiguous("model/decoder.other", DType::Float32, {3}, 64));
    ckpt::ManifestFile file;
    file.path = "/ckpt/reshard-model_part-0.pt";
    add(file, contiguous("model/decoder.embed_tokens.weight", DType::Float16, {4, 2}, 192));
    add(file, contiguous("model/decoder.layers.0.fc1.weight", DType::Float16, {2, 2}, 320));
    file.tensors.edit().back().stride = {4, 1};  // a view of rows of a [2, 4] storage: two runs
    PlacedTensor tied = contiguous("model/decoder.output_projection.weight", DType::Float16, {4, 2}, 192);
    tied.tensor.alias_of = "model/decoder.embed_tokens.weight";
    add(file, tied);
    add(file, contiguous("last_optimizer_state/state/0/exp_avg", DType::Float32, {4}, 448));
    add(file, contiguous("model/decoder.version", DType::Float32, {1}, 512));
    manifest.files.push_back(file);

    SUBCASE("without FSDP metadata") {}
    SUBCASE("with FSDP metadata whose flat parameters are not in the file") {
      ckpt::FsdpMetadata metadata;
      ckpt::FsdpInstanceMeta instance;
      ckpt::FlatParamMeta flat;
      flat.state_key = "flat_param_0";
      flat.name = "flat_param_0";
      flat.names = {"decoder.embed_tokens.weight"};
      flat.shapes = {{4, 2}};
      flat.numels = {8};
      instance.flat_params.push_back(flat);
      metadata.instances.push_back(instance);
      metadata.buffer_names = {"decoder.version"};
      manifest.files[1].fsdp = metadata;
    }
    std::vector<NamedTensor> tensors = ckpt::consolidate_part(manifest, {1});
    CHECK(names_of(tensors) == std::vector<std::string>{"decoder.embed_tokens.weight", "decoder.layers.0.fc1.weight",
                                                        "decoder.output_projection.weight", "decoder.version"});
    CHECK(describe(tensors[0].source) == "[0]1@192+16");
    CHECK(tensors[0].source.dtype == DType::Float16);
    CHECK(shape_of(tensors[0].source.shape) == "[4, 2]");
    CHECK(describe(tensors[1].source) == "[0]1@320+4*2(ss8,st4)");
    REQUIRE(tensors[2].alias_of.has_value());
    CHECK(*tensors[2].alias_of == "decoder.embed_tokens.weight");
    CHECK(tensors[2].source.pieces.empty());
    CHECK(describe(tensors[3].source) == "[0]1@512+4");
    CHECK_FALSE(tensors[3].alias_of.has_value());
  }

  TEST_CASE("consolidate_part: an EMA state dict, buffers it lacks taken from model") {
    std::vector<InstanceSpec> instances{{"decoder.layers.0", {"fc1.weight", "fc1.bias"}, {{2, 2}, {2}}, false, {}}};
    ckpt::Manifest manifest;
    for (int rank = 0; rank < 2; ++rank) {
      auto r = static_cast<std::uint64_t>(rank);
      // The model's flat parameter at 64 + 1000r, the EMA's at 640 + 1000r.
      ckpt::ManifestFile file =
          shard_file(shard_path(rank), instances, 2, rank, {64 + 1000 * r}, DType::Float32, {{"decoder.version", 900}});
      ckpt::ManifestFile ema =
          shard_file(shard_path(rank), instances, 2, rank, {640 + 1000 * r}, DType::Float32, {}, "extra_state/ema");
      file.add_tensor(ema.tensors.front(), ema.places.front());
      manifest.files.push_back(file);
    }
    std::vector<NamedTensor> weights = ckpt::consolidate_part(manifest, {0, 1});
    CHECK(describe(find(weights, "decoder.layers.0.fc1.weight").source) == "[0]0@64+12 [12]1@1064+4");
    std::vector<NamedTensor> ema = ckpt::consolidate_part(manifest, {0, 1}, "extra_state/ema");
    CHECK(names_of(ema) ==
          std::vector<std::string>{"decoder.layers.0.fc1.weight", "decoder.layers.0.fc1.bias", "decoder.version"});
    CHECK(describe(find(ema, "decoder.layers.0.fc1.weight").source) == "[0]0@640+12 [12]1@1640+4");
    CHECK(describe(find(ema, "decoder.layers.0.fc1.bias").source) == "[0]1@1644+8");
    CHECK(describe(find(ema, "decoder.version").source) == "[0]0@900+4");
  }

  TEST_CASE("consolidate_part: an EMA copy of unflattened weights keeps the model's buffers") {
    // Regression test for a bug found by these tests (fixed): the unflattened
    // branch returned the EMA's tensors only, so `stitch --ema` of consolidated
    // files whose EMA holds parameters only (ema_fp32_params) lost decoder.version.
    ckpt::Manifest manifest;
    ckpt::ManifestFile file;
    file.path = "/ckpt/reshard-model_part-0.pt";
    add(file, contiguous("model/decoder.embed_tokens.weight", DType::Float16, {4, 2}, 128));
    add(file, contiguous("model/decoder.version", DType::Float32, {1}, 192));
    add(file, contiguous("extra_state/ema_fp32_params/decoder.embed_tokens.weight", DType::Float32, {4, 2}, 256));
    manifest.files.push_back(file);
    std::vector<NamedTensor> tensors = ckpt::consolidate_part(manifest, {0}, "extra_state/ema_fp32_params");
    REQUIRE_FALSE(tensors.empty());
    CHECK(tensors[0].name == "decoder.embed_tokens.weight");
    CHECK(describe(tensors[0].source) == "[0]0@256+32");
    CHECK(tensors[0].source.dtype == DType::Float32);  // the EMA's, not the model's float16
    CHECK(names_of(tensors) == std::vector<std::string>{"decoder.embed_tokens.weight", "decoder.version"});
    CHECK(describe(find(tensors, "decoder.version").source) == "[0]0@192+4");
  }

  // ================================================================ consolidate_optimizer_state

  TEST_CASE("consolidate_optimizer_state: state/<k>/<name> unpadded like the weights, split into their names") {
    // ThreeRankPart's two instances on 3 ranks, weights float16. The optimizer
    // state is float32 with the weights' padded lengths: state/0 belongs to the
    // first flat parameter in metadata order, state/1 to the second.
    for (bool root_first : {false, true}) {
      CAPTURE(root_first);
      ThreeRankPart part;
      // Flat parameters in metadata order; k counts them.
      std::vector<std::size_t> order = root_first ? std::vector<std::size_t>{1, 0} : std::vector<std::size_t>{0, 1};
      auto state_offset = [&](const std::string& name, std::size_t k, int rank) -> std::uint64_t {
        return (name == "exp_avg" ? 10000 : 20000) + 2000 * k + 100 * static_cast<std::uint64_t>(rank);
      };
      for (int rank = 0; rank < 3; ++rank) {
        ckpt::ManifestFile& file = part.rank_file(rank);
        for (ckpt::StoredTensor& tensor : file.tensors.edit()) tensor.dtype = DType::Float16;
        file.remove_tensors_if(
            [](const ckpt::StoredTensor& t) { return ckpt::tensor_section(t) == "optimizer_state"; });
        if (root_first) std::swap(file.fsdp.edit().instances[0], file.fsdp.edit().instances[1]);
        for (std::size_t k = 0; k < 2; ++k) {
          ckpt::FsdpChunk chunk = chunk_of(part.instances[order[k]], 3, rank);
          for (const std::string name : {"exp_avg", "exp_avg_sq"}) {
            std::string path = "last_optimizer_state/state/";
            path.append(std::to_string(k));
            path.append("/");
            path.append(name);
            add(file, contiguous(path, DType::Float32, {chunk.numel + chunk.padding}, state_offset(name, k, rank)));
          }
        }
      }
      std::vector<NamedTensor> weights = ckpt::consolidate_part(part.manifest, part.shard_files);
      for (const std::string name : {"exp_avg", "exp_avg_sq"}) {
        CAPTURE(name);
        std::vector<NamedTensor> state = ckpt::consolidate_optimizer_state(part.manifest, part.shard_files, name);
        // The weights' parameters in the same order, without the tie and the buffers.
        std::vector<std::string> want_names;
        for (const NamedTensor& weight : weights) {
          if (!weight.alias_of && weight.name != "decoder.version") want_names.push_back(weight.name);
        }
        CHECK(names_of(state) == want_names);
        for (const NamedTensor& tensor : state) {
          CAPTURE(tensor.name);
          CHECK(tensor.source.dtype == DType::Float32);
          CHECK_FALSE(tensor.alias_of.has_value());
          CHECK(tensor.source.shape == find(weights, tensor.name).source.shape);
          CHECK(find(weights, tensor.name).source.dtype == DType::Float16);
        }
        // Byte for byte where the chunk rule puts each element of state/k.
        auto file_of = [&](int rank) {
          return static_cast<std::uint32_t>(part.shard_files[static_cast<std::size_t>(rank)]);
        };
        for (std::size_t k = 0; k < 2; ++k) {
          const InstanceSpec& spec = part.instances[order[k]];
          auto offset_of = [&](int rank) { return state_offset(name, k, rank); };
          std::vector<std::int64_t> starts = starts_of(spec);
          for (std::size_t p = 0; p < spec.names.size(); ++p) {
            std::string key = spec.fsdp_path.empty() ? spec.names[p] : cat(spec.fsdp_path + ".", spec.names[p]);
            CAPTURE(key);
            Ids want = flat_ids(spec, 3, 4, starts[p], product(spec.shapes[p]), file_of, offset_of);
            CHECK(difference(ids_of(find(state, key).source), want) == "");
          }
        }
      }
      // Exact pieces of one case: embed_tokens = root elements 0-7 = rank 0's 4, rank 1's 4.
      std::size_t root_k = root_first ? 0 : 1;
      std::vector<NamedTensor> exp_avg = ckpt::consolidate_optimizer_state(part.manifest, part.shard_files, "exp_avg");
      std::string rank0 = std::to_string(10000 + 2000 * root_k);
      std::string rank1 = std::to_string(10000 + 2000 * root_k + 100);
      CHECK(describe(find(exp_avg, "decoder.embed_tokens.weight").source) ==
            cat(cat(cat(cat("[0]1@", rank0), "+16 [16]2@"), rank1), "+16"));
    }
  }

  TEST_CASE("consolidate_optimizer_state: several flat parameters per instance, no_broadcast instances") {
    // World size 2. Instance 0 has two flat parameters (k = 0, 1), instance 1
    // one (k = 2) and is no_broadcast (whole on every rank; shard 0's is used).
    ckpt::Manifest manifest;
    for (int rank = 0; rank < 2; ++rank) {
      auto r = static_cast<std::uint64_t>(rank);
      ckpt::ManifestFile file;
      file.path = shard_path(rank);
      ckpt::FsdpMetadata metadata;
      ckpt::FsdpInstanceMeta layer;
      layer.fsdp_path = "decoder.layers.0";
      for (int j = 0; j < 2; ++j) {
        ckpt::FlatParamMeta flat;
        flat.name = cat("flat_param_", std::to_string(j));
        flat.state_key = cat("decoder.layers.0.", flat.name);
        flat.names = {j == 0 ? "fc1.weight" : "fc2.weight"};
        flat.shapes = {{3}};
        flat.numels = {3};
        flat.padding = ckpt::fsdp_chunk(3, 2, rank).padding;  // chunk 2: 2 + 0, 1 + 1
        layer.flat_params.push_back(flat);
        add(file, contiguous(cat("model/", flat.state_key), DType::Float32, {2}, 100 + 50 * j + 1000 * r));
      }
      ckpt::FsdpInstanceMeta root;
      root.no_broadcast_optim_state = true;
      ckpt::FlatParamMeta flat;
      flat.name = "flat_param_0";
      flat.state_key = "flat_param_0";
      flat.names = {"decoder.embed_tokens.weight"};
      flat.shapes = {{2, 2}};
      flat.numels = {4};
      root.flat_params.push_back(flat);
      add(file, contiguous("model/flat_param_0", DType::Float32, {4}, 300 + 1000 * r));
      metadata.instances = {layer, root};
      file.fsdp = metadata;
      for (std::uint64_t k = 0; k < 3; ++k) {
        add(file, contiguous(cat(cat("last_optimizer_state/state/", std::to_string(k)), "/exp_avg"), DType::Float32,
                             {k == 2 ? 4 : 2}, 500 + 100 * k + 1000 * r));
      }
      manifest.files.push_back(file);
    }
    std::vector<NamedTensor> weights = ckpt::consolidate_part(manifest, {0, 1});
    CHECK(names_of(weights) == std::vector<std::string>{"decoder.layers.0.fc1.weight", "decoder.layers.0.fc2.weight",
                                                        "decoder.embed_tokens.weight"});
    CHECK(describe(weights[0].source) == "[0]0@100+8 [8]1@1100+4");
    CHECK(describe(weights[1].source) == "[0]0@150+8 [8]1@1150+4");
    CHECK(describe(weights[2].source) == "[0]0@300+16");
    std::vector<NamedTensor> state = ckpt::consolidate_optimizer_state(manifest, {0, 1}, "exp_avg");
    CHECK(names_of(state) == names_of(weights));
    CHECK(describe(state[0].source) == "[0]0@500+8 [8]1@1500+4");
    CHECK(describe(state[1].source) == "[0]0@600+8 [8]1@1600+4");
    CHECK(describe(state[2].source) == "[0]0@700+16");
    CHECK(shape_of(state[2].source.shape) == "[2, 2]");
  }

  TEST_CASE("consolidate_optimizer_state: inputs it cannot split are errors naming file and tensor") {
    SUBCASE("a consolidated file: state <i> is torch's, shaped like the i-th parameter") {
      ckpt::Manifest manifest;
      ckpt::ManifestFile file;
      file.path = "/ckpt/reshard-model_part-0.pt";
      add(file, contiguous("model/decoder.embed_tokens.weight", DType::Float16, {4, 2}, 128));
      add(file, contiguous("model/decoder.version", DType::Float32, {1}, 192));  // a buffer: no state
      add(file, contiguous("model/decoder.layer_norm.weight", DType::Float16, {2}, 200));
      add(file, contiguous("last_optimizer_state/state/0/exp_avg", DType::Float32, {4, 2}, 256));
      add(file, contiguous("last_optimizer_state/state/1/exp_avg", DType::Float32, {2}, 320));
      auto entry = [](int tensor) { return nlohmann::ordered_json{{"step", 7}, {"exp_avg", {{"$tensor", tensor}}}}; };
      file.objects = nlohmann::ordered_json{
          {"last_optimizer_state",
           {{"state", {{"0", entry(3)}, {"1", entry(4)}}}, {"param_groups", {{{"lr", 1}, {"params", {0, 1}}}}}}}};
      manifest.files.push_back(file);
      CHECK(ckpt::optimizer_state_names(manifest.files[0]) == std::vector<std::string>{"exp_avg"});
      ckpt::ManifestFile reordered = manifest.files[0];  // a dict saved with state 1 first
      reordered.objects = nlohmann::ordered_json{
          {"last_optimizer_state", {{"state", {{"1", entry(4)}, {"0", entry(3)}}}, {"param_groups", nullptr}}}};
      CHECK(ckpt::optimizer_state_names(reordered) == std::vector<std::string>{"exp_avg"});
      std::vector<NamedTensor> state = ckpt::consolidate_optimizer_state(manifest, {0}, "exp_avg");
      REQUIRE(state.size() == 2);
      CHECK(state[0].name == "decoder.embed_tokens.weight");
      CHECK(describe(state[0].source) == "[0]0@256+32");
      CHECK(state[1].name == "decoder.layer_norm.weight");
      CHECK(state[1].source.shape == Shape{2});
      // shaped unlike its parameter, missing, or one state too many: named
      ckpt::ManifestFile& edited = manifest.files[0];
      edited.tensors.edit()[4].shape = {3};
      auto error = error_of([&] { ckpt::consolidate_optimizer_state(manifest, {0}, "exp_avg"); });
      REQUIRE(error.has_value());
      CHECK(error->where().member == "last_optimizer_state/state/1/exp_avg");
      CHECK(contains(error->message(), "shape [3], but parameter 1 (decoder.layer_norm.weight) has [2]"));
      edited.tensors.edit()[4].shape = {2};
      error = error_of([&] { ckpt::consolidate_optimizer_state(manifest, {0}, "exp_avg_sq"); });
      REQUIRE(error.has_value());
      CHECK(error->where().member == "last_optimizer_state");
      CHECK(contains(error->message(), "no optimizer state 'exp_avg_sq' here (the states hold: exp_avg)"));
      add(edited, contiguous("last_optimizer_state/state/2/exp_avg", DType::Float32, {2}, 400));
      edited.objects.edit()["last_optimizer_state"]["state"]["2"] = entry(5);
      error = error_of([&] { ckpt::consolidate_optimizer_state(manifest, {0}, "exp_avg"); });
      REQUIRE(error.has_value());
      CHECK(error->where().member == "last_optimizer_state/state/2");
      CHECK(contains(error->message(), "state 2, but there are 2 parameters"));
    }
    SUBCASE("FSDP metadata but no flat parameter in the file") {
      ThreeRankPart part;
      for (ckpt::ManifestFile& file : part.manifest.files) {
        file.remove_tensors_if([](const ckpt::StoredTensor& t) { return ckpt::tensor_section(t) == "model"; });
      }
      auto error = error_of([&] { ckpt::consolidate_optimizer_state(part.manifest, part.shard_files, "exp_avg"); });
      REQUIRE(error.has_value());
      CHECK(error->where().file == shard_path(0));
      CHECK_KIND(*error, ckpt::ErrorKind::BadInput);
    }
    SUBCASE("a state tensor missing from one shard") {
      ThreeRankPart part;
      for (int rank = 0; rank < 3; ++rank) {
        ckpt::ManifestFile& file = part.rank_file(rank);
        file.remove_tensors_if(
            [](const ckpt::StoredTensor& t) { return ckpt::tensor_section(t) == "optimizer_state"; });
        for (std::size_t k = 0; k < 2; ++k) {
          if (rank == 1 && k == 1) continue;
          ckpt::FsdpChunk chunk = chunk_of(part.instances[k], 3, rank);
          add(file, contiguous(cat(cat("last_optimizer_state/state/", std::to_string(k)), "/exp_avg"), DType::Float32,
                               {chunk.numel + chunk.padding}, 9000 + 100 * k));
        }
      }
      CHECK_NOTHROW(ckpt::consolidate_part(part.manifest, part.shard_files));
      auto error = error_of([&] { ckpt::consolidate_optimizer_state(part.manifest, part.shard_files, "exp_avg"); });
      REQUIRE(error.has_value());
      CHECK(error->where().file == shard_path(1));
      CHECK(error->where().member == "last_optimizer_state/state/1/exp_avg");
      CHECK_KIND(*error, ckpt::ErrorKind::IncompleteSet);
      // Another state name: nothing of it anywhere.
      error = error_of([&] { ckpt::consolidate_optimizer_state(part.manifest, part.shard_files, "momentum_buffer"); });
      REQUIRE(error.has_value());
      CHECK(error->where().member == "last_optimizer_state/state/0/momentum_buffer");
    }
    SUBCASE("state still padded (metaseq's reshard_fsdp trap): lengths that do not match the weights'") {
      // FORMATS.md section 5: metaseq's own resharding leaves optimizer slices
      // longer than their weights. Unpadding them with the weights' padding
      // gives too many elements: an error, never a silent misplacement.
      ThreeRankPart part;
      for (int rank = 0; rank < 3; ++rank) {
        ckpt::ManifestFile& file = part.rank_file(rank);
        file.remove_tensors_if(
            [](const ckpt::StoredTensor& t) { return ckpt::tensor_section(t) == "optimizer_state"; });
        for (std::size_t k = 0; k < 2; ++k) {
          ckpt::FsdpChunk chunk = chunk_of(part.instances[k], 3, rank);
          std::int64_t extra = rank == 2 && k == 0 ? 1 : 0;
          add(file, contiguous(cat(cat("last_optimizer_state/state/", std::to_string(k)), "/exp_avg"), DType::Float32,
                               {chunk.numel + chunk.padding + extra}, 9000 + 100 * k));
        }
      }
      auto error = error_of([&] { ckpt::consolidate_optimizer_state(part.manifest, part.shard_files, "exp_avg"); });
      REQUIRE(error.has_value());
      CHECK(error->where().member == "last_optimizer_state/state/0/exp_avg");
      CHECK(contains(error->message(), "hold 9 unpadded elements, shard_metadata names 8"));
    }
  }

  // ================================================================ flatten_fsdp

  TEST_CASE("flatten_fsdp: world sizes 1, 2, 3 and 8, padding as fsdp_chunk's, chunks give back the parameters") {
    FlattenInputs inputs;
    const std::int64_t totals[] = {14, 10, 1};
    for (int world : {1, 2, 3, 8}) {
      CAPTURE(world);
      std::vector<Ids> gathered(3);  // per instance: every rank's real elements in rank order
      bool pure_padding_seen = false;
      for (int rank = 0; rank < world; ++rank) {
        CAPTURE(rank);
        std::vector<ckpt::FlatShard> shards = ckpt::flatten_fsdp(inputs.layout, inputs.params, world, rank);
        REQUIRE(shards.size() == 3);
        for (std::size_t i = 0; i < 3; ++i) {
          CAPTURE(i);
          const ckpt::FlatShard& shard = shards[i];
          const InstanceSpec& spec = inputs.specs[i];
          CHECK(shard.instance == i);
          CHECK(shard.flat_param == 0u);
          CHECK(shard.state_key == flat_key(spec));
          CHECK(shard.shapes == spec.shapes);
          std::vector<std::int64_t> numels;
          for (const Shape& shape : spec.shapes) numels.push_back(product(shape));
          CHECK(shard.numels == numels);
          ckpt::FsdpChunk chunk = ckpt::fsdp_chunk(totals[i], world, rank);
          CHECK(shard.padding == chunk.padding);
          CHECK(shard.source.dtype == DType::Float32);
          CHECK(shard.source.shape == Shape{chunk.numel + chunk.padding});
          pure_padding_seen = pure_padding_seen || (chunk.numel == 0 && chunk.padding > 0);
          // This rank's elements of the flat parameter, then zeros.
          Ids want = ids_join({ids_slice(inputs.flat(i), static_cast<std::uint64_t>(chunk.begin) * 4,
                                         static_cast<std::uint64_t>(chunk.numel) * 4),
                               ids_zeros(static_cast<std::uint64_t>(chunk.padding) * 4)});
          Ids got = ids_of(shard.source);
          CHECK(difference(got, want) == "");
          Ids real = ids_slice(got, 0, static_cast<std::uint64_t>(chunk.numel) * 4);
          gathered[i].insert(gathered[i].end(), real.begin(), real.end());
        }
      }
      for (std::size_t i = 0; i < 3; ++i) CHECK(difference(gathered[i], inputs.flat(i)) == "");
      CHECK(pure_padding_seen == (world > 1));  // 1 element on W ranks; on 8 also 10 elements (chunk 2)
    }
  }

  TEST_CASE("flatten_fsdp: exact pieces of 14 elements on 3 ranks") {
    // Layer: chunk 5. Rank 0 = elements 0-4 (fc1.weight 0-4); rank 1 = 5-9
    // (fc1.weight 5, fc1.bias, fc2.weight row 0); rank 2 = 10-13 (fc2.weight
    // rows 1-2: still one strided piece) and 1 element of padding.
    FlattenInputs inputs;
    std::vector<std::string> layer;
    for (int rank = 0; rank < 3; ++rank) {
      layer.push_back(describe(ckpt::flatten_fsdp(inputs.layout, inputs.params, 3, rank)[0].source));
    }
    CHECK(layer[0] == "[0]0@100+20");
    CHECK(layer[1] == "[0]0@120+4 [4]0@200+8 [12]1@304+8");
    CHECK(layer[2] == "[0]1@320+8*2(ss16,st8) [16]zeros+4");
    // Root: 10 elements, chunk 4. Rank 0 = embed's first 4 elements (two runs);
    // rank 2 = elements 8-9 (final_layer_norm) and 2 of padding.
    CHECK(describe(ckpt::flatten_fsdp(inputs.layout, inputs.params, 3, 0)[1].source) == "[0]1@500+12 [12]0@700+4");
    CHECK(describe(ckpt::flatten_fsdp(inputs.layout, inputs.params, 3, 2)[1].source) == "[0]1@900+8 [8]zeros+8");
  }

  TEST_CASE("flatten_fsdp: shapes and numels come from the parameters, not from the layout's metadata") {
    // After a Megatron re-cut the layout (the input's first file's metadata)
    // still names the old shapes; the flat shards follow the parameters.
    FlattenInputs inputs;
    ckpt::FlatParamMeta& stale = inputs.layout.instances[0].flat_params[0];
    stale.shapes = {{4, 3}, {4}, {3, 4}};
    stale.numels = {12, 4, 12};
    stale.padding = 5;
    std::vector<ckpt::FlatShard> shards = ckpt::flatten_fsdp(inputs.layout, inputs.params, 2, 1);
    CHECK(shards[0].shapes == std::vector<Shape>{{2, 3}, {2}, {3, 2}});
    CHECK(shards[0].numels == std::vector<std::int64_t>{6, 2, 6});
    CHECK(shards[0].padding == 0);  // 14 on 2 ranks
    CHECK(shards[0].source.shape == Shape{7});
  }

  TEST_CASE("flatten_fsdp + plan + consolidate_part: bytes survive the round trip through shard files") {
    // Flatten float32 parameters into W shard files (running each flat shard's
    // record in the simulator), describe the shards in a manifest as fairscale
    // would, consolidate them again, and compare every parameter's bytes with
    // the original's.
    FlattenInputs inputs;
    std::vector<Buffer> originals{patterned(1024, 1), patterned(1024, 2)};
    for (int world : {1, 2, 3, 8}) {
      CAPTURE(world);
      ckpt::Manifest manifest;
      std::vector<Buffer> shard_bytes;
      for (int rank = 0; rank < world; ++rank) {
        std::vector<ckpt::FlatShard> shards = ckpt::flatten_fsdp(inputs.layout, inputs.params, world, rank);
        ckpt::ManifestFile file;
        file.path = shard_path(rank);
        ckpt::FsdpMetadata metadata = inputs.layout;
        Buffer bytes = patterned(2048, 10 + static_cast<unsigned>(rank));
        for (std::size_t i = 0; i < shards.size(); ++i) {
          const ckpt::FlatShard& shard = shards[i];
          ckpt::FlatParamMeta& flat = metadata.instances[shard.instance].flat_params[shard.flat_param];
          flat.padding = shard.padding;
          flat.shapes = shard.shapes;
          flat.numels = shard.numels;
          NamedTensor tensor{shard.state_key, shard.source.dtype, shard.source, std::nullopt};
          PlannedRecord record = ckpt::plan_tensor_record(tensor, {0, 1});
          CHECK(tiling_problem(record) == "");
          Buffer written = execute(record, pointers(originals));
          std::uint64_t at = 256 * (i + 1);
          std::copy(written.begin(), written.end(), bytes.begin() + static_cast<std::ptrdiff_t>(at));
          add(file, contiguous(cat("model/", shard.state_key), DType::Float32, shard.source.shape, at));
        }
        add(file, contiguous("model/decoder.version", DType::Float32, {1}, 1792));  // the buffer the layout names
        file.fsdp = metadata;
        manifest.files.push_back(file);
        shard_bytes.push_back(std::move(bytes));
      }
      std::vector<int> shard_files;
      for (int rank = 0; rank < world; ++rank) shard_files.push_back(rank);
      std::vector<NamedTensor> back = ckpt::consolidate_part(manifest, shard_files);
      std::size_t compared = 0;
      for (std::size_t i = 0; i < inputs.specs.size(); ++i) {
        for (std::size_t k = 0; k < inputs.specs[i].names.size(); ++k) {
          std::string name = inputs.full_name(i, k);
          CAPTURE(name);
          const NamedTensor& original = find(inputs.params, name);
          const NamedTensor& restored = find(back, name);
          CHECK(restored.source.shape == original.source.shape);
          CHECK(materialize(restored.source, pointers(shard_bytes)) ==
                materialize(original.source, pointers(originals)));
          ++compared;
        }
      }
      CHECK(compared == 6);
    }
  }

  TEST_CASE("flatten_fsdp + consolidate_part: a no_broadcast_optim_state instance stays whole on every rank") {
    // Regression test for a bug this test found (fixed).
    FlattenInputs inputs;
    inputs.layout.instances[0].no_broadcast_optim_state = true;
    std::vector<Buffer> originals{patterned(1024, 1), patterned(1024, 2)};
    const int world = 3;
    ckpt::Manifest manifest;
    std::vector<Buffer> shard_bytes;
    for (int rank = 0; rank < world; ++rank) {
      std::vector<ckpt::FlatShard> shards = ckpt::flatten_fsdp(inputs.layout, inputs.params, world, rank);
      CHECK(shards[0].source.shape == Shape{14});  // whole, unpadded
      CHECK(shards[0].padding == 0);
      ckpt::ManifestFile file;
      file.path = shard_path(rank);
      ckpt::FsdpMetadata metadata = inputs.layout;
      Buffer bytes(2048);
      for (std::size_t i = 0; i < shards.size(); ++i) {
        metadata.instances[i].flat_params[0].padding = shards[i].padding;
        NamedTensor tensor{shards[i].state_key, DType::Float32, shards[i].source, std::nullopt};
        Buffer written = execute(ckpt::plan_tensor_record(tensor, {0, 1}), pointers(originals));
        std::copy(written.begin(), written.end(), bytes.begin() + static_cast<std::ptrdiff_t>(256 * (i + 1)));
        add(file,
            contiguous(cat("model/", shards[i].state_key), DType::Float32, shards[i].source.shape, 256 * (i + 1)));
      }
      add(file, contiguous("model/decoder.version", DType::Float32, {1}, 1792));  // the buffer the layout names
      file.fsdp = metadata;
      manifest.files.push_back(file);
      shard_bytes.push_back(std::move(bytes));
    }
    std::vector<NamedTensor> back;
    auto error = error_of([&] { back = ckpt::consolidate_part(manifest, {0, 1, 2}); });
    CHECK_FALSE(error.has_value());
    if (error) MESSAGE("consolidate_part: " << std::string(error->what()));
    if (!error) {
      CHECK(materialize(find(back, "decoder.layers.0.fc2.weight").source, pointers(shard_bytes)) ==
            materialize(find(inputs.params, "decoder.layers.0.fc2.weight").source, pointers(originals)));
    }
  }

  TEST_CASE("flatten_fsdp: bf16 parameters, one flat parameter per instance of several") {
    // Two flat parameters in one instance (flat_param_0, flat_param_1), bf16.
    ckpt::FsdpMetadata layout;
    ckpt::FsdpInstanceMeta instance;
    instance.fsdp_path = "decoder.layers.3";
    for (int j = 0; j < 2; ++j) {
      ckpt::FlatParamMeta flat;
      flat.name = cat("flat_param_", std::to_string(j));
      flat.state_key = cat("decoder.layers.3.", flat.name);
      flat.names = {j == 0 ? "fc1.weight" : "fc2.weight", j == 0 ? "fc1.bias" : "fc2.bias"};
      instance.flat_params.push_back(flat);
    }
    layout.instances.push_back(instance);
    std::vector<NamedTensor> params{
        named("decoder.layers.3.fc2.bias", {3}, 0, 600, DType::BFloat16),
        named("decoder.layers.3.fc1.weight", {2, 2}, 0, 100, DType::BFloat16),
        named("decoder.layers.3.fc1.bias", {2}, 0, 108, DType::BFloat16),  // continues fc1.weight's run
        named("decoder.layers.3.fc2.weight", {2, 3}, 0, 500, DType::BFloat16),
    };
    std::vector<ckpt::FlatShard> rank1 = ckpt::flatten_fsdp(layout, params, 4, 1);
    REQUIRE(rank1.size() == 2);
    // flat_param_0: 6 elements on 4 ranks, chunk 2: rank 1 = elements 2-3.
    CHECK(rank1[0].state_key == "decoder.layers.3.flat_param_0");
    CHECK(rank1[0].flat_param == 0u);
    CHECK(rank1[0].source.dtype == DType::BFloat16);
    CHECK(describe(rank1[0].source) == "[0]0@104+4");
    CHECK(rank1[0].padding == 0);
    // flat_param_1: 9 elements, chunk 3: rank 1 = elements 3-5 = fc2.weight row 1.
    CHECK(rank1[1].flat_param == 1u);
    CHECK(describe(rank1[1].source) == "[0]0@506+6");
    CHECK(rank1[1].shapes == std::vector<Shape>{{2, 3}, {3}});
    std::vector<ckpt::FlatShard> rank3 = ckpt::flatten_fsdp(layout, params, 4, 3);
    CHECK(describe(rank3[0].source) == "[0]zeros+4");  // 6 on 4: rank 3 is pure padding
    CHECK(rank3[0].padding == 2);
    CHECK(describe(rank3[1].source) == "[0]zeros+6");  // 9 on 4 (chunk 3): 3, 3, 3, 0 + 3
    CHECK(rank3[1].padding == 3);
  }

  TEST_CASE("flatten_fsdp: parameters it cannot flatten are errors naming the key and flat parameter") {
    SUBCASE("a parameter missing") {
      FlattenInputs inputs;
      std::erase_if(inputs.params, [](const NamedTensor& t) { return t.name == "decoder.layers.0.fc1.bias"; });
      auto error = error_of([&] { ckpt::flatten_fsdp(inputs.layout, inputs.params, 2, 0); });
      REQUIRE(error.has_value());
      CHECK(contains(error->what(), "decoder.layers.0.fc1.bias"));
      CHECK(contains(error->what(), "decoder.layers.0.flat_param_0"));
      CHECK_KIND(*error, ckpt::ErrorKind::BadInput);
    }
    SUBCASE("a parameter that is only a tie") {
      FlattenInputs inputs;
      for (NamedTensor& param : inputs.params) {
        if (param.name == "decoder.final_layer_norm.weight") param = alias(param.name, "decoder.layers.0.fc1.bias");
      }
      auto error = error_of([&] { ckpt::flatten_fsdp(inputs.layout, inputs.params, 2, 1); });
      REQUIRE(error.has_value());
      CHECK(contains(error->what(), "decoder.final_layer_norm.weight"));
      CHECK(contains(error->what(), "flat_param_0"));
      CHECK_KIND(*error, ckpt::ErrorKind::BadInput);
    }
    SUBCASE("mixed dtypes in one flat parameter") {
      FlattenInputs inputs;
      for (NamedTensor& param : inputs.params) {
        if (param.name == "decoder.layers.0.fc2.weight") param.source.dtype = DType::Int32;
      }
      auto error = error_of([&] { ckpt::flatten_fsdp(inputs.layout, inputs.params, 2, 0); });
      REQUIRE(error.has_value());
      CHECK(contains(error->what(), "decoder.layers.0.fc2.weight"));
      CHECK_KIND(*error, ckpt::ErrorKind::BadInput);
      CHECK(contains(error->what(), "decoder.layers.0.flat_param_0"));
    }
    SUBCASE("a flat parameter without names") {
      FlattenInputs inputs;
      inputs.layout.instances[2].flat_params[0].names.clear();
      auto error = error_of([&] { ckpt::flatten_fsdp(inputs.layout, inputs.params, 2, 0); });
      REQUIRE(error.has_value());
      CHECK(contains(error->what(), "decoder.layers.1.flat_param_0"));
      CHECK_KIND(*error, ckpt::ErrorKind::BadInput);
    }
    SUBCASE("a rank outside the world") {
      FlattenInputs inputs;
      CHECK_THROWS_KIND(ckpt::flatten_fsdp(inputs.layout, inputs.params, 2, 2), ckpt::ErrorKind::BadInput);
      CHECK_THROWS_KIND(ckpt::flatten_fsdp(inputs.layout, inputs.params, 0, 0), ckpt::ErrorKind::BadInput);
    }
  }
}  // TEST_SUITE
