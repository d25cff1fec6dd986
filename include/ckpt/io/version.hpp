// ckpt-tool's version, written in one place: meson.build's project(version:),
// passed to the compiler as CKPT_VERSION.
#pragma once

#ifndef CKPT_VERSION
#error "meson.build defines CKPT_VERSION from project(version:)"
#endif

namespace ckpt {

// "ckpt-tool 0.1.0": what --version prints and a manifest's created_by records.
inline constexpr const char* kVersionString = "ckpt-tool " CKPT_VERSION;

}  // namespace ckpt
