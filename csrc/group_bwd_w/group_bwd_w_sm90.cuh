// Hopper (sm_90a) per-expert weight gradient dW[e] = X_e^T dY_e, the routed rows gathered on load, dY's
// rows optionally scaled by the gates (the gated backward), and optionally the bias gradient db[e] (the
// column sums of the scaled dY_e). The contract is in include/scattermoe/group_bwd_w.h.
//
// The GEMM's M is K_in (X's columns), N is N_out (dY's columns) and its K runs over the expert's
// rows, so both operands arrive MN-major: a row of X is 128 contiguous M elements of the A tile,
// a row of dY 128 contiguous N elements of the B tile. As in the scatter GEMM, one producer
// warpgroup gathers those rows with 16-byte cp.async copies (each thread reads the routing index of
// its 8 rows once per stage and uses it for both operands), and two consumer warpgroups run
// CUTLASS's cp.async GMMA collective (wgmma reads MN-major 16-bit operands from shared memory).
//
// Scheduling: one CTA per (dW tile, expert); every tile of every expert is in the grid, so an
// empty expert's CTAs write zeros. A very large expert makes its CTAs long (no split over rows yet), so
// with many experts they are launched largest first (params.expert_order): the long CTAs start first.
// Within an expert the shorter tile dimension varies fastest (L2 reuse of the other operand).
//
// Epilogue: the fp32 tile is staged through the freed pipeline stages, transposed when dW's unit
// stride is along K_in (ParallelExperts' layout), so that each thread stores 8 consecutive elements
// with one 16-byte store either way.
#pragma once

#include <climits>

#include "scattermoe/check.h"
#include "scattermoe/cutlass_element.h"
#include "scattermoe/group_bwd_w.h"
#include "scattermoe/sm90_cp_async_gemm.h"
#include "scattermoe/sm90_device.h"

#include <cute/arch/copy_sm80.hpp>
#include <cutlass/numeric_conversion.h>

namespace scattermoe {
namespace sm90_wgrad {

using namespace cute;
using sm90::cp_async_16;
using sm90::load_shared_16;
using sm90::store_shared_16;
using sm90::store_8;

using TileShape = Shape<Int<kGroupBwdWTileM>, Int<kGroupBwdWTileN>, Int<kGroupBwdWTileK>>;

// CUTLASS's names: A is M x K, ColumnMajor = unit stride along M; B is K x N, RowMajor = along N.
// The bias gradient's per-warp partial column sums, from the producer warpgroup's 4 warps.
struct BiasGradStorage {
  float partial[cutlass::NumThreadsPerWarpGroup / 32][kGroupBwdWTileN];
};

template <class ElementTag>
struct GroupBwdW : sm90::CpAsyncGemm<typename CutlassElement<ElementTag>::type, cutlass::layout::ColumnMajor,
                                     cutlass::layout::RowMajor, TileShape, sizeof(BiasGradStorage),
                                     BiasGradStorage> {
  using Element = typename CutlassElement<ElementTag>::type;
  static_assert(kGroupBwdWTileM == kGroupBwdWTileN, "the staged tile is stored either way round");
};

template <class G, class Offset>
__global__ void __launch_bounds__(G::kThreads, 1) group_bwd_w_kernel(const __grid_constant__ GroupBwdWParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename G::Element;
  constexpr int kBM = kGroupBwdWTileM, kBN = kGroupBwdWTileN, kBK = kGroupBwdWTileK;
  auto& shared = G::shared_storage();

  // This CTA's expert (by the launch order, when given) and rows, clamped to [0, num_rows] as the Triton
  // kernel does. An order that is not a permutation of the experts leaves a CTA without one: it writes nothing.
  const int expert = p.expert_order != nullptr ? p.expert_order[blockIdx.y] : static_cast<int>(blockIdx.y);
  if (expert < 0 || expert >= p.num_experts) return;
  const auto* offsets = static_cast<const Offset*>(p.expert_offsets);
  int64_t row_end = static_cast<int64_t>(offsets[expert]);
  row_end = row_end < 0 ? 0 : (row_end > p.num_rows ? p.num_rows : row_end);
  int64_t row_start = expert > 0 ? static_cast<int64_t>(offsets[expert - 1]) : 0;
  row_start = row_start < 0 ? 0 : (row_start > row_end ? row_end : row_start);
  const int k_tiles = static_cast<int>((row_end - row_start + kBK - 1) / kBK);
  // The shorter of the two tile dimensions varies fastest, so the CTAs resident at once cover it
  // whole and share the operand slice of the other: one read of the larger operand from HBM.
  const int tiles_m = (p.k_in + kBM - 1) / kBM;
  const int tiles_n = (p.n_out + kBN - 1) / kBN;
  const int tile = static_cast<int>(blockIdx.x);
  const bool m_fastest = tiles_m <= tiles_n;
  const int m0 = (m_fastest ? tile % tiles_m : tile / tiles_n) * kBM;
  const int n0 = (m_fastest ? tile / tiles_m : tile % tiles_n) * kBN;

  const bool producer = cutlass::canonical_warp_group_idx() < G::kLoadWarpGroups;
  auto pipeline = G::make_pipeline(shared, producer);
  __syncthreads();  // barriers initialised before anyone waits on them

  if (producer) {
    // One stage: 64 rows x 128 columns of X (A) and of dY (B), 16 copies of 16 bytes per row.
    // Thread t takes chunk t % 16 of rows t / 16 + 8 i, i < 8, in both operands.
    using Mainloop = typename G::Mainloop;
    constexpr int kVec = 16 / sizeof(Element);
    constexpr int kChunks = kBM / kVec;                                 // 16 per row
    constexpr int kRowsPerPass = cutlass::NumThreadsPerWarpGroup / kChunks;  // 8
    constexpr int kPasses = kBK / kRowsPerPass;                          // 8
    static_assert(kBM == kBN, "one chunk index serves both operands");
    Tensor sA = make_tensor(make_smem_ptr(shared.tensors.smem_A.data()), typename Mainloop::SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared.tensors.smem_B.data()), typename Mainloop::SmemLayoutB{});
    const int t = static_cast<int>(threadIdx.x);
    const int c = (t % kChunks) * kVec;
    const bool a_col_ok = m0 + c < p.k_in;  // k_in and n_out are multiples of kVec: whole chunks only
    const bool b_col_ok = n0 + c < p.n_out;
    const auto* x = static_cast<const Element*>(p.x) + (a_col_ok ? m0 + c : 0);
    const auto* dy = static_cast<const Element*>(p.dy) + (b_col_ok ? n0 + c : 0);

    typename G::PipelineState write_state = cutlass::make_producer_start_state<typename G::Pipeline>();
    // Gated dW (row_scale) and the bias gradient (db, in the CTAs of the first K_in tile): cp.async
    // cannot scale or sum what it copies. Each thread instead commits its copies of a stage as a
    // cp.async group, and kDefer stages later (kDefer + 1 stages of its copies stay in flight) waits for
    // that group, scales the dY chunks it copied in place and adds them to its column sums, fences those
    // generic-proxy writes for wgmma (which reads through the async proxy) and only then arrives on the
    // stage's full barrier. The scales and states of the stages in between shift through registers.
    const bool scaled = p.row_scale != nullptr;
    const bool with_db = p.db != nullptr && m0 == 0;
    const bool deferred = scaled || with_db;
    float db_sum[kVec] = {};  // this thread's chunk of columns, summed over its rows
    constexpr int kDefer = 3;
    // Deadlock freedom: the consumers release stage j once they have waited for stage j + 1 (one wgmma
    // batch in flight), so the producer's acquire of stage kt needs stage kt - Stages + 1 committed, which
    // it was at iteration kt - Stages + 1 + kDefer < kt.
    static_assert(kDefer + 2 <= static_cast<int>(G::Pipeline::Stages), "too few stages for kDefer");
    float pending_scale[kDefer][kPasses];
    typename G::PipelineState pending_state[kDefer];
    auto scale_and_commit = [&](const typename G::PipelineState& state, const float (&scale)[kPasses]) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kPasses; ++i) {
        const int k = t / kChunks + i * kRowsPerPass;
        auto* chunk = raw_pointer_cast(&sB(c, k, state.index()));  // the 16 bytes this thread copied
        cutlass::AlignedArray<Element, kVec> packed;
        *reinterpret_cast<uint4*>(packed.data()) = load_shared_16(chunk);
        if (scaled) {  // the scaled row rounded to Element, as the Triton kernel does (and db sums that)
          cutlass::Array<float, kVec> v = cutlass::NumericArrayConverter<float, Element, kVec>{}(packed);
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kVec; ++j) v[j] *= scale[i];
          static_cast<cutlass::Array<Element, kVec>&>(packed) =
              cutlass::NumericArrayConverter<Element, float, kVec>{}(v);
          store_shared_16(chunk, *reinterpret_cast<const uint4*>(packed.data()));
        }
        if (with_db) {
          const cutlass::Array<float, kVec> v = cutlass::NumericArrayConverter<float, Element, kVec>{}(packed);
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kVec; ++j) db_sum[j] += v[j];
        }
      }
      if (scaled) cutlass::arch::fence_view_async_shared();
      pipeline.producer_commit(state);
    };
    for (int kt = 0; kt < k_tiles; ++kt) {
      // The routing indices first, so their loads overlap the wait for a free stage.
      int64_t x_row[kPasses], dy_row[kPasses];
      bool ok[kPasses];
      float scale[kPasses];
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kPasses; ++i) {
        const int64_t row = row_start + static_cast<int64_t>(kt) * kBK + t / kChunks + i * kRowsPerPass;
        ok[i] = row < row_end;
        const bool need_slot = ok[i] && (scaled || !(p.x_grouped && p.dy_grouped));  // db needs none
        const int64_t slot64 = need_slot ? p.sorted_scattered_idxs[row] : 0;
        // A slot outside [0, N) (hand-made routing, unchecked on CUDA outside debug mode) adds nothing: not read.
        ok[i] = ok[i] && slot64 >= 0 && slot64 < p.num_rows;
        const int slot = static_cast<int>(slot64);
        // 32-bit division (num_rows < 2^31 is checked): the 64-bit one is a subroutine call
        x_row[i] = !ok[i] ? 0 : (p.x_grouped ? row : slot / p.x_fan_out);
        dy_row[i] = !ok[i] ? 0 : (p.dy_grouped ? row : slot / p.dy_fan_out);
        scale[i] = !ok[i] ? 0.f : (scaled ? p.row_scale[slot] : 1.f);
      }
      pipeline.producer_acquire(write_state);
      const int stage = write_state.index();
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kPasses; ++i) {
        const int k = t / kChunks + i * kRowsPerPass;
        const bool a_ok = ok[i] && a_col_ok, b_ok = ok[i] && b_col_ok;
        cp_async_16(raw_pointer_cast(&sA(c, k, stage)), x + x_row[i] * p.stride_xm, a_ok);
        cp_async_16(raw_pointer_cast(&sB(c, k, stage)), dy + dy_row[i] * p.stride_dym, b_ok);
      }
      if (!deferred) {
        pipeline.producer_commit(write_state, cutlass::arch::cpasync_barrier_arrive);
      } else {
        cute::cp_async_fence();  // this stage's copies are one group
        if (kt >= kDefer) {      // the stage copied kDefer iterations ago: its group has landed
          cute::cp_async_wait<kDefer>();
          scale_and_commit(pending_state[0], pending_scale[0]);
        }
        CUTLASS_PRAGMA_UNROLL
        for (int d = 0; d + 1 < kDefer; ++d) {
          pending_state[d] = pending_state[d + 1];
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < kPasses; ++i) pending_scale[d][i] = pending_scale[d + 1][i];
        }
        pending_state[kDefer - 1] = write_state;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kPasses; ++i) pending_scale[kDefer - 1][i] = scale[i];
      }
      ++write_state;
    }
    if (deferred) {  // the last min(k_tiles, kDefer) stages, oldest first: pending[d] is stage k_tiles - kDefer + d
      cute::cp_async_wait<0>();
      CUTLASS_PRAGMA_UNROLL
      for (int d = 0; d < kDefer; ++d) {
        if (k_tiles - kDefer + d >= 0) scale_and_commit(pending_state[d], pending_scale[d]);
      }
    }
    if (with_db) {
      // db[e, n0 + c + j]: lanes l and l ^ 16 hold the same columns (rows t / 16 differ), then one
      // partial per warp in shared memory, summed by the first 16 threads (an empty expert writes zeros).
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kVec; ++j) db_sum[j] += __shfl_xor_sync(0xffffffffu, db_sum[j], 16);
      auto& partial = shared.extra.partial;
      if (t % 32 < 16) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kVec; ++j) partial[t / 32][c + j] = db_sum[j];
      }
      constexpr uint32_t kProducerBarrierId = 1;  // 0 is the consumers' (sm90_cp_async_gemm.h)
      cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, kProducerBarrierId);
      if (t < kChunks && n0 + c < p.n_out) {
        float v[kVec];
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kVec; ++j) {
          v[j] = 0.f;
          CUTLASS_PRAGMA_UNROLL
          for (int w = 0; w < cutlass::NumThreadsPerWarpGroup / 32; ++w) v[j] += partial[w][c + j];
        }
        auto* db = static_cast<Element*>(p.db) + static_cast<int64_t>(expert) * p.stride_dbe + n0 + c;
        store_8(db, v, cute::min(kVec, p.n_out - (n0 + c)));
      }
    }
    pipeline.producer_tail(write_state);  // wait until the consumers released every stage
    return;
  }

  // Consumers (an empty expert's acc is zero), then the tile staged, transposed when dW is
  // unit-stride along K_in, so that the stores below run along the unit stride either way.
  const int mma_thread = static_cast<int>(threadIdx.x) - G::kLoadWarpGroups * cutlass::NumThreadsPerWarpGroup;
  Tensor acc = partition_fragment_C(typename G::TiledMma{}, take<0, 2>(TileShape{}));
  typename G::PipelineState read_state;
  G::mma(pipeline, read_state, acc, k_tiles, mma_thread, shared);
  const bool along_m = p.stride_dwk == 1;
  const float* staged = G::stage(shared, acc, mma_thread, /*transposed=*/along_m);

  auto* dw = static_cast<Element*>(p.dw) + static_cast<int64_t>(expert) * p.stride_dwe;
  constexpr int kChunksPerLine = kBN / 8;  // 16 (kBM == kBN)
  for (int chunk = mma_thread; chunk < kBM * kChunksPerLine; chunk += G::kMmaThreads) {
    const int line = chunk / kChunksPerLine;   // n (along_m) or m
    const int c = (chunk % kChunksPerLine) * 8;
    const int m = along_m ? m0 + c : m0 + line;
    const int n = along_m ? n0 + line : n0 + c;
    if (m >= p.k_in || n >= p.n_out) continue;
    const int count = cute::min(8, along_m ? p.k_in - m : p.n_out - n);
    float v[8];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 8; ++j) v[j] = staged[line * G::kStageLd + c + j];
    store_8(dw + static_cast<int64_t>(m) * p.stride_dwk + static_cast<int64_t>(n) * p.stride_dwn, v, count);
  }
#endif
}

template <class ElementTag>
void run(const GroupBwdWParams& p, cudaStream_t stream) {
  using G = GroupBwdW<ElementTag>;
  static_assert(G::kSmemBytes <= 232448, "more shared memory than an sm_90 CTA can have");
  constexpr int align = G::kAlignment;
  SMOE_CHECK(p.num_experts >= 1 && p.num_experts <= 65535, "num_experts: expected 1..65535, got ", p.num_experts);
  SMOE_CHECK(p.num_rows >= 0 && p.num_rows <= INT_MAX, "num_rows: expected in [0, 2^31), got ", p.num_rows);
  SMOE_CHECK(p.k_in >= 1 && p.k_in % align == 0, "k_in: cp.async needs a positive multiple of ", align,
             " elements, got ", p.k_in);
  SMOE_CHECK(p.n_out >= 1 && p.n_out % align == 0, "n_out: cp.async needs a positive multiple of ", align,
             " elements, got ", p.n_out);
  SMOE_CHECK(p.stride_xm >= p.k_in && p.stride_xm % align == 0,
             "stride_xm: expected a multiple of ", align, " and >= k_in=", p.k_in, ", got ", p.stride_xm);
  SMOE_CHECK(p.stride_dym >= p.n_out && p.stride_dym % align == 0,
             "stride_dym: expected a multiple of ", align, " and >= n_out=", p.n_out, ", got ", p.stride_dym);
  SMOE_CHECK(p.stride_dwk == 1 || p.stride_dwn == 1,
             "stride_dwk: dW needs a unit stride along k_in or n_out, got strides (", p.stride_dwk, ", ",
             p.stride_dwn, ")");
  SMOE_CHECK(p.x_fan_out >= 1 && p.dy_fan_out >= 1, "x_fan_out: expected fan-outs >= 1, got ", p.x_fan_out,
             " and ", p.dy_fan_out);
  SMOE_CHECK(p.x_grouped ? p.x_rows >= p.num_rows : p.x_rows * p.x_fan_out >= p.num_rows,
             "x_rows: X has ", p.x_rows, " rows, too few for ", p.num_rows, " routed rows");
  SMOE_CHECK(p.dy_grouped ? p.dy_rows >= p.num_rows : p.dy_rows * p.dy_fan_out >= p.num_rows,
             "dy_rows: dY has ", p.dy_rows, " rows, too few for ", p.num_rows, " routed rows");
  for (auto [name, ptr] : {std::pair<const char*, const void*>{"x", p.x}, {"dy", p.dy}}) {
    // With no rows nothing is read (every dW[e] is zero), and an empty tensor's address may be null.
    SMOE_CHECK((p.num_rows == 0 || ptr != nullptr) && reinterpret_cast<uintptr_t>(ptr) % 16 == 0,
               name, ": expected a non-null 16-byte aligned device pointer, got ", ptr);
  }
  SMOE_CHECK(p.dw != nullptr, "dw: expected a device pointer, got nullptr");
  SMOE_CHECK(p.db == nullptr || p.stride_dbe >= p.n_out, "stride_dbe: expected >= n_out=", p.n_out, ", got ",
             p.stride_dbe);
  SMOE_CHECK(p.expert_offsets != nullptr, "expert_offsets: expected a device pointer, got nullptr");
  SMOE_CHECK(p.num_rows == 0 || p.sorted_scattered_idxs != nullptr || (p.x_grouped && p.dy_grouped && !p.row_scale),
             "sorted_scattered_idxs: expected a device pointer for gathered rows or a row scale, got nullptr");

  DeviceGuard guard(p.device);
  const int64_t tiles = static_cast<int64_t>((p.k_in + kGroupBwdWTileM - 1) / kGroupBwdWTileM) *
                        ((p.n_out + kGroupBwdWTileN - 1) / kGroupBwdWTileN);
  SMOE_CHECK(tiles <= INT_MAX, "k_in: too many dW tiles (", tiles, ")");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_experts));
  auto kernel = p.offsets_int64 ? group_bwd_w_kernel<G, int64_t> : group_bwd_w_kernel<G, int32_t>;
  SMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, G::kSmemBytes));
  kernel<<<grid, G::kThreads, G::kSmemBytes, stream>>>(p);
  SMOE_CHECK_LAUNCH("group_bwd_w_kernel");
}

}  // namespace sm90_wgrad

#define SCATTERMOE_INSTANTIATE_GROUP_BWD_W_SM90(Tag)                                                \
  template <>                                                                                      \
  void group_bwd_w_sm90<Tag>(const GroupBwdWParams& params, cudaStream_t stream) {                 \
    sm90_wgrad::run<Tag>(params, stream);                                                          \
  }

}  // namespace scattermoe
