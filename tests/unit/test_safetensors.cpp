// Unit tests for the safetensors format (src/format/safetensors.cpp), the
// Hugging Face OPT name table (src/layout/hf_opt.cpp) and the safetensors
// planner (src/plan/export.cpp).
//
// Headers are rendered in memory, checked byte by byte, read back, then broken
// one rule at a time: one case per failure kind, each asserting the message and
// the byte offset the error names.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "ckpt/format/safetensors.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/layout/hf_opt.hpp"
#include "ckpt/plan/export.hpp"
#include "error_kind.hpp"

namespace {

using ckpt::DType;
using ckpt::SafetensorsTensor;
using Buffer = std::vector<std::byte>;

Buffer file_of(std::string_view header_text, std::uint64_t data_bytes) {
  Buffer out(8 + header_text.size() + data_bytes, std::byte{0x5A});
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((header_text.size() >> (8 * i)) & 0xFF);
  std::memcpy(out.data() + 8, header_text.data(), header_text.size());
  return out;
}

// The Error that reading `file` throws, as what() renders it; "" when it reads.
std::string read_error(const Buffer& file) {
  try {
    (void)ckpt::read_safetensors_header(file, "t.safetensors");
  } catch (const ckpt::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST_CASE("safetensors header: rendered as the specification lays it out, and read back") {
  std::vector<SafetensorsTensor> tensors = {
      {"a", DType::Float32, {2, 3}, 0, 24},
      {"b.weight", DType::BFloat16, {5}, 24, 34},
      {"empty", DType::Int64, {0, 4}, 34, 34},
  };
  Buffer header = ckpt::render_safetensors_header(tensors, {{"format", "pt"}});
  REQUIRE(header.size() % 8 == 0);  // 8 + N, padded
  std::uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= static_cast<std::uint64_t>(header[i]) << (8 * i);
  CHECK(length == header.size() - 8);
  std::string text(reinterpret_cast<const char*>(header.data() + 8), length);
  CHECK(text.starts_with(R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})"));
  CHECK(text.find_last_not_of(' ') + 1 + (8 - (8 + text.find_last_not_of(' ') + 1) % 8) % 8 == text.size());

  Buffer file = header;
  file.resize(header.size() + 34);
  ckpt::SafetensorsHeader read = ckpt::read_safetensors_header(file, "t.safetensors");
  CHECK(read.data_offset == header.size());
  REQUIRE(read.tensors.size() == 3);
  CHECK(read.tensors[1].name == "b.weight");
  CHECK(read.tensors[1].dtype == DType::BFloat16);
  CHECK(read.tensors[1].shape == std::vector<std::int64_t>{5});
  CHECK(read.tensors[2].begin == 34);
  CHECK(read.metadata.at("format") == "pt");
}

TEST_CASE("safetensors header: every broken rule is one error naming the file, the tensor and the offset") {
  struct Case {
    const char* what;
    std::string header;
    std::uint64_t data_bytes;
    const char* message;
  };
  const std::string good_entry = R"("t":{"dtype":"F16","shape":[2],"data_offsets":[0,4]})";
  std::vector<Case> cases = {
      {"not JSON", "{\"t\":", 4, "header is not valid UTF-8 JSON at byte 13: the text ends before"},
      {"not an object", "[1]     ", 0, "does not start with '{'"},
      {"unknown dtype", R"({"t":{"dtype":"X9","shape":[2],"data_offsets":[0,4]}})", 4,
       "unknown or unsupported dtype 'X9'"},
      {"shape against offsets", R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4,
       "shape [2] of F32 needs 8"},
      {"offsets past the end", R"({"t":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", 4, "reach past the 4 data"},
      {"overlap",
       R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
       4, "overlap 'a'"},
      {"gap",
       R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[3,4]}})",
       4, "leave a gap of 1 bytes"},
      {"bytes after the last tensor", "{" + good_entry + "}", 6, "the tensors end at data byte 4"},
      {"a name twice", "{" + good_entry + "," + good_entry + "}", 4, "names 't' twice"},
      {"end before begin", R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[3,2]}})", 4, "end before they begin"},
      {"negative dimension", R"({"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})", 0, "not a non-negative"},
      {"numel overflow", R"({"t":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0,
       "overflows 64 bits"},
      {"an unknown field", R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":1}})", 0, "unknown field 'x'"},
      {"metadata not strings", R"({"__metadata__":{"n":1}})", 0, "'n' is not a string"},
      {"NUL padding", "{" + good_entry + "}" + std::string(3, '\0'), 4, "NUL byte \\x00"},
      {"a newline as padding", "{" + good_entry + "}\n   ", 4, "followed by byte 0x0a: only spaces may pad it"},
      {"nested too deep", R"({"t":{"dtype":"U8","shape":[[[[0]]]],"data_offsets":[0,0]}})", 0, "nested more than"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    std::string error = read_error(file_of(c.header, c.data_bytes));
    CHECK(contains(error, "t.safetensors"));
    CHECK(contains(error, c.message));
  }
  // The length itself.
  Buffer short_file(5);
  CHECK_THROWS_KIND(ckpt::read_safetensors_header(short_file, "t.safetensors"), ckpt::ErrorKind::BadInput);
  Buffer past_end = file_of("{}", 0);
  past_end[0] = std::byte{200};
  CHECK(contains(read_error(past_end), "past the end of the 10-byte file"));
  Buffer huge = file_of("{}", 0);
  huge[7] = std::byte{1};
  CHECK(contains(read_error(huge), "at most 100000000 are read"));
  // The offset of the tensor's data is named.
  std::string gap = read_error(file_of(
      R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[3,4]}})",
      4));
  CHECK(contains(gap, "t.safetensors: b: at byte 0x74: "));
}

TEST_CASE("safetensors header: text that is not UTF-8 JSON is one line naming the file offset, bytes escaped") {
  struct Case {
    const char* what;
    std::string header;
    std::string message;  // the whole line, as what() renders it
  };
  const std::string entry = R"(:{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})";
  // The header's text starts at file byte 8: '{' is byte 8, '"' 9, 'a' 10.
  std::vector<Case> cases = {
      {"invalid UTF-8 inside a string", "{\"a\xe2\x82\"" + entry,
       "t.safetensors: header is not valid UTF-8 JSON at byte 11: invalid UTF-8 sequence \\xe2\\x82\\x22"},
      {"a lone 0xFF", "{\"\xff\"" + entry,
       "t.safetensors: header is not valid UTF-8 JSON at byte 10: byte \\xff begins no UTF-8 sequence"},
      {"a truncated multibyte sequence", "{\"a\":\"\xf0\x9f\x98",
       "t.safetensors: header is not valid UTF-8 JSON at byte 14: the UTF-8 sequence \\xf0\\x9f\\x98 is cut short by "
       "the end of the text"},
      {"a control byte in a key", "{\"a\x1b[2J\"" + entry,
       "t.safetensors: header is not valid UTF-8 JSON at byte 11: control byte \\x1b (JSON allows none; in a string it "
       "is written escaped)"},
      {"an overlong encoding", "{\"\xc0\xaf\"" + entry,
       "t.safetensors: header is not valid UTF-8 JSON at byte 10: byte \\xc0 begins no UTF-8 sequence"},
      {"a UTF-16 surrogate", "{\"\xed\xa0\x80\"" + entry,
       "t.safetensors: header is not valid UTF-8 JSON at byte 10: invalid UTF-8 sequence \\xed\\xa0"},
      {"a byte after the object", "{}x", "t.safetensors: header is not valid UTF-8 JSON at byte 10: unexpected 'x'"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    std::string error = read_error(file_of(c.header, 0));
    CHECK(error == c.message);
    for (char ch : error) CHECK(static_cast<unsigned char>(ch) >= 0x20);  // one line, nothing raw
    for (char ch : error) CHECK(static_cast<unsigned char>(ch) < 0x80);
  }
  // Valid UTF-8 beyond ASCII reads.
  CHECK(read_error(file_of("{\"\xc3\xa9\xe5\x90\x8d\xf0\x9f\x98\x80\"" + entry, 0)) == "");
  // The index says the same of its own text (offsets from its first byte).
  try {
    (void)ckpt::parse_safetensors_index("{\"weight_map\": {\"\xff\": \"a.safetensors\"}}", "i.json");
    FAIL("accepted");
  } catch (const ckpt::Error& e) {
    CHECK(std::string(e.what()) ==
          "i.json: index is not valid UTF-8 JSON at byte 17: byte \\xff begins no UTF-8 sequence");
  }
}

TEST_CASE("safetensors index: files beside it only, in the order the map first names them") {
  auto index = ckpt::parse_safetensors_index(
      R"({"metadata":{"total_size":12},"weight_map":{"a":"m-2.safetensors","b":"m-1.safetensors","c":"m-2.safetensors"}})",
      "i.json");
  CHECK(index.files == std::vector<std::string>{"m-2.safetensors", "m-1.safetensors"});
  CHECK(index.total_size == 12u);
  for (const char* bad : {"../x.safetensors", "d/x.safetensors", "", ".."}) {
    CAPTURE(bad);
    std::string text = std::string(R"({"weight_map":{"a":")") + bad + "\"}}";
    CHECK_THROWS_KIND(ckpt::parse_safetensors_index(text, "i.json"), ckpt::ErrorKind::BadInput);
  }
  CHECK_THROWS_KIND(ckpt::parse_safetensors_index("{}", "i.json"), ckpt::ErrorKind::BadInput);
  CHECK(ckpt::safetensors_shard_name("model", 2, 17) == "model-00002-of-00017.safetensors");
  CHECK(ckpt::safetensors_shard_stem("model-00002-of-00017.safetensors") == "model");
  CHECK(ckpt::safetensors_shard_stem("a+b(1)-00001-of-00002.safetensors") == "a+b(1)");
  for (const char* other : {"model.safetensors", "model-0001-of-00017.safetensors", "model-00002-of-0001x.safetensors",
                            "model-00002_of-00017.safetensors", "model-00002-of-00017.safetensor"}) {
    CAPTURE(other);
    CHECK_FALSE(ckpt::safetensors_shard_stem(other).has_value());
  }
}

TEST_CASE("hf_opt_rule: transformers' converter's table") {
  using Action = ckpt::HfOptRule::Action;
  struct Row {
    const char* key;
    Action action;
    const char* name;
  };
  for (const Row& row : std::vector<Row>{
           {"decoder.version", Action::Drop, ""},
           {"decoder.output_projection.weight", Action::Drop, ""},
           {"decoder.layer_norm.weight", Action::Rename, "model.decoder.final_layer_norm.weight"},
           {"decoder.layer_norm.bias", Action::Rename, "model.decoder.final_layer_norm.bias"},
           {"decoder.project_in_dim.weight", Action::Rename, "model.decoder.project_in.weight"},
           {"decoder.project_out_dim.weight", Action::Rename, "model.decoder.project_out.weight"},
           {"decoder.embed_tokens.weight", Action::Rename, "model.decoder.embed_tokens.weight"},
           {"decoder.embed_positions.weight", Action::Rename, "model.decoder.embed_positions.weight"},
           {"decoder.layers.11.final_layer_norm.bias", Action::Rename, "model.decoder.layers.11.final_layer_norm.bias"},
           {"decoder.layers.0.self_attn.q_proj.weight", Action::Rename,
            "model.decoder.layers.0.self_attn.q_proj.weight"},
           {"decoder.layers.3.fc2.weight", Action::Rename, "model.decoder.layers.3.fc2.weight"},
           {"decoder.layers.7.self_attn.qkv_proj.bias", Action::SplitQkv, "model.decoder.layers.7.self_attn.{}.bias"},
       }) {
    CAPTURE(row.key);
    ckpt::HfOptRule rule = ckpt::hf_opt_rule(row.key);
    CHECK(rule.action == row.action);
    CHECK(rule.name == row.name);
  }
  for (const char* key : {"decoder.embed_positions._float_tensor", "encoder.layers.0.fc1.weight",
                          "decoder.layers.0.self_attn.qkv_proj.weight.extra", "decoder.layers.x.fc1.weight"}) {
    CAPTURE(key);
    CHECK_THROWS_KIND(ckpt::hf_opt_rule(key), ckpt::ErrorKind::BadInput);
  }
}

ckpt::NamedTensor zeros(const char* name, DType dtype, std::vector<std::int64_t> shape) {
  return {name, dtype, ckpt::zeros_source(dtype, shape), std::nullopt};
}

TEST_CASE("to_hf_opt: fused qkv split k, v, q; a tied output projection dropped, an untied one is lm_head") {
  std::vector<ckpt::NamedTensor> model = {
      zeros("decoder.embed_tokens.weight", DType::Float16, {10, 4}),
      zeros("decoder.layers.0.self_attn.qkv_proj.weight", DType::Float16, {12, 4}),
      {"decoder.output_projection.weight", DType::Float16, {}, "decoder.embed_tokens.weight"},
  };
  ckpt::HfOptModel tied = ckpt::to_hf_opt(model);
  REQUIRE(tied.tensors.size() == 4);
  CHECK(tied.tied_embeddings);
  CHECK(tied.tensors[1].name == "model.decoder.layers.0.self_attn.k_proj.weight");
  CHECK(tied.tensors[2].name == "model.decoder.layers.0.self_attn.v_proj.weight");
  CHECK(tied.tensors[3].name == "model.decoder.layers.0.self_attn.q_proj.weight");
  CHECK(tied.tensors[3].source.shape == std::vector<std::int64_t>{4, 4});
  model[2] = zeros("decoder.output_projection.weight", DType::Float16, {10, 4});
  ckpt::HfOptModel untied = ckpt::to_hf_opt(model);
  CHECK_FALSE(untied.tied_embeddings);
  CHECK(untied.tensors.back().name == "lm_head.weight");
}

TEST_CASE("plan_safetensors: shards filled in order, largest elements first in each file, back to back") {
  std::vector<ckpt::NamedTensor> tensors = {
      zeros("h", DType::Float16, {3}),    // 6 B
      zeros("f", DType::Float32, {1}),    // 4 B
      zeros("big", DType::Float64, {4}),  // 32 B: a file of its own
      zeros("b", DType::Bool, {1}),       // 1 B
      zeros("l", DType::Int64, {1}),      // 8 B
      {"tie", DType::Float16, {}, "h"},   // written once, as h
  };
  ckpt::Plan plan;
  auto files = ckpt::plan_safetensors(tensors, {"out/model.safetensors", 16}, {}, plan);
  REQUIRE(plan.files.size() == 4);  // 3 shards and the index
  CHECK(plan.files[0].path == "out/model-00001-of-00003.safetensors");
  CHECK(plan.files[3].path == "out/model.safetensors.index.json");
  REQUIRE(files.size() == 4);
  // h (6) + f (4) fit in 16; big starts a file; b + l in the third, l first (8-byte elements).
  CHECK(files[0].size() == 2);
  CHECK(files[0][0].name == "f");
  CHECK(files[0][1].name == "h");
  CHECK(files[1][0].name == "big");
  CHECK(files[2][0].name == "l");
  CHECK(files[2][1].name == "b");
  for (std::size_t k = 0; k < 3; ++k) {
    const ckpt::PlannedFile& file = plan.files[k];
    CHECK(file.container == ckpt::Container::Concatenated);
    ckpt::ZipLayout layout = ckpt::layout_file(file);
    CHECK(layout.records[0].data_offset == 0);
    CHECK(layout.records[1].data_offset % 8 == 0);  // the data starts at a multiple of 8
    for (std::size_t r = 1; r < layout.records.size(); ++r) {
      CHECK(layout.records[r].data_offset == layout.records[r - 1].data_offset + layout.records[r - 1].nbytes);
    }
    // The header read back tiles the file's data.
    Buffer bytes(layout.file_size);
    std::memcpy(bytes.data(), file.records[0].inline_bytes.data(), file.records[0].nbytes);
    ckpt::SafetensorsHeader header = ckpt::read_safetensors_header(bytes, file.path);
    CHECK(header.tensors.size() == file.records.size() - 1);
  }
  std::string index(reinterpret_cast<const char*>(plan.files[3].records[0].inline_bytes.data()),
                    plan.files[3].records[0].nbytes);
  CHECK(contains(index, R"("total_size": 51)"));
  CHECK(contains(index, R"("big": "model-00002-of-00003.safetensors")"));
  CHECK_FALSE(contains(index, "tie"));

  ckpt::Plan one;
  CHECK(ckpt::plan_safetensors(tensors, {"m.safetensors", 0}, {}, one).size() == 1);
  CHECK(one.files.size() == 1);
  tensors.push_back(zeros("c", DType::Complex64, {1}));
  CHECK_THROWS_WITH_AS(ckpt::plan_safetensors(tensors, {"m.safetensors", 0}, {}, one),
                       doctest::Contains("complex64 has no safetensors dtype"), ckpt::Error);
}

}  // namespace
