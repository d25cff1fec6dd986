// One error type for every failure ckpt-tool reports to a person.
//
// An Error knows where it happened: the file, the member inside it (a zip record
// such as `data/17`, often with the tensor it holds) and the byte offset in the
// file. `what()` renders all of it on one line, which `main` prints after
// `ckpt-tool: error: `. Errors are thrown from deep inside the readers and caught
// only in `main`, except where a pure function that knows no file (a shape check,
// a nesting bound) is called by one that does: that caller re-throws the same
// message with the Location filled in, and never re-words it.
//
// Names inside a checkpoint (tensor keys, object keys, record names) are
// untrusted bytes. `printable` is the one escape every terminal printer uses, and
// `what()` applies it to the whole rendered line, so a key holding `\n` or an
// escape sequence can neither forge a second line nor move the cursor.
#pragma once

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

struct Location {
  std::string file;                          // path as the user gave it
  std::string member;                        // zip record and/or object path; may be empty
  std::optional<std::uint64_t> byte_offset;  // absolute offset in `file`
};

class Error : public std::runtime_error {
 public:
  Error(Location where, std::string message);
  explicit Error(std::string message) : Error(Location{}, std::move(message)) {}

  const Location& where() const { return where_; }
  const std::string& message() const { return message_; }

  // `what()` is the rendered line, escaped by `printable`; `message()` is raw.

 private:
  static std::string render(const Location& where, const std::string& message);
  Location where_;
  std::string message_;
};

// A broken internal invariant: a bug in ckpt-tool, never a property of the input.
// `main` prints it as `ckpt-tool: internal error: ...` with the source location
// and exits with kInternalErrorExit, so a bug is never mistaken for bad input.
inline constexpr int kInternalErrorExit = 70;  // sysexits.h EX_SOFTWARE
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
