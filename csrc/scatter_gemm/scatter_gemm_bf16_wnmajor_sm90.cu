// Scatter GEMM instantiation: bf16, W n-major (see scatter_gemm_sm90.cuh). One per file so builds parallelise.
#include "scatter_gemm_sm90.cuh"

namespace scattermoe {
SCATTERMOE_INSTANTIATE_SCATTER_GEMM_SM90(Bf16, false)
}  // namespace scattermoe
