// Grouped GEMM over experts, rows already grouped by expert (scatter2scatter with
// grouped_in=True and grouped_out=True):
//
//   for e in [0, E):  Y[s_e:t_e, :] = X[s_e:t_e, :] @ W[e] (+ bias[e])
//
// where [s_e, t_e) are expert e's rows, read from expert_offsets ON THE DEVICE
// (t_e = offsets[e], s_e = offsets[e-1] or 0, both clamped to [0, num_rows] like the
// Triton kernel, so inconsistent routing tensors never read or write out of bounds).
//
// Legend: N routed rows (num_rows), E experts, K input features (k_in), F output features (n_out).
// Layouts (elements, not bytes; all pointers are device addresses passed as integers):
//   X [N, K]     row stride stride_xm, unit column stride
//   W [E, K, F]  expert stride stride_we; either K-major (unit stride along K, stride_w_ld along F:
//                the permuted nn.Linear layout [E, F, K] that ops.py passes forward) or F-major
//                (unit stride along F, stride_w_ld along K: the transposed view used for dX)
//   bias [E, F]  expert stride stride_be, unit column stride; nullptr for none
//   Y [N, F]     row stride stride_ym, unit column stride
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace scattermoe {

// Element tags: keep CUTLASS out of the host-compiled bindings.
struct Bf16 {};
struct Fp16 {};

struct GroupedGemmParams {
  const void* x = nullptr;
  int64_t stride_xm = 0;
  const void* w = nullptr;
  int64_t stride_we = 0;
  int64_t stride_w_ld = 0;  // the non-unit stride of W[e]: along F if K-major, along K if F-major
  const void* bias = nullptr;
  int64_t stride_be = 0;
  void* y = nullptr;
  int64_t stride_ym = 0;
  const void* expert_offsets = nullptr;  // [E] cumulative row counts, int32 or int64
  bool offsets_int64 = true;
  int num_experts = 0;
  int64_t num_rows = 0;
  int k_in = 0;
  int n_out = 0;
  void* workspace = nullptr;  // device buffer of grouped_gemm_workspace_bytes(...) bytes, 256-byte aligned
  size_t workspace_bytes = 0;
  int device = 0;
  int sm_count = 0;  // SMs the persistent scheduler may use (the device's multiprocessor count)
};

// Bytes of device workspace the grouped GEMM needs: CUTLASS's (TMA descriptors per SM) plus the
// per-expert argument arrays (problem sizes, pointers, strides) that a setup kernel fills.
template <class ElementTag, bool WKMajor>
size_t grouped_gemm_workspace_bytes_sm90(int num_experts, int sm_count);

// Enqueue the setup kernel and the grouped GEMM on `stream`. No host synchronisation.
template <class ElementTag, bool WKMajor>
void grouped_gemm_sm90(const GroupedGemmParams& params, cudaStream_t stream);

// Tile shape (M, N, K) of the instantiated kernels; reported by scattermoe._C.build_info().
constexpr int kGroupedGemmTileM = 128;
constexpr int kGroupedGemmTileN = 128;
constexpr int kGroupedGemmTileK = 64;

}  // namespace scattermoe
