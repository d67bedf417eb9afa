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
    apply_scattermoe_to_gpt_oss,
    apply_scattermoe_to_granitemoe,
    apply_scattermoe_to_jetmoe,
    apply_scattermoe_to_mixtral,
    apply_scattermoe_to_olmoe,
    apply_scattermoe_to_qwen2_moe,
    apply_scattermoe_to_qwen3_moe,
    register_experts_implementation,
    revert_scattermoe_patches,
)

__all__ = [
    "SUPPORTED_FAMILIES", "apply_scattermoe", "apply_scattermoe_to_gpt_oss", "apply_scattermoe_to_granitemoe",
    "apply_scattermoe_to_jetmoe", "apply_scattermoe_to_mixtral", "apply_scattermoe_to_olmoe",
    "apply_scattermoe_to_qwen2_moe", "apply_scattermoe_to_qwen3_moe", "register_experts_implementation",
    "revert_scattermoe_patches",
]
