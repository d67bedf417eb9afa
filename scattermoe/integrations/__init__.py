"""One-line switches from other libraries' MoE models to scattermoe.

    from scattermoe.integrations import apply_scattermoe
    model = AutoModelForCausalLM.from_pretrained(...)
    apply_scattermoe(model)                  # in place; state_dict names unchanged

    from scattermoe.integrations import apply_scattermoe_to_mixtral
    apply_scattermoe_to_mixtral()            # before loading: the model is built with scattermoe blocks

    from scattermoe.integrations import register_experts_implementation
    register_experts_implementation()        # then from_pretrained(..., experts_implementation="scattermoe")

``transformers`` (>= 5) is imported only when one of these is called.
"""

from .transformers_moe import (
    SUPPORTED_FAMILIES,
    apply_scattermoe,
    apply_scattermoe_to_deepseek_v2,
    apply_scattermoe_to_deepseek_v3,
    apply_scattermoe_to_dots1,
    apply_scattermoe_to_ernie4_5_moe,
    apply_scattermoe_to_exaone_moe,
    apply_scattermoe_to_flex_olmo,
    apply_scattermoe_to_glm4_moe,
    apply_scattermoe_to_glm4_moe_lite,
    apply_scattermoe_to_gpt_oss,
    apply_scattermoe_to_granitemoe,
    apply_scattermoe_to_granitemoeshared,
    apply_scattermoe_to_hunyuan_v1_moe,
    apply_scattermoe_to_jetmoe,
    apply_scattermoe_to_minimax,
    apply_scattermoe_to_minimax_m2,
    apply_scattermoe_to_mixtral,
    apply_scattermoe_to_olmoe,
    apply_scattermoe_to_phimoe,
    apply_scattermoe_to_qwen2_moe,
    apply_scattermoe_to_qwen3_moe,
    apply_scattermoe_to_qwen3_next,
    register_experts_implementation,
    revert_scattermoe_patches,
)

__all__ = [
    "SUPPORTED_FAMILIES",
    "apply_scattermoe",
    "apply_scattermoe_to_deepseek_v2",
    "apply_scattermoe_to_deepseek_v3",
    "apply_scattermoe_to_dots1",
    "apply_scattermoe_to_ernie4_5_moe",
    "apply_scattermoe_to_exaone_moe",
    "apply_scattermoe_to_flex_olmo",
    "apply_scattermoe_to_glm4_moe",
    "apply_scattermoe_to_glm4_moe_lite",
    "apply_scattermoe_to_gpt_oss",
    "apply_scattermoe_to_granitemoe",
    "apply_scattermoe_to_granitemoeshared",
    "apply_scattermoe_to_hunyuan_v1_moe",
    "apply_scattermoe_to_jetmoe",
    "apply_scattermoe_to_minimax",
    "apply_scattermoe_to_minimax_m2",
    "apply_scattermoe_to_mixtral",
    "apply_scattermoe_to_olmoe",
    "apply_scattermoe_to_phimoe",
    "apply_scattermoe_to_qwen2_moe",
    "apply_scattermoe_to_qwen3_moe",
    "apply_scattermoe_to_qwen3_next",
    "register_experts_implementation",
    "revert_scattermoe_patches",
]
