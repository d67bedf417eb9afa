"""One-line switches from other libraries' MoE models to scattermoe.

    from scattermoe.integrations import apply_scattermoe
    model = AutoModelForCausalLM.from_pretrained(...)
    apply_scattermoe(model)                  # in place; state_dict names unchanged

    from scattermoe.integrations import apply_scattermoe_to_mixtral
    apply_scattermoe_to_mixtral()            # before loading: the model is built with scattermoe blocks

    from scattermoe.integrations import register_experts_implementation
    register_experts_implementation()        # then from_pretrained(..., experts_implementation="scattermoe")

Every experts class of transformers' fused-experts interface is supported, whatever its family; the families in
``SUPPORTED_FAMILIES`` are the ones tested here and have a named patcher below, and
``apply_scattermoe_to_<model_type>`` of any other family with fused experts is built on first use.
``transformers`` (>= 5) is imported only when one of these is called.
"""

from .transformers_moe import (
    SUPPORTED_FAMILIES,
    apply_scattermoe,
    apply_scattermoe_to_afmoe,
    apply_scattermoe_to_aria,
    apply_scattermoe_to_axk1,
    apply_scattermoe_to_axk2,
    apply_scattermoe_to_bailing_hybrid,
    apply_scattermoe_to_beam,
    apply_scattermoe_to_cohere2_moe,
    apply_scattermoe_to_deepseek_ocr2,
    apply_scattermoe_to_deepseek_v2,
    apply_scattermoe_to_deepseek_v3,
    apply_scattermoe_to_deepseek_v32,
    apply_scattermoe_to_deepseek_v4,
    apply_scattermoe_to_dots1,
    apply_scattermoe_to_dots3_note,
    apply_scattermoe_to_ernie4_5_moe,
    apply_scattermoe_to_ernie4_5_vl_moe,
    apply_scattermoe_to_exaone_moe,
    apply_scattermoe_to_flex_olmo,
    apply_scattermoe_to_flint,
    apply_scattermoe_to_gemma4,
    apply_scattermoe_to_glm4_moe,
    apply_scattermoe_to_glm4_moe_lite,
    apply_scattermoe_to_glm4v_moe,
    apply_scattermoe_to_glm5_next,
    apply_scattermoe_to_glm_moe_dsa,
    apply_scattermoe_to_gpt_oss,
    apply_scattermoe_to_granitemoe,
    apply_scattermoe_to_granitemoe_swa,
    apply_scattermoe_to_granitemoehybrid,
    apply_scattermoe_to_granitemoeshared,
    apply_scattermoe_to_hunyuan_v1_moe,
    apply_scattermoe_to_hy_v3,
    apply_scattermoe_to_hy_v4,
    apply_scattermoe_to_inkling,
    apply_scattermoe_to_inkling2,
    apply_scattermoe_to_jamba,
    apply_scattermoe_to_jetmoe,
    apply_scattermoe_to_kimi_linear,
    apply_scattermoe_to_kolibri1,
    apply_scattermoe_to_laguna,
    apply_scattermoe_to_lfm2_moe,
    apply_scattermoe_to_mellum,
    apply_scattermoe_to_mimo_v2_flash,
    apply_scattermoe_to_minimax,
    apply_scattermoe_to_minimax_m2,
    apply_scattermoe_to_minimax_m3_vl,
    apply_scattermoe_to_mistral4,
    apply_scattermoe_to_mistral_large4,
    apply_scattermoe_to_mixtral,
    apply_scattermoe_to_nemotron_h,
    apply_scattermoe_to_olmoe,
    apply_scattermoe_to_openai_privacy_filter,
    apply_scattermoe_to_phimoe,
    apply_scattermoe_to_qwen2_moe,
    apply_scattermoe_to_qwen3_5_moe,
    apply_scattermoe_to_qwen3_moe,
    apply_scattermoe_to_qwen3_next,
    apply_scattermoe_to_qwen3_omni_moe,
    apply_scattermoe_to_qwen3_vl_moe,
    apply_scattermoe_to_qwen4_exp,
    apply_scattermoe_to_unlimited_ocr,
    apply_scattermoe_to_zaya,
    register_experts_implementation,
    revert_scattermoe_patches,
)

__all__ = [
    "SUPPORTED_FAMILIES",
    "apply_scattermoe",
    "apply_scattermoe_to_afmoe",
    "apply_scattermoe_to_aria",
    "apply_scattermoe_to_axk1",
    "apply_scattermoe_to_axk2",
    "apply_scattermoe_to_bailing_hybrid",
    "apply_scattermoe_to_beam",
    "apply_scattermoe_to_cohere2_moe",
    "apply_scattermoe_to_deepseek_ocr2",
    "apply_scattermoe_to_deepseek_v2",
    "apply_scattermoe_to_deepseek_v3",
    "apply_scattermoe_to_deepseek_v32",
    "apply_scattermoe_to_deepseek_v4",
    "apply_scattermoe_to_dots1",
    "apply_scattermoe_to_dots3_note",
    "apply_scattermoe_to_ernie4_5_moe",
    "apply_scattermoe_to_ernie4_5_vl_moe",
    "apply_scattermoe_to_exaone_moe",
    "apply_scattermoe_to_flex_olmo",
    "apply_scattermoe_to_flint",
    "apply_scattermoe_to_gemma4",
    "apply_scattermoe_to_glm4_moe",
    "apply_scattermoe_to_glm4_moe_lite",
    "apply_scattermoe_to_glm4v_moe",
    "apply_scattermoe_to_glm5_next",
    "apply_scattermoe_to_glm_moe_dsa",
    "apply_scattermoe_to_gpt_oss",
    "apply_scattermoe_to_granitemoe",
    "apply_scattermoe_to_granitemoe_swa",
    "apply_scattermoe_to_granitemoehybrid",
    "apply_scattermoe_to_granitemoeshared",
    "apply_scattermoe_to_hunyuan_v1_moe",
    "apply_scattermoe_to_hy_v3",
    "apply_scattermoe_to_hy_v4",
    "apply_scattermoe_to_inkling",
    "apply_scattermoe_to_inkling2",
    "apply_scattermoe_to_jamba",
    "apply_scattermoe_to_jetmoe",
    "apply_scattermoe_to_kimi_linear",
    "apply_scattermoe_to_kolibri1",
    "apply_scattermoe_to_laguna",
    "apply_scattermoe_to_lfm2_moe",
    "apply_scattermoe_to_mellum",
    "apply_scattermoe_to_mimo_v2_flash",
    "apply_scattermoe_to_minimax",
    "apply_scattermoe_to_minimax_m2",
    "apply_scattermoe_to_minimax_m3_vl",
    "apply_scattermoe_to_mistral4",
    "apply_scattermoe_to_mistral_large4",
    "apply_scattermoe_to_mixtral",
    "apply_scattermoe_to_nemotron_h",
    "apply_scattermoe_to_olmoe",
    "apply_scattermoe_to_openai_privacy_filter",
    "apply_scattermoe_to_phimoe",
    "apply_scattermoe_to_qwen2_moe",
    "apply_scattermoe_to_qwen3_5_moe",
    "apply_scattermoe_to_qwen3_moe",
    "apply_scattermoe_to_qwen3_next",
    "apply_scattermoe_to_qwen3_omni_moe",
    "apply_scattermoe_to_qwen3_vl_moe",
    "apply_scattermoe_to_qwen4_exp",
    "apply_scattermoe_to_unlimited_ocr",
    "apply_scattermoe_to_zaya",
    "register_experts_implementation",
    "revert_scattermoe_patches",
]


def __getattr__(name: str):
    """``apply_scattermoe_to_<model_type>`` of a family with fused experts that has no named patcher."""
    from . import transformers_moe

    if name.startswith("apply_scattermoe_to_"):
        return getattr(transformers_moe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
