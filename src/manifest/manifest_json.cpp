// Manifest <-> JSON, plain or zstd-compressed.
#include <fmt/format.h>
#include <zstd.h>

#include <fstream>
#include <sstream>

#include "ckpt/manifest.hpp"
#include "ckpt/output_file.hpp"

namespace ckpt {

using json = nlohmann::json;

namespace {

json role_value(const std::optional<int>& value) { return value ? json(*value) : json(nullptr); }

json fsdp_to_json(const FsdpMetadata& fsdp) {
  json instances = json::array();
  for (const FsdpInstanceMeta& instance : fsdp.instances) {
    json flat_params = json::array();
    for (const FlatParamMeta& flat : instance.flat_params) {
      flat_params.push_back({{"state_key", flat.state_key}, {"name", flat.name}, {"names", flat.names},
                             {"shapes", flat.shapes}, {"numels", flat.numels}, {"padding", flat.padding}});
    }
    json shared = json::array();
    for (const auto& [src, dst] : instance.shared_param_info) shared.push_back({src, dst});
    instances.push_back({{"fsdp_path", instance.fsdp_path}, {"flat_params", flat_params},
                         {"no_broadcast_optim_state", instance.no_broadcast_optim_state},
                         {"shared_param_info", shared}});
  }
  return {{"param_metadata", instances}, {"buffer_names", fsdp.buffer_names}};
}

FsdpMetadata fsdp_from_json(const json& j) {
  FsdpMetadata fsdp;
  for (const json& instance_json : j.at("param_metadata")) {
    FsdpInstanceMeta instance;
    instance.fsdp_path = instance_json.at("fsdp_path").get<std::string>();
    instance.no_broadcast_optim_state = instance_json.at("no_broadcast_optim_state").get<bool>();
    for (const json& pair : instance_json.at("shared_param_info")) {
      instance.shared_param_info.emplace_back(pair.at(0).get<std::string>(), pair.at(1).get<std::string>());
    }
    for (const json& flat_json : instance_json.at("flat_params")) {
      FlatParamMeta flat;
      flat.state_key = flat_json.at("state_key").get<std::string>();
      flat.name = flat_json.at("name").get<std::string>();
      flat.names = flat_json.at("names").get<std::vector<std::string>>();
      flat.shapes = flat_json.at("shapes").get<std::vector<std::vector<std::int64_t>>>();
      flat.numels = flat_json.at("numels").get<std::vector<std::int64_t>>();
      flat.padding = flat_json.at("padding").get<std::int64_t>();
      instance.flat_params.push_back(std::move(flat));
    }
    fsdp.instances.push_back(std::move(instance));
  }
  fsdp.buffer_names = j.at("buffer_names").get<std::vector<std::string>>();
  return fsdp;
}

bool ends_with(const std::string& text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

json manifest_to_json(const Manifest& manifest) {
  json files = json::array();
  for (const ManifestFile& file : manifest.files) {
    json tensors = json::array();
    for (const ManifestTensor& t : file.tensors) {
      tensors.push_back({{"path", t.path}, {"dtype", std::string(dtype_info(t.dtype).name)}, {"shape", t.shape},
                         {"stride", t.stride}, {"storage_key", t.storage_key}, {"storage_offset", t.storage_offset},
                         {"record_name", t.record_name}, {"record_crc32", t.record_crc32},
                         {"file_byte_offset", t.file_byte_offset}, {"nbytes", t.nbytes},
                         {"requires_grad", t.requires_grad}});
      if (!t.alias_of.empty()) tensors.back()["alias_of"] = t.alias_of;
    }
    files.push_back({{"path", file.path}, {"size_bytes", file.size_bytes}, {"mtime_ns", file.mtime_ns},
                     {"archive_name", file.archive_name}, {"mp_part", role_value(file.role.mp_part)},
                     {"dp_shard", role_value(file.role.dp_shard)}, {"pickle_protocol", file.pickle_protocol},
                     {"top_level_keys", file.top_level_keys}, {"tensors", tensors},
                     {"fsdp", file.fsdp ? fsdp_to_json(*file.fsdp) : json(nullptr)},
                     {"model_parallel_size", file.declared_parts ? json{{"parts", file.declared_parts->parts},
                                                                        {"from", file.declared_parts->from}}
                                                                  : json(nullptr)},
                     {"objects", file.objects}});
  }
  json cells = manifest.grid.cells;
  return {{"format", kManifestFormat},
          {"version", kManifestVersion},
          {"created_by", "ckpt-tool 0.1.0"},
          {"grid", {{"mp", manifest.grid.mp}, {"dp", manifest.grid.dp}, {"cells", cells},
                    {"problems", manifest.grid.problems}}},
          {"files", files}};
}

Manifest manifest_from_json(const json& j, const std::string& source) {
  Location where{source, "", std::nullopt};
  if (!j.is_object() || j.value("format", "") != kManifestFormat) throw Error(where, "not a ckpt-tool manifest");
  int version = j.value("version", 0);
  if (version != kManifestVersion) {
    throw Error(where, fmt::format("manifest version {} is not supported (this ckpt-tool reads version {})", version,
                                   kManifestVersion));
  }
  Manifest manifest;
  try {
    for (const json& file_json : j.at("files")) {
      ManifestFile file;
      file.path = file_json.at("path").get<std::string>();
      file.size_bytes = file_json.at("size_bytes").get<std::uint64_t>();
      file.mtime_ns = file_json.at("mtime_ns").get<std::int64_t>();
      file.archive_name = file_json.at("archive_name").get<std::string>();
      if (!file_json.at("mp_part").is_null()) file.role.mp_part = file_json.at("mp_part").get<int>();
      if (!file_json.at("dp_shard").is_null()) file.role.dp_shard = file_json.at("dp_shard").get<int>();
      file.pickle_protocol = file_json.value("pickle_protocol", 2);
      file.top_level_keys = file_json.at("top_level_keys").get<std::vector<std::string>>();
      for (const json& t_json : file_json.at("tensors")) {
        ManifestTensor t;
        t.path = t_json.at("path").get<std::string>();
        auto dtype = dtype_from_name(t_json.at("dtype").get<std::string>());
        if (!dtype) throw Error(where, "unknown dtype " + t_json.at("dtype").dump());
        t.dtype = *dtype;
        t.shape = t_json.at("shape").get<std::vector<std::int64_t>>();
        t.stride = t_json.at("stride").get<std::vector<std::int64_t>>();
        t.storage_key = t_json.at("storage_key").get<std::string>();
        t.storage_offset = t_json.at("storage_offset").get<std::int64_t>();
        t.record_name = t_json.at("record_name").get<std::string>();
        t.record_crc32 = t_json.at("record_crc32").get<std::uint32_t>();
        t.file_byte_offset = t_json.at("file_byte_offset").get<std::uint64_t>();
        t.nbytes = t_json.at("nbytes").get<std::uint64_t>();
        t.requires_grad = t_json.value("requires_grad", false);
        t.alias_of = t_json.value("alias_of", "");
        file.tensors.push_back(std::move(t));
      }
      if (!file_json.at("fsdp").is_null()) file.fsdp = fsdp_from_json(file_json.at("fsdp"));
      if (const json& declared = file_json.at("model_parallel_size"); !declared.is_null()) {
        file.declared_parts = DeclaredParts{declared.at("parts").get<std::int64_t>(),
                                            declared.at("from").get<std::string>()};
      }
      file.objects = file_json.value("objects", json(nullptr));
      manifest.files.push_back(std::move(file));
    }
  } catch (const json::exception& e) {
    throw Error(where, std::string("malformed manifest: ") + e.what());
  }
  manifest.grid = detect_grid(manifest.files);
  return manifest;
}

bool looks_like_manifest(const std::string& path) {
  return ends_with(path, ".json") || ends_with(path, ".json.zst");
}

Manifest read_manifest(const std::string& path) {
  MappedFile file(path);
  std::string text;
  Location where{path, "", std::nullopt};
  if (ends_with(path, ".zst")) {
    ZSTD_DCtx* context = ZSTD_createDCtx();
    ZSTD_inBuffer in{file.bytes().data(), file.bytes().size(), 0};
    std::vector<char> chunk(ZSTD_DStreamOutSize());
    std::size_t last = 0;
    while (in.pos < in.size) {
      ZSTD_outBuffer out{chunk.data(), chunk.size(), 0};
      last = ZSTD_decompressStream(context, &out, &in);
      if (ZSTD_isError(last)) {
        ZSTD_freeDCtx(context);
        throw Error(where, std::string("zstd: ") + ZSTD_getErrorName(last));
      }
      text.append(chunk.data(), out.pos);
      if (text.size() > (4ull << 30)) {
        ZSTD_freeDCtx(context);
        throw Error(where, "manifest larger than 4 GiB");
      }
    }
    ZSTD_freeDCtx(context);
    if (last != 0) throw Error(where, "zstd: truncated frame");
  } else {
    text = std::string(as_chars(file.bytes()));
  }
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) throw Error(where, "not valid JSON");
  return manifest_from_json(j, path);
}

void write_manifest(const Manifest& manifest, const std::string& path, bool overwrite) {
  std::string text = manifest_to_json(manifest).dump(1, ' ', false, json::error_handler_t::replace) + "\n";
  if (ends_with(path, ".zst")) {
    std::string compressed(ZSTD_compressBound(text.size()), '\0');
    std::size_t n = ZSTD_compress(compressed.data(), compressed.size(), text.data(), text.size(), 3);
    if (ZSTD_isError(n)) throw Error(Location{path, "", std::nullopt}, std::string("zstd: ") + ZSTD_getErrorName(n));
    compressed.resize(n);
    text = std::move(compressed);
  }
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
