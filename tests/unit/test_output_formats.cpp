// Unit tests for the table of output formats (src/plan/output_formats.cpp): every
// row against what stitch's option check accepts and refuses, and how --format
// and -o choose a row. No file is read or written.
#include <doctest/doctest.h>

#include <set>
#include <string>

#include "ckpt/io/error.hpp"
#include "ckpt/plan/output_formats.hpp"
#include "error_kind.hpp"

namespace {

using ckpt::OutputFlags;
using ckpt::OutputFormatInfo;

// An -o the row takes: a folder, a file with its extension, or any file.
std::string output_for(const OutputFormatInfo& format) {
  if (format.folder) return "out";
  return *format.extension != '\0' ? std::string("model") + format.extension : "model.pt";
}

// Whether stitch's option check takes `flags` with `format`; any error but a
// usage error fails the test.
bool accepted(const OutputFormatInfo& format, const OutputFlags& flags) {
  try {
    ckpt::check_output_flags(format, flags);
    return true;
  } catch (const ckpt::Error& e) {
    CHECK_KIND(e, ckpt::ErrorKind::Usage);
    return false;
  }
}

// One flag of the check, and the column that says whether a format takes it.
struct FlagCase {
  const char* flag;
  bool OutputFlags::*given;
  bool OutputFormatInfo::*column;
};

}  // namespace

TEST_SUITE("output formats") {
  TEST_CASE("the table: one row per format, named once, each with a plan function") {
    std::set<std::string> names;
    std::size_t defaults = 0;
    for (const OutputFormatInfo& format : ckpt::output_formats()) {
      CAPTURE(format.name);
      CHECK(names.insert(format.name).second);
      CHECK(&ckpt::format_info(format.format) == &format);
      CHECK((format.plan != nullptr));
      CHECK(std::string(format.label).size() > 0);
      CHECK(ckpt::output_formats_help().find(format.name) != std::string::npos);
      // A folder format names no file, so -o implies nothing about it.
      if (format.folder) CHECK(*format.extension == '\0');
      if (&ckpt::choose_output_format("", "x") == &format) ++defaults;
    }
    CHECK(defaults == 1);
  }

  TEST_CASE("--format NAME and -o's extension choose the row") {
    for (const OutputFormatInfo& format : ckpt::output_formats()) {
      CAPTURE(format.name);
      CHECK(&ckpt::choose_output_format(format.name, "x") == &format);
      CHECK(&ckpt::choose_output_format(format.name, output_for(format)) == &format);
      if (*format.extension != '\0') {
        CHECK(&ckpt::choose_output_format("", std::string("dir/x") + format.extension) == &format);
      }
    }
    CHECK_THROWS_KIND(ckpt::choose_output_format("gguf", "x"), ckpt::ErrorKind::Usage);
  }

  TEST_CASE("every flag is accepted or refused as the row says") {
    const FlagCase cases[] = {
        {"--max-shard-size", &OutputFlags::max_shard_size, &OutputFormatInfo::shardable},
        {"--weights-only", &OutputFlags::weights_only, &OutputFormatInfo::carries_objects},
        {"--optimizer-state", &OutputFlags::optimizer_state, &OutputFormatInfo::carries_objects},
        {"--hf-config", &OutputFlags::hf_config, &OutputFormatInfo::hf_config},
        {"--no-stitch-megatron", &OutputFlags::no_stitch_megatron, &OutputFormatInfo::per_part},
        {"--fused-qkv", &OutputFlags::fused_qkv, &OutputFormatInfo::fused_qkv},
    };
    for (const OutputFormatInfo& format : ckpt::output_formats()) {
      OutputFlags none;
      none.output = output_for(format);
      CAPTURE(format.name);
      CHECK(accepted(format, none));
      for (const FlagCase& one : cases) {
        CAPTURE(one.flag);
        OutputFlags flags = none;
        flags.*one.given = true;
        CHECK(accepted(format, flags) == format.*one.column);
      }
      // --no-cfg: with --weights-only, where that is taken, never alone.
      OutputFlags no_cfg = none;
      no_cfg.no_cfg = true;
      CHECK_FALSE(accepted(format, no_cfg));
      no_cfg.weights_only = true;
      CHECK(accepted(format, no_cfg) == format.carries_objects);
      // Flags that never go together, whatever the format.
      OutputFlags both = none;
      both.optimizer_state = both.weights_only = true;
      CHECK_FALSE(accepted(format, both));
      both.weights_only = false;
      both.ema = true;
      CHECK_FALSE(accepted(format, both));
      // -o: a format with an extension requires it.
      OutputFlags other = none;
      other.output = "model.other";
      CHECK(accepted(format, other) == (format.folder || *format.extension == '\0'));
    }
  }

  TEST_CASE("refusals name the flag and the formats that take it") {
    const OutputFormatInfo& torch = ckpt::format_info(ckpt::OutputFormat::Torch);
    const OutputFormatInfo& safetensors = ckpt::format_info(ckpt::OutputFormat::Safetensors);
    const OutputFormatInfo& hf = ckpt::format_info(ckpt::OutputFormat::HfOpt);
    OutputFlags sharded{.output = "model.pt", .max_shard_size = true};
    CHECK_THROWS_WITH(ckpt::check_output_flags(torch, sharded),
                      "--max-shard-size needs --format safetensors, hf or dcp");
    OutputFlags weights_only{.output = "model.safetensors", .weights_only = true};
    CHECK_THROWS_WITH(ckpt::check_output_flags(safetensors, weights_only),
                      "--weights-only is for --format torch (safetensors holds weights only anyway)");
    OutputFlags per_part{.output = "out", .no_stitch_megatron = true};
    CHECK_THROWS_WITH(
        ckpt::check_output_flags(hf, per_part),
        "--no-stitch-megatron does not go with --format hf: a Hugging Face OPT folder is the whole model");
    OutputFlags wrong_extension{.output = "model.pt"};
    CHECK_THROWS_WITH(ckpt::check_output_flags(safetensors, wrong_extension),
                      "-o must end in .safetensors with --format safetensors");
  }
}
