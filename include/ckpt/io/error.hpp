// One error type for every failure ckpt-tool reports to a person.
//
// An Error knows where it happened: the file, the member inside it (a zip record
// such as `data/17`, often with the tensor it holds) and the byte offset in the
// file. `what()` renders all of it on one line, which `main` prints after
// `ckpt-tool: error: `. Errors are thrown from deep inside the readers and caught
// only in `main`, except where a pure function that knows no file (a shape check,
// a nesting bound) is called by one that does: that caller re-throws the same
// message and kind with the Location filled in, and never re-words it.
//
// Names inside a checkpoint (tensor keys, object keys, record names) are
// untrusted bytes. `printable` is the one escape every terminal printer uses, and
// `what()` applies it to the whole rendered line, so a key holding `\n` or an
// escape sequence can neither forge a second line nor move the cursor.
//
// Every Error also has a kind: why it failed, as far as a caller acting on the
// failure cares (free some space and retry, fetch the missing shard, fetch the
// file again). The kind decides the exit code (kErrorKinds, the one table) and
// is what tests assert where the wording is not the point.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <string_view>

namespace ckpt {

// Where an internal error was raised. Clang 14 with GCC 12's library (the fuzz
// build) has no std::source_location: there the location is left out.
#if defined(__cpp_lib_source_location)
using SourceLocation = std::source_location;
#else
struct SourceLocation {
  static constexpr SourceLocation current() { return {}; }
  constexpr const char* file_name() const { return "?"; }
  constexpr unsigned line() const { return 0; }
  constexpr const char* function_name() const { return "?"; }
};
#endif

// `text` with control bytes escaped for a terminal: \t \n \r as such, other
// bytes below 0x20 and 0x7f as \xHH, and the C1 controls U+0080..U+009F (UTF-8
// C2 80..C2 9F, which a UTF-8 terminal obeys like ESC [) as \u00HH. Everything
// else, other UTF-8 and backslashes included, is unchanged.
std::string printable(std::string_view text);

// Few on purpose: each is a different thing to do about the failure.
enum class ErrorKind : std::uint8_t {
  Usage,          // the command line: conflicting flags, a bad -o (found before any input is read)
  BadInput,       // an input ckpt-tool cannot read or refuses; an output it refuses to replace (the default)
  IncompleteSet,  // the files are not one complete, consistent set: a part or shard missing, parts that disagree
  CorruptData,    // a checksum does not match: bytes changed after they were written (CRC-32 of a zip record)
  Io,             // a system call failed: open, read, mmap, write, fsync, rename
  NoSpace,        // no room for an output: ENOSPC, EDQUOT, EFBIG, the free-space check before writing
  Internal,       // a bug in ckpt-tool: InternalError's kind, never an Error's
};

// The exit code of each kind, for every command but diff, and for diff, whose
// 0 and 1 are answers (equal, different): every diff error exits 2. 1 and 2
// are kept from before kinds existed (bad input, usage); the others are
// sysexits.h codes, so scripts can tell them apart without parsing the message.
// `name` is the kind as tests and machine-readable output spell it.
struct ErrorKindInfo {
  ErrorKind kind;
  const char* name;
  int exit_code;
  int diff_exit_code;
};
inline constexpr std::array<ErrorKindInfo, 7> kErrorKinds{{
    {ErrorKind::Usage, "usage", 2, 2},
    {ErrorKind::BadInput, "bad_input", 1, 2},
    {ErrorKind::IncompleteSet, "incomplete_set", 66, 2},  // EX_NOINPUT: an input the set needs is not there
    {ErrorKind::CorruptData, "corrupt_data", 65, 2},      // EX_DATAERR
    {ErrorKind::Io, "io", 74, 2},                         // EX_IOERR
    {ErrorKind::NoSpace, "no_space", 73, 2},              // EX_CANTCREAT: the output cannot be created
    {ErrorKind::Internal, "internal", 70, 70},            // EX_SOFTWARE, diff included: a bug is no answer
}};
constexpr const ErrorKindInfo& info_of(ErrorKind kind) {
  return kErrorKinds[static_cast<std::size_t>(kind)];
}
constexpr bool kinds_in_order() {
  for (std::size_t i = 0; i < kErrorKinds.size(); ++i) {
    if (static_cast<std::size_t>(kErrorKinds[i].kind) != i) return false;
  }
  return true;
}
static_assert(kinds_in_order(), "kErrorKinds: one row per ErrorKind, in the enum's order");

// Io, or NoSpace for ENOSPC, EDQUOT and EFBIG (past a file-size limit): the kind
// of a failed system call.
ErrorKind kind_of_errno(int error_number);

struct Location {
  std::string file;                          // path as the user gave it
  std::string member;                        // zip record and/or object path; may be empty
  std::optional<std::uint64_t> byte_offset;  // absolute offset in `file`
};

// Without a kind, an Error is BadInput. A caller that re-throws an Error with
// its Location filled in or its message extended passes `e.kind()` on.
class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, Location where, std::string message);
  Error(ErrorKind kind, std::string message) : Error(kind, Location{}, std::move(message)) {}
  Error(Location where, std::string message) : Error(ErrorKind::BadInput, std::move(where), std::move(message)) {}
  explicit Error(std::string message) : Error(ErrorKind::BadInput, Location{}, std::move(message)) {}

  ErrorKind kind() const { return kind_; }
  const Location& where() const { return where_; }
  const std::string& message() const { return message_; }

  // `what()` is the rendered line, escaped by `printable`; `message()` is raw.

 private:
  static std::string render(const Location& where, const std::string& message);
  ErrorKind kind_;
  Location where_;
  std::string message_;
};

// A broken internal invariant: a bug in ckpt-tool, never a property of the input.
// `main` prints it as `ckpt-tool: internal error: ...` with the source location
// and exits with kInternalErrorExit, so a bug is never mistaken for bad input.
inline constexpr int kInternalErrorExit = info_of(ErrorKind::Internal).exit_code;
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};
[[noreturn]] void internal_error(std::string_view what, SourceLocation where = SourceLocation::current());
// The assertion of every invariant the code relies on (checked in release builds too).
inline void check_invariant(bool holds, std::string_view what, SourceLocation where = SourceLocation::current()) {
  if (!holds) internal_error(what, where);
}

// Checked 64-bit arithmetic on untrusted sizes: throws Error(message) on overflow.
std::uint64_t checked_add(std::uint64_t a, std::uint64_t b, const char* what);
std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what);

}  // namespace ckpt
