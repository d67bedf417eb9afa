// Build facts reported by scattermoe._C.build_info(): compiled by nvcc, so the CUDA and CUTLASS
// versions are the ones the kernels were built with, not whatever the host compiler sees.
#include <cutlass/version.h>

#include <cuda_runtime_api.h>

#include "scattermoe/grouped_gemm.h"

namespace scattermoe {

void build_versions(int* nvcc_major, int* nvcc_minor, int* cutlass_major, int* cutlass_minor, int* cutlass_patch,
                    int* cudart) {
  *nvcc_major = __CUDACC_VER_MAJOR__;
  *nvcc_minor = __CUDACC_VER_MINOR__;
  *cutlass_major = CUTLASS_MAJOR;
  *cutlass_minor = CUTLASS_MINOR;
  *cutlass_patch = CUTLASS_PATCH;
  *cudart = CUDART_VERSION;
}

}  // namespace scattermoe
