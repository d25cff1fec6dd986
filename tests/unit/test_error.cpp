// Unit tests for error kinds (include/ckpt/io/error.hpp): every Error has one,
// BadInput unless said otherwise; the exit-code table keeps the documented
// contracts (README "Exit codes"); system-call failures are Io or NoSpace.
#include <doctest/doctest.h>

#include <cerrno>
#include <set>
#include <string>

#include "ckpt/io/error.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "error_kind.hpp"
#include "temp_files.hpp"

namespace {

using ckpt::Error;
using ckpt::ErrorKind;
using ckpt::info_of;
using ckpt::kErrorKinds;

TEST_SUITE("error kinds") {
  TEST_CASE("an Error is BadInput unless given a kind, and the kind leaves its text alone") {
    CHECK_KIND(Error("m"), ErrorKind::BadInput);
    CHECK_KIND(Error(ckpt::Location{"f.pt", "data/0", 16}, "m"), ErrorKind::BadInput);
    Error corrupt(ErrorKind::CorruptData, ckpt::Location{"f.pt", "data/0", 16}, "m");
    CHECK_KIND(corrupt, ErrorKind::CorruptData);
    CHECK(std::string(corrupt.what()) == "f.pt: data/0: at byte 0x10: m");
    CHECK(std::string(Error(ErrorKind::Io, "m").what()) == "m");
    CHECK_THROWS_KIND(throw Error(ErrorKind::NoSpace, "full"), ErrorKind::NoSpace);
    CHECK(error_kind::kind_thrown([] {}) == "nothing thrown");
  }

  TEST_CASE("the exit-code table: one row per kind, the documented codes, diff's 2 for every error") {
    std::set<std::string> names;
    std::set<int> codes;
    for (const ckpt::ErrorKindInfo& row : kErrorKinds) {
      CAPTURE(row.name);
      names.insert(row.name);
      codes.insert(row.exit_code);
      CHECK(row.exit_code > 0);
      CHECK(row.exit_code < 126);  // 126 and up: the shell's (not executable, not found, signals)
      // diff: 0 equal, 1 different, 2 error; a bug is a bug there too.
      CHECK(row.diff_exit_code == (row.kind == ErrorKind::Internal ? 70 : 2));
    }
    CHECK(names.size() == kErrorKinds.size());
    CHECK(codes.size() == kErrorKinds.size());  // a script tells every kind apart
    CHECK(info_of(ErrorKind::BadInput).exit_code == 1);
    CHECK(info_of(ErrorKind::Usage).exit_code == 2);
    CHECK(info_of(ErrorKind::CorruptData).exit_code == 65);
    CHECK(info_of(ErrorKind::IncompleteSet).exit_code == 66);
    CHECK(info_of(ErrorKind::NoSpace).exit_code == 73);
    CHECK(info_of(ErrorKind::Io).exit_code == 74);
    CHECK(info_of(ErrorKind::Internal).exit_code == ckpt::kInternalErrorExit);
    CHECK(ckpt::kInternalErrorExit == 70);
    CHECK(std::string(info_of(ErrorKind::IncompleteSet).name) == "incomplete_set");
  }

  TEST_CASE("a failed system call is Io; a full disk, a quota or a file-size limit NoSpace") {
    using error_kind::name_of;
    CHECK(name_of(ckpt::kind_of_errno(ENOSPC)) == "no_space");
    CHECK(name_of(ckpt::kind_of_errno(EDQUOT)) == "no_space");
    CHECK(name_of(ckpt::kind_of_errno(EFBIG)) == "no_space");
    CHECK(name_of(ckpt::kind_of_errno(EIO)) == "io");
    CHECK(name_of(ckpt::kind_of_errno(ENOENT)) == "io");
    CHECK(name_of(ckpt::kind_of_errno(EACCES)) == "io");
    test_files::TempDir dir;
    CHECK_THROWS_KIND(ckpt::MappedFile(dir.file("absent.pt")), ErrorKind::Io);
    CHECK_THROWS_KIND(ckpt::MappedFile(dir.file("")), ErrorKind::BadInput);  // a directory: not a regular file
  }
}

}  // namespace
