// The MoE backward's one pass over the GLU pre-activation (what backends.triton.glu_backward does):
//
//   for each row r < num_rows, with H = [a | b] = pre[r] (2F wide), act_in/lin = (a, b) if
//   activate_first else (b, a), G = silu(act_in) * lin and s = scale[r] (1 without a scale):
//     dh[r]  = dGLU/dH (s * dg[r])          [2F]   (d_act in act_in's half, d_lin in lin's half)
//     g[r]   = s * G                        [F]    (optional: the second dW GEMM's operand)
//     dot[r] = sum_f dg[r, f] * G[f]        fp32   (optional: the gate's gradient, unscaled G)
//
// All math in fp32. pre, dg, dh, g row-major with unit column stride (row strides in elements);
// scale and dot float32 [num_rows].
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "scattermoe/grouped_gemm.h"  // Bf16 / Fp16 tags

namespace scattermoe {

struct GluBackwardParams {
  const void* pre = nullptr;
  int64_t stride_pm = 0;
  const void* dg = nullptr;
  int64_t stride_dgm = 0;
  const float* scale = nullptr;  // nullptr: none
  void* dh = nullptr;
  int64_t stride_dhm = 0;
  void* g = nullptr;             // nullptr: not stored
  int64_t stride_gm = 0;
  float* dot = nullptr;          // nullptr: not stored
  int64_t num_rows = 0;
  int f = 0;                     // half width F
  bool activate_first = true;
  int device = 0;
};

// Enqueue on `stream`: one 128-thread CTA per row, 16-byte loads and stores where rows are aligned.
template <class ElementTag>
void glu_backward_sm90(const GluBackwardParams& params, cudaStream_t stream);

}  // namespace scattermoe
