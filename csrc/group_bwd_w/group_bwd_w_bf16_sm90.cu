// group_bwd_w instantiation: bf16 (see group_bwd_w_sm90.cuh). One per file so builds parallelise.
#include "group_bwd_w_sm90.cuh"

namespace scattermoe {
SCATTERMOE_INSTANTIATE_GROUP_BWD_W_SM90(Bf16)
}  // namespace scattermoe
