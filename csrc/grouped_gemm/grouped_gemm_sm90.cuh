// Hopper (sm_90a) ptr-array grouped GEMM over experts: CUTLASS 3.x collectives, TMA loads of
// both operands, wgmma (HGMMA), warp-specialised cooperative persistent kernel, bias epilogue.
//
// Composition (after CUTLASS example 57, written for this library's layouts):
//   - a tiny setup kernel turns expert_offsets into per-expert problem sizes, operand pointers
//     and strides, in the workspace, on the stream: no host sync, no host copy of the routing;
//   - the GEMM takes those device arrays with no host problem shapes, so the persistent
//     scheduler walks the (expert, tile) pairs itself and skips empty experts;
//   - the epilogue is an EVT: D = acc + bias[e, n], bias broadcast along rows by
//     Sm90RowBroadcast whose batch mode is the group index (stride stride_be); a nullptr
//     bias makes it a zero broadcast, so one kernel serves with and without bias.
// Included by one .cu file per (dtype, W layout), so the instantiations compile in parallel.
#pragma once

#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <climits>
#include <type_traits>

#include "scattermoe/check.h"
#include "scattermoe/cutlass_element.h"
#include "scattermoe/grouped_gemm.h"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "scattermoe: the grouped GEMM needs CUDA >= 12.3 (device-modifiable TMA descriptors)"
#endif

namespace scattermoe {
namespace sm90 {

using namespace cute;

// One tile configuration for now (not tuned on a GPU yet; see csrc/README.md): 128x128x64,
// two consumer warpgroups of 64x128 fp32 accumulators each (64 registers), no cluster, so
// experts with few rows waste at most 127 rows per N tile and no multicast peer is needed.
using TileShape = Shape<Int<kGroupedGemmTileM>, Int<kGroupedGemmTileN>, Int<kGroupedGemmTileK>>;
using ClusterShape = Shape<_1, _1, _1>;

template <class ElementTag, bool WKMajor>
struct GroupedGemm {
  using Element = typename CutlassElement<ElementTag>::type;
  using Accumulator = float;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per expert

  // CUTLASS names B's layout as a K x N matrix: ColumnMajor = unit stride along K.
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = std::conditional_t<WKMajor, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA alignment

  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

  // D = acc + bias[l, n]; the RowBroadcast's L mode is the group (expert) index in the
  // ptr-array kernel's tile coordinates, so its L stride is the bias's expert stride.
  using BiasBroadcast = cutlass::epilogue::fusion::Sm90RowBroadcast<
      0, TileShape, Element, Accumulator, Stride<_0, _1, int64_t>, kAlignment, /*EnableNullptr=*/true>;
  using EpilogueFusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Element, Accumulator,
                                             cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90AccFetch, BiasBroadcast>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator,
      void, LayoutD*, kAlignment,  // no C operand: nothing is read back
      Element, LayoutD*, kAlignment, EpilogueSchedule, EpilogueFusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, kAlignment, Element, LayoutB*, kAlignment, Accumulator,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using ProblemSize = typename ProblemShape::UnderlyingProblemShape;
};

// A 2-d CuTe stride with one static unit mode: set the other (dynamic) mode to `ld`.
template <class Stride>
__host__ __device__ Stride leading_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static_v<std::remove_cv_t<std::remove_reference_t<decltype(get<0>(s))>>>) {
    get<1>(s) = ld;
  } else {
    get<0>(s) = ld;
  }
  return s;
}

// The per-expert argument arrays that live in the workspace after CUTLASS's own part.
template <class G>
struct DeviceArgs {
  using Element = typename G::Element;
  typename G::ProblemSize* problem_sizes;
  const Element** ptr_a;
  const Element** ptr_b;
  Element** ptr_d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
};

constexpr size_t kWorkspaceAlign = 256;

inline size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

template <class G>
size_t device_args_bytes(int num_experts, DeviceArgs<G>* out, char* base) {
  size_t offset = 0;
  auto take = [&](auto*& ptr, size_t elem_bytes) {
    offset = align_up(offset, 128);
    if (out) ptr = reinterpret_cast<std::remove_reference_t<decltype(ptr)>>(base + offset);
    offset += elem_bytes * static_cast<size_t>(num_experts);
  };
  DeviceArgs<G> tmp{};
  DeviceArgs<G>& a = out ? *out : tmp;
  take(a.problem_sizes, sizeof(typename G::ProblemSize));
  take(a.ptr_a, sizeof(void*));
  take(a.ptr_b, sizeof(void*));
  take(a.ptr_d, sizeof(void*));
  take(a.stride_a, sizeof(typename G::StrideA));
  take(a.stride_b, sizeof(typename G::StrideB));
  take(a.stride_d, sizeof(typename G::StrideD));
  return align_up(offset, kWorkspaceAlign);
}

// One thread per expert: rows [start, end) of expert e from the cumulative offsets.
template <class G, class Offset>
__global__ void prepare_grouped_args(const Offset* __restrict__ expert_offsets, int num_experts, int64_t num_rows,
                                     int k_in, int n_out,
                                     const typename G::Element* x, int64_t stride_xm,
                                     const typename G::Element* w, int64_t stride_we, int64_t stride_w_ld,
                                     typename G::Element* y, int64_t stride_ym, DeviceArgs<G> args) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < num_experts; e += gridDim.x * blockDim.x) {
    int64_t end = static_cast<int64_t>(expert_offsets[e]);
    int64_t start = e > 0 ? static_cast<int64_t>(expert_offsets[e - 1]) : 0;
    end = end < 0 ? 0 : (end > num_rows ? num_rows : end);
    start = start < 0 ? 0 : (start > end ? end : start);
    args.problem_sizes[e] = typename G::ProblemSize(static_cast<int>(end - start), n_out, k_in);
    args.ptr_a[e] = x + start * stride_xm;
    args.ptr_b[e] = w + static_cast<int64_t>(e) * stride_we;
    args.ptr_d[e] = y + start * stride_ym;
    args.stride_a[e] = leading_stride<typename G::StrideA>(stride_xm);
    args.stride_b[e] = leading_stride<typename G::StrideB>(stride_w_ld);
    args.stride_d[e] = leading_stride<typename G::StrideD>(stride_ym);
  }
}

template <class G>
typename G::Gemm::Arguments make_arguments(const GroupedGemmParams& p, const DeviceArgs<G>& a) {
  using Element = typename G::Element;
  typename G::Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  // No host problem shapes: the sizes exist only on the device, written by prepare_grouped_args.
  args.problem_shape = {p.num_experts, a.problem_sizes, nullptr};
  args.mainloop = {a.ptr_a, a.stride_a, a.ptr_b, a.stride_b};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = a.ptr_d;
  args.epilogue.dD = a.stride_d;
  // EVT arguments nest as {child args..., node args}: {AccFetch, RowBroadcast, plus}.
  args.epilogue.thread = {
      {},                                                                            // acc
      {static_cast<const Element*>(p.bias), Element(0), {_0{}, _1{}, p.stride_be}},  // bias[l, n]
      {}                                                                             // plus
  };
  args.hw_info.device_id = p.device;
  args.hw_info.sm_count = p.sm_count;
  return args;
}

template <class G>
size_t cutlass_workspace_bytes(int num_experts, int sm_count) {
  GroupedGemmParams p;
  p.num_experts = num_experts;
  p.sm_count = sm_count;
  DeviceArgs<G> a{};
  return align_up(G::Gemm::get_workspace_size(make_arguments<G>(p, a)), kWorkspaceAlign);
}

template <class ElementTag, bool WKMajor>
size_t workspace_bytes(int num_experts, int sm_count) {
  using G = GroupedGemm<ElementTag, WKMajor>;
  return cutlass_workspace_bytes<G>(num_experts, sm_count) + device_args_bytes<G>(num_experts, nullptr, nullptr);
}

inline const char* status_name(cutlass::Status s) { return cutlassGetStatusString(s); }

// A failed CUTLASS step: report the CUTLASS status and whatever CUDA error caused it. CUTLASS's run() and
// initialize() read (and so clear) a non-sticky launch error themselves; then none is pending here and the
// message says so rather than naming none.
[[noreturn]] inline void throw_cutlass_error(const char* step, cutlass::Status status, const char* file, int line) {
  cudaError_t err = cudaGetLastError();
  std::ostringstream os;
  os << step << " failed: " << status_name(status);
  if (err != cudaSuccess) {
    os << "; " << cudaGetErrorName(err) << " (CUDA error " << static_cast<int>(err) << "): " << cudaGetErrorString(err);
    if (is_sticky(err))
      os << "; this error outlives the kernel that caused it, so it may come from an earlier kernel on this device";
  } else if (status == cutlass::Status::kErrorInternal) {
    os << "; CUTLASS consumed the CUDA error (a failed launch or cudaFuncSetAttribute): rerun with "
          "CUDA_LAUNCH_BLOCKING=1 or under compute-sanitizer to name it";
  }
  os << " [" << file << ":" << line << "]";
  throw CudaError(os.str(), static_cast<int>(err));
}

#define SMOE_CUTLASS_CHECK(step, expr)                                                       \
  do {                                                                                      \
    cutlass::Status smoe_status_ = (expr);                                                  \
    if (smoe_status_ != cutlass::Status::kSuccess)                                           \
      ::scattermoe::sm90::throw_cutlass_error(step, smoe_status_, __FILE__, __LINE__);     \
  } while (0)

template <class ElementTag, bool WKMajor>
void run(const GroupedGemmParams& p, cudaStream_t stream) {
  using G = GroupedGemm<ElementTag, WKMajor>;
  using Element = typename G::Element;
  // Argument checks (the Python layer checks too; these keep direct callers of _C safe).
  SMOE_CHECK(p.num_experts >= 1, "num_experts: expected >= 1, got ", p.num_experts);
  SMOE_CHECK(p.num_rows >= 0 && p.num_rows <= INT_MAX, "num_rows: expected in [0, 2^31), got ", p.num_rows);
  SMOE_CHECK(p.k_in >= 1 && p.k_in % G::kAlignment == 0,
             "k_in: TMA needs a positive multiple of ", G::kAlignment, " elements, got ", p.k_in);
  SMOE_CHECK(p.n_out >= 1 && p.n_out % G::kAlignment == 0,
             "n_out: TMA needs a positive multiple of ", G::kAlignment, " elements, got ", p.n_out);
  SMOE_CHECK(p.sm_count >= 1, "sm_count: expected >= 1, got ", p.sm_count);
  const int64_t w_ld_min = WKMajor ? p.k_in : p.n_out;
  SMOE_CHECK(p.stride_xm >= p.k_in && p.stride_xm % G::kAlignment == 0,
             "stride_xm: expected a multiple of ", G::kAlignment, " and >= k_in=", p.k_in, ", got ", p.stride_xm);
  SMOE_CHECK(p.stride_ym >= p.n_out && p.stride_ym % G::kAlignment == 0,
             "stride_ym: expected a multiple of ", G::kAlignment, " and >= n_out=", p.n_out, ", got ", p.stride_ym);
  SMOE_CHECK(p.stride_w_ld >= w_ld_min && p.stride_w_ld % G::kAlignment == 0,
             "stride_w_ld: expected a multiple of ", G::kAlignment, " and >= ", w_ld_min, ", got ", p.stride_w_ld);
  SMOE_CHECK(p.stride_we >= 0 && p.stride_we % G::kAlignment == 0,
             "stride_we: expected a non-negative multiple of ", G::kAlignment, ", got ", p.stride_we);
  SMOE_CHECK(p.bias == nullptr || p.stride_be >= 0, "stride_be: expected >= 0, got ", p.stride_be);
  for (auto [name, ptr] : {std::pair<const char*, const void*>{"x", p.x}, {"w", p.w}, {"y", p.y}}) {
    SMOE_CHECK(ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0,
               name, ": expected a non-null 16-byte aligned device pointer, got ", ptr);
  }
  SMOE_CHECK(p.expert_offsets != nullptr, "expert_offsets: expected a device pointer, got nullptr");
  SMOE_CHECK(p.workspace != nullptr && reinterpret_cast<uintptr_t>(p.workspace) % kWorkspaceAlign == 0,
             "workspace: expected a ", kWorkspaceAlign, "-byte aligned device pointer, got ", p.workspace);
  const size_t cutlass_bytes = cutlass_workspace_bytes<G>(p.num_experts, p.sm_count);
  const size_t needed = cutlass_bytes + device_args_bytes<G>(p.num_experts, nullptr, nullptr);
  SMOE_CHECK(p.workspace_bytes >= needed, "workspace_bytes: expected >= ", needed, ", got ", p.workspace_bytes);

  DeviceGuard guard(p.device);
  if (p.num_rows == 0) return;  // every expert is empty: nothing to write

  DeviceArgs<G> a{};
  device_args_bytes<G>(p.num_experts, &a, static_cast<char*>(p.workspace) + cutlass_bytes);
  const int threads = 128;
  const int blocks = (p.num_experts + threads - 1) / threads;
  const auto* x = static_cast<const Element*>(p.x);
  const auto* w = static_cast<const Element*>(p.w);
  auto* y = static_cast<Element*>(p.y);
  if (p.offsets_int64) {
    prepare_grouped_args<G, int64_t><<<blocks, threads, 0, stream>>>(
        static_cast<const int64_t*>(p.expert_offsets), p.num_experts, p.num_rows, p.k_in, p.n_out,
        x, p.stride_xm, w, p.stride_we, p.stride_w_ld, y, p.stride_ym, a);
  } else {
    prepare_grouped_args<G, int32_t><<<blocks, threads, 0, stream>>>(
        static_cast<const int32_t*>(p.expert_offsets), p.num_experts, p.num_rows, p.k_in, p.n_out,
        x, p.stride_xm, w, p.stride_we, p.stride_w_ld, y, p.stride_ym, a);
  }
  SMOE_CHECK_LAUNCH("prepare_grouped_args");

  typename G::Gemm gemm;
  auto args = make_arguments<G>(p, a);
  SMOE_CUTLASS_CHECK("cutlass GemmUniversalAdapter::can_implement", gemm.can_implement(args));
  SMOE_CUTLASS_CHECK("cutlass GemmUniversalAdapter::initialize", gemm.initialize(args, p.workspace, stream));
  SMOE_CUTLASS_CHECK("cutlass GemmUniversalAdapter::run (grouped GEMM launch)", gemm.run(stream));
  SMOE_CHECK_LAUNCH("cutlass grouped GEMM kernel");
}

}  // namespace sm90

// Explicit instantiation of the public entry points for one (dtype, W layout); one per .cu file.
#define SCATTERMOE_INSTANTIATE_GROUPED_GEMM_SM90(Tag, KMajor)                                           \
  template <>                                                                                          \
  size_t grouped_gemm_workspace_bytes_sm90<Tag, KMajor>(int num_experts, int sm_count) {               \
    return sm90::workspace_bytes<Tag, KMajor>(num_experts, sm_count);                                  \
  }                                                                                                    \
  template <>                                                                                          \
  void grouped_gemm_sm90<Tag, KMajor>(const GroupedGemmParams& params, cudaStream_t stream) {         \
    sm90::run<Tag, KMajor>(params, stream);                                                            \
  }

}  // namespace scattermoe
