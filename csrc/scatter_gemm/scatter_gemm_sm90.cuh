// Hopper (sm_90a) scatter GEMM over experts: token rows gathered on load with cp.async, wgmma,
// rows scattered on store, per-row gates and per-expert bias in the epilogue. The contract is in
// include/scattermoe/scatter_gemm.h.
//
// Why not TMA for A: Hopper's TMA loads boxes, not lists of rows, so a gathered operand needs
// per-thread addresses. Warp-specialised: one producer warpgroup fills the shared-memory stages
// with 16-byte cp.async copies (its own loop below: each thread resolves its 8 rows' token index
// once per tile, then streams them over K), two consumer warpgroups run CUTLASS's cp.async + GMMA
// collective (MainloopSm90CpAsyncGmmaWarpSpecialized::mma: its smem layouts, pipeline and wgmma).
// W goes through the same cp.async path, unindexed, or (params.w_tma) by TMA: one producer thread issues
// a stage's W boxes on the stage's full barrier, counted as transaction bytes beside the cp.async arrivals.
//
// Scheduling: the row tiles of expert e are the cdiv(rows_e, 128) tiles after those of experts
// < e, found from expert_offsets on the device, so the tile count needs only the bound
// cdiv(N, 128) + E (as the Triton kernel); tiles past the last one are skipped. The tiles are
// ordered as a grouped raster (scatter_gemm_tile_of in the header): 8 row tiles through all
// column tiles, so X rows are read from HBM about once. Two kernels over the same tile code:
// - scatter_gemm_kernel: one CTA per tile (the first version, reviewed twice);
// - scatter_gemm_persistent_kernel (params.num_ctas > 0, one CTA per SM): each CTA takes tiles
//   pid, pid + gridDim.x, ... The epilogue tile has its own shared memory (5 stages instead of
//   7), so the producer fills the stages with the next tile while the consumers store this one,
//   and a CTA's launch, barrier set-up and pipeline fill are paid once, not once per tile
//   (at JetMoE's T=16384, ~176 tiles per SM of ~9 us of wgmma each).
//
// GLU: the CTA's 128 W columns are 64 of each half (j..j+63 and F+j..F+j+63), so a(m, j) and its
// partner b(m, j) end up in the same tile and the activation is applied in the epilogue.
//
// Epilogue: the fp32 accumulator tile is staged through shared memory (per tile: in the pipeline's
// stages, free once the mainloop is done; persistent: in a buffer of its own), then each consumer thread takes 8 consecutive columns of one
// row: bias, GLU, gate, and one 16-byte store at that row's own address (scatter). A TMA store
// cannot scatter rows; 16-byte per-thread stores keep each row's 256 bytes in one coalesced burst.
// Included by one .cu file per (dtype, W layout), so the instantiations compile in parallel.
#pragma once

#include <climits>
#include <type_traits>

#include <cuda.h>  // CUtensorMap (the driver is reached through cudart's entry-point query, not linked)
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>

#include "scattermoe/check.h"
#include "scattermoe/cutlass_element.h"
#include "scattermoe/scatter_gemm.h"
#include "scattermoe/sm90_cp_async_gemm.h"
#include "scattermoe/sm90_device.h"

namespace scattermoe {
namespace sm90_scatter {

using namespace cute;
using sm90::cp_async_16;
using sm90::store_8;

using TileShape = Shape<Int<kScatterGemmTileM>, Int<kScatterGemmTileN>, Int<kScatterGemmTileK>>;

// Which expert and rows a row tile holds: in the per-tile kernel found once by warp 0 and kept in
// shared memory (the 256-byte carve-out; unused by the persistent kernel, whose warps each find it).
struct TileInfo {
  int64_t row_start;
  int64_t row_end;
  int expert;
};

// TMA weight loads (params.w_tma). A stage's W tile (128 columns x 64 k) arrives as boxes of one 3-D tensor
// map over W (the unit-stride dim, the other, the expert), 128-byte swizzled, so that they land where the
// mainloop's shared-memory layout (CUTLASS's GMMA atoms of 1 KB: 8 n x 64 k K-major, 64 n x 8 k MN-major)
// puts each element. K-major W: a 64-column half of the stage is 8 atoms in a row, 8 KB: one 64 k x 64 n
// box per half. F-major W: the atoms go along n first, so a half's k rows are 8 atoms 2 KB apart, and a box
// fills contiguous shared memory: eight 64 n x 8 k boxes per half. (scatter_gemm_w_tma_layout_mismatches
// checks this placement against the layout on the host.) The halves start at columns n0 and n0 + 64
// (plain) or j0 and n_out + j0 (GLU), as w_column's; the one difference from the cp.async loads: a GLU
// tile's first half past n_out reads second-half columns instead of zeros, and those accumulator columns
// are never stored (the epilogue skips output columns >= n_out). Out-of-range boxes and k past k_in are
// zero-filled by TMA, as cp.async zero-fills them.
template <bool WKMajor>
struct WeightBoxes {
  static constexpr int kHalfN = kScatterGemmTileN / 2;            // a half's columns: 64
  static constexpr int kInner = 64;                               // the box's unit-stride extent: 128 bytes
  static constexpr int kBoxK = WKMajor ? kScatterGemmTileK : 8;   // k rows per box
  static constexpr int kCount = 2 * (kScatterGemmTileK / kBoxK);  // boxes per stage: 2 or 16
  static constexpr uint32_t kStageBytes = kScatterGemmTileN * kScatterGemmTileK * 2;  // 16-bit elements
  // Box b: its half (shared-memory rows n = 64 half ...) and its first k row within the stage.
  SMOE_HOST_DEVICE static int half(int b) { return b % 2; }
  SMOE_HOST_DEVICE static int k(int b) { return (b / 2) * kBoxK; }
};

// The TMA weight loads' tensor map: a kernel parameter (__grid_constant__: TMA reads it in parameter space).
struct WeightTma {
  CUtensorMap map;
  bool active;  // false: W by cp.async, map unused
};

// CUTLASS names B's layout as a K x N matrix: ColumnMajor = unit stride along K.
// Persistent: the epilogue tile gets its own shared memory (see above).
template <class ElementTag, bool WKMajor, bool Persistent = false>
struct ScatterGemm
    : sm90::CpAsyncGemm<typename CutlassElement<ElementTag>::type, cutlass::layout::RowMajor,
                        std::conditional_t<WKMajor, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>,
                        TileShape, 256 /* room for TileInfo */, TileInfo, Persistent> {
  using Element = typename CutlassElement<ElementTag>::type;
  static constexpr bool kWKMajor = WKMajor;
};

// Tile column c (0..127) -> W column, and whether it exists. Plain: n0 + c. GLU: the tile holds
// output columns j0..j0+63 of both halves, c < 64 from the first (W column j0 + c) and c >= 64 from
// the second (n_out + j0 + c - 64); it exists when its output column j0 + c % 64 < n_out.
CUTE_DEVICE int w_column(int c, int n_tile, int n_out, bool glu, bool& ok) {
  if (!glu) {
    const int n = n_tile * kScatterGemmTileN + c;
    ok = n < n_out;
    return n;
  }
  constexpr int kHalf = kScatterGemmTileN / 2;
  const int j = n_tile * kHalf + c % kHalf;
  ok = j < n_out;
  return c < kHalf ? j : n_out + j;
}

// Fast-math silu, as Triton's sigmoid: exp(-v) = inf for v < -88 gives v / inf = -0, the limit.
CUTE_DEVICE float silu(float v) { return __fdividef(v, 1.0f + __expf(-v)); }

// Which expert and rows does row tile `tile` hold? (expert -1: none.) The definition, serially (what thread 0 of
// the per-tile kernel ran until 2026-12-03, and what tests/test_cutlass_backend.py transcribes):
//     tiles_before = 0, prev_end = 0
//     for e in [0, E): end = clamp(offsets[e], 0, N); start = min(prev_end, end); prev_end = end
//                      tiles = cdiv(end - start, 128)
//                      if tile < tiles_before + tiles: return {start + (tile - tiles_before) * 128, end, e}
//                      tiles_before += tiles
//     return {0, 0, -1}
// Found here by a whole warp 32 experts at a time: each lane takes one expert (its clamped rows and row
// tiles), an inclusive scan over the lanes counts the tiles up to each, and a ballot picks the first expert
// whose tiles reach past `tile`. O(E / 32) steps of a few shuffles instead of E dependent loads, so warp 0 of
// a per-tile CTA finds its tile quickly and every warp of a persistent CTA can find each of its tiles itself.
// All 32 lanes must call it together; all get the answer.
template <class Offset>
CUTE_DEVICE TileInfo locate_row_tile_warp(const Offset* offsets, int num_experts, int64_t num_rows, int tile) {
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = static_cast<int>(threadIdx.x % 32);
  int tiles_before = 0;   // row tiles of the experts of the passes before this one
  long long prev_end = 0; // clamped end of the last expert of the pass before
  for (int base = 0; base < num_experts; base += 32) {
    const int e = base + lane;
    long long end = 0;
    if (e < num_experts) {
      end = static_cast<long long>(offsets[e]);
      end = end < 0 ? 0 : (end > num_rows ? num_rows : end);
    }
    long long before = __shfl_up_sync(kAll, end, 1);  // expert e-1's end; lane 0 takes the carry
    if (lane == 0) before = prev_end;
    const long long start = before < end ? before : end;
    const int count = e < num_experts ? static_cast<int>((end - start + kScatterGemmTileM - 1) / kScatterGemmTileM) : 0;
    int upto = count;  // inclusive scan: row tiles of this pass's experts up to this lane's
    CUTLASS_PRAGMA_UNROLL
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(kAll, upto, d);
      if (lane >= d) upto += v;
    }
    const unsigned holds = __ballot_sync(kAll, e < num_experts && tile < tiles_before + upto);
    if (holds != 0) {  // the first such lane's expert holds the tile (upto never decreases)
      const int src = __ffs(holds) - 1;
      const long long row_start = __shfl_sync(kAll, start, src);
      const long long row_end = __shfl_sync(kAll, end, src);
      const int first_tile = __shfl_sync(kAll, tiles_before + upto - count, src);
      return {static_cast<int64_t>(row_start + static_cast<long long>(tile - first_tile) * kScatterGemmTileM),
              static_cast<int64_t>(row_end), base + src};
    }
    tiles_before += __shfl_sync(kAll, upto, 31);
    prev_end = __shfl_sync(kAll, end, 31);
  }
  return {0, 0, -1};
}

// One producer thread: W's boxes of one stage into the stage, completing on its full barrier. The transaction
// bytes are expected before this thread's own arrival on that barrier (producer_commit), so the stage cannot
// complete before they land.
template <class G, class SmemB>
CUTE_DEVICE void load_w_stage_tma(const CUtensorMap* map, uint64_t* full_barrier, SmemB& sB, int stage, int k0,
                                  int n_tile, int n_out, bool glu, int expert) {
  using Boxes = WeightBoxes<G::kWKMajor>;
  cutlass::arch::ClusterTransactionBarrier::expect_transaction(full_barrier, Boxes::kStageBytes);
  constexpr auto kHint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);
  CUTLASS_PRAGMA_UNROLL
  for (int b = 0; b < Boxes::kCount; ++b) {
    const int h = Boxes::half(b), kk = Boxes::k(b);
    bool in_range;  // whether the half's first column exists: unused, TMA zero-fills past W's columns
    const int n = w_column(h * Boxes::kHalfN, n_tile, n_out, glu, in_range);  // the half's first W column
    void* dst = raw_pointer_cast(&sB(h * Boxes::kHalfN, kk, stage));
    if constexpr (G::kWKMajor) {
      SM90_TMA_LOAD_3D::copy(map, full_barrier, kHint, dst, k0 + kk, n, expert);
    } else {
      SM90_TMA_LOAD_3D::copy(map, full_barrier, kHint, dst, n, k0 + kk, expert);
    }
  }
}

// Producer warpgroup: fill the stages, from write_state on (advanced past them), with the k tiles of
// one (row tile, column tile). Its 128 threads fill one stage of A (128 x 64) and of B (128 x 64)
// with 16-byte cp.async copies, 8 per thread per operand. Each thread keeps the same rows for the
// whole K loop, so the routing index is read once per row here, not once per k tile.
// w_map: W by TMA instead (thread 0 issues a stage's boxes), or nullptr: W by cp.async like X.
template <class G>
CUTE_DEVICE void load_tile(const ScatterGemmParams& p, const TileInfo& tile, int n_tile, typename G::Pipeline& pipeline,
                           typename G::PipelineState& write_state, typename G::SharedStorage& shared,
                           const CUtensorMap* w_map) {
  using Element = typename G::Element;
  using Mainloop = typename G::Mainloop;
  constexpr int kVec = 16 / sizeof(Element);                 // elements per 16-byte copy
  constexpr int kBM = kScatterGemmTileM, kBN = kScatterGemmTileN, kBK = kScatterGemmTileK;
  constexpr int kThreadsLoad = cutlass::NumThreadsPerWarpGroup;
  constexpr int kChunksK = kBK / kVec;                        // 8 copies span one row's BLK_K
  constexpr int kRowsPerPass = kThreadsLoad / kChunksK;       // 16
  constexpr int kPassesA = kBM / kRowsPerPass;                 // 8
  constexpr int kPassesBK = kBN / kRowsPerPass;                // K-major W: rows are n
  constexpr int kChunksN = kBN / kVec;                        // F-major W: copies span BLK_N
  constexpr int kKRowsPerPass = kThreadsLoad / kChunksN;      // 8
  constexpr int kPassesBN = kBK / kKRowsPerPass;              // 8
  static_assert(kPassesBK == 8 && kPassesBN == 8, "one B stage is 8 copies per thread");

  const int64_t rows_here = cute::min(tile.row_end - tile.row_start, int64_t(kScatterGemmTileM));
  const int k_tiles = (p.k_in + kScatterGemmTileK - 1) / kScatterGemmTileK;
  Tensor sA = make_tensor(make_smem_ptr(shared.tensors.smem_A.data()), typename Mainloop::SmemLayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(shared.tensors.smem_B.data()), typename Mainloop::SmemLayoutB{});
  const int t = static_cast<int>(threadIdx.x);  // the producer warpgroup is threads 0..127
  const auto* x = static_cast<const Element*>(p.x);
  const auto* w = static_cast<const Element*>(p.w) + static_cast<int64_t>(tile.expert) * p.stride_we;

  const int ck = t % kChunksK;
  const Element* a_src[kPassesA];
  bool a_ok[kPassesA];
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < kPassesA; ++i) {
    const int m = t / kChunksK + i * kRowsPerPass;
    a_ok[i] = m < rows_here;
    const int64_t row = tile.row_start + (a_ok[i] ? m : 0);   // a valid row either way
    int64_t x_row = row;
    if (!p.x_grouped) {
      // A slot outside [0, N) (hand-made routing, unchecked on CUDA outside debug mode) is not read (zero-filled)
      // and its row not stored (epilogue): wrong rows at worst, never memory outside the tensors.
      const int64_t slot = p.sorted_scattered_idxs[row];
      a_ok[i] = a_ok[i] && slot >= 0 && slot < p.num_rows;
      // 32-bit division (num_rows < 2^31 is checked): the 64-bit one is a subroutine call
      x_row = a_ok[i] ? static_cast<int>(slot) / p.fan_out : 0;
    }
    a_src[i] = x + x_row * p.stride_xm + ck * kVec;
  }
  const bool glu = p.glu != 0;
  const Element* b_src[8];
  bool b_ok[8];
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < 8; ++i) {
    if constexpr (G::kWKMajor) {  // W[e] as (n, k), unit stride along k: row n, chunk ck
      const int n = w_column(t / kChunksK + i * kRowsPerPass, n_tile, p.n_out, glu, b_ok[i]);
      b_src[i] = w + static_cast<int64_t>(b_ok[i] ? n : 0) * p.stride_w_ld + ck * kVec;
    } else {  // unit stride along n: k row t / kChunksN + 8 i, chunk t % kChunksN (k0 added per tile);
              // a chunk never straddles the GLU halves (64 and n_out are multiples of kVec)
      const int n = w_column((t % kChunksN) * kVec, n_tile, p.n_out, glu, b_ok[i]);
      b_src[i] = w + static_cast<int64_t>(t / kChunksN + i * kKRowsPerPass) * p.stride_w_ld + (b_ok[i] ? n : 0);
    }
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    pipeline.producer_acquire(write_state);
    const int stage = write_state.index();
    const int k0 = kt * kBK;
    const bool k_ok = k0 + ck * kVec < p.k_in;  // k_in is a multiple of kVec: whole copies only
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kPassesA; ++i) {
      const int m = t / kChunksK + i * kRowsPerPass;
      const bool ok = a_ok[i] && k_ok;
      cp_async_16(raw_pointer_cast(&sA(m, ck * kVec, stage)), ok ? a_src[i] + k0 : x, ok);
    }
    if (w_map != nullptr) {
      if (t == 0) {
        load_w_stage_tma<G>(w_map, pipeline.producer_get_barrier(write_state), sB, stage, k0, n_tile, p.n_out, glu,
                            tile.expert);
      }
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < 8; ++i) {
        if constexpr (G::kWKMajor) {
          const int n = t / kChunksK + i * kRowsPerPass;
          const bool ok = b_ok[i] && k_ok;
          cp_async_16(raw_pointer_cast(&sB(n, ck * kVec, stage)), ok ? b_src[i] + k0 : w, ok);
        } else {
          const int kk = t / kChunksN + i * kKRowsPerPass;
          const bool ok = b_ok[i] && k0 + kk < p.k_in;
          cp_async_16(raw_pointer_cast(&sB((t % kChunksN) * kVec, kk, stage)),
                      ok ? b_src[i] + static_cast<int64_t>(k0) * p.stride_w_ld : w, ok);
        }
      }
    }
    pipeline.producer_commit(write_state, cutlass::arch::cpasync_barrier_arrive);
    ++write_state;
  }
}

// Consumers: the epilogue of one tile from its staged fp32 accumulators. Each thread takes 8
// consecutive output columns of one row; 8 or 16 threads cover a row's tile.
template <class G>
CUTE_DEVICE void store_tile(const ScatterGemmParams& p, const TileInfo& tile, int n_tile, const float* staged,
                            int mma_thread) {
  using Element = typename G::Element;
  const int64_t rows_here = cute::min(tile.row_end - tile.row_start, int64_t(kScatterGemmTileM));
  const bool glu = p.glu != 0;
  constexpr int kHalf = kScatterGemmTileN / 2;
  const int out_cols = glu ? kHalf : kScatterGemmTileN;
  const int col_start = n_tile * out_cols;
  const int chunks_per_row = out_cols / 8;
  const auto* bias = static_cast<const Element*>(p.bias);
  const auto* gates = static_cast<const float*>(p.gates);
  auto* y = static_cast<Element*>(p.y);
  auto* pre = static_cast<Element*>(p.pre);
  const Element* bias_e = bias != nullptr ? bias + static_cast<int64_t>(tile.expert) * p.stride_be : nullptr;
  for (int chunk = mma_thread; chunk < kScatterGemmTileM * chunks_per_row; chunk += G::kMmaThreads) {
    const int m = chunk / chunks_per_row;
    if (m >= rows_here) break;  // chunks go row by row: every later one is past the tile's rows too
    const int c = (chunk % chunks_per_row) * 8;  // tile column (of the first half with glu)
    const int col = col_start + c;               // output column
    if (col >= p.n_out) continue;
    const int count = cute::min(8, p.n_out - col);
    const int64_t row = tile.row_start + m;
    const int64_t slot = p.sorted_scattered_idxs[row];
    // As the Triton kernel: where the slot is used at all, one outside [0, N) leaves its row unwritten.
    if ((!p.x_grouped || !p.y_grouped || gates != nullptr) && (slot < 0 || slot >= p.num_rows)) continue;
    const int64_t y_row = p.y_grouped ? row : slot;
    float a[8], b[8];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 8; ++j) {
      a[j] = staged[m * G::kStageLd + c + j];
      b[j] = glu ? staged[m * G::kStageLd + kHalf + c + j] : 0.0f;
    }
    if (bias_e != nullptr) {
      for (int j = 0; j < count; ++j) {
        a[j] += static_cast<float>(bias_e[col + j]);
        if (glu) b[j] += static_cast<float>(bias_e[p.n_out + col + j]);
      }
    }
    if (glu && pre != nullptr) {
      Element* pre_row = pre + y_row * p.stride_pm;
      store_8(pre_row + col, a, count);
      store_8(pre_row + p.n_out + col, b, count);
    }
    const float gate = gates != nullptr ? gates[slot] : 1.0f;
    float v[8];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 8; ++j) {
      const float g = !glu ? a[j] : (p.glu == 1 ? silu(a[j]) * b[j] : a[j] * silu(b[j]));
      v[j] = g * gate;
    }
    store_8(y + y_row * p.stride_ym + col, v, count);
  }
}

// The producer's W tensor map, or nullptr (cp.async). Thread 0, which issues the boxes, prefetches it. It
// also traps if the stages are not 1024-byte aligned, whether W comes by TMA or not: the 128-byte swizzle of
// the TMA boxes, of CuTe's cp.async addresses and of the wgmma descriptors is a function of the address, and
// all three assume it (as CUTLASS's kernels do), so a misaligned base would be wrong values; this makes it loud.
template <class G>
CUTE_DEVICE const CUtensorMap* producer_w_map(const WeightTma& w_tma, typename G::SharedStorage& shared) {
  if (threadIdx.x == 0) {
    if (cute::cast_smem_ptr_to_uint(shared.tensors.smem_A.data()) % 1024 != 0 ||
        cute::cast_smem_ptr_to_uint(shared.tensors.smem_B.data()) % 1024 != 0) {
      __trap();
    }
    if (w_tma.active) cute::prefetch_tma_descriptor(&w_tma.map);
  }
  return w_tma.active ? &w_tma.map : nullptr;
}

template <class G, class Offset>
__global__ void __launch_bounds__(G::kThreads, 1)
    scatter_gemm_kernel(const __grid_constant__ ScatterGemmParams p, const __grid_constant__ WeightTma w_tma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  auto& shared = G::shared_storage();

  int row_tile, n_tile;
  scatter_gemm_tile_of(static_cast<int>(blockIdx.x), scatter_gemm_row_tiles(p.num_rows, p.num_experts),
                       scatter_gemm_col_tiles(p.n_out, p.glu), row_tile, n_tile);
  // Warp 0 finds the tile's expert and rows, E / 32 rounds of 32 independent loads: thread 0 alone walking
  // expert_offsets was E dependent loads (each waits for the last one's compare) while 383 threads waited here.
  if (threadIdx.x < 32) {
    const TileInfo found = locate_row_tile_warp(static_cast<const Offset*>(p.expert_offsets), p.num_experts,
                                                p.num_rows, row_tile);
    if (threadIdx.x == 0) shared.extra = found;
  }
  __syncthreads();
  const auto tile = shared.extra;
  if (tile.expert < 0) return;  // past the last row tile: the whole CTA leaves together

  const bool producer = cutlass::canonical_warp_group_idx() < G::kLoadWarpGroups;
  auto pipeline = G::make_pipeline(shared, producer);
  __syncthreads();  // barriers initialised before anyone waits on them

  const int k_tiles = (p.k_in + kScatterGemmTileK - 1) / kScatterGemmTileK;
  if (producer) {
    const CUtensorMap* w_map = producer_w_map<G>(w_tma, shared);
    typename G::PipelineState write_state = cutlass::make_producer_start_state<typename G::Pipeline>();
    load_tile<G>(p, tile, n_tile, pipeline, write_state, shared, w_map);
    pipeline.producer_tail(write_state);  // wait until the consumers released every stage
    return;
  }

  // Consumers: the two warpgroups share the 128 x 128 tile (64 rows each); then the tile is staged.
  const int mma_thread = static_cast<int>(threadIdx.x) - G::kLoadWarpGroups * cutlass::NumThreadsPerWarpGroup;
  Tensor acc = partition_fragment_C(typename G::TiledMma{}, take<0, 2>(TileShape{}));  // (MMA, MMA_M, MMA_N)
  typename G::PipelineState read_state;
  G::mma(pipeline, read_state, acc, k_tiles, mma_thread, shared);
  const float* staged = G::stage(shared, acc, mma_thread, /*transposed=*/false);
  store_tile<G>(p, tile, n_tile, staged, mma_thread);
#endif
}

// Persistent: gridDim.x CTAs (one per SM), CTA b takes the tiles b, b + gridDim.x, ... in the raster
// order. The producer and the consumers walk the same tiles, each warp finding a tile's rows itself
// (locate_row_tile_warp), and skip the same ones (past the last row tile), so the pipeline's stages
// pair up; the stages' state runs on across tiles.
template <class G, class Offset>
__global__ void __launch_bounds__(G::kThreads, 1)
    scatter_gemm_persistent_kernel(const __grid_constant__ ScatterGemmParams p, const __grid_constant__ WeightTma w_tma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  auto& shared = G::shared_storage();
  const bool producer = cutlass::canonical_warp_group_idx() < G::kLoadWarpGroups;
  auto pipeline = G::make_pipeline(shared, producer);
  __syncthreads();  // barriers initialised before anyone waits on them

  const int row_tiles = scatter_gemm_row_tiles(p.num_rows, p.num_experts);
  const int col_tiles = scatter_gemm_col_tiles(p.n_out, p.glu);
  const int64_t tiles = static_cast<int64_t>(row_tiles) * col_tiles;  // < 2^31, checked on the host
  const auto* offsets = static_cast<const Offset*>(p.expert_offsets);
  const int k_tiles = (p.k_in + kScatterGemmTileK - 1) / kScatterGemmTileK;

  if (producer) {
    const CUtensorMap* w_map = producer_w_map<G>(w_tma, shared);
    typename G::PipelineState write_state = cutlass::make_producer_start_state<typename G::Pipeline>();
    for (int64_t pid = blockIdx.x; pid < tiles; pid += gridDim.x) {
      int row_tile, n_tile;
      scatter_gemm_tile_of(static_cast<int>(pid), row_tiles, col_tiles, row_tile, n_tile);
      const TileInfo tile = locate_row_tile_warp(offsets, p.num_experts, p.num_rows, row_tile);
      if (tile.expert < 0) continue;  // past the last row tile (the consumers skip it too)
      load_tile<G>(p, tile, n_tile, pipeline, write_state, shared, w_map);
    }
    pipeline.producer_tail(write_state);  // wait until the consumers released every stage
    return;
  }

  const int mma_thread = static_cast<int>(threadIdx.x) - G::kLoadWarpGroups * cutlass::NumThreadsPerWarpGroup;
  typename G::PipelineState read_state;
  for (int64_t pid = blockIdx.x; pid < tiles; pid += gridDim.x) {
    int row_tile, n_tile;
    scatter_gemm_tile_of(static_cast<int>(pid), row_tiles, col_tiles, row_tile, n_tile);
    const TileInfo tile = locate_row_tile_warp(offsets, p.num_experts, p.num_rows, row_tile);
    if (tile.expert < 0) continue;
    Tensor acc = partition_fragment_C(typename G::TiledMma{}, take<0, 2>(TileShape{}));
    G::mma(pipeline, read_state, acc, k_tiles, mma_thread, shared);
    // stage() starts with a barrier over the consumers: every one has stored the last tile's values
    const float* staged = G::stage(shared, acc, mma_thread, /*transposed=*/false);
    store_tile<G>(p, tile, n_tile, staged, mma_thread);
  }
#endif
}

// The driver's cuTensorMapEncodeTiled, looked up once through cudart (the module links no libcuda), or
// nullptr where the driver has none; a failed lookup's error is cleared, so no later check sees it.
inline decltype(&cuTensorMapEncodeTiled) tensor_map_encoder() {
  static const auto encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(fn);
  }();
  return encoder;
}

// W's tensor map for the TMA loads (WeightBoxes): dims (unit-stride dim, the other, expert), strides in
// bytes. False where the driver refuses it (e.g. strides it cannot describe); the caller then loads by cp.async.
template <class ElementTag, bool WKMajor>
bool encode_w_tma(const ScatterGemmParams& p, CUtensorMap& map) {
  using Boxes = WeightBoxes<WKMajor>;
  using Element = typename CutlassElement<ElementTag>::type;
  constexpr cuuint64_t kBytes = sizeof(Element);
  const cuuint64_t w_cols = p.glu ? 2 * static_cast<cuuint64_t>(p.n_out) : static_cast<cuuint64_t>(p.n_out);
  const cuuint64_t k_in = static_cast<cuuint64_t>(p.k_in);
  const cuuint64_t ld = static_cast<cuuint64_t>(p.stride_w_ld) * kBytes;
  // One expert: its stride is never stepped; give the driver a plain one.
  const cuuint64_t we = p.num_experts > 1 ? static_cast<cuuint64_t>(p.stride_we) * kBytes : ld * (WKMajor ? w_cols : k_in);
  const cuuint64_t dims[3] = {WKMajor ? k_in : w_cols, WKMajor ? w_cols : k_in, static_cast<cuuint64_t>(p.num_experts)};
  const cuuint64_t strides[2] = {ld, we};
  const cuuint32_t box[3] = {Boxes::kInner, WKMajor ? static_cast<cuuint32_t>(Boxes::kHalfN) : Boxes::kBoxK, 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const auto dtype = std::is_same_v<Element, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                  : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  static_assert(Boxes::kInner * kBytes == 128, "a 128-byte swizzled box spans 128 bytes of its unit-stride dim");
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const CUresult r = encode(&map, dtype, 3, const_cast<void*>(p.w), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// For every element of every W box of every stage: where TMA puts it (the box's shared-memory start plus its
// dense offset in the box, then the 128-byte swizzle: address bits 4-6 ^= bits 7-9, on a 1024-aligned base)
// against where the mainloop's layout has it. Addresses are only computed, never touched.
template <class G>
int w_tma_layout_mismatches_of() {
  using Element = typename G::Element;
  using Boxes = WeightBoxes<G::kWKMajor>;
  constexpr uintptr_t kBase = uintptr_t{1} << 20;
  auto* base = reinterpret_cast<Element*>(kBase);
  Tensor sB = make_tensor(make_smem_ptr(base), typename G::Mainloop::SmemLayoutB{});
  auto address = [&](int n, int k, int stage) {
    return reinterpret_cast<uintptr_t>(raw_pointer_cast(&sB(n, k, stage))) - kBase;
  };
  int mismatches = 0;
  for (int stage = 0; stage < G::kStages; ++stage) {
    for (int b = 0; b < Boxes::kCount; ++b) {
      const int h = Boxes::half(b), k0 = Boxes::k(b);
      const uintptr_t start = address(h * Boxes::kHalfN, k0, stage);
      const int outer = G::kWKMajor ? Boxes::kHalfN : Boxes::kBoxK;
      for (int o = 0; o < outer; ++o) {
        for (int i = 0; i < Boxes::kInner; ++i) {
          uintptr_t a = start + (static_cast<uintptr_t>(o) * Boxes::kInner + i) * sizeof(Element);
          a ^= ((a >> 7) & 7) << 4;
          const int n = h * Boxes::kHalfN + (G::kWKMajor ? o : i), k = k0 + (G::kWKMajor ? i : o);
          mismatches += (start % 1024 != 0) || a != address(n, k, stage);
        }
      }
    }
  }
  return mismatches;
}

// Returns whether W is loaded by TMA.
template <class ElementTag, bool WKMajor>
bool run(const ScatterGemmParams& p, cudaStream_t stream) {
  using G = ScatterGemm<ElementTag, WKMajor>;
  constexpr int align = G::kAlignment;
  SMOE_CHECK(p.num_experts >= 1, "num_experts: expected >= 1, got ", p.num_experts);
  SMOE_CHECK(p.num_rows >= 0 && p.num_rows <= INT_MAX, "num_rows: expected in [0, 2^31), got ", p.num_rows);
  SMOE_CHECK(p.k_in >= 1 && p.k_in % align == 0, "k_in: cp.async needs a positive multiple of ", align,
             " elements, got ", p.k_in);
  SMOE_CHECK(p.n_out >= 1, "n_out: expected >= 1, got ", p.n_out);
  SMOE_CHECK(p.glu >= 0 && p.glu <= 2, "glu: expected 0 (none), 1 or 2, got ", p.glu);
  SMOE_CHECK(p.pre == nullptr || p.glu != 0, "pre: the pre-activation is a GLU output; glu is 0");
  SMOE_CHECK(p.pre == nullptr || p.stride_pm >= 2 * static_cast<int64_t>(p.n_out),
             "stride_pm: expected >= 2 * n_out=", 2 * static_cast<int64_t>(p.n_out), ", got ", p.stride_pm);
  const int64_t w_cols = p.glu ? 2 * static_cast<int64_t>(p.n_out) : p.n_out;
  const int64_t w_ld_min = WKMajor ? p.k_in : w_cols;
  if (!WKMajor) {
    SMOE_CHECK(p.n_out % align == 0, "n_out: an F-major W needs a multiple of ", align, " elements, got ", p.n_out);
  }
  SMOE_CHECK(p.stride_xm >= p.k_in && p.stride_xm % align == 0,
             "stride_xm: expected a multiple of ", align, " and >= k_in=", p.k_in, ", got ", p.stride_xm);
  SMOE_CHECK(p.stride_ym >= p.n_out, "stride_ym: expected >= n_out=", p.n_out, ", got ", p.stride_ym);
  SMOE_CHECK(p.stride_w_ld >= w_ld_min && p.stride_w_ld % align == 0,
             "stride_w_ld: expected a multiple of ", align, " and >= ", w_ld_min, ", got ", p.stride_w_ld);
  SMOE_CHECK(p.stride_we >= 0 && p.stride_we % align == 0,
             "stride_we: expected a non-negative multiple of ", align, ", got ", p.stride_we);
  SMOE_CHECK(p.bias == nullptr || p.stride_be >= 0, "stride_be: expected >= 0, got ", p.stride_be);
  SMOE_CHECK(p.fan_out >= 1, "fan_out: expected >= 1, got ", p.fan_out);
  SMOE_CHECK(p.num_ctas >= 0, "num_ctas: expected 0 (one CTA per tile) or a positive CTA count, got ", p.num_ctas);
  SMOE_CHECK(p.x_grouped ? p.x_rows >= p.num_rows : p.x_rows * p.fan_out >= p.num_rows,
             "x_rows: X has ", p.x_rows, " rows, too few for ", p.num_rows, " routed rows with fan_out ", p.fan_out);
  SMOE_CHECK(p.y_rows >= p.num_rows, "y_rows: Y has ", p.y_rows, " rows, fewer than the ", p.num_rows, " routed rows");
  SMOE_CHECK(p.pre == nullptr || p.pre_rows >= p.num_rows, "pre_rows: PRE has ", p.pre_rows, " rows, fewer than the ",
             p.num_rows, " routed rows");
  for (auto [name, ptr] : {std::pair<const char*, const void*>{"x", p.x}, {"w", p.w}}) {
    SMOE_CHECK(ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0,
               name, ": expected a non-null 16-byte aligned device pointer, got ", ptr);
  }
  SMOE_CHECK(p.y != nullptr, "y: expected a device pointer, got nullptr");
  SMOE_CHECK(p.sorted_scattered_idxs != nullptr, "sorted_scattered_idxs: expected a device pointer, got nullptr");
  SMOE_CHECK(p.expert_offsets != nullptr, "expert_offsets: expected a device pointer, got nullptr");

  const int64_t tiles = static_cast<int64_t>(scatter_gemm_row_tiles(p.num_rows, p.num_experts)) *
                        scatter_gemm_col_tiles(p.n_out, p.glu);
  SMOE_CHECK(tiles < INT_MAX, "num_rows: ", p.num_rows, " rows x ", p.n_out, " columns make ", tiles,
             " tiles, more than the kernel's 32-bit tile index");
  DeviceGuard guard(p.device);
  if (p.num_rows == 0) return false;

  WeightTma w_tma{};
  w_tma.active = p.w_tma && encode_w_tma<ElementTag, WKMajor>(p, w_tma.map);
  if (p.num_ctas > 0) {
    using GP = ScatterGemm<ElementTag, WKMajor, /*Persistent=*/true>;
    const dim3 grid(static_cast<unsigned>(tiles < p.num_ctas ? tiles : p.num_ctas));
    auto kernel = p.offsets_int64 ? scatter_gemm_persistent_kernel<GP, int64_t>
                                  : scatter_gemm_persistent_kernel<GP, int32_t>;
    SMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, GP::kSmemBytes));
    kernel<<<grid, GP::kThreads, GP::kSmemBytes, stream>>>(p, w_tma);
    SMOE_CHECK_LAUNCH("scatter_gemm_persistent_kernel");
    return w_tma.active;
  }
  const dim3 grid(static_cast<unsigned>(tiles));
  auto kernel = p.offsets_int64 ? scatter_gemm_kernel<G, int64_t> : scatter_gemm_kernel<G, int32_t>;
  SMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, G::kSmemBytes));
  kernel<<<grid, G::kThreads, G::kSmemBytes, stream>>>(p, w_tma);
  SMOE_CHECK_LAUNCH("scatter_gemm_kernel");
  return w_tma.active;
}

}  // namespace sm90_scatter

#define SCATTERMOE_INSTANTIATE_SCATTER_GEMM_SM90(Tag, KMajor)                                       \
  template <>                                                                                      \
  bool scatter_gemm_sm90<Tag, KMajor>(const ScatterGemmParams& params, cudaStream_t stream) {     \
    return sm90_scatter::run<Tag, KMajor>(params, stream);                                         \
  }                                                                                                \
  template <>                                                                                      \
  int scatter_gemm_w_tma_layout_mismatches<Tag, KMajor>() {                                        \
    return sm90_scatter::w_tma_layout_mismatches_of<sm90_scatter::ScatterGemm<Tag, KMajor>>() +    \
           sm90_scatter::w_tma_layout_mismatches_of<sm90_scatter::ScatterGemm<Tag, KMajor, true>>(); \
  }

}  // namespace scattermoe
