// Per-expert weight and bias gradients of the scatter GEMM (group_bwd_w):
//
//   for every expert e with rows [s_e, t_e) in expert order (slot s = sorted_scattered_idxs[r]):
//     dW[e] = sum_{r in [s_e, t_e)} X[x(r), :]^T (c(r) dY[dy(r), :])   [K_in, N_out], fp32 accumulation
//   x(r)  = r if x_grouped  else s / x_fan_out                         (gathered on load, never copied)
//   dy(r) = r if dy_grouped else s / dy_fan_out
//   c(r)  = row_scale[s] (the gates), the scaled row rounded to the element type as the Triton
//           kernel does; 1 without a row_scale
//   db[e] = sum_{r in [s_e, t_e)} c(r) dY[dy(r), :]                     [N_out], if db is given
//
// An expert with no rows gets dW[e] = 0 (written, not skipped). Expert boundaries come from
// expert_offsets ON THE DEVICE, clamped to [0, num_rows] like the Triton kernel; where a row's slot is
// read, a slot outside [0, num_rows) makes that row add nothing (not read), as in the Triton kernel.
// Layouts: X [*, K_in] and dY [*, N_out] row-major (row strides stride_xm, stride_dym; K_in and N_out
// multiples of 8, rows 16-byte aligned: cp.async); dW [E, K_in, N_out] with strides (stride_dwe,
// stride_dwk, stride_dwn), one of stride_dwk / stride_dwn equal to 1 (the weight's own layout).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "scattermoe/grouped_gemm.h"  // Bf16 / Fp16 tags

namespace scattermoe {

struct GroupBwdWParams {
  const void* x = nullptr;
  int64_t stride_xm = 0;
  int64_t x_rows = 0;                     // rows of X: host-side size checks only (ids trusted on the device)
  const void* dy = nullptr;
  int64_t stride_dym = 0;
  int64_t dy_rows = 0;
  void* dw = nullptr;
  int64_t stride_dwe = 0;
  void* db = nullptr;                     // [E, N_out], unit column stride, or null (no bias gradient)
  int64_t stride_dbe = 0;
  int64_t stride_dwk = 0;
  int64_t stride_dwn = 0;
  const int64_t* sorted_scattered_idxs = nullptr;
  const float* row_scale = nullptr;       // [N] by slot, or null
  const void* expert_offsets = nullptr;   // [E] cumulative row counts, int32 or int64
  const int32_t* expert_order = nullptr;  // [E] a permutation: the expert of CTA row blockIdx.y (largest
                                          // first: scattermoe/backends/_schedule.py), or null: blockIdx.y
  bool offsets_int64 = true;
  bool x_grouped = false;
  bool dy_grouped = false;
  int x_fan_out = 1;
  int dy_fan_out = 1;
  int num_experts = 0;
  int64_t num_rows = 0;                   // N = T * k routed rows
  int k_in = 0;                           // rows of dW[e] (the GEMM's M)
  int n_out = 0;                          // columns of dW[e] (the GEMM's N)
  int device = 0;
};

// Enqueue on `stream`: a grid of (cdiv(K_in, 128) * cdiv(N_out, 128), E) CTAs, each reducing one
// 128 x 128 tile of dW[e] over its expert's rows, 64 rows per pipeline stage. No host sync.
template <class ElementTag>
void group_bwd_w_sm90(const GroupBwdWParams& params, cudaStream_t stream);

constexpr int kGroupBwdWTileM = 128;  // along K_in
constexpr int kGroupBwdWTileN = 128;  // along N_out
constexpr int kGroupBwdWTileK = 64;   // routed rows per stage

}  // namespace scattermoe
