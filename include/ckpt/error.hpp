// One error type for every failure ckpt-tool reports to a person.
//
// An Error knows where it happened: the file, the member inside it (a zip record
// such as `data/17`, often with the tensor it holds) and the byte offset in the
// file. `what()` renders all of it on one line, which `main` prints after
// `ckpt-tool: error: `. Errors are thrown from deep inside the readers and caught
// only in `main`; intermediate layers add context with `Error::with_file` and
// friends rather than catching and re-wording.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace ckpt {

struct Location {
  std::string file;                    // path as the user gave it
  std::string member;                  // zip record and/or object path; may be empty
  std::optional<std::uint64_t> byte_offset;  // absolute offset in `file`
};

class Error : public std::runtime_error {
 public:
  Error(Location where, std::string message);
  explicit Error(std::string message) : Error(Location{}, std::move(message)) {}

  const Location& where() const { return where_; }
  const std::string& message() const { return message_; }

  // Copies of this error with a field filled in when it was still empty.
  Error with_file(const std::string& file) const;
  Error with_member(const std::string& member) const;

 private:
  static std::string render(const Location& where, const std::string& message);
  Location where_;
  std::string message_;
};

// Checked 64-bit arithmetic on untrusted sizes: throws Error(message) on overflow.
std::uint64_t checked_add(std::uint64_t a, std::uint64_t b, const char* what);
std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what);

}  // namespace ckpt
