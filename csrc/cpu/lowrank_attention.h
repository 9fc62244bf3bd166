// C++ CPU decode kernel of svdkernels::lowrank_attention (attention over a KV cache
// kept as low-rank latents); see lowrank_attention.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace svdkernels {
namespace cpu {

// The latent-space part of lowrank_attention for one decode step (Sq small):
// (o_lat [B, M, rv], lse [B, M]) float32, o_lat = softmax(s)·C_v over each
// sequence's valid prefix, M = Hq·Sq query rows (row m = h·Sq + i).
//   absorbed (k_basis None): q [B, M, rk] float32 = sm_scale·q_h·W_k,jᵀ, s = q·C_kᵀ;
//   pre-RoPE: q [B, M, d] float32 (sm_scale folded in), k_basis [1 or B, rk, Hkv·d]
//     float32, s = q_h·RoPE(C_k·W_k,j) with inv_freq [rotary_dim/2] float32 angles
//     (none: no rotation), rope_layout 0 neox / 1 interleaved.
// k_latent [B, T, rk], v_latent [B, T, rv]: float32 or bfloat16, contiguous.
std::tuple<at::Tensor, at::Tensor> lowrank_attention_decode(
    const at::Tensor& q,
    const at::Tensor& k_latent,
    const at::Tensor& v_latent,
    const std::optional<at::Tensor>& k_basis,
    const std::optional<at::Tensor>& inv_freq,
    const std::optional<at::Tensor>& cache_seqlens,
    int64_t Sq,
    bool causal,
    int64_t rope_layout,
    int64_t isa);

namespace attn {

// Everything one work item reads; raw pointers so that the per-ISA translation
// units (compiled with their own target options) need no ATen templates.
struct Params {
  int64_t B, T, M, Sq, rk, rv;
  int64_t d, Hkv, rows_per_kv;  // pre-RoPE only: rows m of kv head j are [j·rows_per_kv, (j+1)·rows_per_kv)
  const float* q;               // [B, M, rk] (absorbed) or [B, M, d]
  const void* ck;               // [B, T, rk]
  const void* cv;               // [B, T, rv]
  bool bf16;                    // latents are bfloat16 (else float32)
  const float* wk;              // [1 or B, P, rk, kPanel] panels of [rk, Hkv·d], or nullptr (absorbed)
  int64_t wk_batch_stride;      // 0 for a shared basis
  const float* inv_freq;        // [half_rot] or nullptr
  int64_t half_rot;
  int64_t layout;
  bool causal;
};

// One work item: the keys [t0, t1) of sequence b, whose valid length is L.
struct Item {
  int64_t b, t0, t1, L;
};

constexpr int64_t kTile = 32;  // tokens per tile
// The key basis is packed in panels of kPanel columns ([P, rk, kPanel] per basis,
// zero-padded): a tile's GEMM then streams contiguous rows instead of rows 4 KiB
// apart, which alias in L1.
constexpr int64_t kPanel = 48;

// Floats of scratch memory one work item needs.
int64_t scratch_floats(const Params& p);

// Partial attention of item `it`: o [M, rv] (unnormalised), mx [M] (running
// max), l [M] (sum of exp(s - mx)); mx = -inf where a row saw no key.
void attend_generic(const Params& p, const Item& it, float* o, float* mx, float* l, float* scratch);
void attend_avx2(const Params& p, const Item& it, float* o, float* mx, float* l, float* scratch);
void attend_avx512(const Params& p, const Item& it, float* o, float* mx, float* l, float* scratch);

}  // namespace attn
}  // namespace cpu
}  // namespace svdkernels
