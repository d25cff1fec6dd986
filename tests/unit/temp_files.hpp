// Temporary files and directories of the unit tests, removed when the guard goes
// away, and whole-file reads and writes. The one copy: every test that needs a
// file on disk (MappedFile, the executor, Checkpoint) takes it from here.
#pragma once

#include <doctest/doctest.h>

#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace test_files {

using Buffer = std::vector<std::byte>;

inline void write_file(const std::filesystem::path& path, const Buffer& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

inline Buffer read_file(const std::filesystem::path& path) {
  Buffer bytes(std::filesystem::file_size(path));
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(in.gcount() == static_cast<std::streamsize>(bytes.size()));
  return bytes;
}

// A temporary file holding `bytes`, or `nbytes` bytes counting 0, 1, 2, ... (mod 256).
class TempFile {
 public:
  explicit TempFile(const Buffer& bytes) {
    char name[] = "/tmp/ckpt_unit_test_XXXXXX";
    int fd = ::mkstemp(name);
    REQUIRE(fd >= 0);
    ::close(fd);
    path_ = name;
    write_file(path_, bytes);
  }
  explicit TempFile(std::size_t nbytes) : TempFile(counting(nbytes)) {}
  ~TempFile() { std::filesystem::remove(path_); }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  static Buffer counting(std::size_t nbytes) {
    Buffer out(nbytes);
    for (std::size_t i = 0; i < nbytes; ++i) out[i] = static_cast<std::byte>(i & 0xFF);
    return out;
  }
  std::string path_;
};

// A temporary directory, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "ckpt_unit_test_XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path_ = pattern;
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace test_files
