// Unit tests for reading a manifest (src/manifest/manifest_json.cpp): a valid
// manifest built in memory round-trips through its JSON, and a table of
// corruptions, one per field check, each fails with one ckpt::Error naming the
// manifest and the field as a JSON path. Also the text level (JSON, zstd, size
// and depth limits) and detect_grid on part and shard numbers too large to
// allocate. No file is touched.
// GCC 12 reports a false -Wrestrict inside inlined std::string assignments
// (GCC bug 105329), here depending on what else the file inlines.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wrestrict"
#endif
#include <doctest/doctest.h>
#include <zstd.h>

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/io/error.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/manifest/manifest_json.hpp"
#include "layout_fixtures.hpp"
#include "temp_files.hpp"

namespace {

using json = nlohmann::ordered_json;
using ckpt::DType;
using layout_fixtures::contains;
using layout_fixtures::error_of;

const std::string kSource = "test.json";

ckpt::StoredTensor tensor(const std::string& path, DType dtype, std::vector<std::int64_t> shape,
                          std::vector<std::int64_t> stride) {
  ckpt::StoredTensor t;
  t.path = path;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.stride = std::move(stride);
  t.storage_key = path;  // a storage of its own, as large as the view (storage_offset 0)
  ckpt::ViewExtent extent = ckpt::view_extent(t.shape, t.stride, ckpt::dtype_info(dtype).itemsize);
  t.nbytes = extent.span_elements * ckpt::dtype_info(dtype).itemsize;
  t.storage_nbytes = t.nbytes;
  return t;
}

// Two FSDP shards of model part 0: a flat parameter, a tied embedding, a strided
// view, FSDP metadata and an object tree pointing at the tensors.
ckpt::Manifest valid_manifest() {
  ckpt::Manifest manifest;
  for (int d = 0; d < 2; ++d) {
    ckpt::ManifestFile file;
    file.path = "/ckpt/checkpoint_last-model_part-0-shard" + std::to_string(d) + ".pt";
    file.size_bytes = 8192;
    file.mtime_ns = 1764137000000000000 + d;
    file.archive_name = "checkpoint_last-model_part-0-shard" + std::to_string(d);
    file.role = ckpt::parse_file_role(file.path);
    file.declared_parts = ckpt::DeclaredParts{1, "cfg.model.model_parallel_size"};
    file.top_level_keys = {"model", "shard_metadata"};
    const std::uint32_t crc = 0x12345678;
    file.add_tensor(tensor("model/flat_param_0", DType::Float16, {3}, {1}), {1024, crc});
    file.add_tensor(tensor("model/decoder.embed_tokens.weight", DType::Float32, {4, 2}, {2, 1}), {2048, crc});
    ckpt::StoredTensor tied = file.tensors.back();
    tied.path = "model/decoder.output_projection.weight";
    tied.alias_of = "model/decoder.embed_tokens.weight";
    file.add_tensor(tied, {2048, crc});
    ckpt::StoredTensor strided = tensor("model/strided", DType::Float32, {2, 3}, {1, 2});
    strided.storage_offset = 4;
    strided.storage_nbytes += 4 * 4;
    strided.requires_grad = true;
    strided.wrap = ckpt::TensorWrap::Parameter;
    file.add_tensor(strided, {4096, crc});
    ckpt::FlatParamMeta flat;
    flat.state_key = "flat_param_0";
    flat.name = "flat_param_0";
    flat.names = {"w", "b"};
    flat.shapes = {{2, 2}, {2}};
    flat.numels = {4, 2};
    ckpt::FsdpInstanceMeta instance;
    instance.flat_params.push_back(flat);
    instance.shared_param_info = {{"decoder.embed_tokens.weight", "decoder.output_projection.weight"}};
    file.fsdp = ckpt::FsdpMetadata{{instance}, {"decoder.version"}};
    file.objects = json{{"model",
                         {{"flat_param_0", {{"$tensor", 0}}},
                          {"decoder.embed_tokens.weight", {{"$tensor", 1}}},
                          {"decoder.output_projection.weight", {{"$tensor", 1}}},
                          {"strided", {{"$tensor", 3}}}}},
                        {"cfg", {{"$class", "argparse.Namespace"}, {"attributes", {{"lr", 0.5}}}}},
                        {"again", {{"$ref", "cfg"}}},
                        {"blob", {{"$bytes", 12}}},
                        {"list", {1, "two", nullptr, {{"$tensor", 3}}}}};
    manifest.files.push_back(std::move(file));
  }
  // As build_manifest keeps them: both shards refer to one tensor list, one
  // shard_metadata and one object tree.
  ckpt::SharedContent shared;
  for (ckpt::ManifestFile& file : manifest.files) shared.share(file);
  manifest.grid = ckpt::detect_grid(manifest.files);
  return manifest;
}

json valid_json() {
  return ckpt::manifest_to_json(valid_manifest());
}

struct Corruption {
  const char* what;
  std::function<void(json&)> edit;
  const char* field;    // the JSON path the error must name
  const char* message;  // a part of the message
};

std::string zstd(const std::string& text) {
  std::string out(ZSTD_compressBound(text.size()), '\0');
  std::size_t n = ZSTD_compress(out.data(), out.size(), text.data(), text.size(), 3);
  REQUIRE_FALSE(ZSTD_isError(n));
  out.resize(n);
  return out;
}

ckpt::Bytes bytes_of(const std::string& text) {
  return ckpt::Bytes(reinterpret_cast<const std::byte*>(text.data()), text.size());
}

}  // namespace

TEST_SUITE("manifest") {
  TEST_CASE("manifest JSON: a valid manifest round-trips, as JSON, as text and as zstd") {
    ckpt::Manifest manifest = valid_manifest();
    REQUIRE(manifest.grid.problems.empty());
    REQUIRE(manifest.grid.mp == 1);
    REQUIRE(manifest.grid.dp == 2);
    json rendered = ckpt::manifest_to_json(manifest);
    ckpt::Manifest again = ckpt::manifest_from_json(rendered, kSource);
    CHECK(ckpt::manifest_to_json(again) == rendered);
    CHECK(again.files[1].tensors[2].alias_of == "model/decoder.embed_tokens.weight");
    CHECK(again.files[0].tensors[3].storage_offset == 4);
    CHECK(again.files[0].role.dp_shard == 0);
    CHECK(again.files[1].role.dp_shard == 1);

    std::string text = rendered.dump(1) + "\n";
    CHECK(ckpt::manifest_to_json(ckpt::parse_manifest(bytes_of(text), kSource, false)) == rendered);
    std::string compressed = zstd(text);
    CHECK(ckpt::manifest_to_json(ckpt::parse_manifest(bytes_of(compressed), kSource, true)) == rendered);
    // Several frames one after the other are one text.
    std::string half = text.substr(0, text.size() / 2);
    std::string two_frames = zstd(half) + zstd(text.substr(half.size()));
    CHECK(ckpt::manifest_to_json(ckpt::parse_manifest(bytes_of(two_frames), kSource, true)) == rendered);
    // Files come first, and parse_manifest names each file's path as it meets
    // it; a manifest with its files last (as written before) reads the same.
    std::vector<std::string> met;
    ckpt::parse_manifest(bytes_of(text), kSource, false, ckpt::kMaxManifestBytes,
                         [&](const std::string& path) { met.push_back(path); });
    CHECK(met == std::vector<std::string>{manifest.files[0].path, manifest.files[1].path});
    CHECK(text.find("\"files\"") < text.find("\"tensor_lists\""));
    json files_last = rendered;
    json files = files_last["files"];
    files_last.erase("files");
    files_last["files"] = files;
    CHECK(ckpt::manifest_to_json(ckpt::parse_manifest(bytes_of(files_last.dump(1)), kSource, false)) == rendered);
  }

  TEST_CASE("manifest text: tensors are written as the JSON document dumps them, whatever their paths hold") {
    ckpt::Manifest manifest = valid_manifest();
    ckpt::ManifestFile& file = manifest.files[0];
    const char* paths[] = {"model/quote\"and\\backslash",    "model/tab\tnewline\n",    "model/\x7f del",
                           "model/caf\xc3\xa9 \xe2\x82\xac", "model/bad \xff\xfe utf8", "model/ctl \x01"};
    for (const char* path : paths) {
      ckpt::StoredTensor odd = tensor(path, DType::BFloat16, {5, 0, 1}, {1, 5, 5});
      odd.storage_key = "key \"x\"";
      odd.storage_offset = 3;
      odd.storage_nbytes = ~std::uint64_t{0} >> 1;
      odd.wrap = ckpt::TensorWrap::ParameterWithState;
      file.add_tensor(odd, {8000, 7});
    }
    test_files::TempDir dir;
    std::string path = dir.file("m.json");
    ckpt::write_manifest(manifest, path, false);
    std::ifstream in(path);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    json document = ckpt::manifest_to_json(manifest);
    for (const json& list : document["tensor_lists"]) {
      std::string dumped = list.dump(-1, ' ', false, json::error_handler_t::replace);
      CHECK_MESSAGE(text.find("\n  " + dumped) != std::string::npos, dumped);
    }
  }

  TEST_CASE("check_fresh: a listed path that is a directory is named as one, not as changed") {
    test_files::TempDir dir;
    ckpt::Manifest manifest = valid_manifest();
    manifest.files.resize(1);
    manifest.files[0].path = dir.path().string();
    auto error = error_of([&] { ckpt::check_fresh(manifest); });
    REQUIRE(error.has_value());
    CHECK(error->message().find("not a regular file") != std::string::npos);
    CHECK(error->where().file == dir.path().string());
  }

  TEST_CASE("manifest JSON: the stored grid is not trusted, it is recomputed") {
    json j = valid_json();
    j["grid"] = {{"mp", 1000000}, {"dp", -3}, {"cells", {{7, 8, 9}}}, {"problems", "none"}};
    ckpt::Manifest manifest = ckpt::manifest_from_json(j, kSource);
    CHECK(manifest.grid.mp == 1);
    CHECK(manifest.grid.dp == 2);
    CHECK(manifest.grid.cells == std::vector<std::vector<int>>{{0, 1}});
  }

  TEST_CASE("manifest JSON: a part number past the grid's limit reads back as the grid problem it was") {
    ckpt::Manifest manifest = valid_manifest();
    manifest.files[1].path = "/ckpt/checkpoint_last-model_part-99999999-shard1.pt";
    manifest.files[1].archive_name = "checkpoint_last-model_part-99999999-shard1";  // saved under that name
    manifest.files[1].role = ckpt::parse_file_role(manifest.files[1].path);
    manifest.grid = ckpt::detect_grid(manifest.files);
    // the part number, and the shard that file 0's flat parameter then lacks
    REQUIRE(manifest.grid.problems.size() == 2);
    CHECK(contains(manifest.grid.problems[0], "model part number 99999999 is outside"));
    CHECK(contains(manifest.grid.problems[1], "shard 1 of 2 missing for model part 0"));
    json rendered = ckpt::manifest_to_json(manifest);
    ckpt::Manifest again = ckpt::manifest_from_json(rendered, kSource);
    CHECK(again.grid.problems == manifest.grid.problems);
    CHECK(again.grid.cells == manifest.grid.cells);
    CHECK(ckpt::manifest_to_json(again) == rendered);
  }

  TEST_CASE("manifest JSON: each corrupt field is one Error naming the manifest and the field") {
    const std::uint64_t big = std::uint64_t{1} << 40;
    const Corruption cases[] = {
        // top level
        {"not an object", [](json& j) { j = json::array(); }, "", "not a ckpt-tool manifest"},
        {"another format", [](json& j) { j["format"] = "other"; }, "format", "not a ckpt-tool manifest"},
        {"format of the wrong type", [](json& j) { j["format"] = 1; }, "format", "not a ckpt-tool manifest"},
        {"older version", [](json& j) { j["version"] = 1; }, "version", "version 1 is not supported"},
        {"version 2 (one tensor list per file)", [](json& j) { j["version"] = 2; }, "version",
         "version 2 is not supported (this ckpt-tool reads version 4): run `ckpt-tool manifest` again"},
        {"version 3 (paths not escaped, trees sorted)", [](json& j) { j["version"] = 3; }, "version",
         "version 3 is not supported"},
        {"declared part count from nowhere known",
         [](json& j) { j["files"][0]["model_parallel_size"]["from"] = "cfg.x"; }, "files[0].model_parallel_size.from",
         "is not a place a checkpoint declares its part count"},
        {"declared part count not an integer", [](json& j) { j["files"][0]["model_parallel_size"]["parts"] = "2"; },
         "files[0].model_parallel_size.parts", "an integer"},
        {"declared part count not an object", [](json& j) { j["files"][1]["model_parallel_size"] = 2; },
         "files[1].model_parallel_size", "an object"},
        {"version as a string", [](json& j) { j["version"] = "1"; }, "version", "is not supported"},
        {"no version", [](json& j) { j.erase("version"); }, "version", "missing"},
        {"files not an array", [](json& j) { j["files"] = json::object(); }, "files", "expected an array"},
        {"no files", [](json& j) { j["files"] = json::array(); }, "files", "lists no file"},
        {"a file not an object", [](json& j) { j["files"][1] = 3; }, "files[1]", "expected an object"},
        {"the same file twice", [](json& j) { j["files"][1] = j["files"][0]; }, "files[1].path",
         "same file as files[0]"},
        // files
        {"relative path", [](json& j) { j["files"][0]["path"] = "ckpt/model_part-0-shard0.pt"; }, "files[0].path",
         "not an absolute path"},
        {"size as a string", [](json& j) { j["files"][0]["size_bytes"] = "8192"; }, "files[0].size_bytes",
         "expected an integer, found string"},
        {"negative size", [](json& j) { j["files"][0]["size_bytes"] = -1; }, "files[0].size_bytes", "-1 is negative"},
        {"fractional mtime", [](json& j) { j["files"][0]["mtime_ns"] = 1.5; }, "files[0].mtime_ns",
         "expected an integer"},
        {"negative part", [](json& j) { j["files"][0]["mp_part"] = -5; }, "files[0].mp_part", "-5 is outside"},
        {"huge part", [](json& j) { j["files"][0]["mp_part"] = 2000000000; }, "files[0].mp_part",
         "2000000000, but the file name \"checkpoint_last-model_part-0-shard0.pt\" gives 0"},
        {"part past an int", [](json& j) { j["files"][0]["mp_part"] = 4294967296; }, "files[0].mp_part",
         "4294967296 is outside [0, 2147483647]"},
        {"part past 64 bits", [](json& j) { j["files"][0]["mp_part"] = json::parse("18446744073709551615"); },
         "files[0].mp_part", "outside"},
        {"shard disagreeing with the name", [](json& j) { j["files"][1]["dp_shard"] = 0; }, "files[1].dp_shard",
         "0, but the file name \"checkpoint_last-model_part-0-shard1.pt\" gives 1"},
        {"part dropped though the name has one", [](json& j) { j["files"][0]["mp_part"] = nullptr; },
         "files[0].mp_part", "none, but the file name"},
        {"part added though the name has none",
         [](json& j) {
           j["files"][0]["path"] = "/ckpt/model.pt";
           j["files"][0]["dp_shard"] = nullptr;
         },
         "files[0].mp_part", "0, but the file name \"model.pt\" gives none"},
        {"unknown pickle protocol", [](json& j) { j["files"][0]["pickle_protocol"] = 7; }, "files[0].pickle_protocol",
         "outside [2, 5]"},
        {"a top-level key not a string", [](json& j) { j["files"][0]["top_level_keys"][1] = 1; },
         "files[0].top_level_keys[1]", "expected a string"},
        {"tensors missing", [](json& j) { j["files"][1].erase("tensors"); }, "files[1].tensors", "missing"},
        {"tensor list reference past the lists", [](json& j) { j["files"][1]["tensors"] = 1; }, "files[1].tensors",
         "1 refers to tensor_lists[1], but there are 1"},
        {"tensor list reference negative", [](json& j) { j["files"][1]["tensors"] = -1; }, "files[1].tensors",
         "-1 is negative"},
        {"offsets fewer than the list's tensors", [](json& j) { j["files"][1]["file_byte_offsets"].erase(3); },
         "files[1].file_byte_offsets", "3 values for the 4 tensors"},
        {"CRCs more than the list's tensors", [](json& j) { j["files"][0]["record_crc32s"].push_back(0); },
         "files[0].record_crc32s", "5 values for the 4 tensors"},
        {"offsets missing", [](json& j) { j["files"][0].erase("file_byte_offsets"); }, "files[0].file_byte_offsets",
         "missing"},
        {"a tied tensor at another offset than its target", [](json& j) { j["files"][1]["file_byte_offsets"][2] = 64; },
         "files[1].file_byte_offsets[2]", "tied to \"model/decoder.embed_tokens.weight\" (alias_of) but at another"},
        {"object tree reference past the trees", [](json& j) { j["files"][0]["objects"] = 3; }, "files[0].objects",
         "3 refers to object_trees[3], but there are 1"},
        {"tensor_lists not an array", [](json& j) { j["tensor_lists"] = json::object(); }, "tensor_lists",
         "expected an array"},
        // tensors
        {"unknown dtype", [](json& j) { j["tensor_lists"][0][1]["dtype"] = "float8"; }, "tensor_lists[0][1].dtype",
         "unknown dtype \"float8\""},
        {"dtype of the wrong type", [](json& j) { j["tensor_lists"][0][1]["dtype"] = 5; }, "tensor_lists[0][1].dtype",
         "expected a string, found a number"},
        {"empty tensor path", [](json& j) { j["tensor_lists"][0][0]["path"] = ""; }, "tensor_lists[0][0].path",
         "empty"},
        {"negative size in the shape", [](json& j) { j["tensor_lists"][0][1]["shape"][1] = -4; },
         "tensor_lists[0][1].shape[1]", "-4 is negative"},
        {"shape not an array", [](json& j) { j["tensor_lists"][0][1]["shape"] = 8; }, "tensor_lists[0][1].shape",
         "expected an array"},
        {"negative stride", [](json& j) { j["tensor_lists"][0][1]["stride"][0] = -2; }, "tensor_lists[0][1].stride[0]",
         "-2 is negative"},
        {"stride of another length", [](json& j) { j["tensor_lists"][0][1]["stride"] = {1}; },
         "tensor_lists[0][1].stride", "1 strides for 2 dimensions"},
        {"too many dimensions",
         [](json& j) {
           j["tensor_lists"][0][1]["shape"] = std::vector<int>(65, 1);
           j["tensor_lists"][0][1]["stride"] = std::vector<int>(65, 1);
         },
         "tensor_lists[0][1].shape", "65 dimensions"},
        {"shape product past 64 bits",
         [big](json& j) {
           j["tensor_lists"][0][1]["shape"] = {big, big};
           j["tensor_lists"][0][1]["stride"] = {0, 0};
         },
         "tensor_lists[0][1].shape", "overflows 64 bits"},
        {"span past 64 bits",
         [](json& j) {
           j["tensor_lists"][0][1]["shape"] = {4, 2};
           j["tensor_lists"][0][1]["stride"] = {INT64_MAX, 1};
         },
         "tensor_lists[0][1].shape", "overflows 64 bits"},
        {"nbytes not the span of the view", [](json& j) { j["tensor_lists"][0][1]["nbytes"] = 31; },
         "tensor_lists[0][1].nbytes", "31 bytes, but a float32 view of shape [4, 2] and stride [2, 1] spans 32"},
        {"nbytes missing", [](json& j) { j["tensor_lists"][0][1].erase("nbytes"); }, "tensor_lists[0][1].nbytes",
         "missing"},
        {"storage smaller than its view", [](json& j) { j["tensor_lists"][0][3]["storage_nbytes"] = 36; },
         "tensor_lists[0][3].storage_nbytes",
         "a storage of 36 bytes cannot hold the view: 24 bytes from its element 4 (storage_offset)"},
        {"storage_nbytes missing", [](json& j) { j["tensor_lists"][0][0].erase("storage_nbytes"); },
         "tensor_lists[0][0].storage_nbytes", "missing"},
        {"two sizes for one storage",
         [](json& j) {
           j["tensor_lists"][0][3]["storage_key"] = "model/decoder.embed_tokens.weight";
           j["tensor_lists"][0][3]["dtype"] = "float32";
         },
         "tensor_lists[0][3].storage_nbytes", "is float32 40 bytes here but float32 32 bytes at [1]"},
        {"storage larger than the file",
         [](json& j) {
           j["tensor_lists"][0][1]["storage_nbytes"] = 1 << 20;
           j["tensor_lists"][0][2]["storage_nbytes"] = 1 << 20;  // its tie
         },
         "files[0].tensors", "storage of 1048576 bytes is larger than the file (size_bytes 8192)"},
        {"bytes past the end of the file", [](json& j) { j["files"][0]["file_byte_offsets"][1] = 8190; },
         "files[0].file_byte_offsets[1]",
         "8190 + 32 bytes of \"model/decoder.embed_tokens.weight\" reach past the end of the file (size_bytes 8192)"},
        {"offset near 2^64",
         [](json& j) { j["files"][0]["file_byte_offsets"][1] = json::parse("18446744073709551600"); },
         "files[0].file_byte_offsets[1]", "reach past the end of the file"},
        {"file shrunk below its tensors", [](json& j) { j["files"][0]["size_bytes"] = 2000; },
         "files[0].file_byte_offsets[1]", "reach past the end of the file"},
        {"negative storage offset", [](json& j) { j["tensor_lists"][0][3]["storage_offset"] = -1; },
         "tensor_lists[0][3].storage_offset", "-1 is negative"},
        {"storage starting before the file",
         [](json& j) {
           j["tensor_lists"][0][3]["storage_offset"] = 1025;
           j["tensor_lists"][0][3]["storage_nbytes"] = 1025 * 4 + 24;
         },
         "files[0].file_byte_offsets[3]", "the storage would start before the file"},
        {"crc32 past 32 bits", [](json& j) { j["files"][0]["record_crc32s"][0] = 4294967296; },
         "files[0].record_crc32s[0]", "outside [0, 4294967295]"},
        {"requires_grad not a boolean", [](json& j) { j["tensor_lists"][0][0]["requires_grad"] = "yes"; },
         "tensor_lists[0][0].requires_grad", "expected true or false"},
        {"an unknown parameter kind", [](json& j) { j["tensor_lists"][0][0]["parameter"] = "nn.Buffer"; },
         "tensor_lists[0][0].parameter", "is not \"nn.Parameter\" or \"nn.Parameter with state\""},
        {"the same tensor path twice", [](json& j) { j["tensor_lists"][0][3]["path"] = "model/flat_param_0"; },
         "tensor_lists[0][3].path", "same path as [0]"},
        {"alias of a missing tensor", [](json& j) { j["tensor_lists"][0][2]["alias_of"] = "model/nothing"; },
         "tensor_lists[0][2].alias_of", "is not a tensor of this list"},
        {"alias of itself",
         [](json& j) { j["tensor_lists"][0][2]["alias_of"] = "model/decoder.output_projection.weight"; },
         "tensor_lists[0][2].alias_of", "itself tied"},
        {"alias of another view", [](json& j) { j["tensor_lists"][0][2]["alias_of"] = "model/strided"; },
         "tensor_lists[0][2].alias_of", "differ"},
        {"empty alias", [](json& j) { j["tensor_lists"][0][2]["alias_of"] = ""; }, "tensor_lists[0][2].alias_of",
         "empty"},
        // fsdp
        {"fsdp not an object", [](json& j) { j["fsdp"][0] = "yes"; }, "fsdp[0]", "expected an object"},
        {"fsdp reference past the list", [](json& j) { j["files"][0]["fsdp"] = 1; }, "files[0].fsdp",
         "1 refers to fsdp[1], but there are 1"},
        {"fsdp reference not a number", [](json& j) { j["files"][0]["fsdp"] = "yes"; }, "files[0].fsdp",
         "expected an integer"},
        {"names shorter than numels",
         [](json& j) { j["fsdp"][0]["param_metadata"][0]["flat_params"][0]["names"].erase(1); },
         "fsdp[0].param_metadata[0].flat_params[0]", "names, shapes and numels have different lengths"},
        {"numel not the shape's", [](json& j) { j["fsdp"][0]["param_metadata"][0]["flat_params"][0]["numels"][0] = 5; },
         "fsdp[0].param_metadata[0].flat_params[0].numels[0]", "w: shape has 4 elements but numel says 5"},
        {"negative numel", [](json& j) { j["fsdp"][0]["param_metadata"][0]["flat_params"][0]["numels"][1] = -2; },
         "fsdp[0].param_metadata[0].flat_params[0].numels[1]", "-2 is negative"},
        {"negative size in an FSDP shape",
         [](json& j) { j["fsdp"][0]["param_metadata"][0]["flat_params"][0]["shapes"][0][1] = -2; },
         "fsdp[0].param_metadata[0].flat_params[0].shapes[0][1]", "-2 is negative"},
        {"FSDP shape product past 64 bits",
         [big](json& j) {
           auto& flat = j["fsdp"][0]["param_metadata"][0]["flat_params"][0];
           flat["shapes"][0] = {big, big};
         },
         "fsdp[0].param_metadata[0].flat_params[0].shapes[0]", "invalid shape"},
        {"negative padding", [](json& j) { j["fsdp"][0]["param_metadata"][0]["flat_params"][0]["padding"] = -1; },
         "fsdp[0].param_metadata[0].flat_params[0].padding", "-1 is negative"},
        {"state key not the path's and name's",
         [](json& j) { j["fsdp"][0]["param_metadata"][0]["flat_params"][0]["state_key"] = "other"; },
         "fsdp[0].param_metadata[0].flat_params[0].state_key", "fsdp_path and name give \"flat_param_0\""},
        {"shared_param_info not pairs",
         [](json& j) { j["fsdp"][0]["param_metadata"][0]["shared_param_info"][0].push_back("x"); },
         "fsdp[0].param_metadata[0].shared_param_info[0]", "pair"},
        {"no_broadcast_optim_state not a boolean",
         [](json& j) { j["fsdp"][0]["param_metadata"][0]["no_broadcast_optim_state"] = 0; },
         "fsdp[0].param_metadata[0].no_broadcast_optim_state", "expected true or false"},
        {"buffer names not strings", [](json& j) { j["fsdp"][0]["buffer_names"] = {{1}}; }, "fsdp[0].buffer_names[0]",
         "expected a string"},
        // objects
        {"$tensor index past the tensors", [](json& j) { j["object_trees"][0]["model"]["strided"]["$tensor"] = 4; },
         "files[0].objects", "object_trees[0] refers to tensor 4, but the file lists 4 tensors"},
        {"negative $tensor index", [](json& j) { j["object_trees"][0]["list"][3]["$tensor"] = -1; },
         "object_trees[0].list[3].$tensor", "-1 is negative"},
        {"$tensor index as a string", [](json& j) { j["object_trees"][0]["list"][3]["$tensor"] = "3"; },
         "object_trees[0].list[3].$tensor", "expected an integer"},
        {"$tensor under a key with dots",
         [](json& j) { j["object_trees"][0]["model"]["decoder.embed_tokens.weight"]["$tensor"] = -9; },
         "object_trees[0].model[\"decoder.embed_tokens.weight\"].$tensor", "-9 is negative"},
        {"$ref under a key with a newline",
         [](json& j) {
           j["object_trees"][0]["a\nb"] = {{"$ref", 1}};
         },
         "object_trees[0][\"a\\nb\"].$ref", "expected a string"},
        {"$ref not a string", [](json& j) { j["object_trees"][0]["again"]["$ref"] = 3; }, "object_trees[0].again.$ref",
         "expected a string"},
        {"$class not a string", [](json& j) { j["object_trees"][0]["cfg"]["$class"] = nullptr; },
         "object_trees[0].cfg.$class", "expected a string, found null"},
    };
    for (const Corruption& c : cases) {
      std::string what = c.what;
      CAPTURE(what);
      json j = valid_json();
      c.edit(j);
      auto error = error_of([&] { ckpt::manifest_from_json(j, kSource); });
      REQUIRE_MESSAGE(error.has_value(), "accepted");
      CHECK(error->where().file == kSource);
      CHECK(error->where().member == c.field);
      CHECK_KIND(*error, ckpt::ErrorKind::BadInput);
      CHECK_MESSAGE(contains(error->message(), c.message), std::string(error->what()));
      CHECK(std::string(error->what()).find('\n') == std::string::npos);
      // Read from text, tensors are read as the parser meets them: the same first error.
      auto streamed = error_of([&] { ckpt::parse_manifest(bytes_of(j.dump()), kSource, false); });
      REQUIRE_MESSAGE(streamed.has_value(), "accepted from text");
      CHECK(std::string(streamed->what()) == std::string(error->what()));
      CHECK(streamed->kind() == error->kind());
    }
    // A bad tensor after a bad version, and a tensor after a list element that
    // is not one: the error is the one the order of the checks gives.
    json both = valid_json();
    both["version"] = 1;
    both["tensor_lists"][0][1]["dtype"] = "float7";
    auto version = error_of([&] { ckpt::parse_manifest(bytes_of(both.dump()), kSource, false); });
    REQUIRE(version.has_value());
    CHECK(version->where().member == "version");
    json odd = valid_json();
    odd["tensor_lists"][0][0] = 5;
    odd["tensor_lists"][0][1]["dtype"] = "float7";
    auto first = error_of([&] { ckpt::parse_manifest(bytes_of(odd.dump()), kSource, false); });
    REQUIRE(first.has_value());
    CHECK(first->where().member == "tensor_lists[0][0]");
  }

  TEST_CASE("manifest text: bad JSON, bad zstd, too large or too deep is one Error naming the file") {
    const std::string text = valid_json().dump(1) + "\n";
    const std::string compressed = zstd(text);
    struct TextCase {
      const char* what;
      std::string bytes;
      bool compressed;
      std::uint64_t max_text_bytes;
      const char* message;
    };
    std::string deep = std::string(ckpt::kMaxManifestDepth + 1, '[') + std::string(ckpt::kMaxManifestDepth + 1, ']');
    std::string deep_in_strings = "{\"format\": \"" + std::string(5000, '[') + "\"}";
    const TextCase cases[] = {
        {"empty", "", false, ckpt::kMaxManifestBytes, "empty file"},
        {"not JSON", "{\"format\": ckpt}", false, ckpt::kMaxManifestBytes, "not valid JSON (parse error at byte 12)"},
        {"truncated JSON", text.substr(0, text.size() / 2), false, ckpt::kMaxManifestBytes, "not valid JSON"},
        {"a number out of range", "[1e999]", false, ckpt::kMaxManifestBytes, "not valid JSON"},
        {"invalid UTF-8", "{\"format\": \"\xff\"}", false, ckpt::kMaxManifestBytes, "not valid JSON"},
        {"nested too deeply", deep, false, ckpt::kMaxManifestBytes, "nested deeper than"},
        {"brackets in strings do not nest", deep_in_strings, false, ckpt::kMaxManifestBytes,
         "not a ckpt-tool manifest"},
        {"larger than the limit", text, false, 1000, "larger than"},
        {"zstd: not zstd", text, true, ckpt::kMaxManifestBytes, "zstd: "},
        {"zstd: truncated", compressed.substr(0, compressed.size() - 5), true, ckpt::kMaxManifestBytes,
         "zstd: truncated"},
        {"zstd: corrupt", compressed.substr(0, 20) + std::string(compressed.size() - 20, 'x'), true,
         ckpt::kMaxManifestBytes, "zstd: "},
        {"zstd: decompresses past the limit", zstd(std::string(1 << 20, ' ') + text), true, std::uint64_t{256} << 10,
         "zstd: decompresses to more than"},
        {"zstd: garbage after the frame", compressed + "garbage", true, ckpt::kMaxManifestBytes, "zstd: "},
        {"zstd: valid JSON that is no manifest", zstd("[1, 2]"), true, ckpt::kMaxManifestBytes,
         "not a ckpt-tool manifest"},
    };
    for (const TextCase& c : cases) {
      std::string what = c.what;
      CAPTURE(what);
      auto error =
          error_of([&] { ckpt::parse_manifest(bytes_of(c.bytes), "m.json.zst", c.compressed, c.max_text_bytes); });
      REQUIRE_MESSAGE(error.has_value(), "accepted");
      CHECK(error->where().file == "m.json.zst");
      CHECK_KIND(*error, ckpt::ErrorKind::BadInput);
      CHECK_MESSAGE(contains(error->message(), c.message), std::string(error->what()));
    }
  }

  TEST_CASE("detect_grid: part and shard numbers too large to allocate are a problem, not an allocation") {
    auto files_named = [](const std::vector<std::string>& paths) {
      std::vector<ckpt::ManifestFile> files;
      for (const std::string& path : paths) {
        ckpt::ManifestFile file;
        file.path = path;
        file.role = ckpt::parse_file_role(path);
        files.push_back(file);
      }
      return files;
    };
    ckpt::Grid huge = ckpt::detect_grid(
        files_named({"/c/checkpoint-model_part-0-shard0.pt", "/c/checkpoint-model_part-99999999-shard0.pt"}));
    REQUIRE(huge.problems.size() == 1);
    CHECK(contains(huge.problems[0],
                   "/c/checkpoint-model_part-99999999-shard0.pt: model part number 99999999 is outside"));
    // the other file still makes its cell of the grid; the problem refuses the set
    CHECK(huge.cells == std::vector<std::vector<int>>{{0}});

    ckpt::Grid many =
        ckpt::detect_grid(files_named({"/c/x-model_part-2000-shard0.pt", "/c/x-model_part-0-shard2000.pt"}));
    REQUIRE(many.problems.size() == 1);
    CHECK(contains(many.problems[0], "2001 model parts x 2001 shards"));
    CHECK(many.cells.empty());

    std::vector<ckpt::ManifestFile> negative = files_named({"/c/x-model_part-0-shard0.pt"});
    negative[0].role.mp_part = -5;  // built in memory: no name gives it
    ckpt::Grid bad = ckpt::detect_grid(negative);
    REQUIRE(bad.problems.size() == 1);
    CHECK(contains(bad.problems[0], "model part number -5 is outside"));

    // A file name with more digits than an int holds carries no part number.
    ckpt::Grid ignored = ckpt::detect_grid(files_named({"/c/x-model_part-2000000000-shard0.pt"}));
    CHECK(ignored.mp == 1);
    CHECK(ignored.dp == 1);
  }
}
