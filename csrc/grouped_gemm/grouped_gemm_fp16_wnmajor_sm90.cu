// Grouped GEMM instantiation: fp16, W n-major (see grouped_gemm_sm90.cuh). One per file so builds parallelise.
#include "grouped_gemm_sm90.cuh"

namespace scattermoe {
SCATTERMOE_INSTANTIATE_GROUPED_GEMM_SM90(Fp16, false)
}  // namespace scattermoe
