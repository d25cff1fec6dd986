// Unit tests for tensor references and zero-copy views (src/format/checkpoint.cpp,
// src/tensor/tensor_view.cpp), on a torch.save-like file written without Python:
// a graph built with the Graph API, planned with plan_torch_file (storages as
// inline bytes), written by the executor into a temporary directory, then opened
// with MappedFile + Checkpoint. Each view must equal the tensor its bytes came
// from, bit for bit, and point into the mapping.
// LibTorch first, then no_glog_checks.hpp, then doctest.
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>

#include "ckpt/tensor/tensor_view.hpp"

#include "no_glog_checks.hpp"

#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "ckpt/exec/exec.hpp"
#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/pickle.hpp"
#include "ckpt/plan/plan.hpp"
#include "ckpt/plan/torch_file.hpp"
#include "temp_files.hpp"

namespace {

using ckpt::DType;
using ckpt::pickle::Graph;
using ckpt::pickle::Kind;
using ckpt::pickle::Node;
using ckpt::pickle::NodeId;

using test_files::TempDir;

std::vector<std::byte> bytes_of(const at::Tensor& tensor) {
  at::Tensor t = tensor.contiguous();
  const auto* data = static_cast<const std::byte*>(t.data_ptr());
  return std::vector<std::byte>(data, data + t.nbytes());
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  return bytes_of(a) == bytes_of(b);
}

// _rebuild_tensor_v2(('storage', torch.<Type>Storage, key, 'cpu', numel), offset, size, stride, False, OrderedDict())
// with its own persistent id, as torch.save writes every tensor.
NodeId rebuild_tensor(Graph& g, DType dtype, const std::string& key, std::int64_t storage_numel, std::int64_t offset,
                      const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& stride) {
  NodeId id_tuple = g.tuple({g.str("storage"), g.global("torch", ckpt::dtype_info(dtype).storage_name), g.str(key),
                             g.str("cpu"), g.integer(storage_numel)});
  Node persid;
  persid.kind = Kind::PersId;
  persid.callable = id_tuple;
  NodeId pid = g.add(std::move(persid));
  auto ints = [&](const std::vector<std::int64_t>& values) {
    std::vector<NodeId> items;
    for (std::int64_t v : values) items.push_back(g.integer(v));
    return g.tuple(std::move(items));
  };
  NodeId args =
      g.tuple({pid, g.integer(offset), ints(shape), ints(stride), g.boolean(false), ckpt::add_ordered_dict(g)});
  Node obj;
  obj.kind = Kind::Object;
  obj.op = ckpt::pickle::ObjectOp::Reduce;
  obj.callable = g.global("torch._utils", "_rebuild_tensor_v2");
  obj.args = args;
  return g.add(std::move(obj));
}

ckpt::PlannedStorage inline_storage(const std::string& key, const at::Tensor& storage) {
  ckpt::PlannedStorage planned;
  planned.key = key;
  planned.data.inline_bytes = bytes_of(storage);
  planned.data.nbytes = planned.data.inline_bytes.size();
  return planned;
}

// Plans and executes a torch.save-like file of `graph` with inline storages.
void write_checkpoint(const std::string& path, const Graph& graph, const std::map<std::string, at::Tensor>& storages) {
  std::vector<ckpt::PlannedStorage> planned;
  for (const auto& [key, storage] : storages) planned.push_back(inline_storage(key, storage));
  ckpt::Plan plan;
  plan.files.push_back(ckpt::plan_torch_file(path, ckpt::archive_name_for(path), graph, std::move(planned)));
  ckpt::ExecOptions options;
  options.threads = 2;
  ckpt::execute(plan, options);
}

struct Expected {
  at::Tensor value;
  std::string storage_key;
  std::int64_t storage_offset;
  bool contiguous;
};

}  // namespace

TEST_SUITE("tensor_view") {
  TEST_CASE("tensor_view: a checkpoint written without Python reads back bit for bit, without a copy") {
    // The storages, one per key: "10" sorts after "5" (numeric keys by value).
    std::map<std::string, at::Tensor> storages = {
        {"0", at::arange(6, at::kFloat).mul(0.5).sub(1.25)},
        {"1", at::arange(4, at::kFloat).div(3).to(at::kHalf)},
        {"2", at::arange(4, at::kFloat).mul(1.7).sub(2).to(at::kBFloat16)},
        {"10", at::arange(3, at::kLong).mul(std::int64_t{1000000000007}).sub(5)},
        {"4", at::arange(20, at::kFloat).mul(0.25)},
        {"5", at::arange(10, at::kFloat).add(100)},
    };
    std::map<std::string, Expected> expected = {
        {"f32", {storages["0"].view({2, 3}), "0", 0, true}},
        {"f16", {storages["1"], "1", 0, true}},
        {"bf16", {storages["2"].view({2, 2}), "2", 0, true}},
        {"i64", {storages["10"], "10", 0, true}},
        // a strided, offset view: elements 2 + 5i + 2j
        {"view", {storages["4"].as_strided({3, 2}, {5, 2}, 2), "4", 2, false}},
        // two tensors over one storage
        {"shared_a", {storages["5"].slice(0, 0, 4), "5", 0, true}},
        {"shared_b", {storages["5"].as_strided({2, 2}, {2, 1}, 6), "5", 6, true}},
    };

    Graph g;
    Node dict;
    dict.kind = Kind::Dict;
    auto tensor_node = [&](const std::string& name, DType dtype, const std::vector<std::int64_t>& shape,
                           const std::vector<std::int64_t>& stride) {
      const Expected& e = expected.at(name);
      return rebuild_tensor(g, dtype, e.storage_key, storages.at(e.storage_key).numel(), e.storage_offset, shape,
                            stride);
    };
    // add_tensor (torch_pickle.hpp) for the plain ones, hand-built nodes for the views.
    dict.entries.emplace_back(g.str("f32"), ckpt::add_tensor(g, DType::Float32, {2, 3}, "0"));
    dict.entries.emplace_back(g.str("f16"), ckpt::add_tensor(g, DType::Float16, {4}, "1"));
    dict.entries.emplace_back(g.str("bf16"), ckpt::add_tensor(g, DType::BFloat16, {2, 2}, "2"));
    dict.entries.emplace_back(g.str("i64"), ckpt::add_tensor(g, DType::Int64, {3}, "10"));
    dict.entries.emplace_back(g.str("view"), tensor_node("view", DType::Float32, {3, 2}, {5, 2}));
    dict.entries.emplace_back(g.str("shared_a"), tensor_node("shared_a", DType::Float32, {4}, {1}));
    dict.entries.emplace_back(g.str("shared_b"), tensor_node("shared_b", DType::Float32, {2, 2}, {2, 1}));
    dict.entries.emplace_back(g.str("step"), g.integer(7));
    g.root = g.add(std::move(dict));

    TempDir dir;
    std::string path = dir.file("model.pt");
    write_checkpoint(path, g, storages);
    REQUIRE(std::filesystem::exists(path));

    ckpt::MappedFile file(path);
    ckpt::Checkpoint checkpoint(file);
    CHECK(checkpoint.archive_name() == "model");
    // Records in torch's order, storages by numeric key.
    std::vector<std::string> names;
    for (const ckpt::ZipRecord& record : checkpoint.zip().records()) names.push_back(record.name);
    const std::vector<std::string> torch_order = {"model/data.pkl", "model/byteorder", "model/data/0",
                                                  "model/data/1",   "model/data/2",    "model/data/4",
                                                  "model/data/5",   "model/data/10",   "model/version"};
    CHECK(names == torch_order);
    CHECK(checkpoint.storages().size() == storages.size());
    CHECK(checkpoint.tensors().size() == expected.size());

    const std::byte* map_begin = file.bytes().data();
    const std::byte* map_end = map_begin + file.size();
    for (const auto& [name, want] : expected) {
      CAPTURE(name);
      std::optional<std::size_t> index = checkpoint.tensor_index(name);
      REQUIRE(index.has_value());
      const ckpt::StoredTensor* ref = &checkpoint.tensors()[*index];
      const std::uint64_t file_byte_offset = checkpoint.places()[*index].file_byte_offset;
      const ckpt::ZipRecord* record = checkpoint.zip().find("model/data/" + want.storage_key);
      REQUIRE(record != nullptr);
      CHECK(record->data_offset % 64 == 0);
      CHECK(ref->storage_key == want.storage_key);
      CHECK(ref->storage_offset == want.storage_offset);
      CHECK(ref->shape == want.value.sizes().vec());
      CHECK(ref->stride == want.value.strides().vec());
      CHECK(ref->is_contiguous() == want.contiguous);
      CHECK(ref->numel() == static_cast<std::uint64_t>(want.value.numel()));
      CHECK_FALSE(ref->requires_grad);
      std::uint64_t itemsize = want.value.element_size();
      CHECK(file_byte_offset == record->data_offset + static_cast<std::uint64_t>(want.storage_offset) * itemsize);
      // The span from the first to the last element touched.
      std::uint64_t span = 1;
      for (std::size_t d = 0; d < ref->shape.size(); ++d) span += (ref->shape[d] - 1) * ref->stride[d];
      CHECK(ref->nbytes == span * itemsize);
      CHECK(file_byte_offset + ref->nbytes <= record->data_offset + record->nbytes);

      at::Tensor view = ckpt::tensor_view(checkpoint, *index);
      CHECK(std::string(c10::toString(view.scalar_type())) == c10::toString(want.value.scalar_type()));
      CHECK(view.sizes() == want.value.sizes());
      CHECK(view.strides() == want.value.strides());
      CHECK(at::equal(view, want.value));
      CHECK(same_bits(view, want.value));
      // No copy: the view's first element is the mapped byte at file_byte_offset.
      const auto* data = static_cast<const std::byte*>(view.data_ptr());
      CHECK(data == map_begin + file_byte_offset);
      CHECK(data >= map_begin);
      CHECK(data + ref->nbytes <= map_end);
      CHECK(checkpoint.tensor_bytes(*index).data() == data);
    }

    // The two views of storage "5" alias the same mapped bytes.
    at::Tensor a = ckpt::tensor_view(checkpoint, *checkpoint.tensor_index("shared_a"));
    at::Tensor b = ckpt::tensor_view(checkpoint, *checkpoint.tensor_index("shared_b"));
    CHECK(static_cast<const std::byte*>(b.data_ptr()) - static_cast<const std::byte*>(a.data_ptr()) == 6 * 4);

    // The non-tensor value came through the pickle as well.
    NodeId step = checkpoint.graph().lookup(checkpoint.graph().root, "step");
    REQUIRE(step != ckpt::pickle::kNoNode);
    CHECK(checkpoint.graph()[step].integer == 7);
  }

  TEST_CASE("opening a checkpoint checks every tensor against its storage record") {
    TempDir dir;
    std::map<std::string, at::Tensor> storages = {{"0", at::arange(4, at::kFloat)}};
    struct Case {
      const char* what;
      std::int64_t storage_numel;  // as the persistent id claims
      std::int64_t offset;
      std::vector<std::int64_t> shape, stride;
      const char* message;
    };
    const Case cases[] = {
        {"tensor longer than its storage", 4, 0, {5}, {1}, "tensor reaches element 4 of a storage of 4 elements"},
        {"offset view past the end", 4, 3, {2}, {1}, "tensor reaches element 4 of a storage of 4 elements"},
        {"strided view past the end", 4, 0, {2, 2}, {3, 1}, "tensor reaches element 4"},
        {"record size disagrees with numel", 5, 0, {4}, {1}, "needs 20 bytes, record holds 16"},
        // The third stranger's F11: this one named neither the file nor the record.
        {"numel whose bytes pass 64 bits", std::int64_t{1} << 62, 0, {4}, {1}, "/data/0: at byte 0x"},
        {"negative stride", 4, 3, {2}, {-1}, "negative size or stride"},
        {"shape and stride lengths differ", 4, 0, {2, 2}, {1}, "different lengths"},
    };
    int index = 0;
    for (const Case& c : cases) {
      std::string what = c.what;
      CAPTURE(what);
      Graph g;
      Node dict;
      dict.kind = Kind::Dict;
      dict.entries.emplace_back(g.str("w"),
                                rebuild_tensor(g, DType::Float32, "0", c.storage_numel, c.offset, c.shape, c.stride));
      g.root = g.add(std::move(dict));
      std::string path = dir.file("bad" + std::to_string(index++) + ".pt");
      write_checkpoint(path, g, storages);
      ckpt::MappedFile file(path);
      bool threw = false;
      try {
        ckpt::Checkpoint checkpoint(file);
      } catch (const ckpt::Error& e) {
        threw = true;
        std::string message = e.what();
        CAPTURE(message);
        CHECK(message.find(c.message) != std::string::npos);
        CHECK(e.where().file == path);
      }
      CHECK(threw);
    }
  }

  TEST_CASE("to_scalar_type covers every dtype with the right element size") {
    for (DType dtype : {DType::Float64, DType::Float32, DType::Float16, DType::BFloat16, DType::Int64, DType::Int32,
                        DType::Int16, DType::Int8, DType::UInt8, DType::Bool, DType::Complex64, DType::Complex128}) {
      CAPTURE(std::string(ckpt::dtype_info(dtype).name));
      at::ScalarType type = ckpt::to_scalar_type(dtype);
      CHECK(c10::elementSize(type) == ckpt::dtype_info(dtype).itemsize);
      CHECK(std::string(c10::toString(type)).size() > 0);
    }
    CHECK((ckpt::to_scalar_type(DType::BFloat16) == at::kBFloat16));
    CHECK((ckpt::to_scalar_type(DType::Float16) == at::kHalf));
    CHECK((ckpt::to_scalar_type(DType::UInt8) == at::kByte));
    CHECK((ckpt::to_scalar_type(DType::Int8) == at::kChar));
  }

}  // TEST_SUITE
