// Unit tests for Megatron model parallelism as pure data (src/layout/megatron.cpp):
// the rule table, gluing parts into one state dict (glue_megatron) and
// re-cutting them into any number of parts (reshard_megatron). Pieces are
// checked exactly where they are short; bytes are checked by planning each
// output tensor (plan_tensor_record), running the copies in the simulator of
// layout_fixtures.hpp and comparing with int32 matrices computed by plain loops.
#include <doctest/doctest.h>

#include <functional>

#include "layout_fixtures.hpp"

namespace {

using namespace layout_fixtures;
using ckpt::QkvForm;

std::string describe_pieces(const std::vector<Piece>& pieces) {
  return describe(source(DType::UInt8, {}, pieces));
}

// The int32 values of a planned tensor, files being manifest files 0, 1, ...
std::vector<std::int32_t> int32_values(const NamedTensor& tensor, const std::vector<Buffer>& files) {
  PlannedRecord record = ckpt::plan_tensor_record((tensor), identity_sources(files.size()));
  CHECK(tiling_problem(record) == "");
  return values_of<std::int32_t>(execute(record, pointers(files)));
}

// ---------------------------------------------------------------- a model to re-cut
//
// A one-layer metaseq model whose full tensors are int32 matrices: element
// (r, c) of full tensor t is 100000 (t + 1) + 100 r + c. Sharded tensors are cut
// into parts by the FORMATS.md rules (qkv per part [k_m; v_m; q_m], dim 0, dim
// 1); replicated ones hold their value plus 7m in part m, so that taking part 0
// shows; `version` is 3 + m.
struct Dims {
  int R;  // k, v, q rows (heads x head size)
  int C;  // model dimension
  int F;  // ffn dimension
  int V;  // vocabulary
};

enum class Kind { Dim0, Dim1, Qkv, Replicated, Copied, Placeholder, Alias };
struct Key {
  const char* name;
  Kind kind;
  int tensor;  // first full tensor (Qkv: k, then v = +1, q = +2)
};
const Key kKeys[] = {
    {"decoder.embed_tokens.weight", Kind::Dim0, 0},
    {"decoder.layers.0.self_attn.qkv_proj.weight", Kind::Qkv, 1},
    {"decoder.layers.0.self_attn.qkv_proj.bias", Kind::Qkv, 4},
    {"decoder.layers.0.self_attn.out_proj.weight", Kind::Dim1, 7},
    {"decoder.layers.0.fc1.weight", Kind::Dim0, 8},
    {"decoder.layers.0.fc1.bias", Kind::Dim0, 9},
    {"decoder.layers.0.fc2.weight", Kind::Dim1, 10},
    {"decoder.layers.0.fc2.bias", Kind::Replicated, 11},
    {"decoder.layers.0.self_attn_layer_norm.weight", Kind::Replicated, 12},
    {"decoder.embed_positions._float_tensor", Kind::Placeholder, -1},
    {"decoder.version", Kind::Copied, 13},
    {"decoder.output_projection.weight", Kind::Alias, -1},
};

std::int32_t value(int tensor, int r, int c) {
  return 100000 * (tensor + 1) + 100 * r + c;
}

// Full shape of tensor t as rows x columns (vectors have one column).
std::pair<int, int> full_shape(int tensor, const Dims& d) {
  switch (tensor) {
    case 0: return {d.V, d.C};
    case 1:
    case 2:
    case 3: return {d.R, d.C};
    case 4:
    case 5:
    case 6: return {d.R, 1};
    case 7: return {d.C, d.R};
    case 8: return {d.F, d.C};
    case 9: return {d.F, 1};
    case 10: return {d.C, d.F};
    default: return {d.C, 1};  // 11, 12
  }
}

// Rows [r0, r1) of full tensor t, all columns.
std::vector<std::int32_t> rows_of(int tensor, const Dims& d, int r0, int r1) {
  std::vector<std::int32_t> out;
  int cols = full_shape(tensor, d).second;
  for (int r = r0; r < r1; ++r) {
    for (int c = 0; c < cols; ++c) out.push_back(value(tensor, r, c));
  }
  return out;
}
// Columns [c0, c1) of every row of full tensor t.
std::vector<std::int32_t> columns_of(int tensor, const Dims& d, int c0, int c1) {
  std::vector<std::int32_t> out;
  int rows = full_shape(tensor, d).first;
  for (int r = 0; r < rows; ++r) {
    for (int c = c0; c < c1; ++c) out.push_back(value(tensor, r, c));
  }
  return out;
}
std::vector<std::int32_t> joined(const std::vector<std::vector<std::int32_t>>& parts) {
  std::vector<std::int32_t> out;
  for (const auto& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

// Part m of `parts`: the shape and the int32 values of a key (not for
// Placeholder and Alias).
struct PartTensor {
  Shape shape;
  std::vector<std::int32_t> values;
};
PartTensor part_tensor(const Key& key, const Dims& d, int m, int parts) {
  auto [rows, cols] = key.tensor >= 0 ? full_shape(key.tensor, d) : std::pair<int, int>{1, 1};
  bool vector = key.tensor == 4 || key.tensor == 9 || key.tensor >= 11;
  switch (key.kind) {
    case Kind::Dim0: {
      int n = rows / parts;
      PartTensor out{vector ? Shape{n} : Shape{n, cols}, rows_of(key.tensor, d, m * n, (m + 1) * n)};
      return out;
    }
    case Kind::Dim1: {
      int n = cols / parts;
      return {Shape{rows, n}, columns_of(key.tensor, d, m * n, (m + 1) * n)};
    }
    case Kind::Qkv: {
      int n = rows / parts;
      std::vector<std::int32_t> values;
      for (int t = 0; t < 3; ++t) {
        std::vector<std::int32_t> third = rows_of(key.tensor + t, d, m * n, (m + 1) * n);
        values.insert(values.end(), third.begin(), third.end());
      }
      return {vector ? Shape{3 * n} : Shape{3 * n, cols}, values};
    }
    case Kind::Replicated: {
      std::vector<std::int32_t> values = rows_of(key.tensor, d, 0, rows);
      for (std::int32_t& v : values) v += 7 * m;
      return {Shape{rows}, values};
    }
    case Kind::Copied: return {Shape{1}, {3 + m}};
    default: FAIL("no values for this key"); throw 0;
  }
}

// The input parts: part m's tensors in file m (int32; the placeholder float16),
// each tensor of more than one element stored as two runs with a gap
// between them, cut at an element inside a row. Part 1 lists its keys rotated
// by 3 (part 0's order must win).
struct MpInput {
  std::vector<Buffer> files;
  std::vector<std::vector<NamedTensor>> parts;

  MpInput(const Dims& d, int count) {
    for (int m = 0; m < count; ++m) {
      auto file = static_cast<std::uint32_t>(m);
      Buffer bytes = patterned(16384, static_cast<unsigned>(m + 1));
      std::vector<NamedTensor> part;
      std::uint64_t at = 64;
      for (const Key& key : kKeys) {
        if (key.kind == Kind::Alias) {
          part.push_back(alias(key.name, "decoder.embed_tokens.weight"));
          continue;
        }
        if (key.kind == Kind::Placeholder) {
          part.push_back(named(key.name, {1}, file, at, DType::Float16));
          at += 64;
          continue;
        }
        PartTensor tensor = part_tensor(key, d, m, count);
        std::uint64_t n = tensor.values.size();
        std::uint64_t split = n > 1 ? n * 2 / 5 + 1 : n;
        std::vector<std::int32_t> head(tensor.values.begin(),
                                       tensor.values.begin() + static_cast<std::ptrdiff_t>(split));
        std::vector<std::int32_t> tail(tensor.values.begin() + static_cast<std::ptrdiff_t>(split), tensor.values.end());
        put(bytes, at, head);
        std::uint64_t tail_at = at + 4 * split + 12;
        if (!tail.empty()) put(bytes, tail_at, tail);
        std::vector<Run> runs{{file, at, 4 * split}};
        if (!tail.empty()) runs.push_back({file, tail_at, 4 * tail.size()});
        NamedTensor named_tensor;
        named_tensor.name = key.name;
        named_tensor.source = runs_source(DType::Int32, tensor.shape, runs);
        part.push_back(named_tensor);
        at = tail_at + 4 * tail.size() + 64;
        REQUIRE(at < bytes.size());
      }
      if (m == 1) std::rotate(part.begin(), part.begin() + 3, part.end());
      files.push_back(std::move(bytes));
      parts.push_back(std::move(part));
    }
  }
};

}  // namespace

TEST_SUITE("megatron") {
  // ================================================================ megatron_rule

  TEST_CASE("megatron_rule: the metaseq rule table") {
    using ckpt::MpRule;
    struct Case {
      const char* key;
      MpRule rule;
    };
    const Case cases[] = {
        {"decoder.layers.0.self_attn.qkv_proj.weight", MpRule::FusedQkv},
        {"decoder.layers.0.self_attn.qkv_proj.bias", MpRule::FusedQkv},
        {"decoder.layers.11.self_attn.qkv_proj.weight", MpRule::FusedQkv},
        {"decoder.layers.0.fc1.weight", MpRule::ConcatDim0},
        {"decoder.layers.0.fc1.bias", MpRule::ConcatDim0},
        {"decoder.layers.0.self_attn.k_proj.weight", MpRule::ConcatDim0},
        {"decoder.layers.0.self_attn.k_proj.bias", MpRule::ConcatDim0},
        {"decoder.layers.0.self_attn.q_proj.weight", MpRule::ConcatDim0},
        {"decoder.layers.0.self_attn.q_proj.bias", MpRule::ConcatDim0},
        {"decoder.layers.0.self_attn.v_proj.weight", MpRule::ConcatDim0},
        {"decoder.layers.0.self_attn.v_proj.bias", MpRule::ConcatDim0},
        {"decoder.embed_tokens.weight", MpRule::ConcatDim0},
        {"decoder.layers.0.ffn_layernorm.weight", MpRule::ConcatDim0},
        {"decoder.layers.0.ffn_layernorm.bias", MpRule::ConcatDim0},
        {"decoder.layers.0.fc2.weight", MpRule::ConcatDim1},
        {"decoder.layers.0.self_attn.out_proj.weight", MpRule::ConcatDim1},
        {"decoder.layers.0.fc2.bias", MpRule::Replicated},
        {"decoder.layers.0.self_attn.out_proj.bias", MpRule::Replicated},
        {"decoder.layers.0.self_attn_layer_norm.weight", MpRule::Replicated},
        {"decoder.layers.0.self_attn_layer_norm.bias", MpRule::Replicated},
        {"decoder.layers.0.final_layer_norm.weight", MpRule::Replicated},
        {"decoder.layers.0.final_layer_norm.bias", MpRule::Replicated},
        {"decoder.layer_norm.weight", MpRule::Replicated},
        {"decoder.layer_norm.bias", MpRule::Replicated},
        {"decoder.embed_positions.weight", MpRule::Replicated},
        {"decoder.output_projection.weight", MpRule::ConcatDim0},  // vocab-parallel, like embed_tokens
        {"decoder.version", MpRule::Copied},
        {"decoder.embed_positions._float_tensor", MpRule::Placeholder},
    };
    for (const Case& c : cases) {
      std::string key = c.key;
      CAPTURE(key);
      CHECK(static_cast<int>(ckpt::megatron_rule(c.key)) == static_cast<int>(c.rule));
    }
  }

  // ================================================================ glue_megatron

  TEST_CASE("glue_megatron: qkv split into k, v, q with every part's third, in part order") {
    for (std::uint32_t mp : {2u, 3u}) {
      CAPTURE(mp);
      std::vector<std::vector<NamedTensor>> parts;
      for (std::uint32_t m = 0; m < mp; ++m) {
        std::uint64_t base = 1000 * (m + 1);
        // Weight [6, 4] float32: thirds of 2 rows = 32 bytes; bias [6]: thirds of 8 bytes.
        parts.push_back({named("decoder.layers.0.self_attn.qkv_proj.weight", {6, 4}, m, base),
                         named("decoder.layers.0.self_attn.qkv_proj.bias", {6}, m, base + 500)});
      }
      // Third t of every part in part order, the first at logical offset `at`.
      auto third_pieces = [&](int t, std::uint64_t extra, std::uint64_t third, std::uint64_t at) {
        std::vector<Piece> out;
        for (std::uint32_t m = 0; m < mp; ++m) {
          out.push_back(plain(m, 1000 * (m + 1) + extra + static_cast<std::uint64_t>(t) * third, at, third));
          at += third;
        }
        return out;
      };
      std::vector<std::string> replicated;
      {  // separate k_proj, v_proj, q_proj, in a module's order
        std::vector<NamedTensor> out = ckpt::glue_megatron(parts, {}, &replicated);
        CHECK(names_of(out) == std::vector<std::string>{
                                   "decoder.layers.0.self_attn.k_proj.weight",
                                   "decoder.layers.0.self_attn.k_proj.bias",
                                   "decoder.layers.0.self_attn.v_proj.weight",
                                   "decoder.layers.0.self_attn.v_proj.bias",
                                   "decoder.layers.0.self_attn.q_proj.weight",
                                   "decoder.layers.0.self_attn.q_proj.bias",
                               });
        for (int t = 0; t < 3; ++t) {
          CAPTURE(t);
          const NamedTensor& weight = out[static_cast<std::size_t>(2 * t)];
          CHECK(shape_of(weight.source.shape) == shape_of({2 * static_cast<std::int64_t>(mp), 4}));
          CHECK(weight.source.dtype == DType::Float32);
          CHECK_FALSE(weight.alias_of.has_value());
          CHECK(describe(weight.source) == describe_pieces(third_pieces(t, 0, 32, 0)));
          const NamedTensor& bias = out[static_cast<std::size_t>(2 * t + 1)];
          CHECK(shape_of(bias.source.shape) == shape_of({2 * static_cast<std::int64_t>(mp)}));
          CHECK(describe(bias.source) == describe_pieces(third_pieces(t, 500, 8, 0)));
        }
      }
      {  // --fused-qkv: one qkv_proj laid out [k_all; v_all; q_all]
        ckpt::GlueOptions options;
        options.fused_qkv = true;
        std::vector<NamedTensor> out = ckpt::glue_megatron(parts, options, &replicated);
        REQUIRE(out.size() == 2);
        CHECK(out[0].name == "decoder.layers.0.self_attn.qkv_proj.weight");
        CHECK(shape_of(out[0].source.shape) == shape_of({6 * static_cast<std::int64_t>(mp), 4}));
        CHECK(out[1].name == "decoder.layers.0.self_attn.qkv_proj.bias");
        CHECK(shape_of(out[1].source.shape) == shape_of({6 * static_cast<std::int64_t>(mp)}));
        std::vector<Piece> weight, bias;
        for (int t = 0; t < 3; ++t) {
          for (const Piece& piece : third_pieces(t, 0, 32, 32 * mp * static_cast<std::uint64_t>(t)))
            weight.push_back(piece);
          for (const Piece& piece : third_pieces(t, 500, 8, 8 * mp * static_cast<std::uint64_t>(t)))
            bias.push_back(piece);
        }
        CHECK(describe(out[0].source) == describe_pieces(weight));
        CHECK(describe(out[1].source) == describe_pieces(bias));
      }
      CHECK(replicated.empty());
    }
  }

  TEST_CASE("glue_megatron: dim 0, dim 1, replicated, copied, placeholder and aliases") {
    for (std::uint32_t mp : {2u, 3u}) {
      CAPTURE(mp);
      std::vector<std::vector<NamedTensor>> parts;
      for (std::uint32_t m = 0; m < mp; ++m) {
        auto w = static_cast<std::int64_t>(m);
        std::uint64_t b = 10000 * (m + 1);
        parts.push_back({
            named("decoder.embed_tokens.weight", {5, 4}, m, b + 0),
            named("decoder.embed_positions.weight", {8, 4}, m, b + 200),
            named("decoder.embed_positions._float_tensor", {1}, m, b + 400, DType::Float16),
            named("decoder.layers.0.fc1.weight", {w + 1, 3}, m, b + 500),  // parts of different sizes
            named("decoder.layers.0.fc2.weight", {3, w + 2}, m, b + 700),
            named("decoder.layers.0.fc2.bias", {3}, m, b + 900),
            named("decoder.layers.0.self_attn.out_proj.weight", {2, 2}, m, b + 1000),
            named("decoder.layers.0.final_layer_norm.weight", {3}, m, b + 1100),
            named("decoder.version", {1}, m, b + 1200),
            alias("decoder.output_projection.weight", "decoder.embed_tokens.weight"),
        });
      }
      // Part 1 lists its keys in another order: part 0's order wins.
      std::swap(parts[1][0], parts[1][4]);
      std::vector<std::string> replicated;
      std::vector<NamedTensor> out = ckpt::glue_megatron(parts, {}, &replicated);
      CHECK(names_of(out) == std::vector<std::string>{
                                 "decoder.embed_tokens.weight",
                                 "decoder.embed_positions.weight",
                                 "decoder.embed_positions._float_tensor",
                                 "decoder.layers.0.fc1.weight",
                                 "decoder.layers.0.fc2.weight",
                                 "decoder.layers.0.fc2.bias",
                                 "decoder.layers.0.self_attn.out_proj.weight",
                                 "decoder.layers.0.final_layer_norm.weight",
                                 "decoder.version",
                                 "decoder.output_projection.weight",
                             });
      auto mp64 = static_cast<std::int64_t>(mp);
      std::int64_t sum_m_plus_1 = mp64 * (mp64 + 1) / 2;  // sum of (m + 1)
      auto b = [](std::uint32_t m) -> std::uint64_t { return 10000 * (m + 1); };

      // Dim 0: every part's block in turn.
      const NamedTensor& embed = find(out, "decoder.embed_tokens.weight");
      CHECK(shape_of(embed.source.shape) == shape_of({5 * mp64, 4}));
      std::vector<Piece> want;
      for (std::uint32_t m = 0; m < mp; ++m) want.push_back(plain(m, b(m), 80 * m, 80));
      CHECK(describe(embed.source) == describe_pieces(want));

      const NamedTensor& fc1 = find(out, "decoder.layers.0.fc1.weight");
      CHECK(shape_of(fc1.source.shape) == shape_of({sum_m_plus_1, 3}));
      want.clear();
      for (std::uint32_t m = 0, at = 0; m < mp; at += 12 * (m + 1), ++m)
        want.push_back(plain(m, b(m) + 500, at, 12 * (m + 1)));
      CHECK(describe(fc1.source) == describe_pieces(want));

      // Dim 1: one strided piece per part, its rows (4 (m + 2) bytes) one output row apart.
      const NamedTensor& fc2 = find(out, "decoder.layers.0.fc2.weight");
      CHECK(shape_of(fc2.source.shape) == shape_of({3, sum_m_plus_1 + mp64}));
      std::uint64_t out_row = 4 * static_cast<std::uint64_t>(sum_m_plus_1 + mp64);
      want.clear();
      for (std::uint32_t m = 0, at = 0; m < mp; at += 4 * (m + 2), ++m) {
        want.push_back(strided(m, b(m) + 700, at, 4 * (m + 2), 3, 4 * (m + 2), out_row));
      }
      CHECK(describe(fc2.source) == describe_pieces(want));

      const NamedTensor& out_proj = find(out, "decoder.layers.0.self_attn.out_proj.weight");
      CHECK(shape_of(out_proj.source.shape) == shape_of({2, 2 * mp64}));
      want.clear();
      for (std::uint32_t m = 0; m < mp; ++m) want.push_back(strided(m, b(m) + 1000, 8 * m, 8, 2, 8, 8 * mp));
      CHECK(describe(out_proj.source) == describe_pieces(want));

      // Replicated and copied keys: part 0's tensor alone.
      for (const char* key : {"decoder.embed_positions.weight", "decoder.layers.0.fc2.bias",
                              "decoder.layers.0.final_layer_norm.weight", "decoder.version"}) {
        std::string name = key;
        CAPTURE(name);
        const NamedTensor& tensor = find(out, key);
        REQUIRE(tensor.source.pieces.size() == 1);
        CHECK(tensor.source.pieces[0].source == 0u);
        CHECK(tensor.source.shape == find(parts[0], key).source.shape);
        CHECK_FALSE(tensor.alias_of.has_value());
      }
      CHECK(describe(find(out, "decoder.embed_positions.weight").source) == "[0]0@10200+128");
      CHECK(describe(find(out, "decoder.layers.0.fc2.bias").source) == "[0]0@10900+12");
      CHECK(describe(find(out, "decoder.version").source) == "[0]0@11200+4");
      // Only replicated keys are to be compared; version is copied unchecked.
      CHECK(replicated == std::vector<std::string>{"decoder.embed_positions.weight", "decoder.layers.0.fc2.bias",
                                                   "decoder.layers.0.final_layer_norm.weight"});

      // Sinusoidal placeholder: zeros([1]) in float32, whatever the parts held.
      const NamedTensor& placeholder = find(out, "decoder.embed_positions._float_tensor");
      CHECK(placeholder.source.dtype == DType::Float32);
      CHECK(shape_of(placeholder.source.shape) == "[1]");
      CHECK(describe(placeholder.source) == "[0]zeros+4");

      // Aliases are kept as aliases (no pieces).
      const NamedTensor& tied = find(out, "decoder.output_projection.weight");
      CHECK(tied.alias_of == std::optional<std::string>("decoder.embed_tokens.weight"));
      CHECK(tied.source.pieces.empty());
    }
  }

  TEST_CASE("glue_megatron: a single part reports nothing replicated; no list is fine; no parts is a caller bug") {
    std::vector<std::vector<NamedTensor>> parts{
        {named("decoder.layers.0.fc2.bias", {3}, 0, 64), named("decoder.layers.0.fc1.weight", {2, 3}, 0, 128)}};
    std::vector<std::string> replicated;
    std::vector<NamedTensor> out = ckpt::glue_megatron(parts, {}, &replicated);
    CHECK(replicated.empty());
    REQUIRE(out.size() == 2);
    CHECK(describe(out[1].source) == "[0]0@128+24");
    std::vector<std::vector<NamedTensor>> two{
        parts[0],
        {named("decoder.layers.0.fc2.bias", {3}, 1, 64), named("decoder.layers.0.fc1.weight", {2, 3}, 1, 128)}};
    CHECK(ckpt::glue_megatron(two, {}, nullptr).size() == 2);
    // No parts at all: an Error (a bug in the caller), never a crash.
    CHECK_THROWS_AS(ckpt::glue_megatron({}, {}, &replicated), ckpt::InternalError);
  }

  TEST_CASE("glue_megatron: parts that do not glue are errors naming the key") {
    struct Case {
      const char* what;
      std::vector<std::vector<NamedTensor>> parts;
      const char* key;
      const char* message;
    };
    const std::string fc1 = "decoder.layers.0.fc1.weight";
    const std::string fc2 = "decoder.layers.0.fc2.weight";
    const std::string qkv = "decoder.layers.0.self_attn.qkv_proj.weight";
    const std::string embed = "decoder.embed_tokens.weight";
    const Case cases[] = {
        {"key missing in part 1",
         {{named(fc1, {2, 3}, 0, 0), named(fc2, {3, 2}, 0, 64)}, {named(fc2, {3, 2}, 1, 64)}},
         "decoder.layers.0.fc1.weight",
         "missing from model part 1"},
        {"key missing in part 2 of 3",
         {{named(fc1, {2, 3}, 0, 0), named(fc2, {3, 2}, 0, 64)},
          {named(fc1, {2, 3}, 1, 0), named(fc2, {3, 2}, 1, 64)},
          {named(fc2, {3, 2}, 2, 0)}},
         "decoder.layers.0.fc1.weight",
         "missing from model part 2"},
        {"key in part 2 of 3 only",
         {{named(fc1, {2, 3}, 0, 0)},
          {named(fc1, {2, 3}, 1, 0)},
          {named(fc1, {2, 3}, 2, 0), named(fc2, {3, 2}, 2, 64)}},
         "decoder.layers.0.fc2.weight",
         "in model part 2 but not in part 0"},
        {"an alias in part 1 where part 0 has a tensor",
         {{named(fc1, {2, 3}, 0, 0)}, {alias(fc1, embed)}},
         "decoder.layers.0.fc1.weight",
         "missing from model part 1"},
        {"dim-0 glue with different columns",
         {{named(fc1, {2, 3}, 0, 0)}, {named(fc1, {2, 4}, 1, 0)}},
         "decoder.layers.0.fc1.weight",
         "shape [2, 4] in model part 1 does not glue with [2, 3] in part 0"},
        {"dim-1 glue with different rows",
         {{named(fc2, {3, 2}, 0, 0)}, {named(fc2, {4, 2}, 1, 0)}},
         "decoder.layers.0.fc2.weight",
         "does not glue"},
        {"qkv with different columns",
         {{named(qkv, {6, 4}, 0, 0)}, {named(qkv, {6, 5}, 1, 0)}},
         "decoder.layers.0.self_attn.qkv_proj.weight",
         "does not glue"},
        {"qkv not divisible by 3",
         {{named(qkv, {5, 4}, 0, 0)}, {named(qkv, {5, 4}, 1, 0)}},
         "decoder.layers.0.self_attn.qkv_proj.weight",
         "does not split in three"},
        {"qkv not divisible by 3 in part 1 only",
         {{named(qkv, {6, 4}, 0, 0)}, {named(qkv, {7, 4}, 1, 0)}},
         "decoder.layers.0.self_attn.qkv_proj.weight",
         "does not split in three"},
        {"dtype differs",
         {{named(fc1, {2, 3}, 0, 0)}, {named(fc1, {2, 3}, 1, 0, DType::Float16)}},
         "decoder.layers.0.fc1.weight",
         "dtype float16 in model part 1 differs from float32 in part 0"},
        {"rank differs",
         {{named(fc1, {2, 3}, 0, 0)}, {named(fc1, {6}, 1, 0)}},
         "decoder.layers.0.fc1.weight",
         "shape [6] in model part 1 does not glue with [2, 3]"},
        {"dim-1 glue of a vector",
         {{named(fc2, {3}, 0, 0)}, {named(fc2, {3}, 1, 0)}},
         "decoder.layers.0.fc2.weight",
         "fewer than 2 dimensions"},
        {"dim-0 glue of a scalar",
         {{named(embed, {}, 0, 0)}, {named(embed, {}, 1, 0)}},
         "decoder.embed_tokens.weight",
         "scalar"},
    };
    for (const Case& c : cases) {
      std::string what = c.what;
      CAPTURE(what);
      std::vector<std::string> replicated;
      auto error = error_of([&] { ckpt::glue_megatron(c.parts, {}, &replicated); });
      REQUIRE(error.has_value());
      std::string message = error->what();
      CAPTURE(message);
      CHECK(contains(message, c.key));
      CHECK(contains(message, c.message));
    }
  }

  TEST_CASE("glue_megatron: a key that only a later part has is an error") {
    // Regression test for a bug found by these tests (fixed): only part 0's keys
    // were iterated, so a key missing from part 0 was dropped silently.
    std::vector<std::vector<NamedTensor>> parts{
        {named("decoder.layers.0.fc1.weight", {2, 3}, 0, 0)},
        {named("decoder.layers.0.fc1.weight", {2, 3}, 1, 0), named("decoder.layers.0.fc1.bias", {2}, 1, 64)},
    };
    std::vector<std::string> replicated;
    std::vector<NamedTensor> out;
    auto error = error_of([&] { out = ckpt::glue_megatron(parts, {}, &replicated); });
    REQUIRE(error.has_value());
    CHECK(contains(error->what(), "decoder.layers.0.fc1.bias"));
    CHECK_KIND(*error, ckpt::ErrorKind::IncompleteSet);
  }

  TEST_CASE("glue_megatron: int32 parts glued and split come out as the math says") {
    // Three parts of the re-cut model, glued with separate and with fused qkv.
    const Dims d{6, 2, 6, 6};
    MpInput input(d, 3);
    std::vector<std::string> replicated;
    std::vector<NamedTensor> out = ckpt::glue_megatron(input.parts, {}, &replicated);
    CHECK(names_of(out) == std::vector<std::string>{
                               "decoder.embed_tokens.weight",
                               "decoder.layers.0.self_attn.k_proj.weight",
                               "decoder.layers.0.self_attn.k_proj.bias",
                               "decoder.layers.0.self_attn.v_proj.weight",
                               "decoder.layers.0.self_attn.v_proj.bias",
                               "decoder.layers.0.self_attn.q_proj.weight",
                               "decoder.layers.0.self_attn.q_proj.bias",
                               "decoder.layers.0.self_attn.out_proj.weight",
                               "decoder.layers.0.fc1.weight",
                               "decoder.layers.0.fc1.bias",
                               "decoder.layers.0.fc2.weight",
                               "decoder.layers.0.fc2.bias",
                               "decoder.layers.0.self_attn_layer_norm.weight",
                               "decoder.embed_positions._float_tensor",
                               "decoder.version",
                               "decoder.output_projection.weight",
                           });
    CHECK(int32_values(out[0], input.files) == rows_of(0, d, 0, d.V));
    for (int t = 0; t < 3; ++t) {
      CAPTURE(t);
      // k, v, q weight and bias in module order; the math's tensors number the weights 1-3, the biases 4-6.
      CHECK(out[1 + 2 * static_cast<std::size_t>(t)].source.shape == Shape{d.R, d.C});
      CHECK(int32_values(out[1 + 2 * static_cast<std::size_t>(t)], input.files) == rows_of(1 + t, d, 0, d.R));
      CHECK(out[2 + 2 * static_cast<std::size_t>(t)].source.shape == Shape{d.R});
      CHECK(int32_values(out[2 + 2 * static_cast<std::size_t>(t)], input.files) == rows_of(4 + t, d, 0, d.R));
    }
    CHECK(out[7].source.shape == Shape{d.C, d.R});
    CHECK(int32_values(out[7], input.files) == rows_of(7, d, 0, d.C));
    CHECK(int32_values(out[8], input.files) == rows_of(8, d, 0, d.F));
    CHECK(int32_values(out[9], input.files) == rows_of(9, d, 0, d.F));
    CHECK(out[10].source.shape == Shape{d.C, d.F});
    CHECK(int32_values(out[10], input.files) == rows_of(10, d, 0, d.C));
    CHECK(int32_values(out[11], input.files) == rows_of(11, d, 0, d.C));  // part 0's
    CHECK(int32_values(out[14], input.files) == std::vector<std::int32_t>{3});

    ckpt::GlueOptions fused;
    fused.fused_qkv = true;
    std::vector<NamedTensor> glued = ckpt::glue_megatron(input.parts, fused, nullptr);
    REQUIRE(glued.size() == 12);
    CHECK(glued[1].source.shape == Shape{3 * d.R, d.C});
    CHECK(int32_values(glued[1], input.files) ==
          joined({rows_of(1, d, 0, d.R), rows_of(2, d, 0, d.R), rows_of(3, d, 0, d.R)}));
    CHECK(int32_values(glued[2], input.files) ==
          joined({rows_of(4, d, 0, d.R), rows_of(5, d, 0, d.R), rows_of(6, d, 0, d.R)}));
  }

  // ================================================================ reshard_megatron

  TEST_CASE("reshard_megatron: fc2.weight 3x8 in 2 parts re-cut into 4 and back, exact pieces") {
    // Part m = columns [4m, 4m + 4) of the full [3, 8] (int32, rows of 16 bytes,
    // contiguous at offset 0 of file m). Re-cut into 4, part i = columns [2i, 2i + 2):
    // 8 bytes of every row of part i / 2, starting at byte 8 (i % 2).
    const std::string fc2 = "decoder.layers.0.fc2.weight";
    std::vector<std::vector<NamedTensor>> two{{named(fc2, {3, 4}, 0, 0, DType::Int32)},
                                              {named(fc2, {3, 4}, 1, 0, DType::Int32)}};
    std::vector<std::vector<NamedTensor>> four = ckpt::reshard_megatron(two, 4, nullptr);
    REQUIRE(four.size() == 4);
    for (std::uint32_t i = 0; i < 4; ++i) {
      CAPTURE(i);
      REQUIRE(four[i].size() == 1);
      CHECK(four[i][0].name == fc2);
      CHECK(four[i][0].source.shape == Shape{3, 2});
      CHECK(describe(four[i][0].source) == describe_pieces({strided(i / 2, 8 * (i % 2), 0, 8, 3, 16, 8)}));
    }
    // Four parts [3, 2] at offset 0 of files 0-3, re-cut into 2: part j = the
    // rows of parts 2j and 2j + 1 side by side.
    std::vector<std::vector<NamedTensor>> parts4;
    for (std::uint32_t m = 0; m < 4; ++m) parts4.push_back({named(fc2, {3, 2}, m, 0, DType::Int32)});
    std::vector<std::vector<NamedTensor>> halves = ckpt::reshard_megatron(parts4, 2, nullptr);
    REQUIRE(halves.size() == 2);
    for (std::uint32_t j = 0; j < 2; ++j) {
      CAPTURE(j);
      CHECK(halves[j][0].source.shape == Shape{3, 4});
      CHECK(describe(halves[j][0].source) ==
            describe_pieces({strided(2 * j, 0, 0, 8, 3, 8, 16), strided(2 * j + 1, 0, 8, 8, 3, 8, 16)}));
    }
  }

  TEST_CASE("reshard_megatron: qkv re-cut per part as [k_i; v_i; q_i], exact pieces") {
    // Part m's qkv [6, 3] int32 at offset 100 of file m: k_m rows 0-1 (bytes
    // 100-123), v_m 124-147, q_m 148-171. Into 4: part i = row i % 2 of each of
    // part i / 2's thirds.
    const std::string qkv = "decoder.layers.0.self_attn.qkv_proj.weight";
    std::vector<std::vector<NamedTensor>> two{{named(qkv, {6, 3}, 0, 100, DType::Int32)},
                                              {named(qkv, {6, 3}, 1, 100, DType::Int32)}};
    std::vector<std::vector<NamedTensor>> four = ckpt::reshard_megatron(two, 4, nullptr);
    REQUIRE(four.size() == 4);
    for (std::uint32_t i = 0; i < 4; ++i) {
      CAPTURE(i);
      std::uint32_t m = i / 2;
      std::uint64_t row = 12 * (i % 2);
      CHECK(four[i][0].source.shape == Shape{3, 3});
      CHECK(describe(four[i][0].source) ==
            describe_pieces({plain(m, 100 + row, 0, 12), plain(m, 124 + row, 12, 12), plain(m, 148 + row, 24, 12)}));
    }
    // Back into 2 gives the original parts, merged into one run each.
    std::vector<std::vector<NamedTensor>> back = ckpt::reshard_megatron(four, 2, nullptr);
    REQUIRE(back.size() == 2);
    CHECK(describe(back[0][0].source) == "[0]0@100+72");
    CHECK(describe(back[1][0].source) == "[0]1@100+72");
    CHECK(back[1][0].source.shape == Shape{6, 3});
  }

  TEST_CASE("reshard_megatron: 2 -> 4, 4 -> 2, 3 -> 1, 1 -> 2, 2 -> 2, 2 -> 1, 3 -> 6, bytes as the math says") {
    struct Case {
      int from, to;
      Dims dims;
    };
    const Case cases[] = {
        {2, 4, {4, 3, 8, 4}}, {4, 2, {4, 3, 8, 4}}, {3, 1, {3, 2, 6, 6}},  {1, 2, {4, 3, 8, 4}},
        {2, 2, {4, 3, 8, 4}}, {2, 1, {2, 3, 4, 2}}, {3, 6, {6, 2, 12, 6}},
    };
    for (const Case& c : cases) {
      CAPTURE(c.from);
      CAPTURE(c.to);
      const Dims& d = c.dims;
      MpInput input(d, c.from);
      std::vector<std::string> replicated;
      std::vector<std::vector<NamedTensor>> out = ckpt::reshard_megatron(input.parts, c.to, &replicated);
      REQUIRE(out.size() == static_cast<std::size_t>(c.to));
      if (c.from > 1) {
        CHECK(replicated ==
              std::vector<std::string>{"decoder.layers.0.fc2.bias", "decoder.layers.0.self_attn_layer_norm.weight"});
      } else {
        CHECK(replicated.empty());
      }
      std::vector<std::size_t> sizes(input.files.size(), 16384);
      for (int i = 0; i < c.to; ++i) {
        CAPTURE(i);
        const std::vector<NamedTensor>& part = out[static_cast<std::size_t>(i)];
        REQUIRE(part.size() == std::size(kKeys));
        for (std::size_t k = 0; k < std::size(kKeys); ++k) {
          const Key& key = kKeys[k];
          const NamedTensor& tensor = part[k];
          std::string name = key.name;
          CAPTURE(name);
          CHECK(tensor.name == name);  // part 0's order
          if (key.kind == Kind::Alias) {
            CHECK(tensor.alias_of == std::optional<std::string>("decoder.embed_tokens.weight"));
            CHECK(tensor.source.pieces.empty());
            continue;
          }
          CHECK_FALSE(tensor.alias_of.has_value());
          PlannedRecord record = ckpt::plan_tensor_record((tensor), identity_sources(input.files.size()));
          CHECK(tiling_problem(record) == "");
          ValidationPlan valid(sizes, record);
          CHECK_NOTHROW(ckpt::validate(valid.plan));
          Buffer bytes = execute(record, pointers(input.files));
          if (key.kind == Kind::Placeholder) {
            CHECK(tensor.source.dtype == DType::Float32);
            CHECK(tensor.source.shape == Shape{1});
            CHECK(values_of<float>(bytes) == std::vector<float>{0.0f});
            continue;
          }
          CHECK(tensor.source.dtype == DType::Int32);
          // Replicated and copied keys: part 0's values in every part.
          bool from_part0 = key.kind == Kind::Replicated || key.kind == Kind::Copied;
          PartTensor want = part_tensor(key, d, from_part0 ? 0 : i, from_part0 ? 1 : c.to);
          CHECK(shape_of(tensor.source.shape) == shape_of(want.shape));
          CHECK(values_of<std::int32_t>(bytes) == want.values);
        }
      }
    }
  }

  TEST_CASE("reshard_megatron: re-cut then glued equals glued") {
    // 2 -> 4 -> glue and 2 -> glue give the same bytes for every key.
    const Dims d{4, 3, 8, 4};
    MpInput input(d, 2);
    ckpt::GlueOptions fused;
    fused.fused_qkv = true;
    std::vector<NamedTensor> direct = ckpt::glue_megatron(input.parts, fused, nullptr);
    std::vector<NamedTensor> via_four =
        ckpt::glue_megatron(ckpt::reshard_megatron(input.parts, 4, nullptr), fused, nullptr);
    REQUIRE(names_of(direct) == names_of(via_four));
    for (std::size_t k = 0; k < direct.size(); ++k) {
      CAPTURE(direct[k].name);
      if (direct[k].alias_of) {
        CHECK(via_four[k].alias_of == direct[k].alias_of);
        continue;
      }
      CHECK(via_four[k].source.shape == direct[k].source.shape);
      CHECK(difference(ids_of(via_four[k].source), ids_of(direct[k].source)) == "");
    }
  }

  TEST_CASE(
      "reshard_megatron: a part count that does not divide a sharded dimension is an error naming key and sizes") {
    SUBCASE("2 -> 3: fc1 (dim 0 of 8) is the first key that does not split") {
      MpInput input(Dims{6, 3, 8, 6}, 2);
      auto error = error_of([&] { ckpt::reshard_megatron(input.parts, 3, nullptr); });
      REQUIRE(error.has_value());
      std::string message = error->what();
      CAPTURE(message);
      CHECK(contains(message, "decoder.layers.0.fc1.weight"));
      CHECK(contains(message, "dim 0 of size 8 does not split into 3 model parts"));
    }
    struct Case {
      const char* what;
      std::vector<std::vector<NamedTensor>> parts;
      int new_parts;
      const char* key;
      const char* message;
    };
    const std::string fc2 = "decoder.layers.0.fc2.weight";
    const std::string qkv = "decoder.layers.0.self_attn.qkv_proj.weight";
    const std::string bias = "decoder.layers.0.self_attn.qkv_proj.bias";
    const std::string embed = "decoder.embed_tokens.weight";
    const Case cases[] = {
        {"dim 1",
         {{named(fc2, {3, 4}, 0, 0)}, {named(fc2, {3, 4}, 1, 0)}},
         3,
         "decoder.layers.0.fc2.weight",
         "dim 1 of size 8 does not split into 3 model parts"},
        {"dim 0",
         {{named(embed, {5, 2}, 0, 0)}, {named(embed, {5, 2}, 1, 0)}},
         4,
         "decoder.embed_tokens.weight",
         "dim 0 of size 10 does not split into 4 model parts"},
        // qkv: the sizes are those of k (v and q alike), 2 rows per part here.
        {"qkv weight",
         {{named(qkv, {6, 2}, 0, 0)}, {named(qkv, {6, 2}, 1, 0)}},
         3,
         "decoder.layers.0.self_attn.qkv_proj.weight",
         "dim 0 of size 4 does not split into 3 model parts"},
        {"qkv bias",
         {{named(bias, {3}, 0, 0)}, {named(bias, {3}, 1, 0)}},
         4,
         "decoder.layers.0.self_attn.qkv_proj.bias",
         "dim 0 of size 2 does not split into 4 model parts"},
        {"a single part into more than its rows",
         {{named(embed, {2, 2}, 0, 0)}},
         3,
         "decoder.embed_tokens.weight",
         "dim 0 of size 2 does not split into 3 model parts"},
    };
    for (const Case& c : cases) {
      std::string what = c.what;
      CAPTURE(what);
      auto error = error_of([&] { ckpt::reshard_megatron(c.parts, c.new_parts, nullptr); });
      REQUIRE(error.has_value());
      std::string message = error->what();
      CAPTURE(message);
      CHECK(contains(message, c.key));
      CHECK(contains(message, c.message));
    }
    SUBCASE("no parts, or fewer than one new part") {
      std::vector<std::vector<NamedTensor>> one{{named(embed, {2, 2}, 0, 0)}};
      CHECK_THROWS_AS(ckpt::reshard_megatron({}, 2, nullptr), ckpt::InternalError);
      CHECK_THROWS_AS(ckpt::reshard_megatron(one, 0, nullptr), ckpt::InternalError);
      CHECK_THROWS_AS(ckpt::reshard_megatron(one, -1, nullptr), ckpt::InternalError);
    }
  }

  TEST_CASE("reshard_megatron: replicated, copied and placeholder keys in every part; ties kept") {
    std::vector<std::vector<NamedTensor>> parts;
    for (std::uint32_t m = 0; m < 2; ++m) {
      parts.push_back({named("decoder.embed_tokens.weight", {2, 2}, m, 0),
                       named("decoder.layers.0.final_layer_norm.weight", {2}, m, 64),
                       named("decoder.version", {1}, m, 96),
                       named("decoder.embed_positions._float_tensor", {1}, m, 128, DType::Float16),
                       alias("decoder.output_projection.weight", "decoder.embed_tokens.weight")});
    }
    std::vector<std::string> replicated;
    std::vector<std::vector<NamedTensor>> out = ckpt::reshard_megatron(parts, 4, &replicated);
    CHECK(replicated == std::vector<std::string>{"decoder.layers.0.final_layer_norm.weight"});
    REQUIRE(out.size() == 4);
    for (std::size_t i = 0; i < 4; ++i) {
      CAPTURE(i);
      REQUIRE(out[i].size() == 5);
      CHECK(out[i][0].source.shape == Shape{1, 2});
      CHECK(describe(out[i][0].source) ==
            describe_pieces({plain(static_cast<std::uint32_t>(i / 2), 8 * (i % 2), 0, 8)}));
      CHECK(describe(out[i][1].source) == "[0]0@64+8");
      CHECK(describe(out[i][2].source) == "[0]0@96+4");
      CHECK(describe(out[i][3].source) == "[0]zeros+4");
      CHECK(out[i][3].source.dtype == DType::Float32);
      CHECK(out[i][4].alias_of == std::optional<std::string>("decoder.embed_tokens.weight"));
    }
  }

  TEST_CASE("reshard_megatron: a tied key that a later part lacks is an error") {
    // Regression test for a bug this test found (fixed).
    std::vector<std::vector<NamedTensor>> parts{
        {named("decoder.embed_tokens.weight", {2, 2}, 0, 0),
         alias("decoder.output_projection.weight", "decoder.embed_tokens.weight")},
        {named("decoder.embed_tokens.weight", {2, 2}, 1, 0)},
    };
    auto error = error_of([&] { ckpt::reshard_megatron(parts, 1, nullptr); });
    CHECK(error.has_value());
    if (error) CHECK(contains(error->what(), "decoder.output_projection.weight"));
  }

  // ================================================================ with_qkv_form

  TEST_CASE("with_qkv_form: a singleton's separate k, v, q re-cut into metaseq's fused parts, and back") {
    // The 3 parts glued into one state dict with separate k, v, q (a singleton),
    // then cut into 3 fused parts again: the bytes of every key are the parts'.
    const Dims d{6, 2, 6, 6};
    MpInput input(d, 3);
    std::vector<NamedTensor> singleton = ckpt::glue_megatron(input.parts, {}, nullptr);
    std::vector<std::vector<NamedTensor>> fused = ckpt::reshard_megatron({singleton}, 3, nullptr, QkvForm::Fused);
    REQUIRE(fused.size() == 3);
    for (std::size_t m = 0; m < 3; ++m) {
      CAPTURE(m);
      // metaseq's order: the fused tensor where the first of k, v, q was
      CHECK(names_of(fused[m]) == names_of(ckpt::glue_megatron({input.parts[0]}, {true}, nullptr)));
      for (const NamedTensor& tensor : fused[m]) {
        CAPTURE(tensor.name);
        auto want = std::find_if(input.parts[m].begin(), input.parts[m].end(),
                                 [&](const NamedTensor& t) { return t.name == tensor.name; });
        REQUIRE(want != input.parts[m].end());
        CHECK(tensor.alias_of == want->alias_of);
        if (tensor.alias_of || ckpt::megatron_rule(tensor.name) == ckpt::MpRule::Placeholder) continue;
        CHECK(tensor.source.shape == want->source.shape);
        ckpt::MpRule rule = ckpt::megatron_rule(tensor.name);
        if (rule == ckpt::MpRule::Replicated || rule == ckpt::MpRule::Copied) continue;  // part 0's value
        CHECK(int32_values(tensor, input.files) == int32_values(*want, input.files));
      }
    }
    // Separate from fused parts: part m's thirds under k_proj, v_proj, q_proj.
    std::vector<std::vector<NamedTensor>> split = ckpt::reshard_megatron(input.parts, 3, nullptr, QkvForm::Separate);
    for (std::size_t m = 0; m < 3; ++m) {
      CAPTURE(m);
      std::vector<NamedTensor> again = ckpt::with_qkv_form(split[m], QkvForm::Fused);
      std::vector<NamedTensor> want =
          ckpt::with_qkv_form(ckpt::reshard_megatron(input.parts, 3, nullptr)[m], QkvForm::AsInput);
      REQUIRE(names_of(again) == names_of(want));
      for (std::size_t k = 0; k < want.size(); ++k) {
        if (want[k].alias_of) continue;
        CHECK(difference(ids_of(again[k].source), ids_of(want[k].source)) == "");
      }
    }
    // Fused already, or nothing to fuse: unchanged.
    CHECK(names_of(ckpt::with_qkv_form(input.parts[1], QkvForm::Fused)) == names_of(input.parts[1]));
    std::vector<NamedTensor> plain_part{named("decoder.layers.0.fc1.weight", {2, 3}, 0, 0)};
    CHECK(names_of(ckpt::with_qkv_form(plain_part, QkvForm::Separate)) == names_of(plain_part));
  }

  TEST_CASE("with_qkv_form: a fused module splits in a module's order where it was, and fuses back to it") {
    // What a module's parameters() gives: k, v, q, each weight then bias; other keys around them.
    const std::string attn = "decoder.layers.0.self_attn.";
    std::vector<NamedTensor> separate;
    std::uint64_t at = 0;
    auto add = [&](const std::string& name, const Shape& shape) {
      separate.push_back(named(name, shape, 0, at));
      at += 1000;
    };
    add("decoder.embed_tokens.weight", {5, 4});
    for (const char* proj : {"k_proj", "v_proj", "q_proj"}) {
      add(attn + proj + ".weight", {4, 4});
      add(attn + proj + ".bias", {4});
    }
    add(attn + "out_proj.weight", {4, 4});
    // What torch rebuilds goes with the tensor: a Parameter's requires_grad through fusing and splitting.
    for (NamedTensor& tensor : separate) tensor.kind = {ckpt::TensorWrap::Parameter, tensor.name.ends_with("bias")};
    std::vector<NamedTensor> fused = ckpt::with_qkv_form(separate, QkvForm::Fused);
    CHECK(names_of(fused) == std::vector<std::string>{"decoder.embed_tokens.weight", attn + "qkv_proj.weight",
                                                      attn + "qkv_proj.bias", attn + "out_proj.weight"});
    CHECK(fused[1].kind == ckpt::TensorKind{ckpt::TensorWrap::Parameter, false});
    CHECK(fused[2].kind == ckpt::TensorKind{ckpt::TensorWrap::Parameter, true});
    std::vector<NamedTensor> split = ckpt::with_qkv_form(fused, QkvForm::Separate);
    REQUIRE(names_of(split) == names_of(separate));
    for (std::size_t k = 0; k < split.size(); ++k) {
      CAPTURE(split[k].name);
      CHECK(split[k].kind == separate[k].kind);
      CHECK(difference(ids_of(split[k].source), ids_of(separate[k].source)) == "");
    }
    // A fused bias listed before its weight, far from it: both split where the first was.
    std::vector<NamedTensor> apart{named(attn + "qkv_proj.bias", {6}, 0, 0), named("decoder.version", {1}, 0, 100),
                                   named(attn + "qkv_proj.weight", {6, 2}, 0, 200)};
    CHECK(names_of(ckpt::with_qkv_form(apart, QkvForm::Separate)) ==
          std::vector<std::string>{attn + "k_proj.bias", attn + "k_proj.weight", attn + "v_proj.bias",
                                   attn + "v_proj.weight", attn + "q_proj.bias", attn + "q_proj.weight",
                                   "decoder.version"});
    // Gluing parts keeps part 0's kind for every key it writes.
    std::vector<std::vector<NamedTensor>> parts{fused, fused};
    for (auto& part : parts) part[0].kind = {ckpt::TensorWrap::Tensor, true};
    parts[1][0].kind = {};
    std::vector<NamedTensor> glued = ckpt::glue_megatron(parts, {}, nullptr);
    CHECK(glued[0].kind == ckpt::TensorKind{ckpt::TensorWrap::Tensor, true});
    CHECK(glued[1].kind == ckpt::TensorKind{ckpt::TensorWrap::Parameter, false});  // k_proj.weight
    CHECK(glued[2].kind == ckpt::TensorKind{ckpt::TensorWrap::Parameter, true});   // k_proj.bias
  }

  TEST_CASE("with_qkv_form: projections that do not fuse or split are errors naming the key") {
    const std::string layer = "decoder.layers.3.self_attn.";
    auto proj = [&](const std::string& which, std::vector<std::int64_t> shape, std::uint64_t at,
                    DType dtype = DType::Float32) { return named(layer + which, std::move(shape), 0, at, dtype); };
    struct Case {
      const char* what;
      std::vector<NamedTensor> part;
      QkvForm form;
      std::string key;
      std::string message;
    };
    std::vector<Case> cases = {
        {"v_proj missing",
         {proj("k_proj.weight", {2, 4}, 0), proj("q_proj.weight", {2, 4}, 64)},
         QkvForm::Fused,
         layer + "k_proj.weight",
         "'" + layer + "v_proj.weight' is missing"},
        {"only q_proj",
         {proj("q_proj.bias", {2}, 0)},
         QkvForm::Fused,
         layer + "q_proj.bias",
         "'" + layer + "k_proj.bias' is missing"},
        {"shapes differ",
         {proj("k_proj.weight", {2, 4}, 0), proj("v_proj.weight", {2, 4}, 64), proj("q_proj.weight", {3, 4}, 128)},
         QkvForm::Fused,
         layer + "k_proj.weight",
         "shapes [2, 4], [2, 4], [3, 4]"},
        {"dtypes differ",
         {proj("k_proj.weight", {2, 4}, 0), proj("v_proj.weight", {2, 4}, 64, DType::Float16),
          proj("q_proj.weight", {2, 4}, 128)},
         QkvForm::Fused,
         layer + "k_proj.weight",
         "do not fuse"},
        {"a scalar",
         {proj("k_proj.weight", {}, 0), proj("v_proj.weight", {}, 64), proj("q_proj.weight", {}, 128)},
         QkvForm::Fused,
         layer + "k_proj.weight",
         "do not fuse on dim 0"},
        {"k a scalar, v and q not",
         {proj("k_proj.weight", {}, 0), proj("v_proj.weight", {2, 4}, 64), proj("q_proj.weight", {2, 4}, 128)},
         QkvForm::Fused,
         layer + "k_proj.weight",
         "shapes [], [2, 4], [2, 4]"},
        {"a projection another key is tied to",
         {proj("k_proj.weight", {2, 4}, 0), proj("v_proj.weight", {2, 4}, 64), proj("q_proj.weight", {2, 4}, 128),
          alias("decoder.extra.weight", layer + "v_proj.weight")},
         QkvForm::Fused,
         layer + "k_proj.weight",
         "'decoder.extra.weight' is tied to " + layer + "v_proj.weight"},
        {"the fused name is taken",
         {proj("qkv_proj.weight", {6, 4}, 0), proj("k_proj.weight", {2, 4}, 128), proj("v_proj.weight", {2, 4}, 192),
          proj("q_proj.weight", {2, 4}, 256)},
         QkvForm::Fused,
         layer + "k_proj.weight",
         "holds already"},
        {"a tied projection",
         {proj("k_proj.weight", {2, 4}, 0), alias(layer + "v_proj.weight", layer + "k_proj.weight"),
          proj("q_proj.weight", {2, 4}, 64)},
         QkvForm::Fused,
         layer + "v_proj.weight",
         "cannot be fused"},
        {"a split name is taken",
         {proj("qkv_proj.weight", {6, 4}, 0), proj("v_proj.weight", {2, 4}, 128)},
         QkvForm::Separate,
         layer + "qkv_proj.weight",
         "'" + layer + "v_proj.weight', which the state dict holds already"},
        {"a fused tensor another key is tied to",
         {proj("qkv_proj.weight", {6, 4}, 0), alias("decoder.extra.weight", layer + "qkv_proj.weight")},
         QkvForm::Separate,
         layer + "qkv_proj.weight",
         "'decoder.extra.weight' is tied to it"},
        {"a fused tensor not in three",
         {proj("qkv_proj.weight", {4, 4}, 0)},
         QkvForm::Separate,
         layer + "qkv_proj.weight",
         "does not split in three"},
    };
    for (const Case& c : cases) {
      CAPTURE(c.what);
      auto error = error_of([&] { ckpt::with_qkv_form(c.part, c.form); });
      REQUIRE(error.has_value());
      std::string message = error->what();
      CHECK(contains(message, c.key + ":"));
      CHECK(contains(message, c.message));
    }
  }
}  // TEST_SUITE
