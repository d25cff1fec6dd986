// Unit tests for the input-layout table (src/manifest/input_layouts.cpp): every
// row is complete, paths and sets are given to the right row, and a set mixing
// layouts is one problem naming both.
#include <doctest/doctest.h>

#include <fstream>
#include <string>
#include <vector>

#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "temp_files.hpp"

TEST_SUITE("input_layouts") {
  TEST_CASE("every row is complete and found by its format") {
    for (ckpt::FileFormat format : {ckpt::FileFormat::Torch, ckpt::FileFormat::Safetensors}) {
      const ckpt::InputLayout& layout = ckpt::input_layout(format);
      CHECK(layout.format == format);
      CHECK(!layout.name.empty());
      CHECK((layout.claims != nullptr));
      CHECK((layout.describe != nullptr));
      CHECK((layout.check_set != nullptr));
      CHECK((layout.state_dict != nullptr));
      CHECK((layout.count_model != nullptr));
    }
  }

  TEST_CASE("a path goes to the row that claims it, torch taking the rest") {
    CHECK(ckpt::input_layout_of_path("/m/model.safetensors").name == "safetensors");
    CHECK(ckpt::input_layout_of_path("model-00001-of-00002.safetensors").name == "safetensors");
    CHECK(ckpt::input_layout_of_path("checkpoint_last-model_part-0-shard0.pt").name == "torch");
    CHECK(ckpt::input_layout_of_path("model.safetensors.bak").name == "torch");
    CHECK(ckpt::input_layout_of_path("weights").name == "torch");
    CHECK(ckpt::input_layout(ckpt::Manifest{}).name == "torch");
  }

  TEST_CASE("rows say what their files carry") {
    const ckpt::InputLayout& torch = ckpt::input_layout(ckpt::FileFormat::Torch);
    const ckpt::InputLayout& safetensors = ckpt::input_layout(ckpt::FileFormat::Safetensors);
    CHECK(torch.has_crcs);
    CHECK(torch.training);
    CHECK_FALSE(safetensors.has_crcs);
    CHECK_FALSE(safetensors.training);
  }

  TEST_CASE("a set mixing layouts is one problem naming both and the odd file") {
    std::vector<ckpt::ManifestFile> files(2);
    files[0].path = "/a/model.pt";
    files[1].path = "/a/model.safetensors";
    files[1].format = ckpt::FileFormat::Safetensors;
    ckpt::Grid grid = ckpt::detect_grid(files);
    REQUIRE(grid.problems.size() == 1);
    CHECK(grid.problems[0] == "safetensors files mixed with torch files (/a/model.safetensors): give one kind");
  }

  TEST_CASE("a grid is made of training layouts only: reshard refuses a one-state-dict set") {
    ckpt::Manifest manifest;
    manifest.files.resize(1);
    manifest.files[0].path = "/a/model.safetensors";
    manifest.files[0].format = ckpt::FileFormat::Safetensors;
    CHECK_THROWS_WITH_AS(ckpt::complete_grid(manifest),
                         doctest::Contains("a safetensors file: reshard cuts a metaseq training checkpoint"),
                         ckpt::Error);
  }
}

TEST_SUITE("input_layouts") {
  TEST_CASE("a folder is read by the first row whose files it holds") {
    test_files::TempDir dir;
    auto touch = [&](const std::string& name) { std::ofstream(dir / name) << "x"; };
    touch("model.safetensors");
    // Safetensors only: the safetensors row takes it.
    CHECK(ckpt::expand_inputs({dir.path().string()}) == std::vector<std::string>{(dir / "model.safetensors").string()});
    touch("checkpoint_last-model_part-1-shard0.pt");
    touch("checkpoint_last-model_part-0-shard0.pt");
    // With *.pt files, torch's row comes first; files sorted by part, then shard.
    CHECK(ckpt::expand_inputs({dir.path().string()}) ==
          std::vector<std::string>{(dir / "checkpoint_last-model_part-0-shard0.pt").string(),
                                   (dir / "checkpoint_last-model_part-1-shard0.pt").string()});
    CHECK(ckpt::index_problems({dir.path().string()}, {}).empty());
    test_files::TempDir empty;
    CHECK_THROWS_WITH_AS(ckpt::expand_inputs({empty.path().string()}), doctest::Contains("no input files"),
                         ckpt::Error);
  }
}

TEST_SUITE("input_layouts") {
  TEST_CASE("a dangling link named like a file of the set is kept, so that opening it names it") {
    test_files::TempDir dir;
    std::ofstream(dir / "a.safetensors") << "x";
    std::filesystem::create_symlink("/nonexistent/b.safetensors", dir / "b.safetensors");
    CHECK(ckpt::expand_inputs({dir.path().string()}) ==
          std::vector<std::string>{(dir / "a.safetensors").string(), (dir / "b.safetensors").string()});
  }

  TEST_CASE("a set mixing layouts is refused as such by every reader, not as a stitch input") {
    ckpt::Manifest manifest;
    manifest.files.resize(2);
    manifest.files[0].path = "/a/model.pt";
    manifest.files[1].path = "/a/model.safetensors";
    manifest.files[1].format = ckpt::FileFormat::Safetensors;
    CHECK_THROWS_WITH_AS(ckpt::complete_grid(manifest),
                         "safetensors files mixed with torch files (/a/model.safetensors): give one kind", ckpt::Error);
  }
}

TEST_SUITE("input_layouts") {
  TEST_CASE("an index naming a file that is not there is an incomplete set, naming the file") {
    test_files::TempDir dir;
    std::ofstream(dir / "model.safetensors.index.json")
        << R"({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})";
    std::ofstream(dir / "model-00001-of-00002.safetensors") << "x";
    try {
      ckpt::expand_inputs({dir.path().string()});
      FAIL("a set without one of its files was expanded");
    } catch (const ckpt::Error& e) {
      CHECK(e.kind() == ckpt::ErrorKind::IncompleteSet);
      CHECK(std::string(e.what()).find("model-00002-of-00002.safetensors") != std::string::npos);
    }
  }
}
