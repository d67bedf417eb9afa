// Scatter GEMM over experts: scatter2scatter with gather-on-load and scatter-on-store, gates, bias
// and the GLU epilogue, for every grouped_in / grouped_out combination:
//
//   for each row r in expert order, of expert e, slot s = sorted_scattered_idxs[r]:
//     H = X[x(r), :] @ W[e] (+ bias[e])
//     Y[y(r), :] = act(H) (* gates[s])            act = identity, or with glu the GLU of H = [a | b]:
//                                                 1: silu(a) * b, 2: a * silu(b) (fp32, before rounding)
//     PRE[y(r), :] = H                            glu only, when pre != nullptr (for the backward)
//   x(r) = r if x_grouped else s / fan_out        (gather on load: token rows, never copied)
//   y(r) = r if y_grouped else s                  (scatter on store: slot rows)
//
// With glu, W is [E, K, 2F] and bias [E, 2F] while Y is [*, F] (n_out = F): each CTA computes F
// columns j..j+63 of both halves (W columns j.. and F + j..) in one 128-wide tile, so the
// activation happens in the epilogue and Y is written once at its final width.
//
// Expert e's rows [s_e, t_e) come from expert_offsets ON THE DEVICE (clamped to [0, num_rows]
// like the Triton kernel). Legend and layouts as grouped_gemm.h: X [*, K] (row stride stride_xm),
// W [E, K, F] K-major or F-major (stride_we, stride_w_ld), bias [E, F] (stride_be), Y [*, F]
// (row stride stride_ym), gates [N] float32 indexed by slot (nullptr: none), sorted_scattered_idxs [N] int64.
// Where a row's slot is used (gathered X, scattered Y or gates), a slot outside [0, num_rows) leaves that row
// unread and unwritten, as the Triton kernel does.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "scattermoe/grouped_gemm.h"  // Bf16 / Fp16 tags

namespace scattermoe {

struct ScatterGemmParams {
  const void* x = nullptr;
  int64_t stride_xm = 0;
  const void* w = nullptr;
  int64_t stride_we = 0;
  int64_t stride_w_ld = 0;
  const void* bias = nullptr;
  int64_t stride_be = 0;
  void* y = nullptr;
  int64_t stride_ym = 0;
  const void* gates = nullptr;            // [N] float32 per-slot row scale (the gates); nullptr for none
  const int64_t* sorted_scattered_idxs = nullptr;
  const void* expert_offsets = nullptr;   // [E] cumulative row counts, int32 or int64
  bool offsets_int64 = true;
  bool x_grouped = false;
  bool y_grouped = false;
  int fan_out = 1;                        // k when X holds tokens (x_grouped=false), else 1
  int num_experts = 0;
  int64_t num_rows = 0;                   // N = T * k routed rows
  int64_t x_rows = 0;                     // rows of X: host-side size checks only (slots: see above)
  int64_t y_rows = 0;                     // rows of Y: likewise
  int k_in = 0;
  int n_out = 0;                          // columns of Y (F); W and bias have 2F columns with glu
  int glu = 0;                            // 0: none; 1: silu(first half) * second; 2: first * silu(second)
  void* pre = nullptr;                    // glu only: [*, 2F] pre-activation H, rows like Y; nullptr: not kept
  int64_t stride_pm = 0;
  int64_t pre_rows = 0;                   // rows of PRE when given: host-side size checks only, as y_rows
  int num_ctas = 0;                       // 0: one CTA per tile; > 0: the persistent kernel on this many CTAs
  bool w_tma = false;                     // load W by TMA (else cp.async, as X); see scatter_gemm_sm90
  int device = 0;
};

// Enqueue the kernel on `stream`: (row tiles bound cdiv(N, 128) + E) x cdiv(F, 128 or 64 with glu) tiles in
// the order of scatter_gemm_tile_of, each CTA finding its tiles' experts and rows from expert_offsets; one
// CTA per tile, or with num_ctas > 0 min(num_ctas, tiles) persistent CTAs (num_ctas = the SM count).
// No host synchronisation, no workspace. With w_tma, W's tiles are loaded by TMA from a tensor map encoded
// here on the host; where no tensor map can describe W (the driver refuses its strides) the kernel loads W by
// cp.async as without w_tma, the same values in the same places. Returns whether W was loaded by TMA.
template <class ElementTag, bool WKMajor>
bool scatter_gemm_sm90(const ScatterGemmParams& params, cudaStream_t stream);

// Host-only check of the TMA weight loads' placement: for every element of every box a stage's W tile is
// loaded in, where TMA's 128-byte swizzle puts it against where the mainloop's shared-memory layout (which
// its wgmmas read) expects it. Returns the number of elements that disagree (0 when the boxes are right).
template <class ElementTag, bool WKMajor>
int scatter_gemm_w_tma_layout_mismatches();

constexpr int kScatterGemmTileM = 128;
constexpr int kScatterGemmTileN = 128;
constexpr int kScatterGemmTileK = 64;
constexpr int kScatterGemmGroupRows = 8;  // row tiles per raster group (see scatter_gemm_tile_of)

#if defined(__CUDACC__)
#define SMOE_HOST_DEVICE __host__ __device__
#else
#define SMOE_HOST_DEVICE
#endif

// The launch order of the tiles: CTA pid (a 1-D grid of row_tiles * col_tiles) computes
// (row_tile, col_tile). Grouped raster, as in Triton's matmul tutorial: kScatterGemmGroupRows row
// tiles go through every column tile together, so the CTAs resident at once share a few row tiles
// of X and a few column tiles of W in L2. Row tiles fastest would re-read all of X from HBM once
// per column tile (88 times for JetMoE's first GEMM: ~12 GB at T=16384). 32-bit math: the host
// keeps row_tiles * col_tiles < 2^31 (a 64-bit division would be a subroutine call on the GPU).
SMOE_HOST_DEVICE inline void scatter_gemm_tile_of(int pid, int row_tiles, int col_tiles, int& row_tile,
                                                  int& col_tile) {
  const int per_group = kScatterGemmGroupRows * col_tiles;
  const int first = (pid / per_group) * kScatterGemmGroupRows;
  const int rows = row_tiles - first < kScatterGemmGroupRows ? row_tiles - first : kScatterGemmGroupRows;
  const int in_group = pid % per_group;
  row_tile = first + in_group % rows;
  col_tile = in_group / rows;
}

// Row tiles: a bound, cdiv(N, 128) + E (each expert's last tile may be partial); column tiles
// cover n_out, 64 columns of each half per tile with glu.
SMOE_HOST_DEVICE inline int scatter_gemm_row_tiles(int64_t num_rows, int num_experts) {
  return static_cast<int>((num_rows + kScatterGemmTileM - 1) / kScatterGemmTileM) + num_experts;
}
SMOE_HOST_DEVICE inline int scatter_gemm_col_tiles(int n_out, int glu) {
  const int cols = glu ? kScatterGemmTileN / 2 : kScatterGemmTileN;
  return (n_out + cols - 1) / cols;
}

}  // namespace scattermoe
