// The skeleton the two cp.async kernels (scatter_gemm, group_bwd_w) share: one producer warpgroup
// that fills CUTLASS's shared-memory stages with cp.async (each kernel writes its own loop, since
// what it gathers differs), two consumer warpgroups running CUTLASS's cp.async + GMMA collective
// (MainloopSm90CpAsyncGmmaWarpSpecialized), and an fp32 epilogue tile staged in the stages once the
// mainloop is done with them (or, for a persistent kernel, in a buffer of its own, so that the producer
// can fill the stages with the next tile while the consumers store this one). Device code only.
#pragma once

#include <type_traits>

#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/pipeline/pipeline.hpp>

namespace scattermoe {
namespace sm90 {

struct NoExtraStorage {};

// Element: the 16-bit operand type. LayoutA (M x K) and LayoutB (K x N) in CUTLASS's names.
// CarveoutBytes: shared memory kept out of the stages for Extra (what a kernel adds, e.g. its tile's rows).
// SeparateEpilogue: the epilogue tile gets its own buffer instead of reusing the stages (fewer stages).
template <class Element, class LayoutA, class LayoutB, class TileShape_, int CarveoutBytes = 0,
          class Extra = NoExtraStorage, bool SeparateEpilogue = false>
struct CpAsyncGemm {
  using TileShape = TileShape_;
  static constexpr int kTileM = cute::size<0>(TileShape{});
  static constexpr int kTileN = cute::size<1>(TileShape{});
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte cp.async

  // The accumulator tile in fp32, padded so that 16 threads reading 16-byte chunks of two rows
  // spread over the banks. Square tiles may be staged transposed.
  static constexpr int kStageLd = kTileN + 4;
  struct EpilogueStorage {
    alignas(16) float acc[kTileM * kStageLd];
  };
  static constexpr int kEpilogueCarveout = SeparateEpilogue ? static_cast<int>(sizeof(EpilogueStorage)) : 0;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA, kAlignment, Element, LayoutB, kAlignment, float,
      TileShape, cute::Shape<cute::_1, cute::_1, cute::_1>,
      cutlass::gemm::collective::StageCountAutoCarveout<CarveoutBytes + kEpilogueCarveout>,
      cutlass::gemm::KernelCpAsyncWarpSpecializedCooperative>::CollectiveOp;
  using TiledMma = typename Mainloop::TiledMma;
  using Pipeline = typename Mainloop::MainloopPipeline;
  using PipelineState = typename Mainloop::PipelineState;

  static constexpr int kLoadWarpGroups = 1;
  static constexpr int kMmaThreads = cute::size(TiledMma{});  // two consumer warpgroups
  static constexpr int kThreads = kMmaThreads + kLoadWarpGroups * cutlass::NumThreadsPerWarpGroup;

  struct SharedStorageUnion {
    union {  // the mainloop's stages, then (after every consumer finished reading them) the epilogue tile
      typename Mainloop::TensorStorage tensors;
      EpilogueStorage epilogue;
    };
    alignas(16) typename Mainloop::PipelineStorage pipeline;
    Extra extra;
  };
  struct SharedStorageSeparate {
    typename Mainloop::TensorStorage tensors;
    EpilogueStorage epilogue;
    alignas(16) typename Mainloop::PipelineStorage pipeline;
    Extra extra;
  };
  using SharedStorage = std::conditional_t<SeparateEpilogue, SharedStorageSeparate, SharedStorageUnion>;
  static_assert(SeparateEpilogue || sizeof(EpilogueStorage) <= sizeof(typename Mainloop::TensorStorage),
                "the epilogue tile must fit in the pipeline stages it reuses");
  static constexpr int kStages = Mainloop::DispatchPolicy::Stages;
  static_assert(kStages >= 4, "fewer than 4 stages cannot hide the latency of global loads");
  static constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage));
  static_assert(kSmemBytes <= cutlass::gemm::collective::detail::sm90_smem_capacity_bytes, "shared memory over the sm_90 limit");

  // The CTA's dynamic shared memory (kSmemBytes of it, set at launch) as this skeleton's storage.
  CUTE_DEVICE static SharedStorage& shared_storage() {
    extern __shared__ __align__(128) char smem_buf[];
    return *reinterpret_cast<SharedStorage*>(smem_buf);
  }

  // The pipeline over the stages, this thread's role set; all threads of the CTA call it.
  CUTE_DEVICE static Pipeline make_pipeline(SharedStorage& shared, bool producer) {
    typename Pipeline::Params params;
    params.role = producer ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    params.producer_arv_count = kLoadWarpGroups * cutlass::NumThreadsPerWarpGroup;
    params.consumer_arv_count = kMmaThreads;
    return Pipeline(shared.pipeline, params);
  }

  // Consumers: acc = the sum over k_tiles stages (zero when there are none: the collective needs one),
  // read from read_state on, which is then advanced past them (a persistent kernel's next tile starts there).
  template <class Acc>
  CUTE_DEVICE static void mma(Pipeline& pipeline, PipelineState& read_state, Acc& acc, int k_tiles,
                              int mma_thread, SharedStorage& shared) {
    if (k_tiles == 0) {
      cute::clear(acc);
      return;
    }
    Mainloop mainloop;
    typename Mainloop::Params params{};
    mainloop.mma(pipeline, read_state, acc, k_tiles, mma_thread, shared.tensors, params);
    mainloop.mma_tail(pipeline, read_state, k_tiles);  // waits for the wgmmas, releases the stages
    read_state.advance(k_tiles);
  }

  // Consumers: write acc into the epilogue tile, at [m * kStageLd + n] (or [n * kStageLd + m] when
  // transposed), and return it once every consumer has written. mma_tail waited for this thread's
  // wgmmas only, so a named barrier over both warpgroups comes first: then no one reads the stages
  // (union) or the previous tile's staged values (separate buffer) any more.
  template <class Acc>
  CUTE_DEVICE static float* stage(SharedStorage& shared, const Acc& acc, int mma_thread, bool transposed) {
    using Barrier = cutlass::arch::NamedBarrier;
    constexpr uint32_t kBarrierId = 0;  // the first user barrier id (NamedBarrier skips CUTLASS's)
    Barrier::sync(kMmaThreads, kBarrierId);
    float* staged = shared.epilogue.acc;
    auto thr_mma = TiledMma{}.get_thread_slice(mma_thread);
    auto coords = thr_mma.partition_C(cute::make_identity_tensor(cute::take<0, 2>(TileShape{})));  // (m, n)
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < cute::size(acc); ++i) {
      const int m = cute::get<0>(coords(i)), n = cute::get<1>(coords(i));
      staged[transposed ? n * kStageLd + m : m * kStageLd + n] = acc(i);
    }
    Barrier::sync(kMmaThreads, kBarrierId);
    return staged;
  }
};

}  // namespace sm90
}  // namespace scattermoe
