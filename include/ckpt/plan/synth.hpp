// `synth`: a raw metaseq-style training checkpoint of a requested size and grid,
// written quickly from synthetic data (benchmarks, rehearsing a pipeline). The
// files are what metaseq writes: OPT-like decoder, Megatron parts, FSDP flat
// parameters by fairscale's chunk-and-pad rule, shard_metadata, Adam state.
#pragma once

#include <cstdint>
#include <string>

#include "ckpt/format/dtype.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

// Limits on what synth is asked for: far beyond any real model, and small enough
// that every size below fits 64 bits and the synthetic streams (weights below
// 2^50 bytes, exp_avg and exp_avg_sq above) stay apart.
constexpr double kSynthMaxParameters = 1e14;
constexpr std::int64_t kSynthMaxLayers = 4096;
constexpr std::int64_t kSynthMaxDim = std::int64_t{1} << 24;  // embed, ffn, vocab, positions

struct SynthOptions {
  double params = 125e6;  // target parameter count; the dims below win when given
  int mp = 1;
  int dp = 1;
  DType dtype = DType::Float16;
  bool optimizer_state = false;  // fp32 exp_avg and exp_avg_sq per parameter
  std::int64_t layers = 0;       // 0: chosen from `params`
  std::int64_t embed_dim = 0;
  std::int64_t ffn_dim = 0;  // 0: 4 x embed_dim
  std::int64_t vocab = 0;    // 0: 50272 rounded up to a multiple of 8 x mp
  std::int64_t positions = 2050;
};

struct SynthModel {
  std::int64_t layers, embed_dim, ffn_dim, vocab, positions;
  std::uint64_t parameters;  // of the whole model
};

// The dimensions synth will use (every sharded one divisible by mp). Throws Error
// when a dimension is out of the limits above, not divisible by mp, or the model
// has more than kSynthMaxParameters parameters.
SynthModel synth_model(const SynthOptions& options);

// Plans `checkpoint_last-model_part-{m}-shard{d}.pt` files in `directory`.
Plan plan_synth(const SynthOptions& options, const std::string& directory);

}  // namespace ckpt
