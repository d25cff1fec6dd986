// Unit tests for CheckpointBuilder (src/plan/checkpoint_builder.cpp): the exact
// records of a file built from nothing (the pickle, byteorder, one storage per
// new tensor with its copies, version), then the file written by the
// executor and read back with Checkpoint: keys in order, ties kept, bytes where
// the plan said. A second builder edits that file as a base: a replaced tensor
// is seen through every reference, untouched storages are carried over as whole
// record copies from the base, nothing else changes.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "ckpt/exec/exec.hpp"
#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/pyobject.hpp"
#include "ckpt/format/torch_pickle.hpp"
#include "ckpt/format/zip.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"
#include "ckpt/plan/torch_file.hpp"
#include "error_kind.hpp"
#include "plan_sources.hpp"
#include "temp_files.hpp"

namespace {

using ckpt::DType;
using ckpt::NamedTensor;
using ckpt::Piece;
using ckpt::pickle::NodeId;
using test_files::Buffer;
using test_files::TempDir;

void run(const ckpt::Plan& plan) {
  ckpt::validate(plan);
  ckpt::ExecOptions options;
  options.threads = 1;
  options.direct_io = false;
  options.check_crc = false;  // the source is raw bytes, not a zip
  ckpt::execute(plan, options);
}

// A float32 tensor of `shape` whose bytes are the run [offset, offset + nbytes) of file 0.
NamedTensor run_of(const std::string& name, std::vector<std::int64_t> shape, std::uint64_t offset) {
  NamedTensor tensor;
  tensor.name = name;
  tensor.source.dtype = DType::Float32;
  tensor.source.shape = std::move(shape);
  ckpt::Piece piece;
  piece.source = 0;
  piece.source_offset = offset;
  piece.nbytes = tensor.source.nbytes();
  tensor.source.pieces.push_back(piece);
  return tensor;
}

NodeId dict(ckpt::pickle::Graph& graph, std::vector<std::pair<std::string, NodeId>> entries) {
  ckpt::pickle::Node node;
  node.kind = ckpt::pickle::Kind::Dict;
  for (auto& [key, value] : entries) node.entries.emplace_back(graph.str(key), value);
  return graph.add(std::move(node));
}

Buffer slice(const Buffer& bytes, std::uint64_t offset, std::uint64_t nbytes) {
  return Buffer(bytes.begin() + static_cast<std::ptrdiff_t>(offset),
                bytes.begin() + static_cast<std::ptrdiff_t>(offset + nbytes));
}

Buffer bytes_of(const ckpt::Checkpoint& checkpoint, const std::string& path) {
  std::optional<std::size_t> index = checkpoint.tensor_index(path);
  REQUIRE_MESSAGE(index.has_value(), path);
  ckpt::Bytes bytes = checkpoint.tensor_bytes(*index);
  return Buffer(bytes.begin(), bytes.end());
}

std::vector<std::string> top_level_keys(const ckpt::Checkpoint& checkpoint) {
  return ckpt::describe_file(checkpoint).top_level_keys;
}

TEST_SUITE("CheckpointBuilder") {
  TEST_CASE("CheckpointBuilder: from nothing, then edited as a base") {
    TempDir dir;
    Buffer source_bytes(4096);
    for (std::size_t i = 0; i < source_bytes.size(); ++i) source_bytes[i] = static_cast<std::byte>((i * 13 + 5) & 0xFF);
    test_files::write_file(dir / "source.bin", source_bytes);
    ckpt::MappedFile source((dir / "source.bin").string());

    // ---- built from nothing: {"cfg": {"model": {"model_parallel_size": 2}}, "model": {...}}
    std::string first_path = dir.file("first.pt");
    {
      ckpt::CheckpointBuilder builder;
      ckpt::pickle::Graph& graph = builder.graph();
      NodeId parts = graph.integer(2);
      NodeId model_cfg = dict(graph, {{"model_parallel_size", parts}});
      builder.set_top_level("cfg", dict(graph, {{"model", model_cfg}}));
      builder.set_top_level("extra", graph.none());
      NamedTensor zeros;
      zeros.name = "b";
      zeros.source = ckpt::zeros_source(DType::Float32, {3});
      NamedTensor tied;
      tied.name = "tied";
      tied.alias_of = "a";
      NodeId state_dict = builder.add_state_dict({run_of("a", {2, 4}, 100), zeros, tied});
      std::vector<std::byte> three(4);
      const float value = 3.0f;
      std::memcpy(three.data(), &value, 4);
      NodeId version_key = graph.str("version");
      NodeId version = builder.add_inline_tensor(DType::Float32, {1}, three);
      graph.append_entry(state_dict, version_key, version);
      builder.set_top_level("model", state_dict);
      builder.drop_top_level("extra");
      builder.set_model_parallel_size(1);
      CHECK(builder.top_level("extra") == ckpt::pickle::kNoNode);
      CHECK(builder.top_level("cfg") != ckpt::pickle::kNoNode);
      CHECK_THROWS_AS(builder.add_state_dict({tied}), ckpt::Error);  // tied to a key it lacks

      ckpt::Plan plan;
      std::vector<std::uint32_t> sources{plan.add_source(test_files::whole_file_source(source))};
      ckpt::PlannedFile file = builder.finish(first_path, sources, plan);
      // The exact records: pickle, byteorder, storages 0 (a), 1 (b), 2 (version), version.
      const std::string archive = ckpt::archive_name_for(first_path);
      REQUIRE(file.records.size() == 6);
      CHECK(file.records[0].name == archive + "/data.pkl");
      CHECK(file.records[1].name == archive + "/byteorder");
      CHECK(file.records[1].inline_bytes.size() == 6);
      const ckpt::PlannedRecord& a = file.records[2];
      CHECK(a.name == archive + "/data/0");
      CHECK(a.nbytes == 32);
      REQUIRE(a.copies.size() == 1);
      CHECK(a.copies[0].source == sources[0]);
      CHECK(a.copies[0].source_offset == 100);
      CHECK(a.copies[0].offset == 0);
      CHECK(a.copies[0].nbytes == 32);
      CHECK(a.copies[0].plain());
      const ckpt::PlannedRecord& b = file.records[3];
      CHECK(b.name == archive + "/data/1");
      REQUIRE(b.copies.size() == 1);
      CHECK(b.copies[0].source == Piece::kZeros);
      CHECK(b.copies[0].nbytes == 12);
      const ckpt::PlannedRecord& v = file.records[4];
      CHECK(v.name == archive + "/data/2");
      CHECK(v.copies.empty());
      CHECK(v.inline_bytes == three);
      CHECK(file.records[5].name == archive + "/version");
      plan.files.push_back(file);
      run(plan);
    }
    ckpt::MappedFile first_file(first_path);
    ckpt::Checkpoint first(first_file);
    CHECK(top_level_keys(first) == std::vector<std::string>{"cfg", "model"});
    CHECK(bytes_of(first, "model/a") == slice(source_bytes, 100, 32));
    CHECK(bytes_of(first, "model/b") == Buffer(12, std::byte{0}));
    CHECK(first.find_tensor("model/tied")->alias_of == "model/a");
    CHECK(first.find_tensor("model/a")->shape == std::vector<std::int64_t>{2, 4});
    ckpt::ManifestFile described = ckpt::describe_file(first);
    REQUIRE(described.declared_parts);
    CHECK(described.declared_parts->parts == 1);

    // ---- edited: a replaced (and so its tie), b and version carried from the base
    std::string second_path = dir.file("second.pt");
    ckpt::Plan plan;
    std::vector<std::uint32_t> sources{plan.add_source(test_files::whole_file_source(source))};
    ckpt::PlannedFile file;
    {
      ckpt::CheckpointBuilder builder(first);
      builder.replace_tensor(first.tensor_nodes()[*first.tensor_index("model/a")].node, run_of("a", {2, 4}, 1000));
      NodeId model_cfg = ckpt::config_get(builder.graph(), builder.top_level("cfg"), "model");
      CHECK(builder.set_entry(model_cfg, "model_parallel_size", builder.graph().integer(8)));
      CHECK_FALSE(builder.set_entry(model_cfg, "no_such_key", builder.graph().integer(8)));
      builder.set_top_level("added", builder.graph().str("new"));
      file = builder.finish(second_path, sources, plan);
    }
    // new storages first (key 0: the replaced a), then the base's carried over, renumbered
    REQUIRE(file.records.size() == 6);
    REQUIRE(plan.sources.size() == 2);
    CHECK(plan.sources[1].path == first_file.path());
    const ckpt::PlannedRecord& replaced = file.records[2];
    REQUIRE(replaced.copies.size() == 1);
    CHECK(replaced.copies[0].source == 0);
    CHECK(replaced.copies[0].source_offset == 1000);
    std::set<std::pair<std::uint64_t, std::uint64_t>> carried, in_base;  // (source offset, bytes)
    for (std::size_t i : {3u, 4u}) {
      REQUIRE(file.records[i].copies.size() == 1);
      const Piece& piece = file.records[i].copies[0];
      CHECK(piece.source == 1);
      CHECK(piece.plain());
      carried.emplace(piece.source_offset, piece.nbytes);
    }
    for (const char* old_key : {"1", "2"}) {
      const ckpt::ZipRecord& record = *first.storages().at(old_key).record;
      in_base.emplace(record.data_offset, record.nbytes);
    }
    CHECK(carried == in_base);
    plan.files.push_back(file);
    run(plan);
    ckpt::MappedFile second_file(second_path);
    ckpt::Checkpoint second(second_file);
    CHECK(top_level_keys(second) == std::vector<std::string>{"cfg", "model", "added"});
    CHECK(bytes_of(second, "model/a") == slice(source_bytes, 1000, 32));
    CHECK(second.find_tensor("model/tied")->alias_of == "model/a");  // the tie sees the new data
    CHECK(bytes_of(second, "model/b") == Buffer(12, std::byte{0}));
    CHECK(bytes_of(second, "model/version") == bytes_of(first, "model/version"));
    described = ckpt::describe_file(second);
    REQUIRE(described.declared_parts);
    CHECK(described.declared_parts->parts == 8);
  }

  TEST_CASE("CheckpointBuilder: parameters, requires_grad and an OrderedDict root come back as they were read") {
    TempDir dir;
    // The base, as torch.save writes OrderedDict([("model", {...})]): a Parameter,
    // a plain tensor with requires_grad, a Parameter with Python attributes.
    std::string base_path = dir.file("base.pt");
    {
      ckpt::pickle::Graph graph;
      std::vector<ckpt::PlannedStorage> storages;
      auto tensor = [&](bool requires_grad) {
        std::string key = std::to_string(storages.size());
        ckpt::PlannedStorage storage;
        storage.key = key;
        storage.data.nbytes = 8;
        storage.data.inline_bytes = Buffer(8, static_cast<std::byte>(storages.size() + 1));
        storages.push_back(std::move(storage));
        return ckpt::add_tensor(graph, DType::Float32, {2}, key, requires_grad);
      };
      NodeId p = ckpt::add_parameter(graph, tensor(false), true);
      NodeId t = tensor(true);
      NodeId attributes = dict(graph, {{"partition_dim", graph.integer(0)}});
      NodeId s = ckpt::add_parameter(graph, tensor(false), false, attributes);
      NodeId root = ckpt::add_ordered_dict(graph);
      graph.append_entry(root, graph.str("model"), dict(graph, {{"p", p}, {"t", t}, {"s", s}}));
      graph.root = root;
      ckpt::Plan plan;
      plan.files.push_back(ckpt::plan_torch_file(base_path, "base", graph, std::move(storages)));
      run(plan);
    }
    ckpt::MappedFile base_file(base_path);
    ckpt::Checkpoint base(base_file);
    auto kinds = [](const ckpt::Checkpoint& checkpoint) {
      std::vector<std::pair<ckpt::TensorWrap, bool>> out;
      for (const char* key : {"model/p", "model/t", "model/s"}) {
        const ckpt::StoredTensor* ref = checkpoint.find_tensor(key);
        REQUIRE_MESSAGE(ref != nullptr, key);
        out.emplace_back(ref->wrap, ref->requires_grad);
      }
      return out;
    };
    const std::vector<std::pair<ckpt::TensorWrap, bool>> want = {{ckpt::TensorWrap::Parameter, true},
                                                                 {ckpt::TensorWrap::Tensor, true},
                                                                 {ckpt::TensorWrap::ParameterWithState, false}};
    CHECK(kinds(base) == want);
    // A parameter is a tensor of the state dict in the object tree and the manifest.
    ckpt::ManifestFile described = ckpt::describe_file(base);
    for (const auto& item : (*described.objects)["model"].items()) CHECK(item.value().contains("$tensor"));
    CHECK(described.tensors[0].wrap == ckpt::TensorWrap::Parameter);
    CHECK(described.tensors[0].requires_grad);

    // Written anew from NamedTensors of those kinds, and one replaced in place.
    std::string out_path = dir.file("out.pt");
    {
      ckpt::CheckpointBuilder builder(base);
      std::vector<NamedTensor> tensors;
      for (std::size_t i = 0; i < 3; ++i) {
        NamedTensor tensor = run_of(std::string(1, "pts"[i]), {2}, 0);
        tensor.source = ckpt::zeros_source(DType::Float32, {2});
        tensor.kind = {want[i].first, want[i].second};
        tensors.push_back(std::move(tensor));
      }
      NodeId model = builder.add_state_dict(tensors);
      builder.replace_tensor(base.tensor_nodes()[*base.tensor_index("model/t")].node,
                             tensors[1]);  // the base's requires_grad stays
      builder.set_top_level("copy", builder.top_level("model"));
      builder.set_top_level("model", model);
      ckpt::Plan plan;
      plan.files.push_back(builder.finish(out_path, {}, plan));
      run(plan);
    }
    ckpt::MappedFile out_file(out_path);
    ckpt::Checkpoint out(out_file);
    CHECK(kinds(out) == want);
    CHECK(out.find_tensor("copy/t")->requires_grad);
    CHECK(ckpt::class_name(out.graph(), out.graph().root) == "collections.OrderedDict");
    const ckpt::pickle::Graph& graph = out.graph();
    NodeId s = graph.lookup(graph.lookup(graph.root, "model"), "s");
    NodeId state = graph[graph[s].args].items[3];  // _rebuild_parameter_with_state(data, rg, hooks, state)
    CHECK(ckpt::as_int(graph, graph.lookup(state, "partition_dim")) == 0);
  }

  TEST_CASE("Checkpoint: a sparse tensor is one Error naming the file and its path") {
    TempDir dir;
    for (const auto& [function, layout] : {std::pair{"_rebuild_sparse_tensor", "torch.sparse_coo"},
                                           std::pair{"_rebuild_sparse_csr_tensor", "torch.sparse_csr"}}) {
      CAPTURE(function);
      ckpt::pickle::Graph graph;
      std::vector<ckpt::PlannedStorage> storages(1);
      storages[0].key.assign(1, '0');
      storages[0].data.nbytes = 8;
      storages[0].data.inline_bytes = Buffer(8);
      auto reduce = [&](NodeId callable, NodeId args) {
        ckpt::pickle::Node node;
        node.kind = ckpt::pickle::Kind::Object;
        node.callable = callable;
        node.args = args;
        return graph.add(std::move(node));
      };
      NodeId values = ckpt::add_tensor(graph, DType::Float32, {2}, "0");
      NodeId get_layout = reduce(graph.global("torch.serialization", "_get_layout"), graph.tuple({graph.str(layout)}));
      NodeId sparse =
          reduce(graph.global("torch._utils", function),
                 graph.tuple({get_layout, graph.tuple({values, values, ckpt::add_torch_size(graph, {2})})}));
      graph.root = dict(graph, {{"model", dict(graph, {{"w", sparse}})}});
      std::string path = dir.file(std::string(function) + ".pt");
      ckpt::Plan plan;
      plan.files.push_back(ckpt::plan_torch_file(path, function, graph, std::move(storages)));
      run(plan);
      ckpt::MappedFile file(path);
      try {
        ckpt::Checkpoint checkpoint(file);
        FAIL("no error");
      } catch (const ckpt::Error& e) {
        CHECK(std::string(e.what()) ==
              fmt::format("{}: {}/data.pkl (model/w): a sparse tensor ({}): sparse layouts are not supported, "
                          "only strided tensors (tensor.to_dense() before torch.save)",
                          path, function, layout));
      }
    }
  }

  TEST_CASE("CheckpointBuilder: a base whose top level is not a dict is an Error naming the file") {
    TempDir dir;
    std::string path = dir.file("list.pt");
    ckpt::pickle::Graph graph;
    graph.root = ckpt::add_list(graph, {graph.integer(1)});
    ckpt::Plan plan;
    plan.files.push_back(ckpt::plan_torch_file(path, "list", graph, {}));
    run(plan);
    ckpt::MappedFile file(path);
    ckpt::Checkpoint checkpoint(file);
    try {
      ckpt::CheckpointBuilder builder(checkpoint);
      FAIL("no error");
    } catch (const ckpt::Error& e) {
      std::string what = e.what();
      CHECK(what.find("list.pt") != std::string::npos);
      CHECK_KIND(e, ckpt::ErrorKind::BadInput);
    }
  }

  TEST_CASE("Checkpoint: a flipped byte in the pickle is CorruptData, whatever it would decode to") {
    TempDir dir;
    std::string path = dir.file("flipped.pt");
    ckpt::pickle::Graph graph;
    graph.root = dict(graph, {{"step", graph.integer(7)}});
    ckpt::Plan plan;
    plan.files.push_back(ckpt::plan_torch_file(path, "flipped", graph, {}));
    run(plan);
    std::uint64_t pickle_offset = 0;
    {
      ckpt::MappedFile file(path);
      ckpt::ZipArchive zip(file);
      for (const ckpt::ZipRecord& record : zip.records()) {
        if (record.name.ends_with("data.pkl")) pickle_offset = record.data_offset;
      }
    }
    REQUIRE(pickle_offset > 0);
    Buffer bytes = test_files::read_file(path);
    bytes[pickle_offset + 2] ^= std::byte{0x01};
    test_files::write_file(path, bytes);
    ckpt::MappedFile file(path);
    CHECK_THROWS_KIND(ckpt::Checkpoint{file}, ckpt::ErrorKind::CorruptData);
  }
}

}  // namespace
