"""JetMoE-8B on scattermoe: the model, HF-layout checkpoints, KV-cache generation, training and a CLI.

    from jetmoe import JetMoEForCausalLM
    model = JetMoEForCausalLM.from_pretrained("jetmoe/jetmoe-8b", dtype=torch.bfloat16, device="cuda")
    out = model.generate(input_ids, max_new_tokens=64, eos_token_id=model.config.eos_token_id)

    python -m jetmoe demo        # trains the built-in tiny model for ~2 minutes on a CPU, then samples from it
"""

from .checkpoint import CheckpointError, config_from_dict, load_pretrained, load_weights, save_pretrained
from .model import PRESETS, CausalLMOutput, JetMoEConfig, JetMoEForCausalLM, KVCache, router_aux_loss, sample
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "PRESETS", "ByteTokenizer", "CausalLMOutput", "CheckpointError", "HFTokenizer", "JetMoEConfig",
    "JetMoEForCausalLM", "KVCache", "config_from_dict", "load_pretrained", "load_tokenizer", "load_weights",
    "router_aux_loss", "sample", "save_pretrained",
]
