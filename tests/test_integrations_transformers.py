"""scattermoe.integrations: transformers MoE models patched vs unpatched, per family.

Each family gets a tiny random config built with transformers and all weights randomised
(routers and biases included, so routing is non-trivial; group-limited top-k where the family
has it); a family built only as an image-text model gets the smallest vision tower that builds and text-only
input. Checked on the CPU in float32: logits (rel err < 1e-4), loss and every parameter's
gradient, greedy generation identical (all but the token classifier generate), the blocks running scattermoe's
ops, and a checkpoint saved after patching reloads into an unpatched model with the same logits.
Most checks run on the 'torch' backend; one forward+backward per expert layout (TRITON_FAMILIES)
runs the Triton kernels through the interpreter.
"""

import contextlib
import copy
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import scattermoe  # noqa: E402
from scattermoe import integrations  # noqa: E402
from scattermoe.integrations import transformers_moe  # noqa: E402

TOL = 1e-4


# A family with fused experts outside SUPPORTED_FAMILIES: patched because its experts class is on transformers'
# fused-experts interface, not because a list names it.
UNLISTED_FAMILY = "solar_open"


# Every family's text model: 2 layers, hidden 32, router logits returned (the loss includes the aux loss).
_TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, output_router_logits=True)


def _tiny(family):
    """A tiny config of the family: 2 layers, hidden 32, a handful of experts, k >= 2 (and, for an image-text
    family, the smallest vision tower that builds)."""
    if family == "mixtral":
        return transformers.MixtralConfig(**_TEXT, intermediate_size=24, num_key_value_heads=2, num_local_experts=4,
                                          num_experts_per_tok=2)
    if family == "qwen3_moe":  # softmax, top-k, renormalised
        return transformers.Qwen3MoeConfig(**_TEXT, intermediate_size=48, moe_intermediate_size=24, head_dim=8,
                                           num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                                           norm_topk_prob=True)
    if family == "olmoe":  # softmax, top-k, not renormalised
        return transformers.OlmoeConfig(**_TEXT, intermediate_size=24, num_key_value_heads=4, num_experts=5,
                                        num_experts_per_tok=2, norm_topk_prob=False)
    if family == "qwen2_moe":  # with its gated shared expert
        return transformers.Qwen2MoeConfig(**_TEXT, intermediate_size=48, moe_intermediate_size=20,
                                           shared_expert_intermediate_size=40, num_key_value_heads=2, num_experts=5,
                                           num_experts_per_tok=3)
    if family == "granitemoe":  # top-k of logits, softmax over the k
        return transformers.GraniteMoeConfig(**_TEXT, intermediate_size=24, num_key_value_heads=2,
                                             num_local_experts=4, num_experts_per_tok=2)
    if family == "gpt_oss":  # interleaved gate/up, clamped SwiGLU (a low limit so the clamp bites), biases
        return transformers.GptOssConfig(**_TEXT, intermediate_size=24, num_key_value_heads=2, head_dim=8,
                                         num_local_experts=4, num_experts_per_tok=2, swiglu_limit=1.5,
                                         sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    if family == "jetmoe":  # MoE and MoA (attention experts), 2 KV heads x k=2 query heads
        return transformers.JetMoeConfig(**_TEXT, num_key_value_heads=2, kv_channels=8, intermediate_size=24,
                                         num_local_experts=4, num_experts_per_tok=2)
    if family in _FUSED_EXPERTS_CONFIGS:  # transformers 5's fused experts class, each family's own router
        return transformers.AutoConfig.for_model(_CONFIG_TYPE.get(family, family), **_TEXT,
                                                 **_FUSED_EXPERTS_CONFIGS[family])
    if family in _IMAGE_TEXT_CONFIGS:
        return transformers.AutoConfig.for_model(_CONFIG_TYPE.get(family, family),
                                                 **copy.deepcopy(_IMAGE_TEXT_CONFIGS[family]))
    raise KeyError(family)


_MOE = dict(intermediate_size=48, moe_intermediate_size=24, num_experts_per_tok=2)
_GROUPED = dict(_MOE, n_routed_experts=6, n_shared_experts=1, n_group=2, topk_group=1)  # group-limited top-k
_MLA = dict(num_key_value_heads=4, head_dim=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4,
            qk_nope_head_dim=8, v_head_dim=8)  # multi-head latent attention
# The config's model_type where it is not the family's: multimodal families' text model, Qwen3-Omni's thinker.
_CONFIG_TYPE = {"qwen3_5_moe": "qwen3_5_moe_text", "gemma4": "gemma4_text", "aria": "aria_text",
                "dots3_note": "dots3_note_text", "inkling": "inkling_text", "inkling2": "inkling2_text",
                "minimax_m3_vl": "minimax_m3_vl_text", "qwen4_exp": "qwen4_exp_text",
                "inkling2_loop": "inkling2_loop_text", "qwen3_omni_moe": "qwen3_omni_moe_thinker"}
_MLA_OWN_HEAD_DIM = {k: v for k, v in _MLA.items() if k != "head_dim"}  # Mistral 4's: qk_nope + qk_rope
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=8)  # 64 / 8
_FUSED_EXPERTS_CONFIGS = {
    "deepseek_v2": dict(_GROUPED, **_MLA, first_k_dense_replace=0),
    "deepseek_v3": dict(_GROUPED, **_MLA, first_k_dense_replace=0),
    "glm4_moe": dict(_GROUPED, num_key_value_heads=2, first_k_dense_replace=0),
    "glm4_moe_lite": dict(_GROUPED, **_MLA),  # its first layer dense: one MoE block
    "dots1": dict(_GROUPED, num_key_value_heads=2, first_k_dense_replace=0),
    "exaone_moe": dict(_MOE, num_experts=6, n_group=2, topk_group=1, num_key_value_heads=2, first_k_dense_replace=0),
    "qwen3_next": dict(_MOE, num_experts=6, shared_expert_intermediate_size=40, num_key_value_heads=2, head_dim=8,
                       decoder_sparse_step=1, mlp_only_layers=[], layer_types=["linear_attention", "full_attention"],
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                       linear_value_head_dim=8, linear_conv_kernel_dim=4),  # a gated-delta-net layer, then attention
    "phimoe": dict(_MOE, num_local_experts=6, num_key_value_heads=2),  # sparsemixer routing
    "minimax": dict(_MOE, num_local_experts=6, num_key_value_heads=2, head_dim=8),  # lightning attention layers
    "minimax_m2": dict(_MOE, num_local_experts=6, num_key_value_heads=2, head_dim=8),
    "ernie4_5_moe": dict(_MOE, moe_num_experts=6, moe_k=2, moe_layer_start_index=0, num_key_value_heads=2),
    "hunyuan_v1_moe": dict(_MOE, num_experts=6, num_key_value_heads=2, head_dim=8),
    "flex_olmo": dict(_MOE, num_experts=6, num_key_value_heads=2),
    "granitemoeshared": dict(_MOE, num_local_experts=6, num_key_value_heads=2, shared_intermediate_size=40),
    "afmoe": dict(_MOE, num_experts=6, num_key_value_heads=2, head_dim=8, num_dense_layers=0,
                  layer_types=["sliding_attention", "full_attention"]),
    "cohere2_moe": dict(_MOE, num_experts=6, num_key_value_heads=2, head_dim=8,
                        layer_types=["sliding_attention", "full_attention"]),
    "deepseek_v4": dict(_MOE, n_routed_experts=6, num_key_value_heads=2, head_dim=8, q_lora_rank=24, qk_rope_head_dim=4,
                        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
                        mlp_layer_types=["hash_moe", "moe"]),  # its own gate (clamped SwiGLU); hash-routed, then top-k
    "flint": dict(_MOE, num_experts=6, shared_expert_intermediate_size=40, num_key_value_heads=2, head_dim=8,
                  decoder_sparse_step=1, mlp_only_layers=[], layer_types=["full_attention", "sliding_attention"]),
    "granitemoe_swa": dict(_MOE, num_local_experts=6, num_key_value_heads=2,
                           layer_types=["full_attention", "sliding_attention"]),
    "hy_v3": dict(_MOE, num_experts=6, num_key_value_heads=2, head_dim=8),
    "kolibri1": dict(_MOE, num_local_experts=6, shared_expert_intermediate_size=40, num_key_value_heads=2, head_dim=8,
                     layer_types=["sliding_attention", "full_attention"]),
    "laguna": dict(_MOE, num_experts=6, shared_expert_intermediate_size=40, num_key_value_heads=2, head_dim=8,
                   layer_types=["full_attention", "full_attention"]),
    "mellum": dict(_MOE, num_local_experts=6, num_key_value_heads=2, head_dim=8,
                   layer_types=["full_attention", "full_attention"]),
    "mimo_v2_flash": dict(_MOE, n_routed_experts=6, n_group=2, topk_group=1, num_key_value_heads=2, head_dim=8,
                          v_head_dim=8, layer_types=["full_attention", "sliding_attention"]),
    "qwen3_5_moe": dict(_MOE, num_experts=6, shared_expert_intermediate_size=40, num_key_value_heads=2, head_dim=8,
                        layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                        linear_conv_kernel_dim=4),
    "zaya": dict(_MOE, num_experts=6, num_key_value_heads=2, head_dim=8, layer_types=["hybrid", "hybrid"],
                 num_experts_per_tok=1),  # top-1
    "gemma4": dict(_MOE, num_experts=6, top_k_experts=2, enable_moe_block=True, num_key_value_heads=2, head_dim=8,
                   global_head_dim=8, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention"]),  # GELU-tanh experts beside a dense MLP
    "nemotron_h": dict(_MOE, n_routed_experts=6, n_shared_experts=1, moe_shared_expert_intermediate_size=24,
                       num_key_value_heads=2, head_dim=8,
                       layers_block_type=["full_attention", "moe"]),  # ReLU² experts without a gate
    "granitemoehybrid": dict(_MOE, num_local_experts=6, shared_intermediate_size=24, num_key_value_heads=2,
                             layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_state=8, mamba_d_head=16,
                             mamba_chunk_size=8, mamba_n_groups=1),
    "lfm2_moe": dict(_MOE, num_experts=6, num_dense_layers=0, num_key_value_heads=2,
                     layer_types=["conv", "full_attention"]),
    "glm_moe_dsa": dict(_MOE, n_routed_experts=6, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0,
                        **_MLA, index_topk=4, index_head_dim=8, index_n_heads=2),  # sparse attention's indexer
    "deepseek_v32": dict(_MOE, n_routed_experts=6, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0,
                         **_MLA, index_topk=4, index_head_dim=8, index_n_heads=2),
    "jamba": dict(_MOE, num_experts=6, num_key_value_heads=2, expert_layer_period=1, expert_layer_offset=0,
                  attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_expand=2),
    "kimi_linear": dict(_MOE, num_local_experts=6, n_shared_experts=1, mlp_layer_types=["sparse", "sparse"],
                        layer_types=["linear_attention", "full_attention"], num_key_value_heads=4, kv_lora_rank=16,
                        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, linear_head_dim=8, linear_num_heads=4),
    "aria": dict(_MOE, moe_num_experts=6, moe_topk=2, moe_num_shared_experts=1, num_key_value_heads=2,
                 head_dim=8),  # [E, in, out] expert weights
    "axk1": dict(_GROUPED, **_MLA, mlp_layer_types=["sparse", "sparse"]),  # a norm on the MoE block's output
    "axk2": dict(_GROUPED, **_MLA, mlp_layer_types=["sparse", "sparse"],
                 index_topk=4, index_head_dim=8, index_n_heads=2, gated_norm_rank=4),  # DSA indexer
    "bailing_hybrid": dict(_MOE, num_local_experts=6, n_shared_experts=1, n_group=2, topk_group=1,
                           num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
                           v_head_dim=8, head_dim=8, first_k_dense_replace=0, layer_group_size=2,
                           num_mtp_layers=0),  # a KDA (linear attention) layer, then MLA
    "beam": dict(_MOE, num_experts=6, n_group=2, topk_group=1, num_key_value_heads=2, head_dim=8, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"],
                 mlp_layer_types=["sparse", "sparse"]),  # its own gate (SwiGLU in fp32)
    "hy_v4": dict(_MOE, **_MLA, n_routed_experts=6, n_shared_experts=1, mlp_layer_types=["sparse", "sparse"],
                  index_topk=4, index_head_dim=8, index_n_heads=2, hc_mult=2,
                  swiglu_limit=1.5),  # its own gate (clamped SwiGLU; a low limit so the clamp bites)
    "dots3_note": dict(_GROUPED, **_MLA, shared_experts_intermediate_size=24, first_k_dense_replace=0,
                       index_topk=4, index_head_dim=8, index_n_heads=2, sliding_window=4,
                       layer_types=["indexed_attention", "sliding_attention"], swa_num_attention_heads=4,
                       swa_num_key_value_heads=4, swa_q_lora_rank=24, swa_kv_lora_rank=16, swa_head_dim=12,
                       swa_qk_nope_head_dim=8, swa_v_head_dim=8),  # per-layer overrides (SWA layer's MLA)
    "inkling": dict(_MOE, n_routed_experts=6, n_shared_experts=1, num_key_value_heads=2, head_dim=8,
                    swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4,
                    d_rel=4, rel_extent=8, layer_types=["hybrid_sliding", "hybrid"],
                    mlp_layer_types=["sparse", "sparse"]),  # shared experts scored by the router (a softmax sink)
    # intermediate_size is an alias of moe_intermediate_size here: no _MOE
    "inkling2": dict(moe_intermediate_size=24, num_experts_per_tok=2, n_routed_experts=6, num_key_value_heads=2,
                     head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                     sliding_window_size=4, d_rel=4, rel_extent=8, unpadded_vocab_size=64, mlp_gate_softcap=1.0,
                     mlp_up_softcap=2.0, layer_types=["hybrid_sliding", "hybrid"]),  # its own gate: softcapped SwiGLU
    "minimax_m3_vl": dict(intermediate_size=24, num_experts_per_tok=2, num_local_experts=6, dense_intermediate_size=48,
                          shared_intermediate_size=40, num_key_value_heads=2, head_dim=8, swiglu_limit=1.5,
                          layer_types=["minimax_m3_sparse", "full_attention"], index_n_heads=2, index_head_dim=8,
                          index_block_size=2, index_topk_blocks=2,
                          index_local_blocks=1),  # its own gate: clamped SwiGLU-OAI, (up + 1) * glu, not interleaved
    "qwen4_exp": dict(_MOE, num_experts=6, shared_expert_intermediate_size=40, num_key_value_heads=2, head_dim=8,
                      layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                      linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                      hc_count=2, hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                      indexer_budget=4, indexer_compress_ratio=2),  # hyper-connections; an indexed attention layer
    # Families new in transformers 5.25 (the pinned 5.23 lacks them, and skips them saying so):
    # Inkling-2 with looped layers (layer 1 runs twice, mixed by message gates): its own gate, softcapped SwiGLU.
    "inkling2_loop": dict(moe_intermediate_size=24, num_experts_per_tok=2, n_routed_experts=6, num_key_value_heads=2,
                          head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                          sliding_window_size=4, d_rel=4, rel_extent=8, unpadded_vocab_size=64, mlp_gate_softcap=1.0,
                          mlp_up_softcap=2.0, layer_types=["hybrid_sliding", "hybrid"],
                          n_layers_per_attn_res_block=1, loop_layer_index_start=1, loop_layer_index_end=2,
                          loop_num_passes=2, loop_gate_rank=4),
    # A sliding layer, then an indexed (sparse, NVFP4-rounded K/V) attention layer; sigmoid of the top-k logits.
    "kolibri1_1": dict(_MOE, num_experts=6, shared_expert_intermediate_size=40, num_key_value_heads=2, head_dim=16,
                       mlp_only_layers=[], sliding_window=4, layer_types=["sliding_attention", "indexed_attention"],
                       index_topk=4, index_pool_size=8, index_compression=2, index_num_heads=2,
                       index_num_local_tokens=2, index_num_sink_tokens=1),
    # Qwen3-Next-like (a gated-delta-net layer, then sliding attention); the shared expert added ungated.
    "lara_mini": dict(_MOE, num_experts=6, shared_expert_intermediate_size=40, num_key_value_heads=2, head_dim=8,
                      layer_types=["linear_attention", "sliding_attention"], sliding_window=4,
                      linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                      linear_value_head_dim=8, linear_conv_kernel_dim=4),
    # Zero (identity) experts among the routed ones (sent to a real expert with weight 0); MLA; one decoder layer
    # (num_hidden_layers counts its two attention sublayers), so one MoE block.
    "longcat_flash": dict(_MOE, n_routed_experts=6, zero_expert_num=2, num_key_value_heads=4, head_dim=4,
                          kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8),
    "minicpm5_moe": dict(_GROUPED, num_key_value_heads=2, head_dim=8, mlp_layer_types=["sparse", "sparse"]),
    # ReLU² experts without a gate, [E, in, out], each expert's output through its own RMSNorm before the gate:
    # ErgoExperts' own forward around the interface's, so only experts_implementation="scattermoe" reaches them.
    "ergo": dict(_MOE, num_experts=6, num_key_value_heads=2, shared_intermediate_size=40,
                 mlp_layer_types=["sparse", "sparse"], sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"]),
    # A token classifier (GPT-OSS-style experts); as many labels as ids, so the test's labels (its ids) fit.
    "openai_privacy_filter": dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                                  num_key_value_heads=2, head_dim=8, sliding_window=4, swiglu_limit=1.5, num_labels=64),
    UNLISTED_FAMILY: dict(_MOE, n_routed_experts=6, n_shared_experts=1, num_key_value_heads=2, head_dim=8,
                          first_k_dense_replace=0),
}


# Families built only as image-text models (text-only input here: the special token ids lie past the vocabulary, so
# the ids fed, 3..63, never hit them). Text models on _TEXT as above; vision and audio towers the smallest that build.
_NO_IMAGE = dict(image_token_id=100, video_token_id=101)
_GLM_MARKERS = dict(image_start_token_id=102, image_end_token_id=103, video_start_token_id=104, video_end_token_id=105)
_QWEN_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=32)
_QWEN3_VL_TEXT = dict(_TEXT, **_MOE, num_experts=6, num_key_value_heads=2, head_dim=8,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]))
_PIXTRAL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                patch_size=4, image_size=16)
_SAM = dict(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
            window_size=2, global_attn_indexes=[0], mlp_dim=32, downsample_channels=[8, 16])  # DeepSeek-OCR's
_IMAGE_TEXT_CONFIGS = {
    "qwen3_vl_moe": dict(text_config=_QWEN3_VL_TEXT,
                         vision_config=dict(_QWEN_VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                         **_NO_IMAGE, vision_start_token_id=102, vision_end_token_id=103),
    "glm4v_moe": dict(text_config=dict(_TEXT, **_GROUPED, num_key_value_heads=2, first_k_dense_replace=0,
                                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            partial_rotary_factor=0.5, mrope_section=[1, 1, 0])),
                      vision_config=dict(_QWEN_VISION, image_size=16), **_NO_IMAGE, **_GLM_MARKERS),
    # Its own clamped SwiGLU (a low limit so the clamp bites); a KDA linear-attention layer, then DSA ("full_attention",
    # which each version renames to its own name for DSA).
    "glm5_next": dict(text_config=dict(_TEXT, **_MOE, n_routed_experts=6, n_shared_experts=1, num_key_value_heads=4,
                                       kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=0, qk_nope_head_dim=8,
                                       v_head_dim=8, index_topk=4, index_kpool=2, index_head_dim=8, index_n_heads=2,
                                       linear_head_dim=8, linear_num_heads=4, hc_mult=2, hc_sinkhorn_iters=3,
                                       swiglu_limit=1.5, mlp_layer_types=["sparse", "sparse"],
                                       layer_types=["linear_attention", "full_attention"]),
                      vision_config=dict(_QWEN_VISION, image_size=16, projection_intermediate_size=32), **_NO_IMAGE,
                      **_GLM_MARKERS),
    # Text and vision experts in every layer (the vision ones idle on text: no gradient).
    "ernie4_5_vl_moe": dict(text_config=dict(dict(_TEXT, **_MOE), moe_num_experts=6, moe_intermediate_size=[24, 16],
                                             moe_num_shared_experts=1, num_key_value_heads=2,
                                             mlp_layer_types=["sparse", "sparse"],
                                             rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                  mrope_section=[1, 1, 2])),
                            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                                               spatial_merge_size=2, temporal_merge_size=2),
                            **_NO_IMAGE, **_GLM_MARKERS),
    # Text only (Mistral4ForCausalLM), though registered with the image-text auto class alone.
    "mistral4": dict(_TEXT, **_GROUPED, **_MLA_OWN_HEAD_DIM, rope_parameters=dict(_YARN, llama_4_scaling_beta=0.1)),
    "mistral_large4": dict(text_config=dict(_TEXT, **_GROUPED, **_MLA_OWN_HEAD_DIM, first_k_dense_replace=0,
                                            index_topk=4, index_head_dim=8, index_n_heads=2, rope_parameters=_YARN),
                           vision_config=_PIXTRAL, image_token_index=100),
    "deepseek_ocr2": dict(text_config=dict(_TEXT, **_GROUPED, topk_method="group_limited_greedy",
                                           num_key_value_heads=2, mlp_layer_types=["sparse", "sparse"]),
                          vision_config=dict(sam_config=_SAM, encoder_config=dict(
                              vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=2)), image_token_id=100),
    # Its eager attention has no repeat_kv (grouped-query attention fails unpatched): as many KV heads as query heads.
    "unlimited_ocr": dict(text_config=dict(_TEXT, **_GROUPED, topk_method="group_limited_greedy", num_key_value_heads=4,
                                           mlp_layer_types=["sparse", "sparse"], sliding_window=4),
                          vision_config=dict(sam_config=_SAM, encoder_config=dict(
                              hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4)), image_token_id=100),
    # The thinker, Qwen3-Omni's text half (the whole model has generate alone, no forward; its talker is not tested).
    "qwen3_omni_moe": dict(text_config=dict(_QWEN3_VL_TEXT, norm_topk_prob=True),
                           vision_config=dict(_QWEN_VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                           audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2,
                                             encoder_ffn_dim=32, d_model=16, output_dim=32, max_source_positions=64,
                                             n_window=4, n_window_infer=8, conv_chunksize=8, downsample_hidden_size=8),
                           **_NO_IMAGE, audio_token_id=102, audio_start_token_id=103,
                           vision_start_token_id=104),  # generate reads it; the thinker's config class lacks it
    # New in transformers 5.25. HY-V4 as an image-text model: its own gate (clamped SwiGLU), group-limited top-k.
    "hy_v4_vl": dict(text_config=dict(_TEXT, **_MOE, **_MLA, n_routed_experts=6, n_shared_experts=1, n_group=2,
                                      topk_group=1, mlp_layer_types=["sparse", "sparse"], index_topk=4,
                                      index_head_dim=8, index_n_heads=2, hc_mult=2, swiglu_limit=1.5,
                                      rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                           mrope_section=[1, 1, 0])),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, patch_size=4, spatial_merge_size=2, out_hidden_size=32,
                                        max_image_size=16), **_NO_IMAGE),
    # Text model_type step3p5: its own gate (SiLU(gate) clamped, up clamped; low per-layer limits so they bite).
    "step3p7": dict(text_config=dict(_TEXT, **_MOE, n_routed_experts=6, num_key_value_heads=2, head_dim=8,
                                     share_expert_dim=40, mlp_layer_types=["sparse", "sparse"],
                                     swiglu_limits=[1.5, 1.5], swiglu_limits_shared=[1.5, 0.0], sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"]),
                    vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                                       patch_size=4, mlp_ratio=2.0, max_position_embeddings=16),
                    image_token_id=100),
}


def _missing(family):
    """Why the installed transformers cannot run this test family (None when it can): the family was added after
    it, or its experts are not yet on the fused-experts interface there (transformers 5.17, the GPU image's: Aria).
    The pinned version has every family but those new in 5.25."""
    try:
        transformers_moe._family_classes(family)
    except ValueError as exc:
        return f"transformers {transformers.__version__}: {str(exc).split(';')[0]}"
    return None


def _auto_class(config):
    """The causal-LM auto class, or for a family built only as an image-text model or a token classifier, that one."""
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText,
                 transformers.AutoModelForTokenClassification):
        if type(config) in auto._model_mapping:
            return auto
    raise KeyError(type(config).__name__)


def _build(family, seed=0, **config_changes):
    reason = _missing(family)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(seed)
    config = _tiny(family)
    for name, value in config_changes.items():
        setattr(config, name, value)
    # The reference runs each family's own per-expert loop (transformers' default is its grouped_mm implementation).
    model = _auto_class(config).from_config(config, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.25)
            if "norm" in name:
                p.add_(1.0)
    return model.float().eval()


def _rel(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert not torch.isnan(out).any(), "NaN"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _ids(batch=2, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (batch, length), generator=g)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def _count_scattermoe_ops(monkeypatch) -> list:
    """A list that grows by one on each call of a scattermoe op by the patched blocks (a block that fell back to
    transformers' own loop calls none)."""
    calls = []
    for op in ("parallel_linear", "glu_moe"):
        fn = getattr(transformers_moe, op)
        monkeypatch.setattr(transformers_moe, op, lambda *a, _fn=fn, _op=op, **k: calls.append(_op) or _fn(*a, **k))
    return calls


def _scattermoe_classes(model):
    return {type(m).__name__ for m in model.modules() if getattr(type(m), "_scattermoe_original", None)}


def _assert_same_loss_and_grads(model, ref, ids):
    """The patched model (run on the torch backend) against the unpatched one: logits, loss (with the router's aux
    loss), aux loss and every gradient. Returns the unpatched model's output."""
    with scattermoe.use_backend("torch"):
        out, grads = _loss_and_grads(model, ids)
    ref_out, ref_grads = _loss_and_grads(ref, ids)
    err = _rel(out.logits, ref_out.logits)
    print(f"logits rel err {err:.2e}, loss {out.loss.item():.6f} vs {ref_out.loss.item():.6f}")
    assert err < TOL
    assert _rel(out.loss, ref_out.loss) < TOL  # includes the router aux loss (output_router_logits)
    if getattr(ref_out, "aux_loss", None) is not None:
        assert _rel(out.aux_loss, ref_out.aux_loss) < TOL
    for name, ref_grad in ref_grads.items():
        grad = grads[name]
        if ref_grad is None:
            assert grad is None or grad.abs().max() == 0, name
            continue
        assert grad is not None, f"{name}: no gradient"
        if ref_grad.abs().max() < 1e-6:  # an expert no token chose; DeepSeek-V4's hash-routed router (fp32 noise)
            assert grad.abs().max() < 1e-6, name
        else:
            assert _rel(grad, ref_grad) < TOL, f"{name}: grad rel err {_rel(grad, ref_grad):.2e}"
    return ref_out


@contextlib.contextmanager
def _skipped_where_transformers_fails_unpatched(ref, ids):
    """An exception inside skips the test when transformers' own, unpatched model raises the same on the same
    calls (a training forward with labels, then generate): nothing to compare then. Seen with transformers
    5.17.0, the GPU image's (2026-12-01): Mixtral-style load_balancing_loss_func breaks in generate's decode
    steps (one token's router logits against the whole attention mask), and GraniteMoe records no router
    logits (its aux loss comes back as the int 0). The pinned 5.23.0 has neither."""
    try:
        yield
    except Exception as exc:
        try:
            ref(input_ids=ids, labels=ids)
            with torch.no_grad():
                ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        except Exception as ref_exc:  # noqa: BLE001 - compared with exc's type just below
            if type(ref_exc) is type(exc):
                pytest.skip(f"transformers {transformers.__version__}'s own unpatched model fails the same way: "
                            f"{type(ref_exc).__name__}: {ref_exc}")
        raise


FAMILIES = list(integrations.SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_unpatched(family, tmp_path, monkeypatch):
    ref = _build(family)
    model = integrations.apply_scattermoe(copy.deepcopy(ref))
    assert _scattermoe_classes(model), "no block was patched"
    assert _scattermoe_classes(ref) == set()
    # Parameters are the same tensors under the same names (nothing copied by the patch).
    assert list(model.state_dict()) == list(ref.state_dict())
    ids = _ids()
    calls = _count_scattermoe_ops(monkeypatch)
    with _skipped_where_transformers_fails_unpatched(ref, ids):
        ref_out = _assert_same_loss_and_grads(model, ref, ids)
        assert calls, "the patched blocks ran no scattermoe op"
        if ref.can_generate():  # all but the token classifier
            with torch.no_grad(), scattermoe.use_backend("torch"):
                gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                assert torch.equal(gen, ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))

    # A checkpoint saved after patching loads into a plain (unpatched) model.
    model.save_pretrained(tmp_path)
    reloaded = _auto_class(ref.config).from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert type(reloaded) is type(ref) and _scattermoe_classes(reloaded) == set()
    with torch.no_grad():
        assert _rel(reloaded(input_ids=ids).logits, ref_out.logits) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_family_patch_before_loading(family, tmp_path):
    """apply_scattermoe_to_<family>() patches the modeling module: models built afterwards use scattermoe."""
    ref = _build(family)
    ref.save_pretrained(tmp_path)
    patch = getattr(integrations, f"apply_scattermoe_to_{family}")
    try:
        patch()
        model = _auto_class(ref.config).from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    finally:
        integrations.revert_scattermoe_patches()
    assert _scattermoe_classes(model), "the model was not built with scattermoe blocks"
    assert _scattermoe_classes(_build(family)) == set(), "revert_scattermoe_patches left the module patched"
    ids = _ids(batch=1, length=7)
    with torch.no_grad(), scattermoe.use_backend("torch"):
        logits = model(input_ids=ids).logits
    with torch.no_grad():
        assert _rel(logits, ref(input_ids=ids).logits) < TOL


def test_a_family_outside_the_list_is_patched_through_the_fused_experts_interface(tmp_path):
    """Any experts class on transformers' fused-experts interface is patched, by apply_scattermoe and by an
    apply_scattermoe_to_<family>() built on first use; ScatterMoE<Class> pickles (test_patched_model_pickles...)."""
    assert UNLISTED_FAMILY not in integrations.SUPPORTED_FAMILIES
    for family in integrations.SUPPORTED_FAMILIES:  # the tested families' patchers are named (and exported)
        name = f"apply_scattermoe_to_{family}"
        assert name in vars(transformers_moe) and name in integrations.__all__, name
    assert f"apply_scattermoe_to_{UNLISTED_FAMILY}" not in vars(transformers_moe)
    ref = _build(UNLISTED_FAMILY)
    model = integrations.apply_scattermoe(copy.deepcopy(ref))
    assert _scattermoe_classes(model) == {"ScatterMoESolarOpenExperts"}
    ids = _ids()
    _assert_same_loss_and_grads(model, ref, ids)
    ref.save_pretrained(tmp_path)
    from scattermoe.integrations import apply_scattermoe_to_solar_open  # no such name until asked for

    try:
        apply_scattermoe_to_solar_open()
        built = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    finally:
        integrations.revert_scattermoe_patches()
    assert _scattermoe_classes(built) == {"ScatterMoESolarOpenExperts"}
    assert _scattermoe_classes(_build(UNLISTED_FAMILY)) == set(), "revert_scattermoe_patches left the module patched"
    with torch.no_grad(), scattermoe.use_backend("torch"):
        assert _rel(built(input_ids=ids).logits, ref(input_ids=ids).logits) < TOL


def _expert_layout(model) -> set:
    """What decides the scattermoe calls a patched model makes: per fused-experts module, whether it takes the fused
    SiLU GLU op (gate and up concatenated, the default gate, SiLU) or else two parallel_linear calls around its own
    gate or activation, whether it has biases, and whether its weights are [E, in, out]; per JetMoE MoE block, whether
    its activation is SiLU (the fused GLU) or not."""
    layouts = set()
    for m in model.modules():
        if any(transformers_moe._is_interface_class(c) for c in type(m).__mro__):
            default_gate = getattr(type(m)._apply_gate, "__name__", "") == "_default_apply_gate"
            fused = (getattr(m, "has_gate", True) and getattr(m, "is_concatenated", True) and default_gate
                     and transformers_moe._is_silu(getattr(m, "act_fn", None)))
            transposed = getattr(m, "is_transposed", False)  # [E, in, out]: F-major weights, other kernels
            layouts.add(("experts", "glu_moe", transposed) if fused else
                        ("experts", getattr(m, "has_bias", False), transposed))
        elif type(m).__name__ == "JetMoeMoE":
            layouts.add(("jetmoe", transformers_moe._is_silu(m.activation)))
    return layouts


# The Triton kernels run per expert layout, not per family: most families reach the very same glu_moe call (only
# their routers, which stay the model's own, differ), and every family runs on the torch backend above. mixtral:
# the fused SwiGLU; qwen2_moe: the same at k=3 of 5 experts; gpt_oss: biases, [E, in, out] weights and its own
# clamped, interleaved gate (the unfused path); deepseek_v4: the unfused path without biases, [E, out, in] weights;
# aria: the fused SwiGLU on [E, in, out] weights; jetmoe: MoE and MoA. The test below keeps this list covering every
# layout a supported family has.
TRITON_FAMILIES = ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v4", "aria", "jetmoe"]


def test_the_triton_families_cover_every_expert_layout():
    covered = set().union(*(_expert_layout(_build(family)) for family in TRITON_FAMILIES))
    for family in [f for f in FAMILIES if not _missing(f)]:
        layouts = _expert_layout(_build(family))
        assert layouts, f"{family}: no expert module found"
        assert layouts <= covered, f"{family} has an expert layout no Triton family runs: {layouts - covered}"


@pytest.mark.interpreter
@pytest.mark.parametrize("family", TRITON_FAMILIES)
def test_patched_on_triton_backend(family):
    """The Triton kernels (interpreter, fp32): logits, loss and the expert weights' gradients."""
    ref = _build(family, seed=3)
    model = integrations.apply_scattermoe(copy.deepcopy(ref))
    ids = _ids(batch=1, length=6, seed=2)
    with scattermoe.use_backend("triton"):
        out, grads = _loss_and_grads(model, ids)
    ref_out, ref_grads = _loss_and_grads(ref, ids)
    assert _rel(out.logits, ref_out.logits) < TOL
    assert _rel(out.loss, ref_out.loss) < TOL
    for name, ref_grad in ref_grads.items():
        if ref_grad is not None and ref_grad.abs().max() > 1e-6:  # (as in _assert_same_loss_and_grads)
            assert _rel(grads[name], ref_grad) < TOL, name


def test_unknown_architecture_lists_supported():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="fused-experts interface.*tested architectures.*jetmoe.*mixtral") as info:
        integrations.apply_scattermoe(model)
    assert "llama" in str(info.value)
    no_experts = r"family 'llama': transformers.models.llama.modeling_llama of transformers \S+ has no experts class"
    with pytest.raises(ValueError, match=no_experts):
        integrations.apply_scattermoe(model, families=["llama"])
    with pytest.raises(AttributeError, match="apply_scattermoe_to_llama.*" + no_experts):
        getattr(integrations, "apply_scattermoe_to_llama")  # built on first use for families with fused experts


def test_apply_checks_its_arguments_and_a_family_patcher_leaves_transformers_alone_on_a_wrong_model():
    with pytest.raises(TypeError, match="^model: "):
        integrations.apply_scattermoe(None)
    model = integrations.apply_scattermoe(_build("mixtral"), families="mixtral")  # one name, not its letters
    assert _scattermoe_classes(model) == {"ScatterMoEMixtralExperts"}
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    llama = transformers.AutoModelForCausalLM.from_config(config)
    import transformers.models.mixtral.modeling_mixtral as mixtral_module

    before = dict(vars(mixtral_module))
    with pytest.raises(ValueError, match=r"no supported MoE block found in LlamaForCausalLM"):  # (no hint: none)
        integrations.apply_scattermoe_to_mixtral(llama)
    assert dict(vars(mixtral_module)) == before, "transformers' mixtral module was patched before the error"


def test_apply_looks_only_at_the_model_and_names_a_family_transformers_lacks(monkeypatch):
    import sys

    ref = _build("mixtral")
    unrelated = "transformers.models.minimax_m2.modeling_minimax_m2"
    monkeypatch.delitem(sys.modules, unrelated, raising=False)
    integrations.apply_scattermoe(ref)
    assert unrelated not in sys.modules, "apply_scattermoe imported the modeling module of a family not in the model"
    with pytest.raises(ValueError, match=r"family 'future_moe' needs transformers.models.future_moe.modeling_future_moe"
                                         r", which transformers \S+ lacks"):
        integrations.apply_scattermoe(ref, families=["future_moe"])
    with pytest.raises(ValueError, match="unknown family '../mixtral'"):  # not a module path either
        integrations.apply_scattermoe(ref, families=["../mixtral"])
    # Named, a family restricts the patch to its own blocks.
    with pytest.raises(ValueError, match=r"no MoE block of the model types \[.qwen3_moe.\] found in Mixtral"):
        integrations.apply_scattermoe(_build("mixtral"), families=["qwen3_moe"])


def test_quantized_experts_on_an_interface_of_their_own_are_left_alone():
    """transformers' FP8 quantizer swaps each experts module for FP8Experts, put by the same decorator on an interface
    of its own (float8 weights with block scales, which scattermoe's ops would run without their scales)."""
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    model = _build("mixtral")
    config = transformers.FineGrainedFP8Config(weight_block_size=(16, 16))
    fp8.replace_with_fp8_linear(model, quantization_config=config)
    classes = {type(layer.mlp.experts).__name__ for layer in model.model.layers}
    assert classes == {"FP8Experts"}
    with pytest.raises(ValueError, match="no supported MoE block found in MixtralForCausalLM"):
        integrations.apply_scattermoe(model)
    assert {type(layer.mlp.experts).__name__ for layer in model.model.layers} == classes


def test_an_imported_jetmoe_module_of_another_layout_leaves_other_models_alone(monkeypatch):
    """A transformers whose JetMoE module lacks the blocks scattermoe patches (moved onto the experts interface, say)
    must not break apply_scattermoe on the other models of a process that imported it."""
    import transformers.models.jetmoe.modeling_jetmoe as jetmoe_module

    monkeypatch.delattr(jetmoe_module, "JetMoeMoA")
    assert _scattermoe_classes(integrations.apply_scattermoe(_build("mixtral"))) == {"ScatterMoEMixtralExperts"}
    with pytest.raises(ValueError, match="family 'jetmoe' needs JetMoeMoE, JetMoeMoA"):
        integrations.apply_scattermoe(_build("mixtral"), families=["jetmoe"])


def test_without_transformers_a_patcher_is_simply_absent(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed (it is an extra)
    assert not hasattr(integrations, "apply_scattermoe_to_some_future_moe")


def test_apply_twice_is_harmless():
    model = integrations.apply_scattermoe(_build("mixtral"))
    classes = _scattermoe_classes(model)
    integrations.apply_scattermoe(model)
    assert _scattermoe_classes(model) == classes == {"ScatterMoEMixtralExperts"}


@pytest.mark.interpreter  # Triton on CPU tensors: with CUDA present the interpreter is off, and this skips
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "ergo"])
def test_experts_implementation_scattermoe(family, tmp_path, monkeypatch):
    """register_experts_implementation(): transformers' own switch, experts_implementation="scattermoe"."""
    integrations.register_experts_implementation()
    ref = _build(family)
    ref.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="scattermoe").float().eval()
    assert model.config._experts_implementation == "scattermoe"
    ids = _ids()
    calls = _count_scattermoe_ops(monkeypatch)
    with scattermoe.use_backend("triton"):
        out, grads = _loss_and_grads(model, ids)
    assert calls, "the scattermoe experts did not run"
    ref_out, ref_grads = _loss_and_grads(ref, ids)
    assert _rel(out.logits, ref_out.logits) < TOL
    for name, ref_grad in ref_grads.items():
        if ref_grad is not None and ref_grad.abs().max() > 1e-6:  # (as in _assert_same_loss_and_grads)
            assert _rel(grads[name], ref_grad) < TOL, name


def test_ergo_refuses_the_patch_and_runs_on_scattermoe_through_experts_implementation(tmp_path, monkeypatch):
    """transformers 5.25's ergo builds ErgoExperts, whose own forward wraps the interface's (one route per row, then
    each expert's output through its own RMSNorm, then the gated sum): patching would discard it, so both patches
    refuse; experts_implementation="scattermoe" runs the experts on scattermoe inside it."""
    ref = _build("ergo")  # skips where transformers lacks it
    with pytest.raises(ValueError, match=r"family 'ergo': ErgoExperts has its own forward.*experts_implementation="):
        integrations.apply_scattermoe_to_ergo()
    with pytest.raises(ValueError, match="subclasses with their own forward"):
        integrations.apply_scattermoe(copy.deepcopy(ref))
    integrations.register_experts_implementation()
    ref.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="scattermoe").float().eval()
    calls = _count_scattermoe_ops(monkeypatch)
    _assert_same_loss_and_grads(model, ref, _ids())
    assert calls, "the scattermoe experts did not run"

def test_patched_model_pickles_whole_and_loads_in_a_fresh_process(tmp_path):
    """torch.save(model) (pickle: also what spawning worker processes does) of a patched model, loaded back here
    and in a process that never patched anything: the same class, the same logits. Also for a family outside
    SUPPORTED_FAMILIES, whose ScatterMoE<Class> is found from the class name alone."""
    import subprocess
    import sys

    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    code = "import torch; import scattermoe; scattermoe.set_backend('torch'); "
    for family, cls in (("mixtral", "ScatterMoEMixtralExperts"), (UNLISTED_FAMILY, "ScatterMoESolarOpenExperts")):
        model = integrations.apply_scattermoe(_build(family))
        path = tmp_path / f"{family}.pt"
        torch.save(model, path)  # (before any forward: transformers then adds hooks of its own that do not pickle)
        with torch.no_grad(), scattermoe.use_backend("torch"):
            want = model(input_ids=ids).logits
        again = torch.load(path, weights_only=False)
        assert _scattermoe_classes(again) == {cls}
        with torch.no_grad(), scattermoe.use_backend("torch"):
            assert torch.equal(again(input_ids=ids).logits, want)
        torch.save(want, tmp_path / f"{family}_want.pt")
        code += (f"m = torch.load({str(path)!r}, weights_only=False); ids = torch.load({str(tmp_path / 'ids.pt')!r}); "
                 f"want = torch.load({str(tmp_path / f'{family}_want.pt')!r}); "
                 f"assert type(m.model.layers[0].mlp.experts).__name__ == {cls!r}; "
                 f"assert torch.equal(m(input_ids=ids).logits.detach(), want), {family + ' logits differ'!r}; ")
    run = subprocess.run([sys.executable, "-c", code + "print('ok')"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


class _LowRankDelta(torch.nn.Module):
    """A LoRA-like parametrization of a 3-D expert weight: W + A @ B per expert (trainable A, B)."""

    def __init__(self, weight, rank=2):
        super().__init__()
        e, out_features, in_features = weight.shape
        self.a = torch.nn.Parameter(torch.randn(e, out_features, rank) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(e, rank, in_features) * 0.1)

    def forward(self, w):
        return w + self.a @ self.b


def test_experts_with_parametrized_weights_are_patched_and_train_their_parametrization():
    """torch.nn.utils.parametrize (PEFT's LoRA on 3-D expert parameters, weight norm) swaps an experts module's
    class for a subclass: it is still patched, and the parametrization's own parameters get the same gradients."""
    import torch.nn.utils.parametrize as parametrize

    def build():
        model = _build("mixtral")
        torch.manual_seed(7)
        for layer in model.model.layers:
            experts = layer.mlp.experts
            parametrize.register_parametrization(experts, "down_proj", _LowRankDelta(experts.down_proj))
            if layer is model.model.layers[0]:  # one layer with both weights parametrized
                parametrize.register_parametrization(experts, "gate_up_proj", _LowRankDelta(experts.gate_up_proj))
        return model

    ref, model = build(), integrations.apply_scattermoe(build())
    assert _scattermoe_classes(model) == {"ParametrizedScatterMoEMixtralExperts"}
    ids = _ids()
    with scattermoe.use_backend("torch"):
        out_ref, grads_ref = _loss_and_grads(ref, ids)
        out, grads = _loss_and_grads(model, ids)
    assert _rel(out.logits, out_ref.logits) < TOL
    lora = [n for n in grads if n.endswith((".a", ".b"))]
    assert len(lora) == 2 * 3 and all(grads_ref[n].abs().sum() > 0 for n in lora)
    for name in lora:
        assert _rel(grads[name], grads_ref[name]) < TOL, name
    # Merging them (a LoRA merge: remove_parametrizations, leaving the merged weight) leaves the block patched.
    for m in (ref, model):
        for layer in m.model.layers:
            for name in list(layer.mlp.experts.parametrizations):
                parametrize.remove_parametrizations(layer.mlp.experts, name, leave_parametrized=True)
    assert _scattermoe_classes(model) == {"ScatterMoEMixtralExperts"}
    with torch.no_grad(), scattermoe.use_backend("torch"):
        assert _rel(model(input_ids=ids).logits, ref(input_ids=ids).logits) < TOL


def test_register_experts_implementation_refuses_a_name_that_is_not_a_str():
    for bad in (3, None, ""):  # transformers would hold a key no experts_implementation= can select
        with pytest.raises(TypeError, match="^name: expected a non-empty str"):
            integrations.register_experts_implementation(bad)


def test_experts_behind_accelerate_style_hooks_are_patched(monkeypatch):
    """accelerate's hooks (device_map offloading) set an instance ``forward`` calling ``module._old_forward``, which
    shadowed the patched class: the patch ran nowhere, silently. It is rebound now; another instance forward is
    left to run and said so."""
    model, ref = _build("mixtral"), _build("mixtral")
    hooked = []
    for layer in model.model.layers:  # accelerate's add_hook_to_module, reduced to what matters here
        experts = layer.mlp.experts
        experts._old_forward = experts.forward
        experts.forward = lambda *a, _m=experts, **k: hooked.append(1) or _m._old_forward(*a, **k)
    calls = []
    for op in ("parallel_linear", "glu_moe"):
        fn = getattr(transformers_moe, op)
        monkeypatch.setattr(transformers_moe, op, lambda *a, _fn=fn, **k: calls.append(1) or _fn(*a, **k))
    integrations.apply_scattermoe(model)
    ids = _ids()
    with torch.no_grad(), scattermoe.use_backend("torch"):
        out = model(input_ids=ids).logits
    layers = len(model.model.layers)
    assert len(hooked) == len(calls) == layers, (hooked, calls)
    with torch.no_grad():
        assert _rel(out, ref(input_ids=ids).logits) < TOL
    other = _build("mixtral")
    plain = other.model.layers[0].mlp.experts
    plain.forward = plain.forward  # an instance forward of no known hook: left alone, with a warning
    with pytest.warns(UserWarning, match=r"1 MoE blocks keep their own code.*layers.0.mlp.experts \(its instance"):
        integrations.apply_scattermoe(other)
    assert type(plain).__name__ == "MixtralExperts"


def test_experts_subclasses_with_their_own_forward_are_left_alone_and_said_so():
    import transformers.models.mixtral.modeling_mixtral as mixtral_module

    class Plain(mixtral_module.MixtralExperts):  # changes nothing that is replaced: patched
        pass

    class Custom(mixtral_module.MixtralExperts):  # its own forward: patching would discard it
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    model = _build("mixtral")
    model.model.layers[0].mlp.experts.__class__ = Plain
    model.model.layers[1].mlp.experts.__class__ = Custom
    with pytest.warns(UserWarning, match=r"1 MoE blocks keep their own code.*model.layers.1.mlp.experts \(Custom "
                                         r"overrides MixtralExperts.forward\)"):
        integrations.apply_scattermoe(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "ScatterMoEPlain"
    assert type(model.model.layers[1].mlp.experts) is Custom
    everywhere = _build("mixtral")
    for layer in everywhere.model.layers:
        layer.mlp.experts.__class__ = Custom
    with pytest.raises(ValueError, match="subclasses with their own forward, which patching would discard.*"
                                         r"; where such a forward calls the fused-experts interface's, "
                                         r"register_experts_implementation\(\) and experts_implementation="):
        integrations.apply_scattermoe(everywhere)



def _randomized(experts: torch.nn.Module) -> torch.nn.Module:
    """experts with N(0, 0.3) parameters (torch.empty at init)."""
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
    return experts


def _experts_call(T: int, D: int, E: int):
    """The arguments of a fused-experts call: hidden_states [T, D], top_k_index [T, 2] (two experts per token),
    top_k_weights [T, 2]."""
    h, w = torch.randn(T, D), torch.rand(T, 2)
    return h, torch.stack([torch.randperm(E)[:2] for _ in range(T)]), w


class _DoubledMixtralExperts(transformers.models.mixtral.modeling_mixtral.MixtralExperts):
    """Experts whose own forward calls the interface's (as transformers' ErgoExperts does: one route per row, then a
    per-expert norm), here just doubling it."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return 2 * super().forward(hidden_states, top_k_index, top_k_weights)


def test_a_subclass_with_its_own_forward_runs_scattermoe_inside_it_and_its_interface_loop_under_expert_parallelism(
        monkeypatch):
    """experts_implementation="scattermoe" reaches experts whose subclass calls the interface's forward from its own:
    scattermoe runs inside it; under expert parallelism the interface class's own loop runs (the fallback took the
    subclass's forward for that loop before, and recursed without end)."""
    integrations.register_experts_implementation()
    config = _tiny("mixtral")
    torch.manual_seed(0)
    experts = _randomized(_DoubledMixtralExperts(config).float())
    h, idx, w = _experts_call(7, config.hidden_size, config.num_local_experts)
    calls = _count_scattermoe_ops(monkeypatch)
    for expert_parallel in (False, True):
        experts._is_expert_parallel = expert_parallel
        config._experts_implementation = "eager"
        want = experts(h, idx, w)
        config._experts_implementation = "scattermoe"
        with scattermoe.use_backend("torch"):
            got = experts(h, idx, w)
        assert _rel(got, want) < TOL, expert_parallel
        assert calls == ["glu_moe"], calls  # one op call, none under expert parallelism (the eager loop)


def _fake_family(monkeypatch, **classes) -> types.ModuleType:
    """A modeling module of a family 'fake_moe' holding ``classes``, where _family_classes looks for it."""
    name = transformers_moe._modeling_module_name("fake_moe")
    module = types.ModuleType(name)
    for class_name, cls in classes.items():
        setattr(module, class_name, cls)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_a_family_patch_covers_the_subclasses_its_module_defines_and_refuses_those_with_their_own_forward(
        monkeypatch):
    """The module's own subclasses of an experts class were built on the original class, so rebinding that class
    alone left them unpatched, silently (transformers 5.25's ergo builds only ErgoExperts, a subclass of the class
    on the interface with its own forward: apply_scattermoe_to_ergo() patched nothing). A subclass that leaves
    forward alone is patched too; one with its own forward makes the patcher refuse, naming it and the way that
    works (experts_implementation="scattermoe"), and leave the module as it was."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    class PlainSubExperts(MixtralExperts):
        pass

    module = _fake_family(monkeypatch, MixtralExperts=MixtralExperts, PlainSubExperts=PlainSubExperts,
                          DoubledExperts=_DoubledMixtralExperts)
    patch = integrations.apply_scattermoe_to_fake_moe  # built on first use; refuses when called
    with pytest.raises(ValueError, match=r"family 'fake_moe': DoubledExperts has its own forward.*"
                                         r"experts_implementation=\"scattermoe\""):
        patch()
    assert (module.MixtralExperts, module.PlainSubExperts) == (MixtralExperts, PlainSubExperts)

    del module.DoubledExperts
    config = _tiny("mixtral")
    torch.manual_seed(0)
    ref = _randomized(PlainSubExperts(config).float())
    try:
        patch()
        assert module.MixtralExperts.__name__ == "ScatterMoEMixtralExperts"
        built = module.PlainSubExperts(config).float()
    finally:
        integrations.revert_scattermoe_patches()
    assert (module.MixtralExperts, module.PlainSubExperts) == (MixtralExperts, PlainSubExperts)
    assert type(built).__name__ == "ScatterMoEPlainSubExperts"
    built.load_state_dict(ref.state_dict())
    h, idx, w = _experts_call(7, config.hidden_size, config.num_local_experts)
    calls = _count_scattermoe_ops(monkeypatch)
    with scattermoe.use_backend("torch"):
        got = built(h, idx, w)
    assert calls and _rel(got, ref(h, idx, w)) < TOL


class SubclassedMixtralExperts(transformers.models.mixtral.modeling_mixtral.MixtralExperts):
    """A user's subclass at module level (pickle finds classes by name)."""


def test_a_patched_subclass_pickles():
    import io

    model = _build("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts.__class__ = SubclassedMixtralExperts
    integrations.apply_scattermoe(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert {type(layer.mlp.experts) for layer in again.model.layers} == {
        type(model.model.layers[0].mlp.experts)}
    assert type(again.model.layers[0].mlp.experts).__name__ == "ScatterMoESubclassedMixtralExperts"


def test_apply_names_a_bad_families_argument():
    with pytest.raises(TypeError, match="^families: expected model_type names.*got 123"):
        integrations.apply_scattermoe(_build("mixtral"), families=123)
    with pytest.raises(TypeError, match="^families: expected model_type names"):
        integrations.apply_scattermoe(_build("mixtral"), families=[3])
    model = integrations.apply_scattermoe(_build("mixtral"), families={"mixtral": 1}.keys())  # any iterable
    assert _scattermoe_classes(model) == {"ScatterMoEMixtralExperts"}
    with pytest.raises(ValueError, match="^families: an empty list patches nothing"):
        integrations.apply_scattermoe(_build("mixtral"), families=[])
    # Families that exclude the model's own: said so (the message listed the model's type among the supported).
    with pytest.raises(ValueError, match=r"^scattermoe: no MoE block of the model types \['qwen2_moe'\] found in "
                                         r"MixtralForCausalLM \(model_type='mixtral'\); apply_scattermoe\(model\) "
                                         "without families= patches every supported block$"):
        integrations.apply_scattermoe(_build("mixtral"), families=["qwen2_moe"])


def test_jetmoe_with_another_activation_runs_its_own_glu():
    """JetMoE's MoE with an activation other than SiLU leaves the fused GLU op: act(first half) * second half."""
    ref = _build("jetmoe", activation_function="gelu")
    model = integrations.apply_scattermoe(copy.deepcopy(ref))
    assert not transformers_moe._is_silu(model.model.layers[0].mlp.activation)  # the unfused path is what runs
    _assert_same_loss_and_grads(model, ref, _ids())


def test_patched_blocks_take_hidden_states_of_any_strides():
    """transformers' own loops take hidden states of any strides (here a transposed view): so do the patched blocks
    (the ops refused them, asking for .contiguous())."""
    ref = _build("mixtral")
    model = integrations.apply_scattermoe(copy.deepcopy(ref))
    D = ref.config.hidden_size
    h, idx, w = _experts_call(7, D, ref.config.num_local_experts)
    h = h.t().contiguous().t()  # the same values, as a transposed view
    assert h.stride() == (1, 7)
    with torch.no_grad(), scattermoe.use_backend("torch"):
        got = model.model.layers[0].mlp.experts(h, idx, w)
    with torch.no_grad():
        assert _rel(got, ref.model.layers[0].mlp.experts(h, idx, w)) < TOL
    ref = _build("jetmoe")
    model = integrations.apply_scattermoe(copy.deepcopy(ref))
    x = torch.randn(1, D, 5).transpose(1, 2)  # [1, 5, D]: its token rows are a (1, 5)-strided view
    with torch.no_grad(), scattermoe.use_backend("torch"):
        got = model.model.layers[0].mlp(x)
    with torch.no_grad():
        want = ref.model.layers[0].mlp(x)
    assert _rel(got, want) < TOL


def test_expert_parallel_experts_run_their_own_loop(monkeypatch):
    """Under expert parallelism transformers sends sentinel expert ids >= E, which scattermoe's routing refuses:
    such a block runs the class's own loop (and still computes what the unpatched block does)."""
    ref = _build("mixtral")
    model = integrations.apply_scattermoe(copy.deepcopy(ref))
    for m in (model, ref):
        for block in m.modules():
            if hasattr(block, "gate_up_proj"):
                block._is_expert_parallel = True

    def no_scattermoe_routing(*args, **kwargs):
        raise AssertionError("scattermoe's routing ran on an expert-parallel block")

    monkeypatch.setattr(transformers_moe, "flatten_sort_count", no_scattermoe_routing)
    _assert_same_loss_and_grads(model, ref, _ids())


def test_fused_experts_with_another_activation_run_their_own_gate():
    """A fused-experts family configured with GELU leaves the fused SiLU GLU op: act(first half) * second half."""
    ref = _build("mixtral", hidden_act="gelu")
    model = integrations.apply_scattermoe(copy.deepcopy(ref))
    assert _scattermoe_classes(model) == {"ScatterMoEMixtralExperts"}
    _assert_same_loss_and_grads(model, ref, _ids())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_experts_with_a_post_expert_norm_run_on_scattermoe(backend, monkeypatch):
    """A post-expert norm (transformers' has_post_expert_norm, MuseSpark: a norm between each expert's output and its
    gate): the two GEMMs on scattermoe, the norm on the ungated rows, then the gated sum. The output and every
    gradient (the inputs, both expert weights, the norm's weight) as the class's own loop. Before, such experts
    were patched but ran that loop, which is slower than the model's configured grouped_mm."""
    muse = pytest.importorskip("transformers.models.muse_spark.modeling_muse_spark")
    integrations.register_experts_implementation()
    config = muse.MuseSparkTextConfig(hidden_size=32, moe_hidden_size=32, moe_intermediate_size=16,
                                      num_local_experts=4, num_experts_per_tok=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    experts = muse.MuseSparkExperts(config).float()
    with torch.no_grad():
        for name, p in experts.named_parameters():
            p.normal_(0.0, 0.3) if "proj" in name else p.normal_(1.0, 0.3)
    assert experts.has_post_expert_norm
    h, idx, w = _experts_call(7, 32, 4)
    dy = torch.randn(7, 32)

    def run(implementation):
        config._experts_implementation = implementation
        experts.zero_grad(set_to_none=True)
        inputs = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        with scattermoe.use_backend(backend):
            y = experts(inputs[0], idx, inputs[1])
            y.backward(dy)
        return [y] + [t.grad for t in inputs] + [p.grad for p in experts.parameters()]

    want = run("eager")
    ops = []
    real = transformers_moe.parallel_linear
    monkeypatch.setattr(transformers_moe, "parallel_linear", lambda *a, **k: ops.append(1) or real(*a, **k))
    got = run("scattermoe")
    assert len(ops) == 2, "the GEMMs did not run on scattermoe"
    assert len(got) == len(want) == 3 + len(list(experts.parameters()))
    for g, ref in zip(got, want):
        assert _rel(g, ref) < TOL
    with scattermoe.use_backend(backend):  # no tokens (a view of the rows with -1 failed at T=0)
        assert experts(h[:0], idx[:0], w[:0]).shape == (0, 32)


def test_fused_experts_with_their_own_gate_function_keep_it_under_silu():
    """transformers' experts interface (experts_implementation="scattermoe") reaches any fused-experts class; one that
    overrides _apply_gate (here SiLU(gate) clamped, then * up) must run its gate, not the fused SiLU GLU op, even
    though its act_fn is SiLU. Checked per token in float64."""
    E, D, F, T, K = 3, 8, 6, 5, 2

    class ClampedGateExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts, self.act_fn = E, torch.nn.SiLU()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * F, D))  # [E, out, in], as transformers stores
            self.down_proj = torch.nn.Parameter(torch.randn(E, D, F))

        def _apply_gate(self, h):
            gate, up = h.chunk(2, dim=-1)
            return self.act_fn(gate).clamp(max=0.2) * up

    experts = ClampedGateExperts()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    with scattermoe.use_backend("torch"), torch.no_grad():
        y = transformers_moe._fused_experts_forward(experts, x, index, weights)
    want = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            e = int(index[t, j])
            h = experts._apply_gate(x[t].double() @ experts.gate_up_proj[e].detach().double().t())
            want[t] += weights[t, j].double() * (h @ experts.down_proj[e].detach().double().t())
    assert _rel(y, want) < TOL
