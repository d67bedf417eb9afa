// The CUTLASS element type of each dtype tag (Bf16, Fp16 in grouped_gemm.h). Device code only:
// the host-compiled bindings see the tags, never CUTLASS.
#pragma once

#include <cutlass/numeric_types.h>

#include "scattermoe/grouped_gemm.h"

namespace scattermoe {

template <class Tag> struct CutlassElement;
template <> struct CutlassElement<Bf16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassElement<Fp16> { using type = cutlass::half_t; };

}  // namespace scattermoe
