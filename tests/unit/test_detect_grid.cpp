// Unit tests for detect_grid (src/manifest/manifest.cpp) on manifests built in
// memory: the cells of complete grids whatever the file order, and each problem
// that makes a set unfit for stitch, reshard or diff, one line naming what is
// missing, duplicated or inconsistent (the lines inspect, verify and every
// command print).
#include <doctest/doctest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "layout_fixtures.hpp"

namespace {

using namespace layout_fixtures;
using ckpt::ManifestFile;

// Layer: 8 elements; root: 10 elements (see ThreeRankPart). On 3 ranks the
// chunks are 3 and 4, so the flat parameters alone imply 3 ranks.
const std::vector<InstanceSpec>& instances() {
  static const std::vector<InstanceSpec> specs = ThreeRankPart().instances;
  return specs;
}

std::string name_of(int m, int d) {
  std::string out = "/ckpt/checkpoint_last-model_part-";
  out.append(std::to_string(m));
  out.append("-shard");
  out.append(std::to_string(d));
  out.append(".pt");
  return out;
}

ManifestFile file_of(int m, int d, int world = 3, DType dtype = DType::Float32) {
  ManifestFile file = shard_file(name_of(m, d), instances(), world, d, {64, 1024}, dtype, {{"decoder.version", 4000}});
  file.role.mp_part = m;
  return file;
}

std::vector<ManifestFile> grid_files(int mp, int dp) {
  std::vector<ManifestFile> files;
  for (int m = mp - 1; m >= 0; --m) {  // out of order on purpose
    for (int d = dp - 1; d >= 0; --d) files.push_back(file_of(m, d, dp));
  }
  return files;
}

void erase(std::vector<ManifestFile>& files, int m, int d) {
  std::erase_if(files, [&](const ManifestFile& f) { return f.path == name_of(m, d); });
}

bool has_problem(const ckpt::Grid& grid, const std::string& needle) {
  for (const std::string& problem : grid.problems) {
    if (contains(problem, needle)) return true;
  }
  return false;
}

std::string problems_text(const ckpt::Grid& grid) {
  std::string out;
  for (const std::string& problem : grid.problems) out.append(problem).append("\n");
  return out;
}

TEST_SUITE("detect_grid") {
  TEST_CASE("detect_grid: complete grids in any file order, cells by part and shard") {
    for (auto [mp, dp] : {std::pair{1, 1}, {2, 3}, {4, 2}, {1, 3}}) {
      CAPTURE(mp);
      CAPTURE(dp);
      std::vector<ManifestFile> files = grid_files(mp, dp);
      ckpt::Grid grid = ckpt::detect_grid(files);
      CHECK_MESSAGE(grid.problems.empty(), problems_text(grid));
      CHECK(grid.mp == mp);
      CHECK(grid.dp == dp);
      REQUIRE(grid.cells.size() == static_cast<std::size_t>(mp));
      for (int m = 0; m < mp; ++m) {
        REQUIRE(grid.cells[m].size() == static_cast<std::size_t>(dp));
        for (int d = 0; d < dp; ++d) CHECK(files.at(static_cast<std::size_t>(grid.cells[m][d])).path == name_of(m, d));
      }
    }
    CHECK(ckpt::detect_grid({}).cells.empty());
  }

  TEST_CASE("detect_grid: a missing shard, a missing last shard and a missing model part are named") {
    std::vector<ManifestFile> files = grid_files(2, 3);
    erase(files, 1, 1);
    ckpt::Grid grid = ckpt::detect_grid(files);
    CHECK(grid.cells[1][1] == -1);
    CHECK(has_problem(grid, "shard 1 of 3 missing for model part 1"));
    CHECK(grid.problems.size() == 1);

    // the last rank of every part: the chunk rule says there are 3
    files = grid_files(2, 3);
    erase(files, 0, 2);
    erase(files, 1, 2);
    grid = ckpt::detect_grid(files);
    CHECK(grid.dp == 3);
    CHECK(has_problem(grid, "shard 2 of 3 missing for model part 0 (the chunk rule:"));
    CHECK(has_problem(grid, "shard 2 of 3 missing for model part 1"));

    // cfg declares 2 parts, only part 0 is there
    files = grid_files(1, 3);
    for (ManifestFile& file : files) file.declared_parts = ckpt::DeclaredParts{2, "cfg.model.model_parallel_size"};
    grid = ckpt::detect_grid(files);
    CHECK(grid.mp == 2);
    CHECK(has_problem(grid, "model part 1 of 2 missing (cfg.model.model_parallel_size = 2; --model-parts overrides"));
    // --model-parts replaces a stale cfg; it cannot make an incomplete set complete
    CHECK(ckpt::detect_grid(files, 1).problems.empty());
    CHECK(has_problem(ckpt::detect_grid(files, 2), "model part 1 of 2 missing (--model-parts 2)"));
    grid = ckpt::detect_grid(grid_files(2, 3), 1);
    CHECK(has_problem(grid, "model part 1 found, beyond the 1 part(s) declared (--model-parts 1)"));
  }

  TEST_CASE("detect_grid: duplicates, unnamed files and files that disagree are problems") {
    std::vector<ManifestFile> files = grid_files(1, 3);
    files.push_back(file_of(0, 1));
    files.back().path = "/other/checkpoint_last-model_part-0-shard1.pt";
    CHECK(has_problem(ckpt::detect_grid(files), "claim the same part 0 shard 1"));

    files = grid_files(1, 3);
    ManifestFile unnamed = file_of(0, 0);
    unnamed.path = "/ckpt/consolidated.pt";
    unnamed.role = {};
    files.push_back(unnamed);
    CHECK(has_problem(ckpt::detect_grid(files), "/ckpt/consolidated.pt: no model_part/shard number in the name"));
    ManifestFile unnamed2 = unnamed;
    unnamed2.path = "/ckpt/other.pt";
    CHECK(has_problem(ckpt::detect_grid({unnamed, unnamed2}), "2 files whose names carry no model_part/shard numbers"));
    CHECK(ckpt::detect_grid({unnamed}).problems.empty());

    files = grid_files(1, 3);
    files[0].tensors.edit()[0].dtype = DType::Float16;
    files[0].tensors.edit()[0].nbytes /= 2;
    CHECK(has_problem(ckpt::detect_grid(files), "(mixed dtypes)"));

    files = grid_files(1, 3);
    files[1].remove_tensors_if(
        [](const ckpt::StoredTensor& t) { return ckpt::tensor_section(t) == "optimizer_state"; });
    CHECK(has_problem(ckpt::detect_grid(files), "(optimizer state in some files only)"));

    files = grid_files(1, 3);
    add(files[2], contiguous("model/extra.weight", DType::Float32, {2}, 7000));
    CHECK(has_problem(ckpt::detect_grid(files), "(shards of different checkpoints?)"));

    files = grid_files(1, 3);
    files[0].fsdp.edit().instances[0].flat_params[0].padding = 2;  // rank 2 of the layer: 1
    CHECK(has_problem(ckpt::detect_grid(files),
                      "decoder.layers.0.flat_param_0: padding 2 but the chunk rule for 3 ranks gives 1"));

    files = grid_files(2, 3);
    files[0].declared_parts = ckpt::DeclaredParts{2, "cfg.model.model_parallel_size"};
    files[1].declared_parts = ckpt::DeclaredParts{4, "cfg.model.model_parallel_size"};
    CHECK(has_problem(ckpt::detect_grid(files), "(files of different checkpoints?)"));

    files = grid_files(1, 1);
    files[0].role.dp_shard = ckpt::kMaxGridSide;
    CHECK(has_problem(ckpt::detect_grid(files), "is outside [0,"));
  }

  TEST_CASE("detect_grid: a file named into another cell than torch saved it in is a problem of the set") {
    auto saved_as = [](ManifestFile& file, int m, int d) {
      file.archive_name = std::filesystem::path(name_of(m, d)).stem().string();
    };
    std::vector<ManifestFile> files = grid_files(2, 3);
    for (ManifestFile& file : files) saved_as(file, *file.role.mp_part, *file.role.dp_shard);
    CHECK(ckpt::detect_grid(files).problems.empty());

    std::vector<ManifestFile> swapped = files;  // (0, 0) and (0, 1) renamed into each other's names
    for (ManifestFile& file : swapped) {
      if (file.path == name_of(0, 0)) saved_as(file, 0, 1);
      if (file.path == name_of(0, 1)) saved_as(file, 0, 0);
    }
    ckpt::Grid grid = ckpt::detect_grid(swapped);
    INFO(problems_text(grid));
    CHECK(has_problem(grid, name_of(0, 0) + ": named shard 0 but saved as shard 1"));
    CHECK(has_problem(grid, "; " + name_of(0, 1) + " is named shard 1"));
    CHECK(has_problem(grid, name_of(0, 1) + ": named shard 1 but saved as shard 0"));

    std::vector<ManifestFile> parts = files;  // a part renamed
    for (ManifestFile& file : parts) {
      if (*file.role.mp_part == 1) saved_as(file, 0, *file.role.dp_shard);
    }
    CHECK(has_problem(ckpt::detect_grid(parts), "named model part 1 but saved as model part 0"));

    // renamed consistently: another prefix, or an archive name without numbers
    std::vector<ManifestFile> renamed = files;
    for (ManifestFile& file : renamed) file.archive_name = "checkpoint_best-" + file.archive_name.substr(16);
    renamed[0].archive_name = "archive";
    CHECK(ckpt::detect_grid(renamed).problems.empty());
  }
}

}  // namespace
