// Device helpers shared by the sm_90a kernels that load with cp.async and store rows themselves
// (scatter_gemm, group_bwd_w). Device code only.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>

#include <cstdint>

namespace scattermoe {
namespace sm90 {

// One 16-byte cp.async global -> shared (bypassing L1); with valid=false it reads nothing and writes zeros.
CUTE_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = cute::cast_smem_ptr_to_uint(smem);
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}

// 16 bytes from / to shared memory (LDS.128 / STS.128: through a generic pointer the compiler cannot
// tell the address space, and would emit generic LD / ST).
CUTE_DEVICE uint4 load_shared_16(const void* smem) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(cute::cast_smem_ptr_to_uint(smem)));
  return v;
}

CUTE_DEVICE void store_shared_16(void* smem, const uint4& v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(cute::cast_smem_ptr_to_uint(smem)), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// 8 fp32 values to 8 consecutive elements: one 16-byte store when all 8 exist and dst is 16-byte
// aligned, else element by element (the last, partial chunk of a row, or odd row strides).
template <class Element>
CUTE_DEVICE void store_8(Element* dst, const float (&v)[8], int count) {
  if (count == 8 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    cutlass::AlignedArray<Element, 8> packed;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 8; ++j) packed[j] = static_cast<Element>(v[j]);
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(packed.data());
  } else {
    for (int j = 0; j < count; ++j) dst[j] = static_cast<Element>(v[j]);
  }
}

}  // namespace sm90
}  // namespace scattermoe
