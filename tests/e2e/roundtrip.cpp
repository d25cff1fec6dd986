// Test helper: decode a torch.save file and write it back through the plan and
// executor, unchanged. The e2e suite checks the result with torch.load.
#include <fmt/format.h>

#include "ckpt/exec/exec.hpp"
#include "ckpt/format/checkpoint.hpp"
#include "ckpt/plan/torch_file.hpp"

int main(int argc, char** argv) {
  if (argc < 3) {
    fmt::print(stderr, "usage: roundtrip IN.pt OUT.pt [THREADS]\n");
    return 2;
  }
  try {
    ckpt::MappedFile file(argv[1]);
    ckpt::Checkpoint checkpoint(file);
    ckpt::Plan plan;
    auto storages = ckpt::copy_all_storages(checkpoint, plan);
    plan.files.push_back(
        ckpt::plan_torch_file(argv[2], ckpt::archive_name_for(argv[2]), checkpoint.graph(), std::move(storages)));
    ckpt::ExecOptions options;
    options.threads = argc > 3 ? static_cast<unsigned>(std::stoul(argv[3])) : 0;
    ckpt::execute(plan, options);
  } catch (const ckpt::Error& e) {
    fmt::print(stderr, "roundtrip: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
