// Asserting why something failed by its ErrorKind, not by its wording:
// CHECK_THROWS_KIND(expr, ckpt::ErrorKind::CorruptData), CHECK_KIND(error, kind).
// Wording is asserted only where it is the point (a message that must name a
// file, a tensor, an offset or a size).
#pragma once

#include <doctest/doctest.h>

#include <string>

#include "ckpt/io/error.hpp"

namespace error_kind {

// Kinds are compared by name, so that a failed check prints names (doctest
// prints an enum as its number).
inline std::string name_of(ckpt::ErrorKind kind) {
  return ckpt::info_of(kind).name;
}

// The name of the kind of the ckpt::Error `action` throws, or "nothing thrown";
// any other exception passes through (doctest reports it).
template <typename F>
std::string kind_thrown(F&& action) {
  try {
    action();
  } catch (const ckpt::Error& e) {
    return name_of(e.kind());
  }
  return "nothing thrown";
}

}  // namespace error_kind

#define CHECK_THROWS_KIND(expr, expected) \
  CHECK(error_kind::kind_thrown([&] { (void)(expr); }) == error_kind::name_of(expected))
// CHECK_KIND(error, expected): a caught ckpt::Error is of kind `expected`.
#define CHECK_KIND(error, expected) CHECK(error_kind::name_of((error).kind()) == error_kind::name_of(expected))
