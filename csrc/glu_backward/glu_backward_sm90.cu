// The GLU backward pass (contract in include/scattermoe/glu_backward.h): elementwise over [N, 2F]
// plus a per-row dot product. Memory-bound: each row is read once (H and dG) and written once
// (dH, and s*G when asked), 16 bytes per access where the rows allow it. Built for sm_90a like
// the rest of the module, though nothing in it needs Hopper.
#include <cutlass/numeric_types.h>

#include <climits>

#include "scattermoe/check.h"
#include "scattermoe/cutlass_element.h"
#include "scattermoe/glu_backward.h"

namespace scattermoe {
namespace glu_bwd {

constexpr int kThreads = 128;
constexpr int kVec = 8;  // 8 two-byte elements = 16 bytes

template <class Element>
struct Vec8 {
  alignas(16) Element v[kVec];
};

template <class Element>
__device__ __forceinline__ void load8(const Element* src, bool vector, int count, float (&out)[kVec]) {
  if (vector) {
    Vec8<Element> packed = *reinterpret_cast<const Vec8<Element>*>(src);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = static_cast<float>(packed.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = j < count ? static_cast<float>(src[j]) : 0.0f;
  }
}

template <class Element>
__device__ __forceinline__ void store8(Element* dst, bool vector, int count, const float (&in)[kVec]) {
  if (vector) {
    Vec8<Element> packed;
#pragma unroll
    for (int j = 0; j < kVec; ++j) packed.v[j] = static_cast<Element>(in[j]);
    *reinterpret_cast<Vec8<Element>*>(dst) = packed;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (j < count) dst[j] = static_cast<Element>(in[j]);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class Element>
__global__ void __launch_bounds__(kThreads) glu_backward_kernel(const __grid_constant__ GluBackwardParams p) {
  const int64_t row = blockIdx.x;
  const int f = p.f;
  const auto* pre = static_cast<const Element*>(p.pre) + row * p.stride_pm;
  const auto* dg_row = static_cast<const Element*>(p.dg) + row * p.stride_dgm;
  auto* dh = static_cast<Element*>(p.dh) + row * p.stride_dhm;
  auto* g_row = p.g != nullptr ? static_cast<Element*>(p.g) + row * p.stride_gm : nullptr;
  const float s = p.scale != nullptr ? p.scale[row] : 1.0f;
  float dot = 0.0f;
  for (int c = threadIdx.x * kVec; c < f; c += kThreads * kVec) {
    const int count = min(kVec, f - c);
    // 16-byte accesses need all 8 elements and 16-byte aligned addresses (f % 8 == 0 keeps the
    // second half aligned too); anything else goes element by element.
    const bool vec = count == kVec && aligned16(pre + c) && aligned16(pre + f + c) && aligned16(dg_row + c) &&
                     aligned16(dh + c) && aligned16(dh + f + c) && (g_row == nullptr || aligned16(g_row + c));
    float first[kVec], second[kVec], dg[kVec];
    load8(pre + c, vec, count, first);
    load8(pre + f + c, vec, count, second);
    load8(dg_row + c, vec, count, dg);
    float d_first[kVec], d_second[kVec], g[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float act_in = p.activate_first ? first[j] : second[j];
      const float lin = p.activate_first ? second[j] : first[j];
      const float sig = __fdividef(1.0f, 1.0f + __expf(-act_in));  // 0 for act_in < -88 (exp is inf)
      const float silu = act_in * sig;
      dot += dg[j] * silu * lin;  // zero past count: dg was zero-filled
      g[j] = s * silu * lin;
      const float dgs = s * dg[j];
      const float d_act = dgs * lin * sig * (1.0f + act_in * (1.0f - sig));
      const float d_lin = dgs * silu;
      d_first[j] = p.activate_first ? d_act : d_lin;
      d_second[j] = p.activate_first ? d_lin : d_act;
    }
    store8(dh + c, vec, count, d_first);
    store8(dh + f + c, vec, count, d_second);
    if (g_row != nullptr) store8(g_row + c, vec, count, g);
  }
  if (p.dot != nullptr) {
    // Block reduction: warp shuffles, then one value per warp through shared memory.
    __shared__ float partial[kThreads / 32];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
      p.dot[row] = total;
    }
  }
}

template <class ElementTag>
void run(const GluBackwardParams& p, cudaStream_t stream) {
  using Element = typename CutlassElement<ElementTag>::type;
  SMOE_CHECK(p.num_rows >= 0 && p.num_rows <= INT_MAX, "num_rows: expected in [0, 2^31), got ", p.num_rows);
  SMOE_CHECK(p.f >= 1, "f: expected >= 1, got ", p.f);
  SMOE_CHECK(p.stride_pm >= 2 * static_cast<int64_t>(p.f), "stride_pm: expected >= 2 * f, got ", p.stride_pm);
  SMOE_CHECK(p.stride_dgm >= p.f, "stride_dgm: expected >= f, got ", p.stride_dgm);
  SMOE_CHECK(p.stride_dhm >= 2 * static_cast<int64_t>(p.f), "stride_dhm: expected >= 2 * f, got ", p.stride_dhm);
  SMOE_CHECK(p.g == nullptr || p.stride_gm >= p.f, "stride_gm: expected >= f, got ", p.stride_gm);
  if (p.num_rows == 0) return;
  SMOE_CHECK(p.pre != nullptr && p.dg != nullptr && p.dh != nullptr,
             "pre: pre, dg and dh must be device pointers, got ", p.pre, ", ", p.dg, ", ", p.dh);
  DeviceGuard guard(p.device);
  glu_backward_kernel<Element><<<static_cast<unsigned>(p.num_rows), kThreads, 0, stream>>>(p);
  SMOE_CHECK_LAUNCH("glu_backward_kernel");
}

}  // namespace glu_bwd

template <>
void glu_backward_sm90<Bf16>(const GluBackwardParams& params, cudaStream_t stream) {
  glu_bwd::run<Bf16>(params, stream);
}
template <>
void glu_backward_sm90<Fp16>(const GluBackwardParams& params, cudaStream_t stream) {
  glu_bwd::run<Fp16>(params, stream);
}

}  // namespace scattermoe
