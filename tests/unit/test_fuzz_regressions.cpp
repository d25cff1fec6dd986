// Replays every input under tests/fuzz/regressions/<target>/ through the code of
// that fuzz target (tests/fuzz/fuzz_entry.hpp), so that an input that once
// crashed, hung or broke an invariant keeps being checked in the normal build,
// without clang or libFuzzer. A ckpt::Error is a pass.
//
// Each input runs in a child process: a stack overflow or an abort fails that
// input's check (with the signal or exit status) instead of taking every other
// unit test down with it; an input that runs longer than kSecondsPerInput, or
// whose process grows past kMaxResidentBytes (libFuzzer's -rss_limit_mb=2048 in
// `make fuzz`), is stopped and reported as a hang or a memory blow-up.
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "../fuzz/fuzz_entry.hpp"

#ifndef CKPT_FUZZ_REGRESSIONS
#error "tests/meson.build defines CKPT_FUZZ_REGRESSIONS (the tests/fuzz/regressions folder)"
#endif

namespace {

constexpr unsigned kSecondsPerInput = 10;
constexpr std::uint64_t kMaxResidentBytes = std::uint64_t{2} << 30;
constexpr int kExitException = 70;
constexpr int kExitMemory = 71;

// In the child: ends the process once its resident set passes kMaxResidentBytes.
// (setrlimit would do for a plain build, but AddressSanitizer reserves terabytes
// of address space and cannot run under RLIMIT_AS.)
void watch_memory() {
  std::thread([] {
    const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
    while (true) {
      std::ifstream statm("/proc/self/statm");
      std::uint64_t size_pages = 0;
      std::uint64_t resident_pages = 0;
      statm >> size_pages >> resident_pages;
      if (resident_pages * page > kMaxResidentBytes) ::_exit(kExitMemory);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }).detach();
}

std::vector<std::byte> read_all(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(chars.size());
  std::transform(chars.begin(), chars.end(), bytes.begin(), [](char c) { return static_cast<std::byte>(c); });
  return bytes;
}

// "" when `run(bytes)` returned (or threw ckpt::Error, which run_* swallow);
// otherwise how the child process ended.
std::string run_isolated(const std::function<void(ckpt::Bytes)>& run, ckpt::Bytes bytes) {
  std::fflush(nullptr);  // the child must not print the parent's buffered output again
  pid_t pid = ::fork();
  if (pid < 0) return std::string("fork failed: ") + std::strerror(errno);
  if (pid == 0) {
    // doctest's crash handlers would report (and print a summary) from the child
    // too: let a fatal signal simply end it, and the parent tell what happened.
    for (int fatal : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL}) std::signal(fatal, SIG_DFL);
    ::alarm(kSecondsPerInput);
    watch_memory();
    try {
      run(bytes);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "uncaught exception: %s\n", e.what());
      std::exit(kExitException);
    }
    std::exit(0);  // exit, not _exit: LeakSanitizer checks at exit in build-asan
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  if (WIFEXITED(status)) {
    if (WEXITSTATUS(status) == kExitException) return "an exception other than ckpt::Error escaped (see stderr)";
    if (WEXITSTATUS(status) == kExitMemory)
      return "resident memory passed " + std::to_string(kMaxResidentBytes >> 20) + " MiB";
    return "exit status " + std::to_string(WEXITSTATUS(status)) +
           " (a sanitizer report or a violated invariant: see stderr)";
  }
  if (WIFSIGNALED(status)) {
    int signal = WTERMSIG(status);
    if (signal == SIGALRM) return "still running after " + std::to_string(kSecondsPerInput) + " s (a hang)";
    return std::string("killed by signal ") + std::to_string(signal) + " (" + strsignal(signal) + ")";
  }
  return "ended with wait status " + std::to_string(status);
}

}  // namespace

TEST_CASE("fuzz regressions: every saved input runs through its target without crashing") {
  const std::map<std::string, std::function<void(ckpt::Bytes)>> targets = {
      {"fuzz_zip", ckpt::fuzz::run_zip},
      {"fuzz_pickle", ckpt::fuzz::run_pickle},
      {"fuzz_checkpoint", ckpt::fuzz::run_checkpoint},
      {"fuzz_manifest", ckpt::fuzz::run_manifest},
      {"fuzz_safetensors", ckpt::fuzz::run_safetensors},
  };
  const std::filesystem::path root(CKPT_FUZZ_REGRESSIONS);
  // The folder is committed (with its README): missing, it would replay nothing and pass.
  REQUIRE_MESSAGE(std::filesystem::is_directory(root), "no regressions folder at " << root.string());
  std::vector<std::filesystem::path> folders;
  for (const auto& entry : std::filesystem::directory_iterator(root)) {
    if (entry.is_directory()) folders.push_back(entry.path());
  }
  std::sort(folders.begin(), folders.end());
  for (const auto& folder : folders) {
    std::string target = folder.filename().string();
    INFO("target folder: ", folder.string());
    REQUIRE_MESSAGE(targets.count(target) == 1, "regressions/ holds a folder that names no fuzz target");
    std::vector<std::filesystem::path> inputs;
    for (const auto& entry : std::filesystem::directory_iterator(folder)) {
      if (entry.is_regular_file()) inputs.push_back(entry.path());
    }
    std::sort(inputs.begin(), inputs.end());
    for (const auto& input : inputs) {
      std::vector<std::byte> bytes = read_all(input);
      std::string failure = run_isolated(targets.at(target), bytes);
      CHECK_MESSAGE(failure.empty(), input.filename().string(), ": ", failure);
    }
  }
}
