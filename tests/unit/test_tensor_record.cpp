// Unit tests for tensor sources and the copies of one output tensor:
// TensorSource's slice, columns, concat and interleave_rows, source_of and
// zeros_source (src/layout/tensor_source.cpp), plan_tensor_record
// (src/plan/checkpoint_builder.cpp), and the bytes that come out when the
// copies run.
//
// The oracle is the reference model of layout_fixtures.hpp: every source is
// expanded piece by piece into the identity of each of its bytes (which file,
// which offset, or zero) and compared with identities computed by plain loops;
// plans run in the simulator and are compared with bytes read straight from
// fake files.
#include <doctest/doctest.h>

#include <numeric>

#include "layout_fixtures.hpp"

namespace {

using namespace layout_fixtures;

// A source with its reference identities.
struct Known {
  std::string what;
  TensorSource source;
  Ids ids;
};

TensorSource bytes_source(std::vector<Piece> pieces, std::uint64_t nbytes) {
  return source(DType::UInt8, {static_cast<std::int64_t>(nbytes)}, std::move(pieces));
}

// 5 rows of 12 bytes, rows 20 apart in file 0: one strided piece.
Known matrix_source() {
  return {"matrix", bytes_source({strided(0, 100, 0, 12, 5, 20, 12)}, 60), ids_matrix(0, 100, 5, 12, 20)};
}
// 6 rows of 10 bytes interleaved from two matrices: columns 0-3 from file 0
// (rows 4 apart: contiguous), columns 4-9 from file 1 (rows 16 apart).
Known interleaved_source() {
  return {"interleaved", bytes_source({strided(0, 100, 0, 4, 6, 4, 10), strided(1, 500, 4, 6, 6, 16, 10)}, 60),
          ids_interleave({ids_matrix(0, 100, 6, 4, 4), ids_matrix(1, 500, 6, 6, 16)}, 6)};
}
// 64 bytes as rows of 8: a plain run and zeros in row 0, rows 1-4 as strided
// zeros (columns 0-2) beside a strided run of file 2 (columns 3-7), then a plain
// run of file 1.
Known mixed_source() {
  Ids ids = ids_join({ids_run(0, 300, 5), ids_zeros(3)});
  for (std::uint64_t r = 1; r <= 4; ++r) {
    for (std::uint64_t c = 0; c < 8; ++c) ids.push_back(c < 3 ? kZeroId : byte_id(2, 1000 + (r - 1) * 5 + (c - 3)));
  }
  Ids tail = ids_run(1, 200, 24);
  ids.insert(ids.end(), tail.begin(), tail.end());
  return {"mixed",
          bytes_source({plain(0, 300, 0, 5), zeros(5, 3), zeros(8, 3, 4, 8), strided(2, 1000, 11, 5, 4, 5, 8),
                        plain(1, 200, 40, 24)},
                       64),
          ids};
}
// 60 contiguous bytes in three runs of three files, cut at 13 and 47.
Known runs_split_source() {
  return {"runs", runs_source(DType::UInt8, {60}, {{0, 100, 13}, {1, 300, 34}, {2, 700, 13}}),
          ids_join({ids_run(0, 100, 13), ids_run(1, 300, 34), ids_run(2, 700, 13)})};
}
// Strided pieces whose rows straddle the rows a caller views them in: the
// matrix from byte 6 (48 bytes: its full rows 12 apart start at 6), and the
// interleaved source from byte 3 (50 bytes, rows of 10 starting at 1 and 7).
Known shifted_matrix_source() {
  Known m = matrix_source();
  return {"shifted matrix", m.source.slice(6, 48, {48}), ids_slice(m.ids, 6, 48)};
}
Known shifted_interleaved_source() {
  Known i = interleaved_source();
  return {"shifted interleaved", i.source.slice(3, 50, {50}), ids_slice(i.ids, 3, 50)};
}
// 60 bytes, one run.
Known contiguous_source() {
  return {"contiguous", bytes_source({plain(3, 40, 0, 60)}, 60), ids_run(3, 40, 60)};
}

std::vector<std::uint64_t> divisors(std::uint64_t n) {
  std::vector<std::uint64_t> out;
  for (std::uint64_t d = 1; d <= n; ++d) {
    if (n % d == 0) out.push_back(d);
  }
  return out;
}

// At most this many pieces come out of slicing `source`: one per plain piece,
// three per strided one (a partial row, the full rows, a partial row).
std::size_t slice_piece_bound(const TensorSource& source) {
  std::size_t n = 0;
  for (const Piece& piece : source.pieces) n += piece.rows > 1 ? 3 : 1;
  return n;
}

// Plans `tensor` as an output of its own dtype and runs it: the bytes a file
// would hold, from `files` (manifest file i is plan source i).
Buffer planned_bytes(const TensorSource& tensor, const std::vector<Buffer>& files) {
  NamedTensor output{"t", tensor.dtype, tensor, std::nullopt};
  PlannedRecord record = ckpt::plan_tensor_record(output, identity_sources(files.size()));
  CHECK(tiling_problem(record) == "");
  return execute(record, pointers(files));
}

// The bytes of parts' runs interleaved by rows, by plain loops (the definition
// of a dim-1 glue), converted float32 -> float16 when `to_half`.
Buffer interleaved_bytes(const std::vector<Ids>& parts, std::uint64_t rows, const std::vector<const Buffer*>& files,
                         bool to_half = false) {
  Buffer bytes = bytes_of(ids_interleave(parts, rows), files);
  if (!to_half) return bytes;
  Buffer converted(bytes.size() / 2);
  convert_f32_to_f16(bytes.data(), converted.data(), bytes.size() / 4);
  return converted;
}

}  // namespace

TEST_SUITE("tensor_record") {
  // ================================================================ source_of, zeros_source

  TEST_CASE("source_of: one piece, or a strided piece per index of the dimensions before the rows") {
    SUBCASE("contiguous: one piece") {
      ckpt::StoredTensor tensor = contiguous("model/x", DType::Float32, {3, 4}, 128).tensor;
      TensorSource s = ckpt::source_of(tensor, 128, 5);
      CHECK(describe(s) == "[0]5@128+48");
      CHECK(s.shape == Shape{3, 4});
      CHECK(s.dtype == DType::Float32);
    }
    SUBCASE("rows of a wider storage: one strided piece") {
      ckpt::StoredTensor tensor = contiguous("model/x", DType::Float16, {3, 2}, 64).tensor;
      tensor.stride = {5, 1};
      CHECK(describe(ckpt::source_of(tensor, 64, 0)) == "[0]0@64+4*3(ss10,st4)");
    }
    SUBCASE("a stride-0 view of 2^40 elements: one piece, no memory per element") {
      ckpt::StoredTensor tensor = contiguous("model/x", DType::Float32, {1LL << 40}, 64).tensor;
      tensor.stride = {0};
      TensorSource s = ckpt::source_of(tensor, 64, 3);
      CHECK(describe(s) == "[0]3@64+4*1099511627776(ss0,st4)");
      CHECK(s.nbytes() == (std::uint64_t{1} << 42));
    }
    SUBCASE("a transposed view: a strided piece per row, in logical order") {
      ckpt::StoredTensor tensor = contiguous("model/x", DType::Int32, {2, 3}, 0).tensor;
      tensor.stride = {1, 2};
      TensorSource s = ckpt::source_of(tensor, 0, 1);
      Ids want;
      for (std::uint64_t i = 0; i < 2; ++i) {
        for (std::uint64_t j = 0; j < 3; ++j) {
          Ids element = ids_run(1, (i * 1 + j * 2) * 4, 4);
          want.insert(want.end(), element.begin(), element.end());
        }
      }
      CHECK(difference(ids_of(s), want) == "");
      CHECK(s.pieces.size() == 2);
    }
    SUBCASE("size-1 dimensions with any stride are still contiguous; a storage offset") {
      ckpt::StoredTensor tensor = contiguous("model/x", DType::Float32, {1, 4, 1}, 256).tensor;
      tensor.stride = {999, 1, 7};
      CHECK(describe(ckpt::source_of(tensor, 256, 2)) == "[0]2@256+16");
    }
    SUBCASE("a run of rows that are adjacent merges into one piece") {
      // [2, 2, 3] with strides (12, 3, 1) on dim 0 and 1: contiguous after all.
      ckpt::StoredTensor tensor = contiguous("model/x", DType::UInt8, {2, 2, 3}, 10).tensor;
      CHECK(describe(ckpt::source_of(tensor, 10, 0)) == "[0]0@10+12");
      // Every other row of a [4, 3] storage.
      tensor.shape = {2, 3};
      tensor.stride = {6, 1};
      CHECK(describe(ckpt::source_of(tensor, 10, 0)) == "[0]0@10+3*2(ss6,st3)");
    }
    SUBCASE("no elements: no pieces") {
      ckpt::StoredTensor tensor = contiguous("model/x", DType::Float32, {0, 4}, 128).tensor;
      TensorSource s = ckpt::source_of(tensor, 128, 0);
      CHECK(s.pieces.empty());
      CHECK(s.nbytes() == 0);
    }
  }

  TEST_CASE("zeros_source, and a named tensor written in its source's dtype") {
    TensorSource z = ckpt::zeros_source(DType::BFloat16, {3, 5});
    CHECK(describe(z) == "[0]zeros+30");
    CHECK(z.nbytes() == 30);
    CHECK(ckpt::zeros_source(DType::Float32, {0}).pieces.empty());
    NamedTensor tensor = named("decoder.x", {2}, 1, 8, DType::Float16);
    NamedTensor out = (tensor);
    CHECK(out.name == "decoder.x");
    CHECK(out.dtype() == DType::Float16);
    CHECK(describe(out.source) == "[0]1@8+4");
    CHECK_FALSE(out.alias_of.has_value());
    NamedTensor tied = (alias("decoder.y", "decoder.x"));
    CHECK(tied.alias_of == std::optional<std::string>("decoder.x"));
  }

  // ================================================================ slice

  TEST_CASE("slice: every [begin, begin + count) of strided, interleaved and mixed sources") {
    for (const Known& known : {matrix_source(), interleaved_source(), mixed_source(), runs_split_source()}) {
      CAPTURE(known.what);
      REQUIRE(difference(ids_of(known.source), known.ids) == "");  // the fixture itself
      const std::uint64_t n = known.ids.size();
      std::size_t bound = slice_piece_bound(known.source);
      for (std::uint64_t begin = 0; begin <= n; ++begin) {
        for (std::uint64_t count = 0; begin + count <= n; ++count) {
          TensorSource s = known.source.slice(begin, count, {static_cast<std::int64_t>(count)});
          Expansion got = expand(s);
          if (!got.problem.empty() || got.ids != ids_slice(known.ids, begin, count) || s.pieces.size() > bound) {
            CAPTURE(begin);
            CAPTURE(count);
            CAPTURE(describe(s));
            CHECK(got.problem == "");
            CHECK(difference(got.ids, ids_slice(known.ids, begin, count)) == "");
            CHECK(s.pieces.size() <= bound);
          }
        }
      }
    }
  }

  TEST_CASE("slice: exact pieces of a strided piece cut inside rows, on row starts, over 0, 1, 2 and many rows") {
    // Rows of 12 bytes, 20 apart in file 0 from 100; logical row r = bytes [12r, 12r + 12).
    TensorSource m = matrix_source().source;
    auto cut = [&](std::uint64_t begin, std::uint64_t count) {
      return describe(m.slice(begin, count, {static_cast<std::int64_t>(count)}));
    };
    CHECK(cut(0, 60) == "[0]0@100+12*5(ss20,st12)");                         // everything
    CHECK(cut(12, 36) == "[0]0@120+12*3(ss20,st12)");                        // rows 1-3, on row starts
    CHECK(cut(12, 24) == "[0]0@120+12*2(ss20,st12)");                        // two full rows
    CHECK(cut(24, 12) == "[0]0@140+12");                                     // one full row: plain
    CHECK(cut(14, 8) == "[0]0@122+8");                                       // inside one row
    CHECK(cut(10, 4) == "[0]0@110+2 [2]0@120+2");                            // across a row end, no full row
    CHECK(cut(5, 50) == "[0]0@105+7 [7]0@120+12*3(ss20,st12) [43]0@180+7");  // partial, 3 full, partial
    CHECK(cut(6, 18) == "[0]0@106+6 [6]0@120+12");                           // partial, then 1 full row
    CHECK(cut(12, 17) == "[0]0@120+12 [12]0@140+5");                         // 1 full row, partial
    CHECK(cut(7, 0) == "");                                                  // nothing
    CHECK(cut(60, 0) == "");
    // The shape and dtype are the caller's.
    TensorSource typed = m.slice(12, 24, {2, 12});
    CHECK(typed.shape == Shape{2, 12});
    CHECK(typed.dtype == DType::UInt8);
    // Of the interleaved source: whole rows keep both strided pieces.
    TensorSource i = interleaved_source().source;
    CHECK(describe(i.slice(10, 30, {30})) == "[0]0@104+4*3(ss4,st10) [4]1@516+6*3(ss16,st10)");
    CHECK(describe(i.slice(12, 10, {10})) == "[0]0@106+2 [2]1@516+6 [8]0@108+2");
  }

  TEST_CASE("slice: plain pieces that continue each other merge") {
    TensorSource s = bytes_source({plain(0, 100, 0, 4), plain(0, 104, 4, 4), plain(1, 0, 8, 4)}, 12);
    CHECK(describe(s.slice(2, 8, {8})) == "[0]0@102+6 [6]1@0+2");
    TensorSource z = bytes_source({zeros(0, 4), zeros(4, 4)}, 8);
    CHECK(describe(z.slice(1, 6, {6})) == "[0]zeros+6");
  }

  // ================================================================ columns

  TEST_CASE("columns: every column range of a contiguous source spanning many rows") {
    for (const Known& known : {contiguous_source(), runs_split_source()}) {
      CAPTURE(known.what);
      for (std::uint64_t rows : divisors(60)) {
        std::uint64_t row_bytes = 60 / rows;
        for (std::uint64_t begin = 0; begin <= row_bytes; ++begin) {
          for (std::uint64_t count = 0; begin + count <= row_bytes; ++count) {
            TensorSource s = known.source.columns(rows, begin, count,
                                                  {static_cast<std::int64_t>(rows), static_cast<std::int64_t>(count)});
            Expansion got = expand(s);
            Ids want = ids_columns(known.ids, rows, begin, count);
            if (!got.problem.empty() || got.ids != want) {
              CAPTURE(rows);
              CAPTURE(begin);
              CAPTURE(count);
              CAPTURE(describe(s));
              CHECK(got.problem == "");
              CHECK(difference(got.ids, want) == "");
            }
          }
        }
      }
    }
  }

  TEST_CASE("columns: exact pieces") {
    TensorSource c = contiguous_source().source;  // 3@40, 60 bytes
    // Many rows of one run: one strided piece.
    CHECK(describe(c.columns(6, 3, 4, {6, 4})) == "[0]3@43+4*6(ss10,st4)");
    CHECK(describe(c.columns(6, 0, 10, {6, 10})) == "[0]3@40+10*6(ss10,st10)");
    CHECK(describe(c.columns(1, 5, 20, {20})) == "[0]3@45+20");
    CHECK(c.columns(6, 3, 4, {6, 4}).shape == Shape{6, 4});
    // Pieces split mid-row (at 13 and 47, rows of 10): the rows of each run that
    // are whole stay strided, the rest are row pieces.
    TensorSource r = runs_split_source().source;
    CHECK(describe(r.columns(6, 2, 5, {6, 5})) ==
          "[0]0@102+5 [5]0@112+1 [6]1@300+4 [10]1@309+5*2(ss10,st5) [20]1@329+5 [25]2@705+5");
    // Interleaved: each strided piece keeps its rows.
    TensorSource i = interleaved_source().source;
    CHECK(describe(i.columns(6, 2, 5, {6, 5})) == "[0]0@102+2*6(ss4,st5) [2]1@500+3*6(ss16,st5)");
    CHECK(describe(i.columns(6, 4, 6, {6, 6})) == "[0]1@500+6*6(ss16,st6)");
    // A strided piece whose rows straddle the rows of the view (rows of 12 at
    // 6, 18, 30, viewed as rows of 12 from 0): cut into its rows, each in two;
    // view row r, columns 4-7 = 2 bytes of one matrix row and 2 of the next.
    TensorSource shifted = shifted_matrix_source().source;
    CHECK(describe(shifted) == "[0]0@106+6 [6]0@120+12*3(ss20,st12) [42]0@180+6");
    CHECK(describe(shifted.columns(4, 4, 4, {4, 4})) ==
          "[0]0@110+2 [2]0@120+2 [4]0@130+2 [6]0@140+2 [8]0@150+2 [10]0@160+2 [12]0@170+2 [14]0@180+2");
    // Zeros stay zeros, strided.
    TensorSource z = ckpt::zeros_source(DType::UInt8, {4, 6});
    CHECK(describe(z.columns(4, 1, 3, {4, 3})) == "[0]zeros+3*4(ss0,st3)");
  }

  TEST_CASE("columns: every column range of interleaved and mixed sources, for every row count") {
    for (const Known& known : {interleaved_source(), mixed_source(), matrix_source(), shifted_matrix_source(),
                               shifted_interleaved_source()}) {
      CAPTURE(known.what);
      const std::uint64_t n = known.ids.size();
      for (std::uint64_t rows : divisors(n)) {
        std::uint64_t row_bytes = n / rows;
        for (std::uint64_t begin = 0; begin <= row_bytes; ++begin) {
          for (std::uint64_t count = 0; begin + count <= row_bytes; ++count) {
            TensorSource s = known.source.columns(rows, begin, count, {static_cast<std::int64_t>(rows * count)});
            Expansion got = expand(s);
            Ids want = ids_columns(known.ids, rows, begin, count);
            if (!got.problem.empty() || got.ids != want) {
              CAPTURE(rows);
              CAPTURE(begin);
              CAPTURE(count);
              CAPTURE(describe(s));
              CHECK(got.problem == "");
              CHECK(difference(got.ids, want) == "");
            }
          }
        }
      }
    }
  }

  // ================================================================ concat, interleave_rows

  TEST_CASE("concat: parts' pieces shifted, plain continuations merged, strided ones kept") {
    std::vector<Known> parts{matrix_source(), interleaved_source(), mixed_source()};
    TensorSource all = ckpt::concat({parts[0].source, parts[1].source, parts[2].source}, {184});
    CHECK(difference(ids_of(all), ids_join({parts[0].ids, parts[1].ids, parts[2].ids})) == "");
    CHECK(all.pieces.size() == 1 + 2 + 5);
    CHECK(describe(all.pieces[1]) == "[60]0@100+4*6(ss4,st10)");
    CHECK(describe(all.pieces[3]) == "[120]0@300+5");
    // Continuing runs of one file merge across parts; zeros with zeros.
    TensorSource a = bytes_source({plain(0, 100, 0, 8)}, 8);
    TensorSource b = bytes_source({plain(0, 108, 0, 4), zeros(4, 2)}, 6);
    TensorSource c = ckpt::zeros_source(DType::UInt8, {3});
    CHECK(describe(ckpt::concat({a, b, c}, {17})) == "[0]0@100+12 [12]zeros+5");
    // A strided piece is not merged with a plain one that continues its last row.
    TensorSource d = bytes_source({strided(0, 0, 0, 4, 2, 4, 4)}, 8);
    TensorSource e = bytes_source({plain(0, 8, 0, 4)}, 4);
    CHECK(describe(ckpt::concat({d, e}, {12})) == "[0]0@0+4*2(ss4,st4) [8]0@8+4");
    CHECK(ckpt::concat({d, e}, {3, 4}).shape == Shape{3, 4});
  }

  TEST_CASE("interleave_rows: parts of several pieces, for 1, 2 and 4 rows") {
    // P0: 24 bytes, two runs cut at 9 (inside row 1 of 4). P1: 4 rows of 4,
    // rows 10 apart. P2: 8 bytes, zeros then a run, cut at 3. P3: 20 bytes,
    // itself interleaved (2 + 3 bytes per row of 4).
    std::vector<Known> parts{
        {"P0", runs_source(DType::UInt8, {24}, {{0, 100, 9}, {1, 300, 15}}),
         ids_join({ids_run(0, 100, 9), ids_run(1, 300, 15)})},
        {"P1", bytes_source({strided(2, 500, 0, 4, 4, 10, 4)}, 16), ids_matrix(2, 500, 4, 4, 10)},
        {"P2", bytes_source({zeros(0, 3), plain(3, 50, 3, 5)}, 8), ids_join({ids_zeros(3), ids_run(3, 50, 5)})},
        {"P3", bytes_source({strided(0, 900, 0, 2, 4, 2, 5), strided(1, 950, 2, 3, 4, 8, 5)}, 20),
         ids_interleave({ids_matrix(0, 900, 4, 2, 2), ids_matrix(1, 950, 4, 3, 8)}, 4)},
    };
    std::vector<TensorSource> sources;
    std::vector<Ids> ids;
    for (const Known& part : parts) {
      REQUIRE(difference(ids_of(part.source), part.ids) == "");
      sources.push_back(part.source);
      ids.push_back(part.ids);
    }
    for (std::uint64_t rows : {1u, 2u, 4u}) {
      CAPTURE(rows);
      TensorSource glued = ckpt::interleave_rows(sources, rows, {68});
      CHECK(difference(ids_of(glued), ids_interleave(ids, rows)) == "");
      // No piece's row crosses an output row.
      std::uint64_t out_row = 68 / rows;
      for (const Piece& piece : glued.pieces) {
        CAPTURE(describe(piece));
        CHECK(piece.offset % out_row + piece.nbytes <= out_row);
        if (piece.rows > 1) CHECK(piece.stride == out_row);
      }
      // Subsets and other orders.
      TensorSource two = ckpt::interleave_rows({sources[3], sources[1]}, rows, {36});
      CHECK(difference(ids_of(two), ids_interleave({ids[3], ids[1]}, rows)) == "");
    }
    // Parts whose strided rows straddle the part's rows.
    Known sm = shifted_matrix_source();
    for (std::uint64_t rows : {1u, 2u, 4u}) {
      CAPTURE(rows);
      TensorSource glued = ckpt::interleave_rows({sm.source, sources[3], sm.source}, rows, {116});
      CHECK(difference(ids_of(glued), ids_interleave({sm.ids, ids[3], sm.ids}, rows)) == "");
    }
    // Exact pieces of two simple parts: a strided one and a run.
    TensorSource run = bytes_source({plain(3, 0, 0, 12)}, 12);
    CHECK(describe(ckpt::interleave_rows({sources[1], run}, 4, {4, 7})) ==
          "[0]2@500+4*4(ss10,st7) [4]3@0+3*4(ss3,st7)");
    // One part: the same bytes, as rows (adjacent rows are not merged back into
    // one run; harmless, the copy is as cheap).
    CHECK(describe(ckpt::interleave_rows({run}, 4, {12})) == "[0]3@0+3*4(ss3,st3)");
  }

  TEST_CASE("slice, columns, concat and interleave_rows composed at random agree with the reference") {
    // A pool of sources with their reference identities; each step builds a new
    // one from the pool by a random operation and checks it, then plans it and
    // runs the copies against fake files.
    std::vector<Known> pool{
        matrix_source(),         interleaved_source(),        mixed_source(), runs_split_source(), contiguous_source(),
        shifted_matrix_source(), shifted_interleaved_source()};
    std::vector<Buffer> files{patterned(2048, 1), patterned(2048, 2), patterned(2048, 3), patterned(2048, 4)};
    std::uint64_t state = 0x2545F4914F6CDD1DULL;
    auto next = [&](std::uint64_t bound) {  // uniform enough in [0, bound)
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      return bound == 0 ? 0 : state % bound;
    };
    int checked = 0;
    for (int step = 0; step < 400; ++step) {
      CAPTURE(step);
      const Known& a = pool[next(pool.size())];
      const Known& b = pool[next(pool.size())];
      const std::uint64_t n = a.ids.size();
      Known made;
      switch (next(4)) {
        case 0: {
          std::uint64_t begin = next(n + 1);
          std::uint64_t count = next(n - begin + 1);
          made = {"slice", a.source.slice(begin, count, {static_cast<std::int64_t>(count)}),
                  ids_slice(a.ids, begin, count)};
          break;
        }
        case 1: {
          if (n == 0) continue;
          std::vector<std::uint64_t> counts = divisors(n);
          std::uint64_t rows = counts[next(counts.size())];
          std::uint64_t row_bytes = n / rows;
          std::uint64_t begin = next(row_bytes + 1);
          std::uint64_t count = next(row_bytes - begin + 1);
          made = {"columns", a.source.columns(rows, begin, count, {static_cast<std::int64_t>(rows * count)}),
                  ids_columns(a.ids, rows, begin, count)};
          break;
        }
        case 2: {
          std::uint64_t total = n + b.ids.size();
          made = {"concat", ckpt::concat({a.source, b.source}, {static_cast<std::int64_t>(total)}),
                  ids_join({a.ids, b.ids})};
          break;
        }
        default: {
          std::uint64_t g = std::gcd(n, b.ids.size());
          if (g == 0) continue;
          std::vector<std::uint64_t> counts = divisors(g);
          std::uint64_t rows = counts[next(counts.size())];
          std::uint64_t total = n + b.ids.size();
          made = {"interleave", ckpt::interleave_rows({a.source, b.source}, rows, {static_cast<std::int64_t>(total)}),
                  ids_interleave({a.ids, b.ids}, rows)};
          break;
        }
      }
      CAPTURE(made.what);
      CAPTURE(describe(made.source));
      REQUIRE(made.source.nbytes() == made.ids.size());
      Expansion got = expand(made.source);
      CHECK(got.problem == "");
      CHECK(difference(got.ids, made.ids) == "");
      CHECK(planned_bytes(made.source, files) == bytes_of(made.ids, pointers(files)));
      ++checked;
      if (made.ids.size() > 0 && made.ids.size() <= 400) pool.push_back(std::move(made));
    }
    CHECK(checked > 300);
  }

  TEST_CASE("slice, columns, concat and interleave_rows refuse requests that are caller bugs") {
    TensorSource m = matrix_source().source;  // 60 bytes
    auto is_bug = [](auto&& action) {
      try {
        action();
      } catch (const ckpt::InternalError&) {
        return true;
      } catch (...) {
      }
      return false;
    };
    CHECK(is_bug([&] { m.slice(50, 11, {11}); }));      // past the end
    CHECK(is_bug([&] { m.slice(0, 10, {11}); }));       // shape of other size
    CHECK(is_bug([&] { m.columns(7, 0, 1, {7}); }));    // 7 rows do not divide 60
    CHECK(is_bug([&] { m.columns(5, 10, 3, {15}); }));  // past the row's end
    CHECK(is_bug([&] { m.columns(5, 0, 3, {14}); }));   // shape of other size
    CHECK(is_bug([&] { m.columns(0, 0, 0, {0}); }));    // no rows
    TensorSource f = source(DType::Float32, {15}, {plain(0, 0, 0, 60)});
    CHECK(is_bug([&] { ckpt::concat({m, f}, {120}); }));              // dtypes differ
    CHECK(is_bug([&] { ckpt::concat({m, m}, {119}); }));              // shape of other size
    CHECK(is_bug([&] { ckpt::interleave_rows({m, m}, 7, {120}); }));  // rows do not divide
    CHECK(is_bug([&] { ckpt::interleave_rows({m, f}, 5, {120}); }));  // dtypes differ
    CHECK(is_bug([&] { ckpt::interleave_rows({m, m}, 5, {110}); }));  // shape of other size
  }

  // ================================================================ plan_tensor_record

  TEST_CASE("plan_tensor_record: dim-1 glue of single-run parts is one strided copy per part") {
    TensorSource glued =
        ckpt::interleave_rows({runs_source(DType::Float32, {4, 2}, {{0, 1000, 32}}),   // rows of 8 bytes
                               runs_source(DType::Float32, {4, 3}, {{1, 64, 48}}),     // rows of 12 bytes
                               runs_source(DType::Float32, {4, 1}, {{2, 4000, 16}})},  // rows of 4 bytes
                              4, {4, 6});
    NamedTensor tensor{"decoder.layers.0.fc2.weight", DType::Float32, glued, std::nullopt};
    // Manifest files 0, 1, 2 are plan sources 7, 3, 5.
    PlannedRecord record = ckpt::plan_tensor_record(tensor, {7, 3, 5});
    CHECK(record.nbytes == 96);
    CHECK(describe_copies(record.copies) == std::vector<std::string>{
                                                "7 src=1000 dst=0 n=8 rows=4 ss=8 ds=24",
                                                "3 src=64 dst=8 n=12 rows=4 ss=12 ds=24",
                                                "5 src=4000 dst=20 n=4 rows=4 ss=4 ds=24",
                                            });
    for (const Piece& piece : record.copies) CHECK_FALSE(piece.converts());
    CHECK_FALSE(record.sequential());
    CHECK(tiling_problem(record) == "");
  }

  TEST_CASE("plan_tensor_record: a part split mid-row gives whole rows, row pieces, whole rows") {
    // Part 0: [5, 2], rows of 8 bytes, one run. Part 1: [5, 3], rows of 12
    // bytes, split after 28 bytes (2 rows and 4 bytes of row 2).
    TensorSource glued = ckpt::interleave_rows({runs_source(DType::Float32, {5, 2}, {{0, 1000, 40}}),
                                                runs_source(DType::Float32, {5, 3}, {{1, 64, 28}, {2, 512, 32}})},
                                               5, {5, 5});
    NamedTensor tensor{"decoder.layers.0.fc2.weight", DType::Float32, glued, std::nullopt};
    PlannedRecord record = ckpt::plan_tensor_record(tensor, {0, 1, 2});
    CHECK(record.nbytes == 100);
    CHECK(describe_copies(record.copies) == std::vector<std::string>{
                                                "0 src=1000 dst=0 n=8 rows=5 ss=8 ds=20",
                                                "1 src=64 dst=8 n=12 rows=2 ss=12 ds=20",    // rows 0-1
                                                "1 src=88 dst=48 n=4",                       // row 2, first element
                                                "2 src=512 dst=52 n=8",                      // row 2, the rest
                                                "2 src=520 dst=68 n=12 rows=2 ss=12 ds=20",  // rows 3-4
                                            });
    CHECK(tiling_problem(record) == "");

    // The checker itself catches a missing piece and an overlap.
    PlannedRecord missing = record;
    missing.copies.erase(missing.copies.begin() + 2);
    CHECK(tiling_problem(missing) == "gap at 48");
    PlannedRecord overlapping = record;
    overlapping.copies[3].offset -= 4;
    CHECK(tiling_problem(overlapping) == "overlap at 48");

    // And so does validate, given real sources big enough for every copy.
    ValidationPlan valid({1100, 128, 600}, record);
    CHECK_NOTHROW(ckpt::validate(valid.plan));
    ValidationPlan gap({1100, 128, 600}, missing);
    CHECK_THROWS_AS(ckpt::validate(gap.plan), ckpt::InternalError);
    ValidationPlan overlap({1100, 128, 600}, overlapping);
    CHECK_THROWS_AS(ckpt::validate(overlap.plan), ckpt::InternalError);
    ValidationPlan short_source({1100, 128, 540}, record);  // the last rows of part 1 run past file 2's end
    CHECK_THROWS_AS(ckpt::validate(short_source.plan), ckpt::InternalError);
  }

  TEST_CASE("plan_tensor_record: awkward run splits tile the record and copy the right bytes") {
    // Part 1 of a dim-1 glue ([6, 3] float32, rows of 12 bytes) cut into runs
    // at every kind of place: inside a row, at a row end, several pieces inside
    // one row, a run of exactly one row, a single element.
    struct Split {
      const char* what;
      std::vector<std::uint64_t> sizes;  // run sizes, adding up to 72
    };
    const Split splits[] = {
        {"one run", {72}},
        {"at row ends", {24, 12, 36}},
        {"mid-row then whole rows", {16, 56}},
        {"three pieces inside one row", {4, 4, 4, 60}},
        {"single elements", {4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4}},
        {"straddling two rows, then the rest", {8, 12, 52}},
        {"ending with a partial row", {64, 8}},
    };
    for (const Split& split : splits) {
      std::string what = split.what;
      CAPTURE(what);
      std::vector<Buffer> files{patterned(4096, 1), patterned(4096, 2), patterned(4096, 3)};
      std::vector<Run> runs;
      std::vector<Ids> run_ids;
      std::uint64_t at = 0;
      std::uint32_t file = 1;
      for (std::uint64_t size : split.sizes) {
        runs.push_back({file, 100 + 3 * at + 40 * file, size});  // gaps between runs
        run_ids.push_back(ids_run(file, 100 + 3 * at + 40 * file, size));
        at += size;
        file = file == 1 ? 2 : 1;
      }
      REQUIRE(at == 72);
      TensorSource glued = ckpt::interleave_rows(
          {runs_source(DType::Float32, {6, 2}, {{0, 200, 48}}), runs_source(DType::Float32, {6, 3}, runs)}, 6, {6, 5});
      NamedTensor tensor{"decoder.layers.0.fc2.weight", DType::Float32, glued, std::nullopt};
      PlannedRecord record = ckpt::plan_tensor_record(tensor, {0, 1, 2});
      CHECK(record.nbytes == 120);
      CHECK(tiling_problem(record) == "");
      for (const Piece& piece : record.copies) {
        CHECK(piece.offset % 20 + piece.nbytes <= 20);  // never across an output row (of 20 bytes)
        if (piece.rows > 1) CHECK(piece.stride == 20);
      }
      Buffer want = interleaved_bytes({ids_run(0, 200, 48), ids_join(run_ids)}, 6, pointers(files));
      CHECK(execute(record, pointers(files)) == want);
      ValidationPlan valid({4096, 4096, 4096}, record);
      CHECK_NOTHROW(ckpt::validate(valid.plan));
    }
  }

  TEST_CASE("plan_tensor_record: a dtype change converts in every piece, sizes in destination bytes") {
    SUBCASE("contiguous tensor") {
      NamedTensor tensor{"decoder.layers.0.fc1.weight", DType::Float16,
                         runs_source(DType::Float32, {2, 3}, {{0, 100, 24}}), std::nullopt};
      REQUIRE(tensor.source.dtype == DType::Float32);
      PlannedRecord record = ckpt::plan_tensor_record(tensor, {4});
      CHECK(record.nbytes == 12);
      REQUIRE(record.copies.size() == 1);
      CHECK(describe_copy(record.copies[0]) == "4 src=100 dst=0 n=12 float32->float16");
      CHECK(record.copies[0].source_nbytes() == 24);
    }
    SUBCASE("two parts glued on dim 0, one of them split") {
      TensorSource glued = ckpt::concat({runs_source(DType::Float32, {2, 3}, {{0, 100, 24}}),
                                         runs_source(DType::Float32, {2, 3}, {{1, 300, 8}, {1, 400, 16}})},
                                        {4, 3});
      NamedTensor tensor{"decoder.layers.0.fc1.weight", DType::Float16, glued, std::nullopt};
      PlannedRecord record = ckpt::plan_tensor_record(tensor, {0, 1});
      CHECK(record.nbytes == 24);
      CHECK(describe_copies(record.copies) == std::vector<std::string>{
                                                  "0 src=100 dst=0 n=12 float32->float16",
                                                  "1 src=300 dst=12 n=4 float32->float16",
                                                  "1 src=400 dst=16 n=8 float32->float16",
                                              });
      CHECK(tiling_problem(record) == "");
    }
    SUBCASE("dim-1 glue: strides stay in source bytes, offsets in destination bytes") {
      TensorSource glued = ckpt::interleave_rows({runs_source(DType::Float32, {3, 2}, {{0, 1000, 24}}),
                                                  runs_source(DType::Float32, {3, 3}, {{1, 64, 16}, {1, 200, 20}})},
                                                 3, {3, 5});
      NamedTensor tensor{"decoder.layers.0.fc2.weight", DType::Float16, glued, std::nullopt};
      PlannedRecord record = ckpt::plan_tensor_record(tensor, {0, 1});
      CHECK(record.nbytes == 30);
      CHECK(describe_copies(record.copies) == std::vector<std::string>{
                                                  "0 src=1000 dst=0 n=4 rows=3 ss=8 ds=10 float32->float16",
                                                  "1 src=64 dst=4 n=6 float32->float16",    // row 0 (one-row piece)
                                                  "1 src=76 dst=14 n=2 float32->float16",   // row 1, element 0
                                                  "1 src=200 dst=16 n=4 float32->float16",  // row 1, elements 1-2
                                                  "1 src=208 dst=24 n=6 float32->float16",  // row 2
                                              });
      CHECK(tiling_problem(record) == "");
      for (const Piece& piece : record.copies) {
        CHECK(piece.source_dtype == DType::Float32);
        CHECK(piece.dest_dtype == DType::Float16);
      }
      ValidationPlan valid({1100, 300}, record);
      CHECK_NOTHROW(ckpt::validate(valid.plan));

      // The bytes: float32 small integers in, float16 out.
      std::vector<Buffer> files{patterned(1100, 1), patterned(300, 2)};
      put<float>(files[0], 1000, {1, 2, 3, 4, 5, 6});
      put<float>(files[1], 64, {-1, -2, -3, -4});
      put<float>(files[1], 200, {-5, -6, -7, -8, -9});
      std::vector<std::uint16_t> want;
      for (float v : {1.f, 2.f, -1.f, -2.f, -3.f, 3.f, 4.f, -4.f, -5.f, -6.f, 5.f, 6.f, -7.f, -8.f, -9.f}) {
        want.push_back(half_of(v));
      }
      CHECK(values_of<std::uint16_t>(execute(record, pointers(files))) == want);
      // The same through the plain-loop definition.
      CHECK(execute(record, pointers(files)) ==
            interleaved_bytes({ids_run(0, 1000, 24), ids_join({ids_run(1, 64, 16), ids_run(1, 200, 20)})}, 3,
                              pointers(files), true));
    }
    SUBCASE("columns of a glued tensor (re-cut on dim 1), converted") {
      // [2, 4] float32 in one run; columns 1-2 as float16: a strided piece whose
      // source stride is a float32 row and destination stride a float16 row.
      TensorSource full = runs_source(DType::Float32, {2, 4}, {{0, 100, 32}});
      NamedTensor tensor{"decoder.layers.0.fc2.weight", DType::Float16, full.columns(2, 4, 8, {2, 2}), std::nullopt};
      PlannedRecord record = ckpt::plan_tensor_record(tensor, {0});
      CHECK(describe_copies(record.copies) ==
            std::vector<std::string>{"0 src=104 dst=0 n=4 rows=2 ss=16 ds=4 float32->float16"});
      std::vector<Buffer> files{patterned(200, 1)};
      put<float>(files[0], 100, {1, 2, 3, 4, 5, 6, 7, 8});
      std::vector<std::uint16_t> want{half_of(2), half_of(3), half_of(6), half_of(7)};
      CHECK(values_of<std::uint16_t>(execute(record, pointers(files))) == want);
    }
    CHECK(half_of(1.0f) == 0x3C00);  // the test's own converter
    CHECK(half_of(-2.0f) == 0xC000);
    CHECK(half_of(0.5f) == 0x3800);
  }

  TEST_CASE("plan_tensor_record: zeros pieces become kZeros copies") {
    SUBCASE("the sinusoidal placeholder") {
      std::vector<std::vector<NamedTensor>> parts{{named("decoder.embed_positions._float_tensor", {1}, 0, 64)},
                                                  {named("decoder.embed_positions._float_tensor", {1}, 1, 64)}};
      std::vector<NamedTensor> out = ckpt::glue_megatron(parts, {}, nullptr);
      REQUIRE(out.size() == 1);
      PlannedRecord record = ckpt::plan_tensor_record((out[0]), {0, 1});
      CHECK(record.nbytes == 4);
      CHECK(describe_copies(record.copies) == std::vector<std::string>{"zeros src=0 dst=0 n=4"});
    }
    SUBCASE("zeros between data, merged runs, converted sizes") {
      TensorSource padded =
          ckpt::concat({runs_source(DType::Float32, {2}, {{0, 100, 8}}), ckpt::zeros_source(DType::Float32, {3}),
                        ckpt::zeros_source(DType::Float32, {1})},
                       {6});
      NamedTensor tensor{"x", DType::Float32, padded, std::nullopt};
      PlannedRecord record = ckpt::plan_tensor_record(tensor, {2});
      CHECK(describe_copies(record.copies) ==
            std::vector<std::string>{"2 src=100 dst=0 n=8", "zeros src=0 dst=8 n=16"});
      CHECK(record.nbytes == 24);
      tensor.convert_to = DType::Float16;
      record = ckpt::plan_tensor_record(tensor, {2});
      CHECK(record.nbytes == 12);
      CHECK(describe_copies(record.copies) ==
            std::vector<std::string>{"2 src=100 dst=0 n=4 float32->float16", "zeros src=0 dst=4 n=8"});
      CHECK(tiling_problem(record) == "");
    }
    SUBCASE("a zeros part of a dim-1 glue") {
      TensorSource glued = ckpt::interleave_rows(
          {runs_source(DType::Float32, {4, 2}, {{0, 100, 32}}), ckpt::zeros_source(DType::Float32, {4, 3})}, 4, {4, 5});
      NamedTensor tensor{"x", DType::Float32, glued, std::nullopt};
      PlannedRecord record = ckpt::plan_tensor_record(tensor, {0});
      REQUIRE(record.copies.size() == 2);
      CHECK(record.copies[1].source == Piece::kZeros);
      CHECK(record.copies[1].source_offset == 0);
      CHECK(record.copies[1].offset == 8);
      CHECK(record.copies[1].nbytes == 12);
      CHECK(record.copies[1].rows == 4);
      CHECK(record.copies[1].stride == 20);
      CHECK(tiling_problem(record) == "");
      std::vector<Buffer> files{patterned(200, 1)};
      CHECK(execute(record, pointers(files)) ==
            interleaved_bytes({ids_run(0, 100, 32), ids_zeros(48)}, 4, pointers(files)));
      ValidationPlan valid({200}, record);
      CHECK_NOTHROW(ckpt::validate(valid.plan));
    }
  }

  TEST_CASE("plan_tensor_record: consecutive plain runs of one file merge into one piece") {
    TensorSource all =
        ckpt::concat({runs_source(DType::Float32, {2}, {{0, 100, 8}}),
                      runs_source(DType::Float32, {3}, {{0, 108, 12}}),              // continues file 0: merged
                      runs_source(DType::Float32, {1}, {{1, 120, 4}}),               // another file: new piece
                      runs_source(DType::Float32, {2}, {{1, 200, 4}, {1, 204, 4}}),  // jumps, then continues
                      runs_source(DType::Float32, {2}, {{1, 300, 4}, {0, 304, 4}})},
                     {10});
    NamedTensor tensor{"decoder.embed_tokens.weight", DType::Float32, all, std::nullopt};
    PlannedRecord record = ckpt::plan_tensor_record(tensor, {5, 6});
    CHECK(record.nbytes == 40);
    CHECK(describe_copies(record.copies) == std::vector<std::string>{
                                                "5 src=100 dst=0 n=20",
                                                "6 src=120 dst=20 n=4",
                                                "6 src=200 dst=24 n=8",
                                                "6 src=300 dst=32 n=4",
                                                "5 src=304 dst=36 n=4",
                                            });
    CHECK(record.sequential());
    // Two manifest files mapped to the same plan source are one file to the plan.
    PlannedRecord same_source = ckpt::plan_tensor_record(tensor, {5, 5});
    CHECK(describe_copies(same_source.copies)[0] == "5 src=100 dst=0 n=24");
  }

  TEST_CASE("plan_tensor_record: plain pieces in any order are sorted and merged; strided ones map one to one") {
    // Pieces listed backwards: the record still runs front to back, merged.
    TensorSource backwards = bytes_source({zeros(20, 4), zeros(16, 4), plain(0, 108, 8, 8), plain(0, 100, 0, 8)}, 24);
    PlannedRecord record = ckpt::plan_tensor_record({"x", DType::UInt8, backwards, std::nullopt}, {3});
    CHECK(describe_copies(record.copies) == std::vector<std::string>{"3 src=100 dst=0 n=16", "zeros src=0 dst=16 n=8"});
    CHECK(record.sequential());
    // One strided piece among them: the record keeps one piece per source piece, fields as theirs.
    TensorSource mixed = mixed_source().source;
    record = ckpt::plan_tensor_record({"x", DType::UInt8, mixed, std::nullopt}, {10, 11, 12});
    CHECK(describe_copies(record.copies) == std::vector<std::string>{
                                                "10 src=300 dst=0 n=5",
                                                "zeros src=0 dst=5 n=3",
                                                "zeros src=0 dst=8 n=3 rows=4 ss=0 ds=8",
                                                "12 src=1000 dst=11 n=5 rows=4 ss=5 ds=8",
                                                "11 src=200 dst=40 n=24",
                                            });
    CHECK(tiling_problem(record) == "");
    std::vector<Buffer> files{patterned(2048, 1), patterned(2048, 2), patterned(2048, 3)};
    std::vector<Buffer> plan_files(13, Buffer{});
    plan_files[10] = files[0];
    plan_files[11] = files[1];
    plan_files[12] = files[2];
    CHECK(execute(record, pointers(plan_files)) == bytes_of(mixed_source().ids, pointers(files)));
    ValidationPlan valid(std::vector<std::size_t>(13, 2048), record);
    CHECK_NOTHROW(ckpt::validate(valid.plan));
  }

  // ================================================================ bytes, end to end in memory

  TEST_CASE("glue + plan + execute: int32 matrices glued on dim 1 come out as the math says") {
    // part 0 = 3x2, part 1 = 3x3 (split across two files mid-row), part 2 = 3x1.
    auto p0 = [](int r, int c) { return 10 * r + c + 1; };
    auto p1 = [](int r, int c) { return 100 + 10 * r + c; };
    auto p2 = [](int r, int) { return -(r + 1); };
    std::vector<Buffer> files{patterned(512, 1), patterned(512, 2), patterned(512, 3)};
    std::vector<std::int32_t> part0, part1, part2;
    for (int r = 0; r < 3; ++r) {
      for (int c = 0; c < 2; ++c) part0.push_back(p0(r, c));
      for (int c = 0; c < 3; ++c) part1.push_back(p1(r, c));
      part2.push_back(p2(r, 0));
    }
    put(files[0], 40, part0);
    put(files[1], 8, std::vector<std::int32_t>(part1.begin(), part1.begin() + 5));  // row 0, row 1 minus one
    put(files[2], 60, std::vector<std::int32_t>(part1.begin() + 5, part1.end()));
    put(files[2], 300, part2);

    for (int mp : {2, 3}) {
      CAPTURE(mp);
      const std::string key = "decoder.layers.0.fc2.weight";
      NamedTensor second;
      second.name = key;
      second.source = runs_source(DType::Int32, {3, 3}, {{1, 8, 20}, {2, 60, 16}});
      std::vector<std::vector<NamedTensor>> parts{{named(key, {3, 2}, 0, 40, DType::Int32)}, {second}};
      if (mp == 3) parts.push_back({named(key, {3, 1}, 2, 300, DType::Int32)});
      std::vector<NamedTensor> out = ckpt::glue_megatron(parts, {}, nullptr);
      REQUIRE(out.size() == 1);
      int cols = mp == 2 ? 5 : 6;
      CHECK(out[0].source.shape == Shape{3, cols});
      PlannedRecord record = ckpt::plan_tensor_record((out[0]), {0, 1, 2});
      CHECK(tiling_problem(record) == "");
      std::vector<std::int32_t> want;
      for (int r = 0; r < 3; ++r) {
        for (int c = 0; c < 2; ++c) want.push_back(p0(r, c));
        for (int c = 0; c < 3; ++c) want.push_back(p1(r, c));
        if (mp == 3) want.push_back(p2(r, 0));
      }
      CHECK(values_of<std::int32_t>(execute(record, pointers(files))) == want);
    }
  }

  TEST_CASE("glue + plan + execute: qkv (split and fused) and dim 0, int32") {
    // Part m's qkv_proj.weight is [6, 2]: k rows 0-1, v rows 2-3, q rows 4-5;
    // element (r, c) = 1000m + 10r + c.
    std::vector<Buffer> files{patterned(256, 1), patterned(256, 2)};
    std::vector<std::vector<NamedTensor>> parts;
    for (std::uint32_t m = 0; m < 2; ++m) {
      std::vector<std::int32_t> qkv;
      for (int r = 0; r < 6; ++r) {
        for (int c = 0; c < 2; ++c) qkv.push_back(static_cast<std::int32_t>(1000 * m) + 10 * r + c);
      }
      put(files[m], 16, qkv);
      put(files[m], 128, std::vector<std::int32_t>{static_cast<std::int32_t>(7 + m), static_cast<std::int32_t>(8 + m)});
      parts.push_back({named("decoder.layers.0.self_attn.qkv_proj.weight", {6, 2}, m, 16, DType::Int32),
                       named("decoder.layers.0.fc1.bias", {2}, m, 128, DType::Int32)});
    }
    auto rows_of = [](std::int32_t m, int first, int count) {
      std::vector<std::int32_t> out;
      for (int r = first; r < first + count; ++r) {
        for (int c = 0; c < 2; ++c) out.push_back(1000 * m + 10 * r + c);
      }
      return out;
    };
    auto joined = [](std::vector<std::vector<std::int32_t>> pieces) {
      std::vector<std::int32_t> out;
      for (const auto& piece : pieces) out.insert(out.end(), piece.begin(), piece.end());
      return out;
    };
    auto bytes_of_tensor = [&](const NamedTensor& tensor) {
      PlannedRecord record = ckpt::plan_tensor_record((tensor), {0, 1});
      CHECK(tiling_problem(record) == "");
      return values_of<std::int32_t>(execute(record, pointers(files)));
    };

    std::vector<NamedTensor> split = ckpt::glue_megatron(parts, {}, nullptr);
    REQUIRE(names_of(split) == std::vector<std::string>{"decoder.layers.0.self_attn.k_proj.weight",
                                                        "decoder.layers.0.self_attn.v_proj.weight",
                                                        "decoder.layers.0.self_attn.q_proj.weight",
                                                        "decoder.layers.0.fc1.bias"});
    CHECK(bytes_of_tensor(split[0]) == joined({rows_of(0, 0, 2), rows_of(1, 0, 2)}));
    CHECK(bytes_of_tensor(split[1]) == joined({rows_of(0, 2, 2), rows_of(1, 2, 2)}));
    CHECK(bytes_of_tensor(split[2]) == joined({rows_of(0, 4, 2), rows_of(1, 4, 2)}));
    CHECK(bytes_of_tensor(split[3]) == std::vector<std::int32_t>{7, 8, 8, 9});

    ckpt::GlueOptions fused_options;
    fused_options.fused_qkv = true;
    std::vector<NamedTensor> fused = ckpt::glue_megatron(parts, fused_options, nullptr);
    REQUIRE(fused.size() == 2);
    CHECK(fused[0].source.shape == Shape{12, 2});
    CHECK(bytes_of_tensor(fused[0]) == joined({rows_of(0, 0, 2), rows_of(1, 0, 2), rows_of(0, 2, 2), rows_of(1, 2, 2),
                                               rows_of(0, 4, 2), rows_of(1, 4, 2)}));
  }

  TEST_CASE("consolidate + glue + plan + execute: 2 model parts x 2 FSDP shards, int32") {
    // Each part's layer flat parameter: qkv_proj.weight [3, 2] (6), fc2.weight
    // [2, 3] (6), fc1.bias [1] (1): 13 elements on 2 ranks, chunk 7; rank 1 holds
    // 6 and one padding element. fc2.weight straddles the shards (element 6 on
    // rank 0, 7-11 on rank 1). Flat element i of part m is 1000m + i; padding
    // holds -7777 and must never show.
    std::vector<InstanceSpec> instances{{"decoder.layers.0",
                                         {"self_attn.qkv_proj.weight", "fc2.weight", "fc1.bias"},
                                         {{3, 2}, {2, 3}, {1}},
                                         false,
                                         {}}};
    ckpt::Manifest manifest;
    std::vector<Buffer> files;
    std::vector<std::vector<int>> grid(2);
    for (int m = 0; m < 2; ++m) {
      for (int rank = 0; rank < 2; ++rank) {
        auto index = static_cast<int>(manifest.files.size());
        std::uint64_t flat_offset = 64 + 32 * static_cast<std::uint64_t>(index);
        ckpt::ManifestFile file =
            shard_file(shard_path(rank), instances, 2, rank, {flat_offset}, DType::Int32, {{"decoder.version", 16}});
        file.role.mp_part = m;
        manifest.files.push_back(file);
        Buffer bytes = patterned(512, static_cast<unsigned>(index));
        ckpt::FsdpChunk chunk = ckpt::fsdp_chunk(13, 2, rank);
        std::vector<std::int32_t> flat;
        for (std::int64_t i = 0; i < chunk.numel; ++i)
          flat.push_back(static_cast<std::int32_t>(1000 * m + chunk.begin + i));
        for (std::int64_t i = 0; i < chunk.padding; ++i) flat.push_back(-7777);
        put(bytes, flat_offset, flat);
        put(bytes, 16, std::vector<std::int32_t>{3});
        files.push_back(std::move(bytes));
        grid[static_cast<std::size_t>(m)].push_back(index);
      }
    }
    std::vector<std::vector<NamedTensor>> consolidated;
    for (const std::vector<int>& shards : grid) consolidated.push_back(ckpt::consolidate_part(manifest, shards));
    std::vector<std::string> replicated;
    std::vector<NamedTensor> out = ckpt::glue_megatron(consolidated, {}, &replicated);
    REQUIRE(names_of(out) == std::vector<std::string>{
                                 "decoder.layers.0.self_attn.k_proj.weight",
                                 "decoder.layers.0.self_attn.v_proj.weight",
                                 "decoder.layers.0.self_attn.q_proj.weight",
                                 "decoder.layers.0.fc2.weight",
                                 "decoder.layers.0.fc1.bias",
                                 "decoder.version",
                             });
    CHECK(replicated.empty());
    std::vector<std::uint32_t> sources{0, 1, 2, 3};
    auto values = [&](const NamedTensor& tensor) {
      PlannedRecord record = ckpt::plan_tensor_record((tensor), sources);
      CHECK(tiling_problem(record) == "");
      return values_of<std::int32_t>(execute(record, pointers(files)));
    };
    // qkv of part m = flat elements 0-5 as [3, 2]: k = row 0, v = row 1, q = row 2.
    CHECK(values(out[0]) == std::vector<std::int32_t>{0, 1, 1000, 1001});
    CHECK(values(out[1]) == std::vector<std::int32_t>{2, 3, 1002, 1003});
    CHECK(values(out[2]) == std::vector<std::int32_t>{4, 5, 1004, 1005});
    // fc2 of part m = flat elements 6-11 as [2, 3]; glued on dim 1 into [2, 6].
    CHECK(out[3].source.shape == Shape{2, 6});
    CHECK(values(out[3]) == std::vector<std::int32_t>{6, 7, 8, 1006, 1007, 1008, 9, 10, 11, 1009, 1010, 1011});
    // fc1.bias = element 12 of each part, glued on dim 0.
    CHECK(values(out[4]) == std::vector<std::int32_t>{12, 1012});
    CHECK(values(out[5]) == std::vector<std::int32_t>{3});

    // Re-cut into 3 parts: k, v and q (2 rows each) do not divide, an error;
    // into 2 parts: each part's own values again.
    CHECK_THROWS_AS(ckpt::reshard_megatron(consolidated, 3, nullptr), ckpt::Error);
    std::vector<std::vector<NamedTensor>> again = ckpt::reshard_megatron(consolidated, 2, nullptr);
    REQUIRE(again.size() == 2);
    for (int m = 0; m < 2; ++m) {
      CAPTURE(m);
      const std::vector<NamedTensor>& part = again[static_cast<std::size_t>(m)];
      REQUIRE(names_of(part) == std::vector<std::string>{"decoder.layers.0.self_attn.qkv_proj.weight",
                                                         "decoder.layers.0.fc2.weight", "decoder.layers.0.fc1.bias",
                                                         "decoder.version"});
      std::vector<std::int32_t> own;
      for (std::int32_t i = 0; i < 12; ++i) own.push_back(1000 * m + i);
      CHECK(values(part[0]) == std::vector<std::int32_t>(own.begin(), own.begin() + 6));
      CHECK(values(part[1]) == std::vector<std::int32_t>(own.begin() + 6, own.end()));
      CHECK(values(part[2]) == std::vector<std::int32_t>{1000 * m + 12});
    }
  }

  TEST_CASE(
      "consolidate + reshard + flatten + plan, then consolidate + glue again: MP 2 x DP 3 -> MP 4 x DP 2, int32") {
    // What `reshard` does, in memory. Each input part's layer flat parameter:
    // qkv_proj.weight [6, 2] (12), fc2.weight [2, 4] (8), fc1.bias [2] (2): 22
    // elements on 3 ranks, chunk 8, rank 2 holding 6 and 2 of padding (-7777).
    // Flat element i of part m is 1000m + i; decoder.version is 3. Re-cut into
    // 4 parts of 11 elements on 2 ranks (chunk 6, 1 of padding), the shards'
    // bytes written by running their records, then read back as a checkpoint.
    std::vector<InstanceSpec> instances{{"decoder.layers.0",
                                         {"self_attn.qkv_proj.weight", "fc2.weight", "fc1.bias"},
                                         {{6, 2}, {2, 4}, {2}},
                                         false,
                                         {}}};
    ckpt::Manifest input;
    std::vector<Buffer> input_files;
    std::vector<std::vector<int>> grid(2);
    for (int m = 0; m < 2; ++m) {
      for (int rank = 0; rank < 3; ++rank) {
        auto index = static_cast<int>(input.files.size());
        ckpt::ManifestFile file =
            shard_file(shard_path(rank), instances, 3, rank, {64}, DType::Int32, {{"decoder.version", 16}});
        file.role.mp_part = m;
        input.files.push_back(file);
        Buffer bytes = patterned(256, static_cast<unsigned>(index));
        ckpt::FsdpChunk chunk = ckpt::fsdp_chunk(22, 3, rank);
        std::vector<std::int32_t> flat;
        for (std::int64_t i = 0; i < chunk.numel; ++i)
          flat.push_back(static_cast<std::int32_t>(1000 * m + chunk.begin + i));
        for (std::int64_t i = 0; i < chunk.padding; ++i) flat.push_back(-7777);
        put(bytes, 64, flat);
        put(bytes, 16, std::vector<std::int32_t>{3});
        input_files.push_back(std::move(bytes));
        grid[static_cast<std::size_t>(m)].push_back(index);
      }
    }
    std::vector<std::vector<NamedTensor>> parts;
    for (const std::vector<int>& shards : grid) parts.push_back(ckpt::consolidate_part(input, shards));
    std::vector<std::vector<NamedTensor>> weights = ckpt::reshard_megatron(parts, 4, nullptr);
    REQUIRE(weights.size() == 4);

    // Write the 4 x 2 output shards.
    const ckpt::FsdpMetadata& layout = *input.files[0].fsdp;
    ckpt::Manifest output;
    std::vector<Buffer> output_files;
    std::vector<std::vector<int>> out_grid(4);
    auto run = [](const NamedTensor& tensor, const std::vector<Buffer>& files) {
      PlannedRecord record = ckpt::plan_tensor_record(tensor, identity_sources(files.size()));
      CHECK(tiling_problem(record) == "");
      return execute(record, pointers(files));
    };
    for (int m = 0; m < 4; ++m) {
      for (int rank = 0; rank < 2; ++rank) {
        CAPTURE(m);
        CAPTURE(rank);
        std::vector<ckpt::FlatShard> flats = ckpt::flatten_fsdp(layout, weights[static_cast<std::size_t>(m)], 2, rank);
        REQUIRE(flats.size() == 1);
        CHECK(flats[0].source.shape == Shape{6});
        CHECK(flats[0].padding == (rank == 1 ? 1 : 0));
        CHECK(flats[0].shapes == std::vector<Shape>{{3, 2}, {2, 2}, {1}});
        ckpt::ManifestFile file;
        file.path = cat(cat("/out/model_part-", std::to_string(m)), cat("-shard", std::to_string(rank)));
        file.role.mp_part = m;
        file.role.dp_shard = rank;
        ckpt::FsdpMetadata metadata = layout;
        ckpt::FlatParamMeta& flat = metadata.instances[0].flat_params[0];
        flat.padding = flats[0].padding;
        flat.shapes = flats[0].shapes;
        flat.numels = flats[0].numels;
        file.fsdp = metadata;
        Buffer bytes = patterned(256, 50 + static_cast<unsigned>(2 * m + rank));
        Buffer data = run({flats[0].state_key, DType::Int32, flats[0].source, std::nullopt}, input_files);
        std::copy(data.begin(), data.end(), bytes.begin() + 64);
        add(file, contiguous(cat("model/", flats[0].state_key), DType::Int32, {6}, 64));
        Buffer version = run((find(weights[static_cast<std::size_t>(m)], "decoder.version")), input_files);
        std::copy(version.begin(), version.end(), bytes.begin() + 16);
        add(file, contiguous("model/decoder.version", DType::Int32, {1}, 16));
        out_grid[static_cast<std::size_t>(m)].push_back(static_cast<int>(output.files.size()));
        output.files.push_back(file);
        output_files.push_back(std::move(bytes));
      }
    }
    // The padding element of each part's last shard is zero.
    CHECK(values_of<std::int32_t>(Buffer(output_files[1].begin() + 64 + 20, output_files[1].begin() + 64 + 24)) ==
          std::vector<std::int32_t>{0});

    // Read back: consolidate each output part, glue, and compare with the input glued.
    std::vector<std::vector<NamedTensor>> back;
    for (const std::vector<int>& shards : out_grid) back.push_back(ckpt::consolidate_part(output, shards));
    ckpt::GlueOptions fused;
    fused.fused_qkv = true;
    std::vector<NamedTensor> want = ckpt::glue_megatron(parts, fused, nullptr);
    std::vector<NamedTensor> got = ckpt::glue_megatron(back, fused, nullptr);
    REQUIRE(names_of(got) == names_of(want));
    for (std::size_t k = 0; k < want.size(); ++k) {
      CAPTURE(want[k].name);
      CHECK(got[k].source.shape == want[k].source.shape);
      CHECK(values_of<std::int32_t>(run((got[k]), output_files)) ==
            values_of<std::int32_t>(run((want[k]), input_files)));
    }
    // Spot checks by hand: part 2 of 4 holds k, v, q row 2 (= part 1's row 0 of
    // each third) and fc2 columns 4-5 (= part 1's columns 0-1).
    const std::vector<NamedTensor>& part2 = back[2];
    CHECK(values_of<std::int32_t>(run((part2[0]), output_files)) ==
          std::vector<std::int32_t>{1000, 1001, 1004, 1005, 1008, 1009});
    CHECK(values_of<std::int32_t>(run((part2[1]), output_files)) == std::vector<std::int32_t>{1012, 1013, 1016, 1017});
    CHECK(values_of<std::int32_t>(run((part2[2]), output_files)) == std::vector<std::int32_t>{1020});
  }

}  // TEST_SUITE
