// Manifest <-> JSON, plain or zstd-compressed.
//
// Reading treats a manifest as hostile input, as the checkpoint reader treats a
// checkpoint: every value is checked before it is used (its type, its range,
// and what it must agree with: the file's name and size, the tensor's dtype,
// shape and stride, the other tensors), so that a bad manifest is one Error
// naming the manifest and the field as a JSON path, and never a crash, an
// allocation sized by a number in the file, or a confusing failure later.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <unordered_map>

#include "ckpt/io/output_file.hpp"
#include "ckpt/io/version.hpp"
#include "ckpt/io/zstd.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/manifest/manifest_json.hpp"

namespace ckpt {

using json = nlohmann::ordered_json;

namespace {

json role_value(const std::optional<int>& value) {
  return value ? json(*value) : json(nullptr);
}

json fsdp_to_json(const FsdpMetadata& fsdp) {
  json instances = json::array();
  for (const FsdpInstanceMeta& instance : fsdp.instances) {
    json flat_params = json::array();
    for (const FlatParamMeta& flat : instance.flat_params) {
      flat_params.push_back({{"state_key", flat.state_key},
                             {"name", flat.name},
                             {"names", flat.names},
                             {"shapes", flat.shapes},
                             {"numels", flat.numels},
                             {"padding", flat.padding}});
    }
    json shared = json::array();
    for (const auto& [src, dst] : instance.shared_param_info) shared.push_back({src, dst});
    instances.push_back({{"fsdp_path", instance.fsdp_path},
                         {"flat_params", flat_params},
                         {"no_broadcast_optim_state", instance.no_broadcast_optim_state},
                         {"shared_param_info", shared}});
  }
  return {{"param_metadata", instances}, {"buffer_names", fsdp.buffer_names}};
}

}  // namespace

namespace {

// A tensor's "parameter" field: absent for a plain tensor.
constexpr std::pair<TensorWrap, std::string_view> kWrapNames[] = {
    {TensorWrap::Parameter, "nn.Parameter"},
    {TensorWrap::ParameterWithState, "nn.Parameter with state"},
};

std::string_view wrap_name(TensorWrap wrap) {
  for (const auto& [value, name] : kWrapNames) {
    if (value == wrap) return name;
  }
  internal_error("a tensor wrap without a name");
}

json tensor_to_json(const StoredTensor& t) {
  json out = {{"path", t.path},
              {"dtype", std::string(dtype_info(t.dtype).name)},
              {"shape", t.shape},
              {"stride", t.stride},
              {"storage_key", t.storage_key},
              {"storage_offset", t.storage_offset},
              {"nbytes", t.nbytes},
              {"storage_nbytes", t.storage_nbytes},
              {"requires_grad", t.requires_grad}};
  if (t.wrap != TensorWrap::Tensor) out["parameter"] = wrap_name(t.wrap);
  if (t.alias_of) out["alias_of"] = *t.alias_of;
  return out;
}

// A JSON string as dump() writes it (invalid UTF-8 replaced): printable ASCII
// without quotes or backslashes as it is, anything else through nlohmann.
void append_json_string(std::string& out, std::string_view text) {
  bool plain =
      std::all_of(text.begin(), text.end(), [](char c) { return c >= 0x20 && c < 0x7f && c != '"' && c != '\\'; });
  if (!plain) {
    out += json(std::string(text)).dump(-1, ' ', false, json::error_handler_t::replace);
    return;
  }
  out += '"';
  out += text;
  out += '"';
}

void append_integers(std::string& out, const std::vector<std::int64_t>& values) {
  out += '[';
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ',';
    out += fmt::format_int(values[i]).str();
  }
  out += ']';
}

// tensor_to_json(t), dumped compactly, without building it: a manifest of
// 200,000 tensors is written at the speed of its text.
void append_tensor_text(std::string& out, const StoredTensor& t) {
  out += "{\"path\":";
  append_json_string(out, t.path);
  out += ",\"dtype\":";
  append_json_string(out, dtype_info(t.dtype).name);
  out += ",\"shape\":";
  append_integers(out, t.shape);
  out += ",\"stride\":";
  append_integers(out, t.stride);
  out += ",\"storage_key\":";
  append_json_string(out, t.storage_key);
  fmt::format_to(std::back_inserter(out),
                 ",\"storage_offset\":{},\"nbytes\":{},\"storage_nbytes\":{},\"requires_grad\":{}", t.storage_offset,
                 t.nbytes, t.storage_nbytes, t.requires_grad);
  if (t.wrap != TensorWrap::Tensor) {
    out += ",\"parameter\":";
    append_json_string(out, wrap_name(t.wrap));
  }
  if (t.alias_of) {
    out += ",\"alias_of\":";
    append_json_string(out, *t.alias_of);
  }
  out += '}';
}

// Numbers the values that files share, in order of first use.
template <typename Key>
class Numbering {
 public:
  // The number of `key`, and whether it was seen for the first time.
  std::pair<std::size_t, bool> number(Key key) {
    auto [it, fresh] = numbers_.emplace(key, numbers_.size());
    return {it->second, fresh};
  }

 private:
  std::map<Key, std::size_t> numbers_;
};

}  // namespace

namespace {

// The values files share, in order of first use: what manifest_to_json writes
// as tensor_lists and object_trees, and the text writer streams.
struct SharedValues {
  std::vector<const TensorList*> lists;
  std::vector<const nlohmann::ordered_json*> trees;
};

// `shared`, when given, takes the tensor lists and object trees, which are then
// left out of the document (empty arrays), for the caller to write one by one.
json manifest_document(const Manifest& manifest, SharedValues* shared) {
  json lists = json::array();
  json fsdp = json::array();
  json trees = json::array();
  Numbering<const void*> list_numbers;
  Numbering<const void*> fsdp_numbers;
  Numbering<const void*> tree_numbers;
  json files = json::array();
  for (const ManifestFile& file : manifest.files) {
    auto [list, new_list] = list_numbers.number(file.tensors.identity());
    if (new_list && shared != nullptr) {
      shared->lists.push_back(&file.tensors);
    } else if (new_list) {
      json tensors = json::array();
      for (const StoredTensor& t : file.tensors) tensors.push_back(tensor_to_json(t));
      lists.push_back(std::move(tensors));
    }
    json fsdp_number = nullptr;
    if (file.fsdp) {
      auto [number, fresh] = fsdp_numbers.number(file.fsdp.identity());
      if (fresh) fsdp.push_back(fsdp_to_json(*file.fsdp));
      fsdp_number = number;
    }
    auto [tree, new_tree] = tree_numbers.number(file.objects.identity());
    if (new_tree && shared != nullptr) {
      shared->trees.push_back(&*file.objects);
    } else if (new_tree) {
      trees.push_back(*file.objects);
    }
    json offsets = json::array();
    json crcs = json::array();
    for (const TensorPlace& place : file.places) {
      offsets.push_back(place.file_byte_offset);
      crcs.push_back(place.record_crc32);
    }
    files.push_back({{"path", file.path},
                     {"format", input_layout(file.format).name},
                     {"size_bytes", file.size_bytes},
                     {"mtime_ns", file.mtime_ns},
                     {"archive_name", file.archive_name},
                     {"mp_part", role_value(file.role.mp_part)},
                     {"dp_shard", role_value(file.role.dp_shard)},
                     {"pickle_protocol", file.pickle_protocol},
                     {"top_level_keys", file.top_level_keys},
                     {"model_parallel_size", file.declared_parts ? json{{"parts", file.declared_parts->parts},
                                                                        {"from", file.declared_parts->from}}
                                                                 : json(nullptr)},
                     {"tensors", list},
                     {"file_byte_offsets", std::move(offsets)},
                     {"record_crc32s", std::move(crcs)},
                     {"fsdp", fsdp_number},
                     {"objects", tree}});
  }
  json cells = manifest.grid.cells;
  return {
      {"format", kManifestFormat},
      {"version", kManifestVersion},
      {"created_by", kVersionString},
      {"grid",
       {{"mp", manifest.grid.mp}, {"dp", manifest.grid.dp}, {"cells", cells}, {"problems", manifest.grid.problems}}},
      // Files first: a reader can start reading them while it parses the rest.
      {"files", std::move(files)},
      {"tensor_lists", std::move(lists)},
      {"fsdp", std::move(fsdp)},
      {"object_trees", std::move(trees)}};
}

}  // namespace

json manifest_to_json(const Manifest& manifest) {
  return manifest_document(manifest, nullptr);
}

namespace {

// A string from the manifest as an error message quotes it: JSON-escaped (one
// line) and cut to a readable length.
std::string quote_text(const std::string& text) {
  std::string out = json(text).dump(-1, ' ', false, json::error_handler_t::replace);
  return out.size() > 80 ? out.substr(0, 76) + "...\"" : out;
}

// A JSON path, rendered only when an error names it: `files[3].tensors[12].shape[1]`.
// A Field points at its parent, which lives on the stack of the reader's caller.
// Member names that are not plain words (object-tree keys may hold anything)
// are quoted: `objects.model["a.b\n"]`.
struct Field {
  const Field* parent = nullptr;
  std::string_view key;  // the member's name, unless `is_index`
  std::size_t index = 0;
  bool is_index = false;

  Field operator/(std::string_view member) const { return Field{this, member, 0, false}; }
  Field operator[](std::size_t i) const { return Field{this, {}, i, true}; }
  std::string render() const {
    if (parent == nullptr) return "";  // the document itself
    std::string prefix = parent->render();
    if (is_index) return fmt::format("{}[{}]", prefix, index);
    bool plain = !key.empty() && key.size() <= 80 && std::all_of(key.begin(), key.end(), [](char c) {
      return static_cast<unsigned char>(c) > 0x20 && c != '.' && c != '[' && c != ']' && c != '"' && c != 0x7f;
    });
    if (!plain) return fmt::format("{}[{}]", prefix, quote_text(std::string(key)));
    return prefix.empty() ? std::string(key) : fmt::format("{}.{}", prefix, key);
  }
};

std::string role_text(const std::optional<int>& number) {
  return number ? std::to_string(*number) : "none";
}

// Reads a manifest's JSON, checking every value before anything uses it: its
// type, its range, and what it must agree with (see manifest_from_json in
// manifest.hpp). The first failure is an Error naming the manifest and the field.
class ManifestReader {
 public:
  // A tensor of tensor_lists[list] read while the text was parsed (parse_manifest):
  // the tensor, or the Error reading it gave, thrown when read() gets there.
  struct ReadAhead {
    std::vector<std::vector<std::optional<StoredTensor>>> tensors;  // [list][index]; empty: left in the JSON
    std::exception_ptr failure;
    std::size_t failed_list = 0;
    std::size_t failed_index = 0;
  };

  explicit ManifestReader(const std::string& source, ReadAhead* ahead = nullptr) : source_(source), ahead_(ahead) {}

  // tensor_lists[list][index], as read() reads it.
  StoredTensor read_listed_tensor(const json& j, std::size_t list, std::size_t index) const {
    const Field top;
    const Field lists_field = top / "tensor_lists";
    const Field list_field = lists_field[list];
    const Field field = list_field[index];
    return read_tensor(as_object(j, field), field);
  }

  // `root` gives up its object trees (moved into the manifest).
  Manifest read(json& root) {
    const Field top;
    if (!root.is_object()) fail(top, "not a ckpt-tool manifest (not a JSON object)");
    auto format = root.find("format");
    if (format == root.end() || !format->is_string() || format->get_ref<const std::string&>() != kManifestFormat) {
      fail(top / "format", "not a ckpt-tool manifest");
    }
    const Field version_field = top / "version";
    const json& version = member(root, version_field);
    if (!version.is_number_integer() || version.get<std::int64_t>() != kManifestVersion) {
      std::string shown = version.dump(-1, ' ', false, json::error_handler_t::replace);
      if (shown.size() > 40) shown = shown.substr(0, 36) + "...";
      fail(version_field, fmt::format("manifest version {} is not supported (this ckpt-tool reads version {}): run "
                                      "`ckpt-tool manifest` again on its files",
                                      shown, kManifestVersion));
    }
    // "grid" is not read: detect_grid recomputes it from the files' roles.
    Referenced shared;
    const Field lists_field = top / "tensor_lists";
    const json& lists = array(root, top, "tensor_lists");
    for (std::size_t k = 0; k < lists.size(); ++k) shared.lists.push_back(read_tensor_list(lists[k], lists_field[k]));
    const Field fsdp_field = top / "fsdp";
    const json& fsdp = array(root, top, "fsdp");
    for (std::size_t k = 0; k < fsdp.size(); ++k) {
      shared.fsdp.push_back(read_fsdp(as_object(fsdp[k], fsdp_field[k]), fsdp_field[k]));
    }
    const Field trees_field = top / "object_trees";
    array(root, top, "object_trees");
    json& trees = root.at("object_trees");  // (checked an array)
    for (std::size_t k = 0; k < trees.size(); ++k) {
      std::uint64_t highest = 0;
      check_objects(trees[k], trees_field[k], highest, 0);
      shared.trees.push_back(Shared<json>(std::move(trees[k])));
      shared.tree_tensors.push_back(highest);
    }
    Manifest manifest;
    const Field files_field = top / "files";
    const json& files = array(root, top, "files");
    if (files.empty()) fail(files_field, "lists no file (a manifest describes the files of a checkpoint)");
    std::map<std::string, std::size_t> file_index;
    for (std::size_t i = 0; i < files.size(); ++i) {
      const Field field = files_field[i];
      manifest.files.push_back(read_file(as_object(files[i], field), field, shared));
      auto [it, added] = file_index.emplace(manifest.files.back().path, i);
      if (!added) fail(field / "path", fmt::format("the same file as files[{}]", it->second));
    }
    manifest.grid = detect_grid(manifest.files);
    return manifest;
  }

 private:
  [[noreturn]] void fail(const Field& field, const std::string& message) const {
    throw Error(Location{source_, field.render(), std::nullopt}, message);
  }
  [[noreturn]] void wrong_type(const json& value, const Field& field, const char* expected) const {
    fail(field, fmt::format("expected {}, found {}", expected, value.is_number() ? "a number" : value.type_name()));
  }

  // ---- values
  const json& as_object(const json& value, const Field& field) const {
    if (!value.is_object()) wrong_type(value, field, "an object");
    return value;
  }
  const json& as_array(const json& value, const Field& field) const {
    if (!value.is_array()) wrong_type(value, field, "an array");
    return value;
  }
  std::string as_text(const json& value, const Field& field) const {
    if (!value.is_string()) wrong_type(value, field, "a string");
    return value.get<std::string>();
  }
  bool as_boolean(const json& value, const Field& field) const {
    if (!value.is_boolean()) wrong_type(value, field, "true or false");
    return value.get<bool>();
  }
  std::int64_t as_integer(const json& value, const Field& field, std::int64_t min, std::int64_t max) const {
    if (!value.is_number_integer()) wrong_type(value, field, "an integer");
    bool fits = !value.is_number_unsigned() || value.get<std::uint64_t>() <= static_cast<std::uint64_t>(INT64_MAX);
    std::int64_t number = fits ? value.get<std::int64_t>() : 0;
    if (fits && number >= min && number <= max) return number;
    if (fits && number < 0 && min == 0 && max == INT64_MAX) fail(field, fmt::format("{} is negative", number));
    fail(field, fmt::format("{} is outside [{}, {}]", value.dump(), min, max));
  }
  std::uint64_t as_unsigned(const json& value, const Field& field, std::uint64_t max) const {
    if (!value.is_number_integer()) wrong_type(value, field, "an integer");
    // In memory (manifest_to_json) non-negative numbers may be signed; parsed, they are unsigned.
    if (!value.is_number_unsigned() && value.get<std::int64_t>() < 0) {
      fail(field, fmt::format("{} is negative", value.dump()));
    }
    if (value.get<std::uint64_t>() > max) fail(field, fmt::format("{} is outside [0, {}]", value.dump(), max));
    return value.get<std::uint64_t>();
  }
  std::vector<std::int64_t> as_integers(const json& value, const Field& field, std::int64_t min) const {
    as_array(value, field);
    std::vector<std::int64_t> out;
    out.reserve(value.size());
    for (std::size_t i = 0; i < value.size(); ++i) out.push_back(as_integer(value[i], field[i], min, INT64_MAX));
    return out;
  }
  std::vector<std::string> as_texts(const json& value, const Field& field) const {
    as_array(value, field);
    std::vector<std::string> out;
    out.reserve(value.size());
    for (std::size_t i = 0; i < value.size(); ++i) out.push_back(as_text(value[i], field[i]));
    return out;
  }

  // ---- members of an object: `object` is at `parent`
  const json& member(const json& object, const Field& field) const {
    auto it = object.find(field.key);
    if (it == object.end()) fail(field, "missing");
    return *it;
  }
  const json& array(const json& object, const Field& parent, std::string_view key) const {
    const Field field = parent / key;
    return as_array(member(object, field), field);
  }
  std::string text(const json& object, const Field& parent, std::string_view key) const {
    const Field field = parent / key;
    return as_text(member(object, field), field);
  }
  std::int64_t integer(const json& object, const Field& parent, std::string_view key, std::int64_t min,
                       std::int64_t max) const {
    const Field field = parent / key;
    return as_integer(member(object, field), field, min, max);
  }
  std::uint64_t unsigned_integer(const json& object, const Field& parent, std::string_view key,
                                 std::uint64_t max) const {
    const Field field = parent / key;
    return as_unsigned(member(object, field), field, max);
  }
  bool boolean(const json& object, const Field& parent, std::string_view key) const {
    const Field field = parent / key;
    return as_boolean(member(object, field), field);
  }
  std::vector<std::string> texts(const json& object, const Field& parent, std::string_view key) const {
    const Field field = parent / key;
    return as_texts(member(object, field), field);
  }

  // ---- the manifest's parts
  struct Referenced;
  ManifestFile read_file(const json& j, const Field& field, const Referenced& shared) const {
    ManifestFile file;
    file.path = text(j, field, "path");
    if (file.path.empty() || file.path.front() != '/' || file.path.find('\0') != std::string::npos) {
      fail(field / "path", fmt::format("{} is not an absolute path", quote_text(file.path)));
    }
    if (j.contains("format")) {  // (absent before DCP manifests: torch)
      const std::string name = text(j, field, "format");
      const InputLayout* layout = nullptr;
      for (const InputLayout& row : input_layouts()) {
        if (row.name == name) layout = &row;
      }
      if (layout == nullptr) fail(field / "format", fmt::format("{} is no input layout", quote_text(name)));
      file.format = layout->format;
    }
    file.size_bytes = unsigned_integer(j, field, "size_bytes", INT64_MAX);
    file.mtime_ns = integer(j, field, "mtime_ns", INT64_MIN, INT64_MAX);
    file.archive_name = text(j, field, "archive_name");
    // The role is a function of the name: a manifest cannot move a file to another cell.
    FileRole from_name = parse_file_role(file.path);
    file.role.mp_part = role_number(j, field / "mp_part", from_name.mp_part, file.path);
    file.role.dp_shard = role_number(j, field / "dp_shard", from_name.dp_shard, file.path);
    if (j.contains("pickle_protocol"))
      file.pickle_protocol = static_cast<int>(integer(j, field, "pickle_protocol", 2, 5));
    file.top_level_keys = texts(j, field, "top_level_keys");

    const Field declared_field = field / "model_parallel_size";
    const json& declared = member(j, declared_field);
    if (!declared.is_null()) {
      const json& object = as_object(declared, declared_field);
      // Any int a cfg holds reads back; detect_grid judges whether it is plausible.
      file.declared_parts = DeclaredParts{integer(object, declared_field, "parts", INT64_MIN, INT64_MAX),
                                          text(object, declared_field, "from")};
      bool known = false;
      for (const auto& keys : kModelParallelSizeKeys) {
        known = known || file.declared_parts->from == fmt::format("{}", fmt::join(keys, "."));
      }
      if (!known)
        fail(declared_field / "from", fmt::format("{} is not a place a checkpoint declares its part count",
                                                  quote_text(file.declared_parts->from)));
    }
    file.tensors = shared.lists[reference(j, field / "tensors", shared.lists.size(), "tensor_lists")];
    read_places(j, field, file);
    const Field fsdp_field = field / "fsdp";
    if (!member(j, fsdp_field).is_null()) file.fsdp = shared.fsdp[reference(j, fsdp_field, shared.fsdp.size(), "fsdp")];
    const Field objects_field = field / "objects";
    std::size_t tree = reference(j, objects_field, shared.trees.size(), "object_trees");
    if (shared.tree_tensors[tree] > file.tensors.size()) {
      fail(objects_field, fmt::format("object_trees[{}] refers to tensor {}, but the file lists {} tensors", tree,
                                      shared.tree_tensors[tree] - 1, file.tensors.size()));
    }
    file.objects = shared.trees[tree];
    return file;
  }

  // What files refer to by number.
  struct Referenced {
    std::vector<TensorList> lists;
    std::vector<Shared<FsdpMetadata>> fsdp;
    std::vector<Shared<json>> trees;
    std::vector<std::uint64_t> tree_tensors;  // per tree: its highest $tensor index + 1 (0 when none)
  };

  // A number that refers to one of `count` entries of the manifest's `what`.
  std::size_t reference(const json& j, const Field& field, std::size_t count, const char* what) const {
    const json& value = member(j, field);
    std::uint64_t number = as_unsigned(value, field, UINT64_MAX);
    if (number >= count) fail(field, fmt::format("{} refers to {}[{}], but there are {}", number, what, number, count));
    return static_cast<std::size_t>(number);
  }

  // Where each tensor is in this file: one offset and one CRC per tensor of its
  // list, each range inside the file, a tied tensor at its target's bytes.
  void read_places(const json& j, const Field& field, ManifestFile& file) const {
    const Field offsets_field = field / "file_byte_offsets";
    const Field crcs_field = field / "record_crc32s";
    const json& offsets = array(j, field, "file_byte_offsets");
    const json& crcs = array(j, field, "record_crc32s");
    for (const auto& [values, values_field] : {std::pair{&offsets, &offsets_field}, std::pair{&crcs, &crcs_field}}) {
      if (values->size() != file.tensors.size()) {
        fail(*values_field,
             fmt::format("{} values for the {} tensors of the file's list", values->size(), file.tensors.size()));
      }
    }
    file.places.resize(file.tensors.size());
    for (std::size_t i = 0; i < file.tensors.size(); ++i) {
      const StoredTensor& t = file.tensors[i];
      TensorPlace& place = file.places[i];
      place.record_crc32 = static_cast<std::uint32_t>(as_unsigned(crcs[i], crcs_field[i], UINT32_MAX));
      place.file_byte_offset = as_unsigned(offsets[i], offsets_field[i], UINT64_MAX);
      if (t.storage_nbytes > file.size_bytes) {
        fail(field / "tensors", fmt::format("{}'s storage of {} bytes is larger than the file (size_bytes {})",
                                            quote_text(t.path), t.storage_nbytes, file.size_bytes));
      }
      if (place.file_byte_offset > file.size_bytes || t.nbytes > file.size_bytes - place.file_byte_offset) {
        fail(offsets_field[i], fmt::format("{} + {} bytes of {} reach past the end of the file (size_bytes {})",
                                           place.file_byte_offset, t.nbytes, quote_text(t.path), file.size_bytes));
      }
      // Element 0 of the storage is storage_offset elements before the view's first.
      if (static_cast<std::uint64_t>(t.storage_offset) > place.file_byte_offset / dtype_info(t.dtype).itemsize) {
        fail(offsets_field[i], fmt::format("byte {}, but {} starts {} elements into its storage: the storage would "
                                           "start before the file",
                                           place.file_byte_offset, quote_text(t.path), t.storage_offset));
      }
    }
    for (std::size_t i = 0; i < file.tensors.size(); ++i) {
      const StoredTensor& t = file.tensors[i];
      if (!t.alias_of) continue;
      std::size_t target = *file.tensors.find(*t.alias_of);  // read_tensor_list checked it is there
      if (file.places[target].file_byte_offset != file.places[i].file_byte_offset) {
        fail(offsets_field[i], fmt::format("{} is tied to {} (alias_of) but at another byte offset", quote_text(t.path),
                                           quote_text(*t.alias_of)));
      }
    }
  }

  TensorList read_tensor_list(const json& value, const Field& field) const {
    as_array(value, field);
    std::vector<StoredTensor> tensors;
    tensors.reserve(value.size());
    const std::size_t list = field.index;
    for (std::size_t i = 0; i < value.size(); ++i) {
      if (ahead_ != nullptr && ahead_->failure && ahead_->failed_list == list && ahead_->failed_index == i) {
        std::rethrow_exception(ahead_->failure);
      }
      std::optional<StoredTensor>* read = nullptr;
      if (ahead_ != nullptr && list < ahead_->tensors.size() && i < ahead_->tensors[list].size()) {
        read = &ahead_->tensors[list][i];
      }
      if (read != nullptr && *read) {
        tensors.push_back(std::move(**read));
      } else {
        tensors.push_back(read_tensor(as_object(value[i], field[i]), field[i]));
      }
    }
    std::unordered_map<std::string_view, std::size_t> by_path;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      auto [it, added] = by_path.emplace(tensors[i].path, i);
      if (!added) fail(field[i] / "path", fmt::format("the same path as [{}]", it->second));
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) check_alias(tensors, i, by_path, field[i]);
    // Views of one storage agree on its size and dtype.
    std::unordered_map<std::string_view, std::size_t> by_storage;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      auto [it, added] = by_storage.emplace(tensors[i].storage_key, i);
      const StoredTensor& first = tensors[it->second];
      if (!added && (first.storage_nbytes != tensors[i].storage_nbytes || first.dtype != tensors[i].dtype)) {
        fail(field[i] / "storage_nbytes",
             fmt::format("storage {} is {} {} bytes here but {} {} bytes at [{}]", quote_text(tensors[i].storage_key),
                         dtype_info(tensors[i].dtype).name, tensors[i].storage_nbytes, dtype_info(first.dtype).name,
                         first.storage_nbytes, it->second));
      }
    }
    return TensorList(std::move(tensors));
  }

  std::optional<int> role_number(const json& j, const Field& field, const std::optional<int>& from_name,
                                 const std::string& path) const {
    const json& value = member(j, field);
    std::optional<int> number;
    // Any number a name can give (parse_file_role reads at most 8 digits) reads
    // back: one past kMaxGridSide is a grid problem, as for the files themselves.
    if (!value.is_null()) number = static_cast<int>(as_integer(value, field, 0, INT_MAX));
    if (number != from_name) {
      fail(field, fmt::format("{}, but the file name {} gives {}", role_text(number),
                              quote_text(std::filesystem::path(path).filename().string()), role_text(from_name)));
    }
    return number;
  }

  StoredTensor read_tensor(const json& j, const Field& field) const {
    StoredTensor t;
    t.path = text(j, field, "path");
    if (t.path.empty()) fail(field / "path", "empty tensor path");
    std::string dtype_name = text(j, field, "dtype");
    auto dtype = dtype_from_name(dtype_name);
    if (!dtype) fail(field / "dtype", "unknown dtype " + quote_text(dtype_name));
    t.dtype = *dtype;
    const Field shape_field = field / "shape";
    const Field stride_field = field / "stride";
    t.shape = as_integers(member(j, shape_field), shape_field, 0);
    t.stride = as_integers(member(j, stride_field), stride_field, 0);
    if (t.stride.size() != t.shape.size()) {
      fail(stride_field, fmt::format("{} strides for {} dimensions", t.stride.size(), t.shape.size()));
    }
    const std::uint64_t itemsize = dtype_info(t.dtype).itemsize;
    ViewExtent extent;
    try {
      extent = view_extent(t.shape, t.stride, itemsize);
    } catch (const Error& e) {
      throw Error(e.kind(), Location{source_, shape_field.render(), std::nullopt}, e.message());
    }
    t.storage_key = text(j, field, "storage_key");
    t.storage_offset = integer(j, field, "storage_offset", 0, INT64_MAX);
    t.nbytes = unsigned_integer(j, field, "nbytes", UINT64_MAX);
    std::uint64_t spanned = extent.span_elements * itemsize;  // view_extent checked the product
    if (t.nbytes != spanned) {
      fail(field / "nbytes",
           fmt::format("{} bytes, but a {} view of shape [{}] and stride [{}] spans {}", t.nbytes,
                       dtype_info(t.dtype).name, fmt::join(t.shape, ", "), fmt::join(t.stride, ", "), spanned));
    }
    t.storage_nbytes = unsigned_integer(j, field, "storage_nbytes", UINT64_MAX);
    // The view lies within its storage: storage_offset elements, then nbytes.
    auto offset_elements = static_cast<std::uint64_t>(t.storage_offset);
    bool fits =
        offset_elements <= t.storage_nbytes / itemsize && t.nbytes <= t.storage_nbytes - offset_elements * itemsize;
    if (t.nbytes > 0 && !fits) {
      fail(field / "storage_nbytes",
           fmt::format("a storage of {} bytes cannot hold the view: {} bytes from its element {} (storage_offset)",
                       t.storage_nbytes, t.nbytes, t.storage_offset));
    }
    if (j.contains("requires_grad")) t.requires_grad = boolean(j, field, "requires_grad");
    if (j.contains("parameter")) {
      std::string name = text(j, field, "parameter");
      auto known = std::find_if(std::begin(kWrapNames), std::end(kWrapNames),
                                [&](const auto& entry) { return entry.second == name; });
      if (known == std::end(kWrapNames)) {
        fail(field / "parameter",
             fmt::format("{} is not \"nn.Parameter\" or \"nn.Parameter with state\"", quote_text(name)));
      }
      t.wrap = known->first;
    }
    if (j.contains("alias_of")) {
      t.alias_of = text(j, field, "alias_of");
      if (t.alias_of->empty()) fail(field / "alias_of", "empty (leave alias_of out when the tensor is not tied)");
    }
    return t;
  }

  // A tied tensor names the one tensor of the same file that holds its bytes.
  void check_alias(const std::vector<StoredTensor>& tensors, std::size_t i,
                   const std::unordered_map<std::string_view, std::size_t>& by_path, const Field& field) const {
    const StoredTensor& t = tensors[i];
    if (!t.alias_of) return;
    auto it = by_path.find(*t.alias_of);
    if (it == by_path.end()) fail(field / "alias_of", quote_text(*t.alias_of) + " is not a tensor of this list");
    const StoredTensor& target = tensors[it->second];
    if (target.alias_of) {
      fail(field / "alias_of", fmt::format("names tensors[{}], which is itself tied to another", it->second));
    }
    if (target.dtype != t.dtype || target.shape != t.shape || target.stride != t.stride || target.nbytes != t.nbytes) {
      fail(field / "alias_of",
           fmt::format("names tensors[{}], whose dtype, shape, stride or bytes differ", it->second));
    }
  }

  FsdpMetadata read_fsdp(const json& j, const Field& field) const {
    FsdpMetadata fsdp;
    const Field instances_field = field / "param_metadata";
    const json& instances = array(j, field, "param_metadata");
    for (std::size_t i = 0; i < instances.size(); ++i) {
      const Field instance_field = instances_field[i];
      const json& instance_json = as_object(instances[i], instance_field);
      FsdpInstanceMeta instance;
      instance.fsdp_path = text(instance_json, instance_field, "fsdp_path");
      instance.no_broadcast_optim_state = boolean(instance_json, instance_field, "no_broadcast_optim_state");
      const Field shared_field = instance_field / "shared_param_info";
      const json& shared = array(instance_json, instance_field, "shared_param_info");
      for (std::size_t k = 0; k < shared.size(); ++k) {
        std::vector<std::string> pair = as_texts(shared[k], shared_field[k]);
        if (pair.size() != 2) fail(shared_field[k], "expected a [source, destination] pair of names");
        instance.shared_param_info.emplace_back(std::move(pair[0]), std::move(pair[1]));
      }
      const Field flats_field = instance_field / "flat_params";
      const json& flats = array(instance_json, instance_field, "flat_params");
      for (std::size_t k = 0; k < flats.size(); ++k) {
        const Field flat_field = flats_field[k];
        instance.flat_params.push_back(
            read_flat_param(as_object(flats[k], flat_field), flat_field, instance.fsdp_path));
      }
      fsdp.instances.push_back(std::move(instance));
    }
    fsdp.buffer_names = texts(j, field, "buffer_names");
    return fsdp;
  }

  FlatParamMeta read_flat_param(const json& j, const Field& field, const std::string& fsdp_path) const {
    FlatParamMeta flat;
    flat.state_key = text(j, field, "state_key");
    flat.name = text(j, field, "name");
    // As the pickle reader derives it (read_fsdp_metadata): the key is a function of the path and name.
    std::string expected_key = fsdp_key(fsdp_path, flat.name);
    if (flat.state_key != expected_key) {
      fail(field / "state_key",
           fmt::format("{}, but fsdp_path and name give {}", quote_text(flat.state_key), quote_text(expected_key)));
    }
    flat.names = texts(j, field, "names");
    const Field shapes_field = field / "shapes";
    const json& shapes = array(j, field, "shapes");
    for (std::size_t i = 0; i < shapes.size(); ++i) flat.shapes.push_back(as_integers(shapes[i], shapes_field[i], 0));
    const Field numels_field = field / "numels";
    flat.numels = as_integers(member(j, numels_field), numels_field, 0);
    flat.padding = integer(j, field, "padding", 0, INT64_MAX);
    if (auto problem = flat_param_problem(flat)) {
      const Field at = problem->field.empty() ? field : field / problem->field;
      fail(problem->index ? at[*problem->index] : at, problem->message);
    }
    return flat;
  }

  // The object tree: what reads it (inspect) takes {"$tensor": i} as tensors[i],
  // and "$ref" and "$class" as strings. Recursion is bounded: the tree is nested
  // at most kMaxManifestDepth deep.
  // `highest` becomes the highest $tensor index + 1 found, which each file
  // using the tree checks against its tensor count.
  void check_objects(const json& node, const Field& field, std::uint64_t& highest, std::size_t depth) const {
    if (depth > kMaxManifestDepth) fail(field, fmt::format("nested deeper than {} levels", kMaxManifestDepth));
    if (node.is_array()) {
      for (std::size_t i = 0; i < node.size(); ++i) check_objects(node[i], field[i], highest, depth + 1);
      return;
    }
    if (!node.is_object()) return;
    if (auto tensor = node.find("$tensor"); tensor != node.end()) {
      std::uint64_t index = as_unsigned(*tensor, field / "$tensor", UINT64_MAX - 1);
      highest = std::max(highest, index + 1);
    }
    for (const char* key : {"$ref", "$class"}) {
      if (auto it = node.find(key); it != node.end()) as_text(*it, field / key);
    }
    for (auto it = node.begin(); it != node.end(); ++it) check_objects(*it, field / it.key(), highest, depth + 1);
  }

  const std::string& source_;
  ReadAhead* ahead_;
};

// The deepest nesting of arrays and objects in JSON text (strings skipped), read
// before parsing: nlohmann::ordered_json copies, compares and prints values recursively
// (only its parser and destructor are iterative), so depth must be bounded first.
bool nested_deeper_than(std::string_view text, std::size_t limit) {
  std::size_t depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return true;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return false;
}

}  // namespace

Manifest manifest_from_json(const json& j, const std::string& source) {
  json copy = j;
  return ManifestReader(source).read(copy);
}

bool looks_like_manifest(const std::string& path) {
  if (path.ends_with(".safetensors.index.json")) return false;  // a safetensors set's index
  return path.ends_with(".json") || path.ends_with(".json.zst");
}

namespace {

// nlohmann's parser builds an ordered_json object by looking each key up in
// the object before appending it: n^2, minutes for a state dict of 10^5
// tensors. This builder appends, and finds a key given twice once per object,
// by sorting. Each element of an array of tensor_lists is handed to
// `on_tensor` as soon as it is closed, and a null left in its place: a
// manifest of 200,000 tensors never holds them all as JSON at once. The path
// of each element of files is handed to `on_file` once it is closed.
class OrderedJsonBuilder : public nlohmann::json_sax<json> {
 public:
  using OnTensor = std::function<void(std::size_t list, std::size_t index, json&& tensor)>;
  struct Failure {
    std::size_t byte = 0;
    bool out_of_range = false;
    bool duplicate = false;
    std::string duplicate_key;
  };
  OrderedJsonBuilder(json& root, OnTensor on_tensor, const std::function<void(const std::string&)>& on_file)
      : root_(root), on_tensor_(std::move(on_tensor)), on_file_(on_file) {}

  bool null() override { return add(json(nullptr)); }
  bool boolean(bool value) override { return add(json(value)); }
  bool number_integer(number_integer_t value) override { return add(json(value)); }
  bool number_unsigned(number_unsigned_t value) override { return add(json(value)); }
  bool number_float(number_float_t value, const string_t&) override { return add(json(value)); }
  bool string(string_t& value) override { return add(json(std::move(value))); }
  bool binary(binary_t& value) override { return add(json::binary(std::move(value))); }
  bool start_object(std::size_t) override { return open(json::object()); }
  bool start_array(std::size_t) override { return open(json::array()); }
  bool key(string_t& key) override {
    key_ = std::move(key);
    return true;
  }
  bool end_object() override {
    const auto& items = static_cast<const json::object_t::Container&>(open_.back()->get_ref<const json::object_t&>());
    std::vector<const std::string*> keys;
    keys.reserve(items.size());
    for (const auto& item : items) keys.push_back(&item.first);
    std::sort(keys.begin(), keys.end(), [](const std::string* a, const std::string* b) { return *a < *b; });
    auto twice = std::adjacent_find(keys.begin(), keys.end(),
                                    [](const std::string* a, const std::string* b) { return *a == *b; });
    open_.pop_back();
    if (twice != keys.end()) {
      failure_.duplicate = true;
      failure_.duplicate_key = **twice;
      return false;
    }
    if (open_.size() == 2 && open_[1] == files_ && on_file_) {
      const json& file = files_->back();
      if (auto path = file.find("path"); path != file.end() && path->is_string())
        on_file_(path->get_ref<const std::string&>());
    }
    if (open_.size() == 3 && open_[1] == tensor_lists_ && open_[2]->is_array()) {
      auto& list = open_[2]->get_ref<json::array_t&>();
      auto lists = static_cast<std::size_t>(tensor_lists_->size() - 1);
      on_tensor_(lists, list.size() - 1, std::move(list.back()));
      list.back() = nullptr;
    }
    return true;
  }
  bool end_array() override {
    if (open_.back() == tensor_lists_) tensor_lists_ = nullptr;  // closed: its parent may move it now
    if (open_.back() == files_) files_ = nullptr;
    open_.pop_back();
    return true;
  }
  bool parse_error(std::size_t byte, const std::string&, const nlohmann::detail::exception& error) override {
    failure_.byte = byte;
    failure_.out_of_range = error.id == 406;
    return false;
  }
  const Failure& failure() const { return failure_; }

 private:
  // `value` into the open container (a container stays where it is while it
  // is open: its parent gets no new element before it is closed).
  json* place(json value) {
    if (open_.empty()) {
      root_ = std::move(value);
      return &root_;
    }
    json& parent = *open_.back();
    if (parent.is_array()) {
      parent.get_ref<json::array_t&>().push_back(std::move(value));
      return &parent.get_ref<json::array_t&>().back();
    }
    auto& items = static_cast<json::object_t::Container&>(parent.get_ref<json::object_t&>());
    items.emplace_back(std::move(key_), std::move(value));
    return &items.back().second;
  }
  bool add(json value) {
    place(std::move(value));
    return true;
  }
  bool open(json container) {
    bool top_array = open_.size() == 1 && open_[0]->is_object() && container.is_array();
    std::string key = top_array ? key_ : std::string();
    open_.push_back(place(std::move(container)));
    if (key == "tensor_lists") tensor_lists_ = open_.back();
    if (key == "files") files_ = open_.back();
    return true;
  }

  json& root_;
  OnTensor on_tensor_;
  const std::function<void(const std::string&)>& on_file_;
  const json* tensor_lists_ = nullptr;  // the top-level member "tensor_lists", while open
  const json* files_ = nullptr;         // the top-level member "files", while open
  std::vector<json*> open_;
  std::string key_;
  Failure failure_;
};

}  // namespace

Manifest parse_manifest(Bytes bytes, const std::string& source, bool compressed, std::uint64_t max_text_bytes,
                        const std::function<void(const std::string&)>& on_file) {
  Location where{source, "", std::nullopt};
  if (bytes.empty()) throw Error(where, "empty file: not a manifest");
  std::string decompressed;
  std::string_view text = as_chars(bytes);
  if (compressed) {
    decompressed = zstd_decompress(bytes, where, max_text_bytes, "a manifest");
    text = decompressed;
  } else if (text.size() > max_text_bytes) {
    throw Error(where, fmt::format("larger than {} MiB, the limit for a manifest", max_text_bytes >> 20));
  }
  if (nested_deeper_than(text, kMaxManifestDepth)) {
    throw Error(where, fmt::format("not a manifest: JSON nested deeper than {} levels", kMaxManifestDepth));
  }
  json j;
  ManifestReader::ReadAhead ahead;
  ManifestReader reader(source, &ahead);
  OrderedJsonBuilder builder(
      j,
      [&](std::size_t list, std::size_t index, json&& tensor) {
        if (ahead.failure) return;  // read() stops at the first failure: nothing after it is needed
        if (ahead.tensors.size() <= list) ahead.tensors.resize(list + 1);
        ahead.tensors[list].resize(index + 1);
        try {
          ahead.tensors[list][index] = reader.read_listed_tensor(tensor, list, index);
        } catch (const Error&) {
          ahead.failure = std::current_exception();
          ahead.failed_list = list;
          ahead.failed_index = index;
        }
      },
      on_file);
  if (!json::sax_parse(text.begin(), text.end(), &builder)) {
    const OrderedJsonBuilder::Failure& failure = builder.failure();
    if (failure.duplicate) {
      throw Error(where, fmt::format("not a manifest: the key '{}' twice in one JSON object",
                                     printable(failure.duplicate_key)));
    }
    if (failure.out_of_range) throw Error(where, "not valid JSON (a number out of range)");
    throw Error(where, fmt::format("not valid JSON (parse error at byte {}{})", failure.byte,
                                   compressed ? " of the decompressed text" : ""));
  }
  return reader.read(j);
}

Manifest read_manifest(const std::string& path, const std::function<void(const std::string&)>& on_file) {
  MappedFile file(path);
  return parse_manifest(file.bytes(), path, path.ends_with(".zst"), kMaxManifestBytes, on_file);
}

namespace {

// The manifest's text: compact JSON, one line per member of the top-level
// object and per element of its arrays (a file, a tensor list, an object tree),
// so that a person can page through it and a diff shows which file changed.
// The tensor lists and object trees are written one at a time, in the bytes
// the whole document's dump would give: a document of 200,000 tensors would
// hold about 1 KiB for each.
std::string manifest_text(const Manifest& manifest) {
  SharedValues shared;
  json j = manifest_document(manifest, &shared);
  auto dump = [](const json& value) { return value.dump(-1, ' ', false, json::error_handler_t::replace); };
  auto list_text = [&](const TensorList& list) {
    std::string out = "[";
    for (std::size_t i = 0; i < list.size(); ++i) {
      if (i > 0) out += ',';
      append_tensor_text(out, list[i]);
    }
    out += ']';
    return out;
  };
  std::string text = "{";
  bool first_member = true;
  for (const auto& [key, value] : j.items()) {
    text += first_member ? "\n" : ",\n";
    first_member = false;
    text += dump(json(key)) + ": ";
    std::size_t count = key == "tensor_lists"   ? shared.lists.size()
                        : key == "object_trees" ? shared.trees.size()
                                                : value.size();
    if (!value.is_array() || count == 0) {
      text += dump(value);
      continue;
    }
    text += "[";
    for (std::size_t i = 0; i < count; ++i) {
      text += i == 0 ? "\n  " : ",\n  ";
      if (key == "tensor_lists") {
        text += list_text(*shared.lists[i]);
      } else if (key == "object_trees") {
        text += dump(*shared.trees[i]);
      } else {
        text += dump(value[i]);
      }
    }
    text += "\n]";
  }
  return text + "\n}\n";
}

}  // namespace

void write_manifest(const Manifest& manifest, const std::string& path, bool overwrite) {
  std::string text = manifest_text(manifest);
  if (path.ends_with(".zst")) text = zstd_compress(text, Location{path, "", std::nullopt});
  std::vector<FileIdentity> inputs;
  for (const ManifestFile& file : manifest.files) {
    if (auto identity = identity_of(file.path)) inputs.push_back(*identity);
  }
  check_output_targets({{path, text.size()}}, inputs, overwrite, {});
  OutputFile out(path, text.size(), overwrite);
  out.write_at(0, Bytes(reinterpret_cast<const std::byte*>(text.data()), text.size()));
  out.commit();
}

}  // namespace ckpt
