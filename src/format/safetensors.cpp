#include "ckpt/format/safetensors.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <set>

#include "ckpt/io/error.hpp"

namespace ckpt {

using json = nlohmann::ordered_json;

namespace {

struct DTypeName {
  DType dtype;
  std::string_view name;
};

constexpr std::array<DTypeName, 10> kNames{{
    {DType::Float64, "F64"},
    {DType::Float32, "F32"},
    {DType::Float16, "F16"},
    {DType::BFloat16, "BF16"},
    {DType::Int64, "I64"},
    {DType::Int32, "I32"},
    {DType::Int16, "I16"},
    {DType::Int8, "I8"},
    {DType::UInt8, "U8"},
    {DType::Bool, "BOOL"},
}};

// JSON nesting a header needs: the object, a tensor's entry, its shape.
constexpr std::size_t kMaxHeaderDepth = 4;

// Checks the shape of JSON text in one pass before it is parsed (nlohmann's
// parse callback would make parsing n^2 in the number of entries): nesting
// depth, and no key twice in one object.
class ShapeCheck : public nlohmann::json_sax<nlohmann::json> {
 public:
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return open(true); }
  bool end_object() override { return close(); }
  bool start_array(std::size_t) override { return open(false); }
  bool end_array() override { return close(); }
  bool key(string_t& name) override {
    if (keys_.back().insert(name).second) return true;
    duplicate = name;
    return false;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception&) override {
    error_byte = position;
    return false;
  }

  std::string duplicate;
  std::size_t error_byte = 0;  // the reader's position when it failed: bytes read, the failing one included
  bool too_deep = false;

 private:
  bool open(bool object) {
    if (++depth_ > kMaxHeaderDepth) {
      too_deep = true;
      return false;
    }
    if (object) keys_.emplace_back();
    objects_.push_back(object);
    return true;
  }
  bool close() {
    --depth_;
    if (objects_.back()) keys_.pop_back();
    objects_.pop_back();
    return true;
  }
  std::size_t depth_ = 0;
  std::vector<bool> objects_;
  std::vector<std::set<std::string>> keys_;
};

// `bytes` as \xHH each: what a header holds where it is broken is untrusted
// bytes, shown so, never raw.
std::string escaped_bytes(std::string_view bytes) {
  std::string out;
  for (char c : bytes) out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
  return out;
}

// Where `text` stops being UTF-8 (RFC 3629: no overlong forms, no surrogates,
// nothing above U+10FFFF): the offset of the broken sequence's first byte and
// what is wrong; nullopt for valid UTF-8.
struct Utf8Break {
  std::size_t at = 0;
  std::string reason;
};
std::optional<Utf8Break> utf8_break(std::string_view text) {
  for (std::size_t i = 0; i < text.size();) {
    auto lead = static_cast<unsigned char>(text[i]);
    if (lead < 0x80) {
      ++i;
      continue;
    }
    // The sequence's length and the range of its second byte, by its first.
    std::size_t length = 0;
    unsigned char low = 0x80;
    unsigned char high = 0xbf;
    if (lead >= 0xc2 && lead <= 0xdf) {
      length = 2;
    } else if (lead >= 0xe0 && lead <= 0xef) {
      length = 3;
      if (lead == 0xe0) low = 0xa0;
      if (lead == 0xed) high = 0x9f;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
      length = 4;
      if (lead == 0xf0) low = 0x90;
      if (lead == 0xf4) high = 0x8f;
    } else {
      return Utf8Break{i, fmt::format("byte {} begins no UTF-8 sequence", escaped_bytes(text.substr(i, 1)))};
    }
    for (std::size_t k = 1; k < length; ++k) {
      if (i + k >= text.size()) {
        return Utf8Break{
            i, fmt::format("the UTF-8 sequence {} is cut short by the end of the text", escaped_bytes(text.substr(i)))};
      }
      auto next = static_cast<unsigned char>(text[i + k]);
      if (next < (k == 1 ? low : 0x80) || next > (k == 1 ? high : 0xbf)) {
        return Utf8Break{i, fmt::format("invalid UTF-8 sequence {}", escaped_bytes(text.substr(i, k + 1)))};
      }
    }
    i += length;
  }
  return std::nullopt;
}

// What the JSON reader met at byte `at` of `text`, for a person: the byte
// escaped when it is not printable ASCII.
std::string unexpected_at(std::string_view text, std::size_t at) {
  if (at >= text.size()) return "the text ends before the JSON value does";
  auto byte = static_cast<unsigned char>(text[at]);
  if (byte == 0) return "NUL byte \\x00";
  if (byte < 0x20 || byte == 0x7f) {
    return fmt::format("control byte {} (JSON allows none; in a string it is written escaped)",
                       escaped_bytes(text.substr(at, 1)));
  }
  if (byte >= 0x80) return fmt::format("unexpected byte {}", escaped_bytes(text.substr(at, 1)));
  return fmt::format("unexpected '{}'", static_cast<char>(byte));
}

// Parses bounded JSON text: UTF-8, at most kMaxHeaderDepth deep, no key twice
// in an object, nothing after the value but spaces (the padding). Objects are
// std::maps (a header of a million names parses in n log n; an
// insertion-ordered object would take n^2), so callers order what they read
// themselves. `what` names the text ("header"), whose first byte is at
// `file_offset` in `where.file`: text that is not UTF-8 JSON is one line
// naming the file offset where it breaks, never the JSON reader's own words or
// raw bytes. Throws Error(where, ...).
nlohmann::json parse_bounded(std::string_view text, std::uint64_t file_offset, const Location& where,
                             const char* what) {
  std::size_t end = text.find_last_not_of(' ');
  std::string_view value = text.substr(0, end == std::string_view::npos ? 0 : end + 1);
  auto not_json = [&](std::size_t at) {
    return Error(Location{where.file, "", std::nullopt}, fmt::format("{} is not valid UTF-8 JSON at byte {}: {}", what,
                                                                     file_offset + at, unexpected_at(value, at)));
  };
  if (std::optional<Utf8Break> broken = utf8_break(value)) {
    throw Error(Location{where.file, "", std::nullopt}, fmt::format("{} is not valid UTF-8 JSON at byte {}: {}", what,
                                                                    file_offset + broken->at, broken->reason));
  }
  // nlohmann's reader stops at a NUL byte as at the end of the text: what follows would go unread.
  if (std::size_t nul = value.find('\0'); nul != std::string_view::npos) throw not_json(nul);
  ShapeCheck check;
  if (!nlohmann::json::sax_parse(value.begin(), value.end(), &check)) {
    if (check.too_deep) {
      throw Error(where, fmt::format("the {} is nested more than {} levels deep", what, kMaxHeaderDepth));
    }
    if (!check.duplicate.empty()) throw Error(where, fmt::format("the {} names '{}' twice", what, check.duplicate));
    throw not_json(check.error_byte == 0 ? 0 : check.error_byte - 1);  // the position counts the failing byte
  }
  nlohmann::json parsed = nlohmann::json::parse(value.begin(), value.end());
  if (!parsed.is_object()) throw Error(where, fmt::format("the {} is not a JSON object", what));
  return parsed;
}

std::uint64_t unsigned_field(const nlohmann::json& value, const Location& where, const std::string& field) {
  if (!value.is_number_unsigned()) throw Error(where, field + " is not a non-negative integer");
  return value.get<std::uint64_t>();
}

SafetensorsTensor read_entry(const std::string& name, const nlohmann::json& entry, const Location& where) {
  if (!entry.is_object()) throw Error(where, "the entry is not a JSON object");
  for (const auto& item : entry.items()) {
    if (item.key() != "dtype" && item.key() != "shape" && item.key() != "data_offsets") {
      throw Error(where, fmt::format("unknown field '{}'", item.key()));
    }
  }
  SafetensorsTensor tensor;
  tensor.name = name;
  auto dtype = entry.find("dtype");
  if (dtype == entry.end() || !dtype->is_string()) throw Error(where, "no dtype string");
  auto known = dtype_from_safetensors(dtype->get<std::string>());
  if (!known) throw Error(where, fmt::format("unknown or unsupported dtype '{}'", dtype->get<std::string>()));
  tensor.dtype = *known;
  auto shape = entry.find("shape");
  if (shape == entry.end() || !shape->is_array()) throw Error(where, "no shape array");
  if (shape->size() > 64) throw Error(where, fmt::format("a shape of {} dimensions", shape->size()));
  std::uint64_t numel = 1;
  for (std::size_t i = 0; i < shape->size(); ++i) {
    std::uint64_t dim = unsigned_field((*shape)[i], where, fmt::format("shape[{}]", i));
    if (dim > static_cast<std::uint64_t>(INT64_MAX)) throw Error(where, fmt::format("shape[{}] is too large", i));
    tensor.shape.push_back(static_cast<std::int64_t>(dim));
    if (dim != 0 && numel > UINT64_MAX / dim) throw Error(where, "the shape's element count overflows 64 bits");
    numel *= dim;
  }
  auto offsets = entry.find("data_offsets");
  if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2) {
    throw Error(where, "data_offsets is not a [begin, end] pair");
  }
  tensor.begin = unsigned_field((*offsets)[0], where, "data_offsets[0]");
  tensor.end = unsigned_field((*offsets)[1], where, "data_offsets[1]");
  if (tensor.end < tensor.begin) {
    throw Error(where, fmt::format("data_offsets [{}, {}] end before they begin", tensor.begin, tensor.end));
  }
  std::uint64_t itemsize = dtype_info(tensor.dtype).itemsize;
  if (numel > UINT64_MAX / itemsize) throw Error(where, "the tensor's byte size overflows 64 bits");
  std::uint64_t nbytes = numel * itemsize;
  if (tensor.end - tensor.begin != nbytes) {
    throw Error(where, fmt::format("data_offsets [{}, {}] hold {} bytes; shape [{}] of {} needs {}", tensor.begin,
                                   tensor.end, tensor.end - tensor.begin, fmt::join(tensor.shape, ", "),
                                   dtype->get<std::string>(), nbytes));
  }
  return tensor;
}

}  // namespace

std::optional<std::string_view> safetensors_dtype_name(DType dtype) {
  for (const DTypeName& entry : kNames) {
    if (entry.dtype == dtype) return entry.name;
  }
  return std::nullopt;
}

std::optional<DType> dtype_from_safetensors(std::string_view name) {
  for (const DTypeName& entry : kNames) {
    if (entry.name == name) return entry.dtype;
  }
  return std::nullopt;
}

SafetensorsHeader read_safetensors_header(Bytes file, const std::string& path) {
  if (file.size() < 8) {
    throw Error(Location{path, "", 0},
                fmt::format("{} bytes: too short for a safetensors file (8-byte header length)", file.size()));
  }
  ByteReader reader(file, path, "header length");
  std::uint64_t header_bytes = reader.u64();
  if (header_bytes > kMaxSafetensorsHeaderBytes) {
    throw Error(Location{path, "header", 0},
                fmt::format("a header of {} bytes (at most {} are read)", header_bytes, kMaxSafetensorsHeaderBytes));
  }
  if (header_bytes > file.size() - 8) {
    throw Error(Location{path, "header", 0},
                fmt::format("a header of {} bytes, past the end of the {}-byte file", header_bytes, file.size()));
  }
  SafetensorsHeader header;
  header.data_offset = 8 + header_bytes;
  const Location where{path, "header", 8};
  std::string_view text = as_chars(file.subspan(8, header_bytes));
  if (text.empty() || text.front() != '{') throw Error(where, "the header does not start with '{'");
  nlohmann::json parsed = parse_bounded(text, 8, where, "header");
  // The specification pads with spaces only (JSON's other blanks, a NUL, are not padding).
  if (text[text.find_last_not_of(' ')] != '}') {
    throw Error(where, fmt::format("the header's JSON object is followed by byte 0x{:02x}: only spaces may pad it",
                                   static_cast<unsigned char>(text[text.find_last_not_of(' ')])));
  }
  const std::uint64_t data_bytes = file.size() - header.data_offset;
  for (const auto& item : parsed.items()) {
    if (item.key() == "__metadata__") {
      if (!item.value().is_object()) throw Error(where, "__metadata__ is not a JSON object");
      for (const auto& meta : item.value().items()) {
        if (!meta.value().is_string()) throw Error(where, fmt::format("__metadata__ '{}' is not a string", meta.key()));
      }
      for (const auto& meta : item.value().items()) header.metadata.push_back({meta.key(), meta.value()});
      continue;
    }
    SafetensorsTensor tensor = read_entry(item.key(), item.value(), Location{path, item.key(), 8});
    if (tensor.end > data_bytes) {
      throw Error(Location{path, item.key(), header.data_offset + tensor.begin},
                  fmt::format("data_offsets [{}, {}] reach past the {} data bytes of the file", tensor.begin,
                              tensor.end, data_bytes));
    }
    header.tensors.push_back(std::move(tensor));
  }
  // The tensors tile the data: in data order, each begins where the one before ends.
  std::stable_sort(header.tensors.begin(), header.tensors.end(),
                   [](const auto& a, const auto& b) { return std::pair(a.begin, a.end) < std::pair(b.begin, b.end); });
  std::uint64_t covered = 0;
  const SafetensorsTensor* previous = nullptr;
  for (const SafetensorsTensor& entry : header.tensors) {
    const SafetensorsTensor* tensor = &entry;
    Location at{path, tensor->name, header.data_offset + tensor->begin};
    if (tensor->begin < covered) {
      throw Error(at, fmt::format("data_offsets [{}, {}] overlap '{}' [{}, {}]", tensor->begin, tensor->end,
                                  previous->name, previous->begin, previous->end));
    }
    if (tensor->begin > covered) {
      throw Error(at, fmt::format("data_offsets [{}, {}] leave a gap of {} bytes after byte {} of the data",
                                  tensor->begin, tensor->end, tensor->begin - covered, covered));
    }
    covered = tensor->end;
    previous = tensor;
  }
  if (covered != data_bytes) {
    throw Error(Location{path, "", header.data_offset + covered},
                fmt::format("the tensors end at data byte {}, but the file holds {} data bytes", covered, data_bytes));
  }
  return header;
}

std::vector<std::byte> render_safetensors_header(const std::vector<SafetensorsTensor>& tensors, const json& metadata) {
  // Written entry by entry: an insertion-ordered JSON object would look every
  // name up again (n^2 for a state dict of 10^5 keys).
  std::string text = "{";
  auto append = [&](const std::string& name, const json& value) {
    if (text.size() > 1) text += ',';
    text += json(name).dump(-1, ' ', false, json::error_handler_t::strict);
    text += ':';
    text += value.dump(-1, ' ', false, json::error_handler_t::strict);
  };
  if (!metadata.empty()) append("__metadata__", metadata);
  std::set<std::string_view> names;
  std::uint64_t at = 0;
  for (const SafetensorsTensor& tensor : tensors) {
    check_invariant(tensor.begin == at && tensor.end >= tensor.begin, "safetensors tensors not back to back");
    check_invariant(tensor.name != "__metadata__" && names.insert(tensor.name).second, "a safetensors name twice");
    auto dtype = safetensors_dtype_name(tensor.dtype);
    check_invariant(dtype.has_value(), "a dtype safetensors cannot hold");
    append(tensor.name, {{"dtype", *dtype}, {"shape", tensor.shape}, {"data_offsets", {tensor.begin, tensor.end}}});
    at = tensor.end;
  }
  text += '}';
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<std::byte> out(8 + text.size());
  std::uint64_t length = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((length >> (8 * i)) & 0xFF);
  std::transform(text.begin(), text.end(), out.begin() + 8, [](char c) { return static_cast<std::byte>(c); });
  return out;
}

SafetensorsIndex parse_safetensors_index(std::string_view text, const std::string& path) {
  const Location where{path, "", std::nullopt};
  if (text.size() > kMaxSafetensorsIndexBytes) {
    throw Error(where, fmt::format("an index of {} bytes (at most {})", text.size(), kMaxSafetensorsIndexBytes));
  }
  nlohmann::json parsed = parse_bounded(text, 0, where, "index");
  SafetensorsIndex index;
  auto map = parsed.find("weight_map");
  if (map == parsed.end() || !map->is_object()) throw Error(where, "no weight_map object");
  std::set<std::string> files;
  for (const auto& item : map->items()) {
    if (!item.value().is_string()) throw Error(where, fmt::format("weight_map '{}' is not a file name", item.key()));
    std::string file = item.value().get<std::string>();
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
        file.find('\0') != std::string::npos) {
      throw Error(where,
                  fmt::format("weight_map '{}' names '{}', not a file in the index's directory", item.key(), file));
    }
    if (files.insert(file).second) index.files.push_back(file);
    index.weight_map.emplace_back(item.key(), file);
  }
  if (auto metadata = parsed.find("metadata"); metadata != parsed.end() && metadata->is_object()) {
    if (auto total = metadata->find("total_size"); total != metadata->end()) {
      index.total_size = unsigned_field(*total, where, "metadata.total_size");
    }
  }
  return index;
}

std::string render_safetensors_index(const SafetensorsIndex& index) {
  // Written by hand, for the reason render_safetensors_header is.
  std::string text = fmt::format("{{\n  \"metadata\": {{\n    \"total_size\": {}\n  }},\n  \"weight_map\": {{",
                                 index.total_size.value_or(0));
  for (std::size_t i = 0; i < index.weight_map.size(); ++i) {
    const auto& [name, file] = index.weight_map[i];
    text += fmt::format("{}\n    {}: {}", i == 0 ? "" : ",", json(name).dump(), json(file).dump());
  }
  return text + (index.weight_map.empty() ? "}\n}\n" : "\n  }\n}\n");
}

std::string safetensors_shard_name(std::string_view stem, std::size_t shard, std::size_t shards) {
  return fmt::format("{}-{:05d}-of-{:05d}.safetensors", stem, shard, shards);
}

std::optional<std::string_view> safetensors_shard_stem(std::string_view file_name) {
  constexpr std::string_view kTail = "-00000-of-00000.safetensors";  // the shape of the suffix
  if (file_name.size() < kTail.size()) return std::nullopt;
  std::string_view tail = file_name.substr(file_name.size() - kTail.size());
  for (std::size_t i = 0; i < kTail.size(); ++i) {
    bool digit = kTail[i] == '0';
    if (digit ? (tail[i] < '0' || tail[i] > '9') : tail[i] != kTail[i]) return std::nullopt;
  }
  return file_name.substr(0, file_name.size() - kTail.size());
}

}  // namespace ckpt
