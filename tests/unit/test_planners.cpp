// Unit tests for the command planners (src/plan/synth.cpp, stitch.cpp,
// reshard.cpp) on tiny checkpoints: plan_synth writes a metaseq training set of a
// few KiB into a temporary directory, the other planners plan from it, and every
// plan runs through the executor with one thread. Outputs are opened again with
// Checkpoint and their tensors compared byte for byte with what an oracle written
// here says: fairscale's consolidation rule with plain loops over the input
// files' bytes (unpad each rank's flat parameter, concatenate, split by numels),
// Megatron's dim-0 / dim-1 concatenation row by row, and for reshard, the way
// there and back, which must give every input tensor back bit for bit.
//
// The planners are called in one place each (stitch_plan, reshard_plan below),
// so a change of their signatures touches those two functions only.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "ckpt/exec/exec.hpp"
#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/torch_pickle.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/layout/metaseq.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/plan/plan_inputs.hpp"
#include "ckpt/plan/reshard.hpp"
#include "ckpt/plan/stitch.hpp"
#include "ckpt/plan/synth.hpp"
#include "error_kind.hpp"
#include "temp_files.hpp"

namespace {

using ckpt::DType;
using ckpt::Manifest;
using ckpt::ManifestFile;
using ckpt::Piece;
using ckpt::StoredTensor;
using test_files::Buffer;
using test_files::TempDir;
using Shape = std::vector<std::int64_t>;

std::string join(std::string a, const std::string& b) {
  a.append(b);
  return a;
}

// ---------------------------------------------------------------- inputs and runs

// A tiny OPT-like model: 2 layers, E 8, F 16, V 16, P 6 (every sharded dim
// divisible by 1, 2 and 4).
ckpt::SynthOptions tiny(int mp, int dp, bool optimizer_state) {
  ckpt::SynthOptions options;
  options.mp = mp;
  options.dp = dp;
  options.dtype = DType::Float16;
  options.optimizer_state = optimizer_state;
  options.layers = 2;
  options.embed_dim = 8;
  options.ffn_dim = 16;
  options.vocab = 16;
  options.positions = 6;
  return options;
}

void run(const ckpt::Plan& plan) {
  ckpt::validate(plan);
  ckpt::ExecOptions options;
  options.threads = 1;
  options.direct_io = false;
  ckpt::execute(plan, options);
}

// Input files opened as the commands open them (PlanInputs: manifest, mappings,
// checkpoints decoded on demand), and their bytes for the oracles.
struct Inputs {
  ckpt::PlanInputs plan_inputs;
  const Manifest& manifest;
  std::vector<Buffer> bytes;  // whole files, parallel to manifest.files

  explicit Inputs(const std::vector<std::string>& paths)
      : plan_inputs(ckpt::build_manifest(paths)), manifest(plan_inputs.manifest()) {
    for (const ManifestFile& file : manifest.files) bytes.push_back(test_files::read_file(file.path));
  }
  int cell(int m, int d) const { return manifest.grid.cells.at(m).at(d); }
};

std::vector<std::string> paths_of(const ckpt::Plan& plan) {
  std::vector<std::string> out;
  for (const ckpt::PlannedFile& file : plan.files) out.push_back(file.path);
  return out;
}

// A synthetic training set in `dir`, written; its file paths.
std::vector<std::string> synth_set(const TempDir& dir, int mp, int dp, bool optimizer_state) {
  ckpt::Plan plan = ckpt::plan_synth(tiny(mp, dp, optimizer_state), dir.path().string());
  run(plan);
  return paths_of(plan);
}

// The planners, called in one place each.
// (The tests read the planned tensors: they are listed, as --dry-run does.)
ckpt::StitchPlan stitch_plan(const Inputs& in, const std::vector<std::string>& outputs, ckpt::StitchOptions options) {
  options.list_tensors = true;
  return ckpt::plan_stitch(in.plan_inputs, outputs, options);
}

ckpt::ReshardPlan reshard_plan(const Inputs& in, const std::string& pattern, const ckpt::ReshardOptions& options) {
  return ckpt::plan_reshard(in.plan_inputs, pattern, options);
}

ckpt::ReshardOptions grid_of(int mp, int dp) {
  ckpt::ReshardOptions options;
  options.mp = mp;
  options.dp = dp;
  return options;
}

// ---------------------------------------------------------------- outputs

struct Tensor {
  DType dtype = DType::Float32;
  Shape shape;
  Buffer bytes;
  std::optional<std::string> alias_of;  // object path of the tensor this one is tied to
};

// Every tensor of a torch.save file, by object path, and its top-level keys.
struct Opened {
  std::map<std::string, Tensor> tensors;
  std::vector<std::string> top_level_keys;
  ManifestFile described;
};

Opened open(const std::string& path) {
  ckpt::MappedFile file(path);
  ckpt::Checkpoint checkpoint(file);
  Opened out;
  out.described = ckpt::describe_file(checkpoint);
  out.top_level_keys = out.described.top_level_keys;
  for (std::size_t i = 0; i < checkpoint.tensors().size(); ++i) {
    const ckpt::StoredTensor& ref = checkpoint.tensors()[i];
    Tensor tensor;
    tensor.dtype = ref.dtype;
    tensor.shape = ref.shape;
    tensor.alias_of = ref.alias_of;
    REQUIRE(ref.is_contiguous());
    ckpt::Bytes bytes = checkpoint.tensor_bytes(i);
    tensor.bytes.assign(bytes.begin(), bytes.end());
    out.tensors[ref.path] = std::move(tensor);
  }
  return out;
}

// Tensors under `prefix` ("model/"), keyed without it, ties left out.
std::map<std::string, Tensor> section(const Opened& opened, const std::string& prefix) {
  std::map<std::string, Tensor> out;
  for (const auto& [path, tensor] : opened.tensors) {
    if (path.rfind(prefix, 0) == 0 && !tensor.alias_of) out[path.substr(prefix.size())] = tensor;
  }
  return out;
}

void check_same(const std::map<std::string, Tensor>& got, const std::map<std::string, Tensor>& want,
                const std::string& what) {
  CAPTURE(what);
  std::vector<std::string> got_keys, want_keys;
  for (const auto& entry : got) got_keys.push_back(entry.first);
  for (const auto& entry : want) want_keys.push_back(entry.first);
  CHECK(got_keys == want_keys);
  if (got_keys != want_keys) {
    for (const std::string& key : got_keys) MESSAGE("got: " << key);
    for (const std::string& key : want_keys) MESSAGE("want: " << key);
    return;
  }
  for (const auto& [key, tensor] : want) {
    CAPTURE(key);
    const Tensor& other = got.at(key);
    CHECK(other.dtype == tensor.dtype);
    CHECK(other.shape == tensor.shape);
    CHECK(other.bytes == tensor.bytes);
  }
}

// ---------------------------------------------------------------- oracles

std::uint64_t itemsize(DType dtype) {
  return ckpt::dtype_info(dtype).itemsize;
}

Buffer file_range(const Inputs& in, int file, const StoredTensor& tensor, std::uint64_t nbytes) {
  const Buffer& bytes = in.bytes.at(static_cast<std::size_t>(file));
  const std::uint64_t offset = in.manifest.files.at(static_cast<std::size_t>(file)).place(tensor).file_byte_offset;
  REQUIRE(offset + nbytes <= bytes.size());
  auto from = bytes.begin() + static_cast<std::ptrdiff_t>(offset);
  return Buffer(from, from + static_cast<std::ptrdiff_t>(nbytes));
}

const StoredTensor& tensor_at(const ManifestFile& file, const std::string& path) {
  const StoredTensor* tensor = ckpt::find_tensor(file, path);
  REQUIRE_MESSAGE(tensor != nullptr, path);
  return *tensor;
}

// fairscale's consolidate_shard_weights for model part m, with plain loops:
// each rank's flat parameter (state prefix `state` + key) without its padding,
// the ranks one after the other, cut into the names and shapes of the metadata;
// buffers from rank 0. With `optimizer_state` ("exp_avg"), the k-th flat
// parameter's state instead, unpadded with the weights' padding.
std::map<std::string, Tensor> fairscale_consolidate(const Inputs& in, int m, const std::string& optimizer_state = "") {
  std::map<std::string, Tensor> out;
  const ManifestFile& first = in.manifest.files.at(static_cast<std::size_t>(in.cell(m, 0)));
  REQUIRE(first.fsdp);
  int dp = in.manifest.grid.dp;
  std::size_t k = 0;
  for (std::size_t i = 0; i < first.fsdp->instances.size(); ++i) {
    const ckpt::FsdpInstanceMeta& instance = first.fsdp->instances[i];
    for (std::size_t j = 0; j < instance.flat_params.size(); ++j, ++k) {
      const ckpt::FlatParamMeta& flat = instance.flat_params[j];
      Buffer full;
      DType dtype = DType::Float32;
      for (int d = 0; d < dp; ++d) {
        int index = in.cell(m, d);
        const ManifestFile& shard = in.manifest.files.at(static_cast<std::size_t>(index));
        std::string path = optimizer_state.empty()
                               ? join("model/", flat.state_key)
                               : join("last_optimizer_state/state/" + std::to_string(k) + "/", optimizer_state);
        const StoredTensor& tensor = tensor_at(shard, path);
        dtype = tensor.dtype;
        auto padding = static_cast<std::uint64_t>(shard.fsdp->instances[i].flat_params[j].padding);
        Buffer unpadded = file_range(in, index, tensor, (tensor.numel() - padding) * itemsize(dtype));
        full.insert(full.end(), unpadded.begin(), unpadded.end());
      }
      std::uint64_t at = 0;
      for (std::size_t p = 0; p < flat.names.size(); ++p) {
        std::string key = instance.fsdp_path.empty() ? flat.names[p] : instance.fsdp_path + "." + flat.names[p];
        std::uint64_t nbytes = static_cast<std::uint64_t>(flat.numels[p]) * itemsize(dtype);
        REQUIRE(at + nbytes <= full.size());
        Tensor tensor{dtype, flat.shapes[p],
                      Buffer(full.begin() + static_cast<std::ptrdiff_t>(at),
                             full.begin() + static_cast<std::ptrdiff_t>(at + nbytes)),
                      ""};
        out[key] = std::move(tensor);
        at += nbytes;
      }
      CHECK(at == full.size());
    }
  }
  if (optimizer_state.empty()) {
    for (const std::string& buffer : first.fsdp->buffer_names) {
      const StoredTensor& tensor = tensor_at(first, join("model/", buffer));
      out[buffer] = Tensor{tensor.dtype, tensor.shape, file_range(in, in.cell(m, 0), tensor, tensor.nbytes), ""};
    }
  }
  return out;
}

// Megatron's glue of two-dimensional parts: on dim 0 the parts one after the
// other, on dim 1 row r of every part in turn.
Tensor glue(const std::vector<Tensor>& parts, int dim) {
  Tensor out = parts.at(0);
  out.bytes.clear();
  out.shape[static_cast<std::size_t>(dim)] = 0;
  for (const Tensor& part : parts)
    out.shape[static_cast<std::size_t>(dim)] += part.shape[static_cast<std::size_t>(dim)];
  if (dim == 0) {
    for (const Tensor& part : parts) out.bytes.insert(out.bytes.end(), part.bytes.begin(), part.bytes.end());
    return out;
  }
  auto rows = static_cast<std::uint64_t>(out.shape[0]);
  for (std::uint64_t r = 0; r < rows; ++r) {
    for (const Tensor& part : parts) {
      std::uint64_t row_bytes = part.bytes.size() / rows;
      auto from = part.bytes.begin() + static_cast<std::ptrdiff_t>(r * row_bytes);
      out.bytes.insert(out.bytes.end(), from, from + static_cast<std::ptrdiff_t>(row_bytes));
    }
  }
  return out;
}

// What resharding there and back gives back: the top-level keys, and every tensor
// and object of the model, its FSDP metadata, the optimizer state and cfg. (Other
// objects, such as extra_state's data iterator, come from input file (m % M, d % D)
// of the grid in between, as metaseq's own resharding does.)
void check_same_sections(const Opened& got, const Opened& want) {
  CHECK(got.top_level_keys == want.top_level_keys);
  for (const char* key : {"model", "shard_metadata", "last_optimizer_state", "cfg", "args"}) {
    CAPTURE(key);
    check_same(section(got, std::string(key) + "/"), section(want, std::string(key) + "/"), key);
    const nlohmann::ordered_json& got_objects = *got.described.objects;
    const nlohmann::ordered_json& want_objects = *want.described.objects;
    bool both = got_objects.contains(key) == want_objects.contains(key);
    CHECK(both);
    if (both && want_objects.contains(key)) {
      CHECK_MESSAGE(got_objects[key] == want_objects[key], key << " objects differ");
    }
  }
}

// A third of a qkv_proj tensor on dim 0: 0 k, 1 v, 2 q.
Tensor third(const Tensor& qkv, int i) {
  Tensor out = qkv;
  out.shape[0] /= 3;
  std::size_t n = qkv.bytes.size() / 3;
  out.bytes.assign(qkv.bytes.begin() + static_cast<std::ptrdiff_t>(i * n),
                   qkv.bytes.begin() + static_cast<std::ptrdiff_t>((i + 1) * n));
  return out;
}

// One model part as stitch writes it: each qkv_proj split into k_proj, v_proj, q_proj.
std::map<std::string, Tensor> split_qkv(std::map<std::string, Tensor> part) {
  std::map<std::string, Tensor> out;
  for (auto& [key, tensor] : part) {
    std::size_t at = key.find(".qkv_proj.");
    if (at == std::string::npos) {
      out[key] = std::move(tensor);
      continue;
    }
    int i = 0;
    for (const char* proj : {".k_proj.", ".v_proj.", ".q_proj."}) {
      out[key.substr(0, at) + proj + key.substr(at + 10)] = third(tensor, i++);
    }
  }
  return out;
}

// Every (m, d) input file's tensors and objects, by output file name.
void check_same_files(const Inputs& original, const std::string& pattern, int mp, int dp) {
  for (int m = 0; m < mp; ++m) {
    for (int d = 0; d < dp; ++d) {
      CAPTURE(m);
      CAPTURE(d);
      Opened want = open(original.manifest.files.at(static_cast<std::size_t>(original.cell(m, d))).path);
      Opened got = open(ckpt::output_path(pattern, mp, dp, m, d));
      check_same_sections(got, want);
    }
  }
}

// ---------------------------------------------------------------- plan_synth

TEST_SUITE("plan_synth") {
  TEST_CASE("plan_synth: one file per (part, shard), torch's records in order, synthetic data only") {
    ckpt::Plan plan = ckpt::plan_synth(tiny(2, 3, true), "/out");
    CHECK(plan.sources.empty());
    REQUIRE(plan.files.size() == 6);
    CHECK(plan.files[0].path == "/out/checkpoint_last-model_part-0-shard0.pt");
    CHECK(plan.files[5].path == "/out/checkpoint_last-model_part-1-shard2.pt");
    for (const ckpt::PlannedFile& file : plan.files) {
      CAPTURE(file.path);
      std::string archive = ckpt::archive_name_for(file.path);
      REQUIRE(file.records.size() >= 4);
      CHECK(file.records.front().name == archive + "/data.pkl");
      CHECK(file.records[1].name == archive + "/byteorder");
      CHECK(file.records.back().name == archive + "/version");
      // root flat param, version buffer, 2 layers, then exp_avg and exp_avg_sq of each of the 3 flat params
      REQUIRE(file.records.size() == 3 + 1 + 3 + 6);
      for (std::size_t i = 2; i + 1 < file.records.size(); ++i) {
        const ckpt::PlannedRecord& record = file.records[i];
        CHECK(record.name == archive + "/data/" + std::to_string(i - 2));
        if (i == 3) {  // decoder.version: 3.0 as float32, inline
          CHECK(record.copies.empty());
          CHECK(record.inline_bytes.size() == 4);
          continue;
        }
        for (const Piece& piece : record.copies)
          CHECK((piece.source == Piece::kSynthetic || piece.source == Piece::kZeros));
      }
    }
    // the plan is a pure function of the options
    ckpt::Plan again = ckpt::plan_synth(tiny(2, 3, true), "/out");
    REQUIRE(again.files.size() == plan.files.size());
    for (std::size_t f = 0; f < plan.files.size(); ++f) {
      for (std::size_t r = 0; r < plan.files[f].records.size(); ++r) {
        const ckpt::PlannedRecord& a = plan.files[f].records[r];
        const ckpt::PlannedRecord& b = again.files[f].records[r];
        CHECK(a.inline_bytes == b.inline_bytes);
        CHECK(a.copies.size() == b.copies.size());
      }
    }
  }

  TEST_CASE("plan_synth: the files form a complete grid with fairscale's chunk-and-pad layout") {
    for (auto [mp, dp] : {std::pair{2, 3}, {1, 8}, {4, 2}}) {
      CAPTURE(mp);
      CAPTURE(dp);
      TempDir sub;
      Inputs in(synth_set(sub, mp, dp, true));
      CHECK(in.manifest.grid.problems.empty());
      CHECK(in.manifest.grid.mp == mp);
      CHECK(in.manifest.grid.dp == dp);
      for (int m = 0; m < mp; ++m) {
        for (int d = 0; d < dp; ++d) {
          const ManifestFile& file = in.manifest.files.at(static_cast<std::size_t>(in.cell(m, d)));
          REQUIRE(file.fsdp);
          CHECK(file.fsdp->instances.size() == 3);  // the root and 2 layers
          CHECK(file.fsdp->buffer_names == std::vector<std::string>{"decoder.version"});
          REQUIRE(file.declared_parts);
          CHECK(file.declared_parts->parts == mp);
          std::size_t k = 0;
          for (const ckpt::FsdpInstanceMeta& instance : file.fsdp->instances) {
            for (const ckpt::FlatParamMeta& flat : instance.flat_params) {
              ckpt::FsdpChunk chunk = ckpt::fsdp_chunk(flat.total_numel(), dp, d);
              CHECK(flat.padding == chunk.padding);
              const StoredTensor& weight = tensor_at(file, join("model/", flat.state_key));
              CHECK(weight.numel() == static_cast<std::uint64_t>(chunk.numel + chunk.padding));
              CHECK(weight.dtype == DType::Float16);
              for (const char* state : {"exp_avg", "exp_avg_sq"}) {
                const StoredTensor& slice =
                    tensor_at(file, join("last_optimizer_state/state/" + std::to_string(k) + "/", state));
                CHECK(slice.shape == weight.shape);  // optimizer slices as long as the weight slices
                CHECK(slice.dtype == DType::Float32);
              }
              // padding reads as zeros, in the weights and the optimizer state
              if (flat.padding > 0) {
                Buffer tail = file_range(in, in.cell(m, d), weight, weight.nbytes);
                CHECK(std::all_of(tail.end() - 2 * flat.padding, tail.end(),
                                  [](std::byte b) { return b == std::byte{0}; }));
              }
              ++k;
            }
          }
        }
      }
    }
  }

  TEST_CASE("plan_synth: replicated parameters agree across parts; sharded ones differ") {
    TempDir dir;
    Inputs in(synth_set(dir, 2, 2, false));
    std::map<std::string, Tensor> part0 = fairscale_consolidate(in, 0);
    std::map<std::string, Tensor> part1 = fairscale_consolidate(in, 1);
    for (const char* key : {"decoder.layers.0.self_attn_layer_norm.weight", "decoder.layers.1.fc2.bias",
                            "decoder.embed_positions.weight", "decoder.layer_norm.bias"}) {
      CAPTURE(key);
      CHECK(part0.at(key).bytes == part1.at(key).bytes);
    }
    for (const char* key : {"decoder.layers.0.fc1.weight", "decoder.embed_tokens.weight"}) {
      CAPTURE(key);
      CHECK(part0.at(key).bytes != part1.at(key).bytes);
    }
    CHECK(part0.at("decoder.layers.1.self_attn.qkv_proj.weight").shape == Shape{12, 8});
    CHECK(part0.at("decoder.layers.1.fc2.weight").shape == Shape{8, 8});
  }

  TEST_CASE("plan_synth: dimensions that do not split or pass the limits are refused before planning") {
    ckpt::SynthOptions options = tiny(3, 1, false);
    CHECK_THROWS_AS(ckpt::plan_synth(options, "/out"), ckpt::Error);
    options = tiny(1, 0, false);
    CHECK_THROWS_AS(ckpt::plan_synth(options, "/out"), ckpt::Error);
    options = tiny(1, 1, false);
    options.layers = ckpt::kSynthMaxLayers + 1;
    CHECK_THROWS_AS(ckpt::plan_synth(options, "/out"), ckpt::Error);
  }
}

// ---------------------------------------------------------------- plan_stitch

TEST_SUITE("plan_stitch") {
  TEST_CASE("plan_stitch: FSDP only, 3 ranks: fairscale's rule, ties kept, FSDP and optimizer keys dropped") {
    TempDir in_dir, out_dir;
    Inputs in(synth_set(in_dir, 1, 3, true));
    std::string out = out_dir.file("out.pt");
    ckpt::StitchPlan plan = stitch_plan(in, {out}, {});
    CHECK(plan.checks.empty());
    REQUIRE(plan.plan.files.size() == 1);
    run(plan.plan);
    Opened got = open(out);
    check_same(section(got, "model/"), split_qkv(fairscale_consolidate(in, 0)), "model");
    const Tensor& tied = got.tensors.at("model/decoder.output_projection.weight");
    CHECK(tied.alias_of == "model/decoder.embed_tokens.weight");
    CHECK(std::find(got.top_level_keys.begin(), got.top_level_keys.end(), "shard_metadata") ==
          got.top_level_keys.end());
    CHECK(std::find(got.top_level_keys.begin(), got.top_level_keys.end(), "last_optimizer_state") ==
          got.top_level_keys.end());
    CHECK(std::find(got.top_level_keys.begin(), got.top_level_keys.end(), "cfg") != got.top_level_keys.end());
    REQUIRE(got.described.declared_parts);
    CHECK(got.described.declared_parts->parts == 1);
  }

  TEST_CASE("plan_stitch: a parameter straddling two ranks is exactly two copies from their flat parameters") {
    TempDir in_dir, out_dir;
    Inputs in(synth_set(in_dir, 1, 3, false));
    ckpt::StitchPlan plan = stitch_plan(in, {out_dir.file("out.pt")}, {});
    // The root flat parameter: embed_tokens [16, 8], embed_positions [6, 8], layer_norm
    // weight and bias [8]: 192 elements, chunks of 64. embed_positions (elements 128..175)
    // lies in rank 2 at 0..47 whole; embed_tokens (0..127) is ranks 0 and 1, 64 each.
    std::vector<std::string> keys;
    for (const ckpt::NamedTensor& tensor : plan.tensors.at(0)) keys.push_back(tensor.name);
    auto index_of = [&](const std::string& key) {
      std::size_t record = 0;  // storages are numbered in state-dict order, ties skipped
      for (const ckpt::NamedTensor& tensor : plan.tensors.at(0)) {
        if (tensor.name == key) return record;
        if (!tensor.alias_of) ++record;
      }
      FAIL("no tensor " << key);
      return record;
    };
    const ckpt::PlannedFile& file = plan.plan.files.at(0);
    auto record = [&](const std::string& key) -> const ckpt::PlannedRecord& {
      return file.records.at(2 + index_of(key));
    };
    auto flat_offset = [&](int d) {
      const ManifestFile& shard = in.manifest.files.at(static_cast<std::size_t>(in.cell(0, d)));
      return shard.place(tensor_at(shard, "model/flat_param_0")).file_byte_offset;
    };
    auto source_of = [&](int d) { return plan.plan.add_source(in.plan_inputs.source(in.cell(0, d))); };
    const ckpt::PlannedRecord& tokens = record("decoder.embed_tokens.weight");
    CHECK(tokens.nbytes == 16 * 8 * 2);
    REQUIRE(tokens.copies.size() == 2);
    CHECK(tokens.copies[0].source == source_of(0));
    CHECK(tokens.copies[0].source_offset == flat_offset(0));
    CHECK(tokens.copies[0].offset == 0);
    CHECK(tokens.copies[0].nbytes == 128);
    CHECK(tokens.copies[1].source == source_of(1));
    CHECK(tokens.copies[1].source_offset == flat_offset(1));
    CHECK(tokens.copies[1].offset == 128);
    CHECK(tokens.copies[1].nbytes == 128);
    const ckpt::PlannedRecord& positions = record("decoder.embed_positions.weight");
    REQUIRE(positions.copies.size() == 1);
    CHECK(positions.copies[0].source == source_of(2));
    CHECK(positions.copies[0].source_offset == flat_offset(2));
    CHECK(positions.copies[0].nbytes == 6 * 8 * 2);
    const ckpt::PlannedRecord& bias = record("decoder.layer_norm.bias");
    REQUIRE(bias.copies.size() == 1);
    CHECK(bias.copies[0].source_offset == flat_offset(2) + (48 + 8) * 2);
    CHECK(bias.copies[0].nbytes == 16);
  }

  TEST_CASE("plan_stitch: 2 parts x 2 ranks glued: dim 0 and dim 1 by the row, replicated keys checked") {
    TempDir in_dir, out_dir;
    Inputs in(synth_set(in_dir, 2, 2, true));
    std::string out = out_dir.file("out.pt");
    ckpt::StitchPlan plan = stitch_plan(in, {out}, {});
    run(plan.plan);
    Opened got = open(out);
    std::map<std::string, Tensor> model = section(got, "model/");
    std::vector<std::map<std::string, Tensor>> parts{fairscale_consolidate(in, 0), fairscale_consolidate(in, 1)};
    auto both = [&](const std::string& key) { return std::vector<Tensor>{parts[0].at(key), parts[1].at(key)}; };
    for (const char* key :
         {"decoder.embed_tokens.weight", "decoder.layers.0.fc1.weight", "decoder.layers.1.fc1.bias"}) {
      CAPTURE(key);
      Tensor want = glue(both(key), 0);
      CHECK(model.at(key).shape == want.shape);
      CHECK(model.at(key).bytes == want.bytes);
    }
    for (const char* key : {"decoder.layers.0.fc2.weight", "decoder.layers.1.self_attn.out_proj.weight"}) {
      CAPTURE(key);
      Tensor want = glue(both(key), 1);
      CHECK(model.at(key).shape == want.shape);
      CHECK(model.at(key).bytes == want.bytes);
    }
    // qkv: each part's [k; v; q] thirds, glued per projection
    Tensor qkv0 = parts[0].at("decoder.layers.0.self_attn.qkv_proj.weight");
    Tensor qkv1 = parts[1].at("decoder.layers.0.self_attn.qkv_proj.weight");
    int i = 0;
    for (const char* proj : {"k_proj", "v_proj", "q_proj"}) {
      CAPTURE(proj);
      Tensor want = glue({third(qkv0, i), third(qkv1, i)}, 0);
      const Tensor& have = model.at(std::string("decoder.layers.0.self_attn.") + proj + ".weight");
      CHECK(have.shape == Shape{8, 8});
      CHECK(have.bytes == want.bytes);
      ++i;
    }
    CHECK(model.at("decoder.layers.0.final_layer_norm.weight").bytes ==
          parts[0].at("decoder.layers.0.final_layer_norm.weight").bytes);
    std::set<std::string> checked;
    for (const ckpt::ReplicatedCheck& check : plan.checks) {
      CHECK(check.parts.size() == 2);
      checked.insert(check.key);
    }
    CHECK(checked.count("decoder.layers.0.final_layer_norm.weight") == 1);
    CHECK(checked.count("decoder.layers.1.fc2.bias") == 1);
    CHECK(checked.count("decoder.layers.0.fc1.weight") == 0);
    REQUIRE(got.described.declared_parts);
    CHECK(got.described.declared_parts->parts == 1);
  }

  TEST_CASE("plan_stitch: one output per part without gluing; --dtype converts floating weights only") {
    TempDir in_dir, out_dir;
    Inputs in(synth_set(in_dir, 2, 3, false));
    ckpt::StitchOptions options;
    options.stitch_megatron = false;
    std::vector<std::string> outs{out_dir.file("part0.pt"), out_dir.file("part1.pt")};
    ckpt::StitchPlan plan = stitch_plan(in, outs, options);
    CHECK(plan.checks.empty());
    run(plan.plan);
    for (int m = 0; m < 2; ++m) {
      Opened got = open(outs[static_cast<std::size_t>(m)]);
      check_same(section(got, "model/"), fairscale_consolidate(in, m), "part");
      REQUIRE(got.described.declared_parts);
      CHECK(got.described.declared_parts->parts == 2);  // each part keeps its cfg
    }
    options.dtype = DType::Float32;
    ckpt::StitchPlan converting = stitch_plan(in, outs, options);
    for (const ckpt::NamedTensor& tensor : converting.tensors.at(0)) {
      if (!tensor.alias_of) CHECK(tensor.dtype() == DType::Float32);
    }
    bool converts = false;
    for (const ckpt::PlannedRecord& record : converting.plan.files.at(0).records) {
      for (const Piece& piece : record.copies) {
        if (piece.source_dtype == DType::Float16) {  // the weights
          converts = true;
          CHECK(piece.dest_dtype == DType::Float32);
        } else {  // zeros, and the float32 version buffer
          CHECK_FALSE(piece.converts());
        }
      }
    }
    CHECK(converts);
  }

  TEST_CASE("plan_stitch: each output format's row decides its folder, its stale set and its files") {
    TempDir in_dir, out_dir;
    Inputs in(synth_set(in_dir, 1, 2, false));
    for (const ckpt::OutputFormatInfo& format : ckpt::output_formats()) {
      CAPTURE(format.name);
      std::filesystem::path out = out_dir / format.name;
      if (!format.folder) out += *format.extension != '\0' ? format.extension : ".pt";
      // A shard of another set where the format's safetensors would go.
      std::filesystem::path beside = format.folder ? out : out_dir.path();
      std::filesystem::create_directories(beside);
      std::string stem = format.folder ? "model" : format.name;
      test_files::write_file(beside / (stem + "-00001-of-00002.safetensors"), {});
      ckpt::StitchOptions options;
      options.format = format.format;
      ckpt::StitchPlan plan = stitch_plan(in, {out.string()}, options);
      CHECK(plan.plan.directories ==
            (format.folder ? std::vector<std::string>{out.string()} : std::vector<std::string>{}));
      CHECK(plan.plan.stale_files.size() == (format.replaces_set ? 1u : 0u));
      REQUIRE(plan.tensors.size() == plan.plan.files.size());
      for (const ckpt::PlannedFile& file : plan.plan.files) {
        CHECK((format.folder ? std::filesystem::path(file.path).parent_path() == out : file.path == out.string()));
      }
    }
  }

  TEST_CASE("plan_stitch: an incomplete grid is refused naming what is missing") {
    TempDir in_dir;
    std::vector<std::string> paths = synth_set(in_dir, 2, 3, false);
    std::erase_if(paths, [](const std::string& p) { return p.find("part-1-shard1") != std::string::npos; });
    Inputs in(paths);
    try {
      (void)stitch_plan(in, {"/never.pt"}, {});
      FAIL("no error");
    } catch (const ckpt::Error& e) {
      CHECK_KIND(e, ckpt::ErrorKind::IncompleteSet);
      CHECK(std::string(e.what()).find("shard 1 of 3 missing for model part 1") != std::string::npos);
    }
  }
}

// ---------------------------------------------------------------- plan_reshard

TEST_SUITE("plan_reshard") {
  TEST_CASE("plan_reshard: there and back gives every tensor and object back, optimizer state and padding included") {
    TempDir in_dir;
    Inputs in(synth_set(in_dir, 2, 2, true));
    for (auto [mp, dp] : {std::pair{1, 3}, {4, 5}, {2, 8}, {1, 1}}) {
      CAPTURE(mp);
      CAPTURE(dp);
      TempDir there_dir, back_dir;
      std::string there = there_dir.file("checkpoint_last-model_part-{m}-shard{d}.pt");
      std::string back = back_dir.file("checkpoint_last-model_part-{m}-shard{d}.pt");
      ckpt::ReshardPlan plan = reshard_plan(in, there, grid_of(mp, dp));
      REQUIRE(plan.outputs.size() == static_cast<std::size_t>(mp * dp));
      CHECK(plan.outputs.back() == ckpt::output_path(there, mp, dp, mp - 1, dp - 1));
      run(plan.plan);
      Inputs middle(plan.outputs);
      CHECK(middle.manifest.grid.problems.empty());
      CHECK(middle.manifest.grid.mp == mp);
      CHECK(middle.manifest.grid.dp == dp);
      // the weights and every optimizer state as fairscale consolidates them: the same model
      for (int m = 0; m < (mp == 2 ? 2 : 0); ++m) {
        check_same(fairscale_consolidate(middle, m), fairscale_consolidate(in, m), "weights");
        for (const char* state : {"exp_avg", "exp_avg_sq"})
          check_same(fairscale_consolidate(middle, m, state), fairscale_consolidate(in, m, state), state);
      }
      ckpt::ReshardPlan again = reshard_plan(middle, back, grid_of(2, 2));
      run(again.plan);
      check_same_files(in, back, 2, 2);
    }
  }

  TEST_CASE("plan_reshard: optimizer slices as long as weight slices, padding zero in both") {
    TempDir in_dir, out_dir;
    Inputs in(synth_set(in_dir, 1, 3, true));
    ckpt::ReshardPlan plan = reshard_plan(in, out_dir.file("checkpoint_last-model_part-0-shard{d}.pt"), grid_of(1, 8));
    run(plan.plan);
    Inputs out(plan.outputs);
    CHECK(out.manifest.grid.problems.empty());
    std::size_t checked = 0;
    for (int d = 0; d < 8; ++d) {
      const ManifestFile& file = out.manifest.files.at(static_cast<std::size_t>(out.cell(0, d)));
      std::size_t k = 0;
      for (const ckpt::FsdpInstanceMeta& instance : file.fsdp->instances) {
        for (const ckpt::FlatParamMeta& flat : instance.flat_params) {
          const StoredTensor& weight = tensor_at(file, join("model/", flat.state_key));
          Buffer weight_bytes = file_range(out, out.cell(0, d), weight, weight.nbytes);
          for (const char* state : {"exp_avg", "exp_avg_sq"}) {
            const StoredTensor& slice =
                tensor_at(file, join("last_optimizer_state/state/" + std::to_string(k) + "/", state));
            CHECK(slice.shape == weight.shape);
            Buffer bytes = file_range(out, out.cell(0, d), slice, slice.nbytes);
            auto pad = static_cast<std::ptrdiff_t>(flat.padding);
            CHECK(std::all_of(bytes.end() - 4 * pad, bytes.end(), [](std::byte b) { return b == std::byte{0}; }));
            CHECK(std::all_of(weight_bytes.end() - 2 * pad, weight_bytes.end(),
                              [](std::byte b) { return b == std::byte{0}; }));
            ++checked;
          }
          ++k;
        }
      }
    }
    CHECK(checked == 8 * 3 * 2);
    check_same(fairscale_consolidate(out, 0, "exp_avg"), fairscale_consolidate(in, 0, "exp_avg"), "exp_avg");
  }

  TEST_CASE("plan_reshard: reshard then stitch equals stitch") {
    TempDir in_dir, stitched_dir;
    Inputs in(synth_set(in_dir, 2, 3, true));
    ckpt::StitchPlan direct = stitch_plan(in, {stitched_dir.file("direct.pt")}, {});
    run(direct.plan);
    Opened want = open(stitched_dir.file("direct.pt"));
    for (auto [mp, dp] : {std::pair{4, 3}, {2, 5}, {1, 8}}) {
      CAPTURE(mp);
      CAPTURE(dp);
      TempDir out_dir;
      ckpt::ReshardPlan plan =
          reshard_plan(in, out_dir.file("checkpoint_last-model_part-{m}-shard{d}.pt"), grid_of(mp, dp));
      run(plan.plan);
      Inputs resharded(plan.outputs);
      std::string out = out_dir.file("stitched.pt");
      run(stitch_plan(resharded, {out}, {}).plan);
      Opened got = open(out);
      check_same(section(got, "model/"), section(want, "model/"), "stitched");
      CHECK(*got.described.objects == *want.described.objects);
    }
  }

  TEST_CASE("plan_reshard: --unflatten writes consolidated parts that reshard flattens again") {
    TempDir in_dir, flat_dir, again_dir;
    Inputs in(synth_set(in_dir, 2, 3, true));
    ckpt::ReshardOptions options = grid_of(2, 1);
    options.unflatten = true;
    ckpt::ReshardPlan plan = reshard_plan(in, flat_dir.file("reshard-model_part-{m}.pt"), options);
    run(plan.plan);
    for (int m = 0; m < 2; ++m) {
      Opened part = open(plan.outputs[static_cast<std::size_t>(m)]);
      check_same(section(part, "model/"), fairscale_consolidate(in, m), "unflattened");
      CHECK(std::find(part.top_level_keys.begin(), part.top_level_keys.end(), "last_optimizer_state") ==
            part.top_level_keys.end());
      CHECK(std::find(part.top_level_keys.begin(), part.top_level_keys.end(), "shard_metadata") !=
            part.top_level_keys.end());
    }
    Inputs unflattened(plan.outputs);
    std::string pattern = again_dir.file("checkpoint_last-model_part-{m}-shard{d}.pt");
    ckpt::ReshardPlan again = reshard_plan(unflattened, pattern, grid_of(2, 3));
    run(again.plan);
    for (int m = 0; m < 2; ++m) {
      for (int d = 0; d < 3; ++d) {
        Opened want = open(in.manifest.files.at(static_cast<std::size_t>(in.cell(m, d))).path);
        Opened got = open(ckpt::output_path(pattern, 2, 3, m, d));
        check_same(section(got, "model/"), section(want, "model/"), "flattened again");
      }
    }
  }

  TEST_CASE("plan_reshard: --drop-optimizer-state; impossible requests are errors before any output") {
    TempDir in_dir, out_dir;
    Inputs in(synth_set(in_dir, 2, 2, true));
    ckpt::ReshardOptions options = grid_of(1, 2);
    options.drop_optimizer_state = true;
    ckpt::ReshardPlan plan = reshard_plan(in, out_dir.file("checkpoint_last-model_part-0-shard{d}.pt"), options);
    run(plan.plan);
    for (const std::string& path : plan.outputs) {
      Opened got = open(path);
      CHECK(std::find(got.top_level_keys.begin(), got.top_level_keys.end(), "last_optimizer_state") ==
            got.top_level_keys.end());
      CHECK(section(got, "last_optimizer_state/").empty());
    }
    CHECK_THROWS_KIND(reshard_plan(in, out_dir.file("x-{m}-{d}.pt"), grid_of(3, 1)),
                      ckpt::ErrorKind::BadInput);  // vocab 16 in 3 parts
    CHECK_THROWS_KIND(reshard_plan(in, out_dir.file("only-one.pt"), grid_of(1, 2)), ckpt::ErrorKind::Usage);
    ckpt::ReshardOptions unflatten = grid_of(1, 2);
    unflatten.unflatten = true;
    CHECK_THROWS_KIND(reshard_plan(in, out_dir.file("x-{d}.pt"), unflatten), ckpt::ErrorKind::Usage);
    CHECK_THROWS_KIND(reshard_plan(in, out_dir.file("x-{d}.pt"), grid_of(0, 1)), ckpt::ErrorKind::Usage);
    CHECK(ckpt::output_path("a-{m}-{d}-{m}.pt", 2, 3, 1, 2) == "a-1-2-1.pt");
  }
}

// ---------------------------------------------------------------- torch-written fixtures

// The two cases committed under fixtures/tiny (torch.save'd by fixtures/generate.py,
// OmegaConf and Namespace cfgs, LockingArray, root instance first and last, plain
// and model_part names) and the generator's expected outputs, derived from the
// full model and never from the shards.
struct TinyCase {
  std::string name;
  int mp, dp;
  std::vector<std::pair<int, int>> targets;  // grids to reshard to, as test_reshard.py chose them
};
const std::vector<TinyCase>& tiny_cases() {
  static const std::vector<TinyCase> cases{
      {"mp2_dp2_fp16_omega_opt", 2, 2, {{1, 3}, {2, 5}, {1, 8}}},
      {"mp1_dp3_bf16_ns_opt", 1, 3, {{2, 3}, {1, 5}, {2, 1}}},
  };
  return cases;
}

std::string tiny_folder(const TinyCase& c) {
  return std::string(CKPT_TINY_FIXTURES) + "/" + c.name;
}

std::vector<std::string> tiny_inputs(const TinyCase& c) {
  std::vector<std::string> out;
  for (const auto& entry : std::filesystem::directory_iterator(tiny_folder(c))) {
    if (entry.path().extension() == ".pt") out.push_back(entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Two torch.save files hold the same objects: top-level keys, every tensor's
// dtype, shape and bytes by object path, the ties, and the object tree.
void check_same_checkpoint(const std::string& got_path, const std::string& want_path) {
  CAPTURE(got_path);
  CAPTURE(want_path);
  Opened got = open(got_path);
  Opened want = open(want_path);
  CHECK(got.top_level_keys == want.top_level_keys);
  check_same(section(got, ""), section(want, ""), "tensors");
  std::map<std::string, std::string> got_ties, want_ties;
  for (const auto& [path, tensor] : got.tensors) {
    if (tensor.alias_of) got_ties[path] = *tensor.alias_of;
  }
  for (const auto& [path, tensor] : want.tensors) {
    if (tensor.alias_of) want_ties[path] = *tensor.alias_of;
  }
  CHECK(got_ties == want_ties);
  CHECK_MESSAGE(*got.described.objects == *want.described.objects, "the object trees differ");
}

TEST_SUITE("planners on torch-written fixtures") {
  TEST_CASE("plan_stitch on fixtures/tiny: consolidated, fused qkv and one file per part equal the generator's") {
    for (const TinyCase& c : tiny_cases()) {
      CAPTURE(c.name);
      TempDir out;
      Inputs in(tiny_inputs(c));
      run(stitch_plan(in, {out.file("consolidated.pt")}, {}).plan);
      check_same_checkpoint(out.file("consolidated.pt"), tiny_folder(c) + "/expected/consolidated.pt");
      ckpt::StitchOptions fused;
      fused.glue.fused_qkv = true;
      run(stitch_plan(in, {out.file("fused.pt")}, fused).plan);
      check_same_checkpoint(out.file("fused.pt"), tiny_folder(c) + "/expected/fused.pt");
      ckpt::StitchOptions per_part;
      per_part.stitch_megatron = false;
      std::vector<std::string> parts;
      for (int m = 0; m < c.mp; ++m) parts.push_back(out.file("part-" + std::to_string(m) + ".pt"));
      run(stitch_plan(in, parts, per_part).plan);
      for (int m = 0; m < c.mp; ++m) {
        check_same_checkpoint(parts[static_cast<std::size_t>(m)],
                              tiny_folder(c) + "/expected/part-" + std::to_string(m) + ".pt");
      }
    }
  }

  TEST_CASE("plan_reshard on fixtures/tiny: there and back bit-exact; reshard then stitch equals the generator's") {
    for (const TinyCase& c : tiny_cases()) {
      Inputs in(tiny_inputs(c));
      for (auto [mp, dp] : c.targets) {
        CAPTURE(c.name);
        CAPTURE(mp);
        CAPTURE(dp);
        TempDir there_dir, back_dir;
        ckpt::ReshardPlan there =
            reshard_plan(in, there_dir.file("checkpoint_last-model_part-{m}-shard{d}.pt"), grid_of(mp, dp));
        run(there.plan);
        Inputs middle(there.outputs);
        CHECK(middle.manifest.grid.problems.empty());
        std::string stitched = there_dir.file("stitched.pt");
        run(stitch_plan(middle, {stitched}, {}).plan);
        check_same_checkpoint(stitched, tiny_folder(c) + "/expected/consolidated.pt");
        std::string pattern = back_dir.file("checkpoint_last-model_part-{m}-shard{d}.pt");
        run(reshard_plan(middle, pattern, grid_of(c.mp, c.dp)).plan);
        for (int m = 0; m < c.mp; ++m) {
          for (int d = 0; d < c.dp; ++d) {
            check_same_sections(open(ckpt::output_path(pattern, c.mp, c.dp, m, d)),
                                open(in.manifest.files.at(static_cast<std::size_t>(in.cell(m, d))).path));
          }
        }
      }
    }
  }

  TEST_CASE("plan_reshard on fixtures/tiny: --unflatten gives the generator's parts; flattened again, the inputs") {
    for (const TinyCase& c : tiny_cases()) {
      CAPTURE(c.name);
      TempDir flat_dir, again_dir;
      Inputs in(tiny_inputs(c));
      ckpt::ReshardOptions options = grid_of(c.mp, 1);
      options.unflatten = true;
      ckpt::ReshardPlan plan = reshard_plan(in, flat_dir.file("reshard-model_part-{m}.pt"), options);
      run(plan.plan);
      for (int m = 0; m < c.mp; ++m) {
        Opened got = open(plan.outputs[static_cast<std::size_t>(m)]);
        Opened want = open(tiny_folder(c) + "/expected/part-" + std::to_string(m) + ".pt");
        check_same(section(got, "model/"), section(want, "model/"), "unflattened part");
        CHECK(got.tensors.at("model/decoder.output_projection.weight").alias_of == "model/decoder.embed_tokens.weight");
        CHECK(section(got, "last_optimizer_state/").empty());
        CHECK(std::find(got.top_level_keys.begin(), got.top_level_keys.end(), "shard_metadata") !=
              got.top_level_keys.end());
      }
      Inputs unflattened(plan.outputs);
      std::string pattern = again_dir.file("checkpoint_last-model_part-{m}-shard{d}.pt");
      run(reshard_plan(unflattened, pattern, grid_of(c.mp, c.dp)).plan);
      for (int m = 0; m < c.mp; ++m) {
        for (int d = 0; d < c.dp; ++d) {
          Opened got = open(ckpt::output_path(pattern, c.mp, c.dp, m, d));
          Opened want = open(in.manifest.files.at(static_cast<std::size_t>(in.cell(m, d))).path);
          check_same(section(got, "model/"), section(want, "model/"), "flattened again");
          CHECK(static_cast<bool>(got.described.fsdp));
        }
      }
    }
  }
}

}  // namespace
