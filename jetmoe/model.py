"""JetMoE on scattermoe, in one file: config, blocks, forward, KV-cache generation.

Legend: B batch, S new (query) positions, L key positions (cache fill + S), T = B*S tokens,
D model dim, H key/value heads (= query heads per attention expert), Dh head dim,
E experts, K experts per token, F expert hidden dim, V vocabulary.
Expert weights are stored [E, out, in] (the nn.Linear convention, the JetMoE checkpoint layout);
module and parameter names are transformers' ``JetMoe`` names, so state_dicts match key for key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import scattermoe
from scattermoe._validate import positive_int
from scattermoe.routing import flatten_sort_count, load_balancing_loss, router_z_loss, topk_gating

LAYER_NORM_EPS = 1e-6  # the per-layer norms of JetMoE hard-code 1e-6; only model.norm reads rms_norm_eps
Z_LOSS_WEIGHT = 0.1  # JetMoE's training recipe: switch loss + 0.1 * z-loss, per router
ACTIVATIONS: Dict[str, Callable] = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@dataclass
class JetMoEConfig:
    """Hyper-parameters; the defaults are jetmoe/jetmoe-8b's (DESIGN.md section 9)."""
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_key_value_heads: int = 16
    kv_channels: int = 128
    intermediate_size: int = 5632
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    activation_function: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    aux_loss_coef: float = 0.01
    initializer_range: float = 0.01
    attention_dropout: float = 0.0  # on the attention weights, while training (transformers' field)
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, List[int]]] = 2
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # numbers where numbers are due: "32" would fail deep inside torch
            default, value = field.default, getattr(self, field.name)
            if field.name.endswith("_token_id") or not isinstance(default, (int, float)):
                continue  # ids may be None or, for eos, a list (checked below); names
            if isinstance(default, bool):  # a flag: "false" would read as true
                if not isinstance(value, bool):
                    raise ValueError(f"{field.name}={value!r}, expected bool")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(default, int) and not isinstance(value, int)):
                raise ValueError(f"{field.name}={value!r}, expected {type(default).__name__}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels",
                     "intermediate_size", "num_local_experts", "max_position_embeddings"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout: expected a probability in [0, 1), got {self.attention_dropout}")
        if self.kv_channels % 2:
            raise ValueError(f"kv_channels: expected an even head size (rotary embeddings rotate pairs of "
                             f"dimensions), got {self.kv_channels}")
        if self.rms_norm_eps < 0:
            raise ValueError(f"rms_norm_eps: expected a value >= 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta: expected a value > 0, got {self.rope_theta}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        for name, ids in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", eos),
                          ("pad_token_id", [self.pad_token_id])):
            for i in ids:
                if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size):
                    raise ValueError(f"{name}: expected None or an id in [0, vocab_size={self.vocab_size})"
                                     + (" (or a list of them)" if name == "eos_token_id" else "")
                                     + f", got {getattr(self, name)!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function: expected one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation_function!r}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok: expected 1..{self.num_local_experts}, "
                             f"got {self.num_experts_per_tok}")

    @property
    def num_attention_heads(self) -> int:
        return self.num_key_value_heads * self.num_experts_per_tok  # K experts x H heads per token

    @classmethod
    def preset(cls, name: str) -> "JetMoEConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name])

    @classmethod
    def from_pretrained(cls, path: str) -> "JetMoEConfig":
        """From a checkpoint's config.json, either key spelling (see jetmoe.checkpoint)."""
        from .checkpoint import load_config
        return load_config(path)


PRESETS: Dict[str, JetMoEConfig] = {
    "jetmoe-8b": JetMoEConfig(),
    # The built-in model of `python -m jetmoe demo`: byte vocabulary (256 bytes + bos/eos/pad, see
    # jetmoe.tokenizer), sized so that ~100 s on 2 CPU cores show a clearly falling loss (of the sizes tried
    # for 60 s at 2.3-5M parameters, 3 layers x d=160 reached the lowest loss: deeper or wider ran fewer steps).
    "tiny": JetMoEConfig(vocab_size=259, hidden_size=160, num_hidden_layers=3, num_key_value_heads=5,
                         kv_channels=32, intermediate_size=320, num_local_experts=4, num_experts_per_tok=2,
                         rms_norm_eps=1e-5, max_position_embeddings=1024, initializer_range=0.02,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258),
}


class RMSNorm(nn.Module):
    """weight * (x / rms(x)), the normalisation in fp32 and cast back before the weight (as JetMoE)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, S] -> cos, sin [B, 1, S, Dh] (NeoX layout: the frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, Dh]: rotate_half rotary over all Dh dims (every head, same position)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Router(nn.Module):
    """JetMoE's router: fp32 logits of a bias-free Linear, top-k, softmax over the k (scattermoe.topk_gating)."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x_TD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> gates [T, K] (x's dtype), expert_idxs [T, K] int64, logits [T, E] fp32."""
        logits_TE = self.layer(x_TD).float()
        gates_TK, idxs_TK = topk_gating(logits_TE, self.top_k)
        return gates_TK.to(x_TD.dtype), idxs_TK, logits_TE


class MoAExperts(scattermoe.MoA):
    """scattermoe.MoA plus its router: input_linear [E, H*Dh, D], output_linear [E, D, H*Dh], bias [D]."""

    def __init__(self, cfg: JetMoEConfig) -> None:
        E, K, H, Dh, D = (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_key_value_heads,
                          cfg.kv_channels, cfg.hidden_size)
        super().__init__(D, Dh, H, E, K, bias=True)
        self.router = Router(D, E, K)


class Attention(nn.Module):
    """Mixture of attention heads: a token's K experts each give it H query heads over one shared K/V."""

    def __init__(self, cfg: JetMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.experts = MoAExperts(cfg)
        self.kv_proj = nn.Linear(cfg.hidden_size, 2 * cfg.num_key_value_heads * cfg.kv_channels, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor],
                kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]], start: Union[int, torch.Tensor]):
        """x [B, S, D]; mask [B, 1, S, L] bool or None (causal); kv_cache: this layer's ([B, H, Lmax, Dh],) x 2,
        written at positions start..start+S. Returns (y [B, S, D], router logits [T, E], expert_idxs [T, K]).
        A tensor ``start`` ([1] int64, on the device) is the static-shape form a CUDA graph can replay: the
        cache is written there and all Lmax keys are attended, so ``mask`` ([B, 1, S, Lmax]) is required."""
        B, S, D = x_BSD.shape
        H, Dh = self.cfg.num_key_value_heads, self.cfg.kv_channels
        gates, idxs, logits = self.experts.router(x_BSD.reshape(-1, D))
        # q [B, S, H*K, Dh] in (kv head h, slot j) order: SDPA's enable_gqa reads KV head h for query h*K+j,
        # which is JetMoE's tiling (query head j*H + h reads KV head h), with no repeated K/V.
        q, routing = self.experts.map(x_BSD, gates.view(B, S, -1), idxs.view(B, S, -1))
        k, v = self.kv_proj(x_BSD).view(B, S, 2, H, Dh).transpose(1, 3).unbind(2)  # [B, H, S, Dh] each
        q = apply_rope(q.transpose(1, 2), *rope)
        k = apply_rope(k, *rope)
        if isinstance(start, torch.Tensor):  # static shapes: no host-side position anywhere
            if kv_cache is None or mask is None:
                raise ValueError("a tensor start (static decode) needs the KV cache and a mask over its positions")
            at = start + torch.arange(S, device=start.device)
            kv_cache[0].index_copy_(2, at, k.to(kv_cache[0].dtype))
            kv_cache[1].index_copy_(2, at, v.to(kv_cache[1].dtype))
            k, v = kv_cache
        elif kv_cache is not None:  # static cache: write the new positions, attend over all filled ones
            kv_cache[0][:, :, start:start + S] = k
            kv_cache[1][:, :, start:start + S] = v
            k, v = kv_cache[0][:, :, :start + S], kv_cache[1][:, :, :start + S]
        causal = mask is None and S > 1 and isinstance(start, int) and start == 0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True,
                                           dropout_p=self.cfg.attention_dropout if self.training else 0.0)
        y = self.experts.reduce(o.transpose(1, 2), routing)  # [B, S, D]
        return y, logits, idxs


class MoE(nn.Module):
    """GLU experts: y = sum_j gate_j * W2_e (act(a) * b) + bias, [a | b] = W1_e x (the FIRST half activated)."""

    def __init__(self, cfg: JetMoEConfig) -> None:
        super().__init__()
        E, D, Fh = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.input_linear = scattermoe.ParallelExperts(E, D, 2 * Fh)  # [E, 2F, D]
        self.output_linear = scattermoe.ParallelExperts(E, Fh, D)  # [E, D, F]
        self.bias = nn.Parameter(torch.zeros(D))
        self.router = Router(D, E, cfg.num_experts_per_tok)
        self.activation_name = cfg.activation_function

    def forward(self, x_BSD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> (y [B, S, D], router logits [T, E], expert_idxs [T, K])."""
        x_TD = x_BSD.reshape(-1, x_BSD.size(-1))
        gates, idxs, logits = self.router(x_TD)
        routing = flatten_sort_count(idxs, self.input_linear.num_experts)
        if self.activation_name == "silu":  # scattermoe's fused GLU MoE (GLU in the first GEMM's epilogue)
            # Under torch.autocast the scattermoe ops cast x and the weights themselves.
            y = scattermoe.glu_moe(x_TD, self.input_linear.weight.permute(0, 2, 1),
                                   self.output_linear.weight.permute(0, 2, 1), gates, routing, activate_first=True)
        else:
            a, b = self.input_linear(x_TD, gates.size(1), *routing, grouped_out=True).chunk(2, dim=-1)
            h = ACTIVATIONS[self.activation_name](a) * b
            y = self.output_linear(h, 1, *routing, gates=gates, grouped_in=True)
        return (y + self.bias).view_as(x_BSD), logits, idxs


def unknown_compile_backend(backend: str) -> Optional[str]:
    """Why ``backend`` is not a torch.compile backend here, or None."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())  # the debug ones (eager, aot_eager) too
    if backend in known:
        return None
    return f"unknown torch.compile backend {backend!r}; expected one of {', '.join(known)}"


class DecoderLayer(nn.Module):
    def __init__(self, cfg: JetMoEConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, LAYER_NORM_EPS)
        self.self_attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, LAYER_NORM_EPS)
        self.mlp = MoE(cfg)
        self.compiled_layer_forward: Optional[Callable] = None  # JetMoEForCausalLM.compile_decoder_layers

    def __getstate__(self):
        # torch.save(model) pickles the modules, and a compiled function does not pickle: a saved (or deep-copied)
        # model is eager until compile_decoder_layers is called on it again.
        return {**self.__dict__, "compiled_layer_forward": None}

    def forward(self, x, rope, mask, kv_cache, start):
        """x [B, S, D] -> (x [B, S, D], [(router logits [T, E], expert_idxs [T, K])] for MoA and MoE)."""
        # Compiled for the forwards without a KV cache (training, evaluation, prefill-free scoring); generation's
        # steps stay eager: their changing `start` would make Dynamo's later graphs symbolic in it (SDPA's is_causal
        # then a SymBool it refuses) and each decode shape a new graph.
        if self.compiled_layer_forward is not None and kv_cache is None:
            return self.compiled_layer_forward(self, x, rope, mask, kv_cache, start)
        return self.layer_forward(x, rope, mask, kv_cache, start)

    def layer_forward(self, x, rope, mask, kv_cache, start):
        h, attn_logits, attn_idxs = self.self_attention(self.input_layernorm(x), rope, mask, kv_cache, start)
        x = x + h
        h, mlp_logits, mlp_idxs = self.mlp(self.post_attention_layernorm(x))
        return x + h, [(attn_logits, attn_idxs), (mlp_logits, mlp_idxs)]


class JetMoEModel(nn.Module):
    def __init__(self, cfg: JetMoEConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, V] in the model's (or autocast's) dtype
    loss: Optional[torch.Tensor] = None  # next-token cross entropy (labels shifted inside, -100 ignored)
    aux_loss: Optional[torch.Tensor] = None  # aux_loss_coef * sum over routers of (switch + 0.1 z-loss)
    router_logits: Tuple[torch.Tensor, ...] = ()  # [T, E] fp32 per router: layer 0 MoA, layer 0 MoE, layer 1 MoA...


def router_aux_loss(routers: Sequence[Tuple[torch.Tensor, torch.Tensor]], num_experts: int,
                    valid_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """JetMoE's recipe summed over routers: E * sum_e P_e f_e + 0.1 * mean(logsumexp^2); valid_T [T] bool
    drops padding tokens. (transformers 5.23 differs: no z-loss, f sums to K, the MoA router counted twice, and all
    routers pooled before P and f multiply, so two routers unbalanced in opposite ways read as balanced.)"""
    total = 0.0
    for logits_TE, idxs_TK in routers:
        if valid_T is not None:
            logits_TE, idxs_TK = logits_TE[valid_T], idxs_TK[valid_T]
        total = total + load_balancing_loss(logits_TE, idxs_TK, num_experts) + Z_LOSS_WEIGHT * router_z_loss(logits_TE)
    return total


class KVCache:
    """Static cache, allocated once for the whole generation: k, v [layers, B, H, Lmax, Dh]."""

    def __init__(self, cfg: JetMoEConfig, batch: int, max_len: int, device, dtype: torch.dtype) -> None:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.kv_channels)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far


def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None, top_k: int = 0) -> torch.Tensor:
    """Next tokens [B]: greedy when temperature <= 0, else sampling at that temperature from the top_k most likely
    tokens (0: all; ties with the k-th kept) and of those the nucleus (top_p), in transformers' order."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float()
    # Shifted so the largest is 0 first: a tiny temperature then gives -inf for the rest, not inf - inf = nan.
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if 0 < top_k < probs.size(-1):
        probs = probs.masked_fill(probs < probs.topk(top_k, dim=-1).values[..., -1:], 0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0  # keep the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StaticDecoder:
    """Decode steps with static shapes, so that every step after the first replays one CUDA graph.

    The step's inputs live in fixed buffers: the tokens [B, 1], each row's position [B, 1], the cache slot
    written ([1]) and which keys each row may attend ([B, 1, 1, Lmax]: its valid prompt positions and every
    position generated so far), all derived from the prompt's length S and its mask [B, S] (None: no
    padding); the cache holds the prompt's S positions before the first call. Attention runs over all
    Lmax slots under that mask, and nothing reads a device value on the host, so the step can be captured.
    ``graph=False`` runs the same step eagerly (the CPU tests check it against the default path). Decode
    at batch B is ~2 launches per layer and router kernel; a replay issues them all at once, without the
    Python and launch cost of each. The first call runs eagerly and captures; ``capture_s`` is what that
    took.
    """

    def __init__(self, model: "JetMoEForCausalLM", cache: KVCache, prompt_len: int,
                 prompt_mask: Optional[torch.Tensor], graph: bool) -> None:
        B, L_max, device = cache.k.size(1), cache.k.size(3), cache.k.device
        if graph and device.type != "cuda":
            raise ValueError(f"cuda_graph: CUDA graphs need CUDA tensors; input_ids is on {device}")
        self.model, self.cache, self.use_graph = model, cache, graph
        self.capture_s = 0.0
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.key_ok = torch.zeros(B, 1, 1, L_max, dtype=torch.bool, device=device)
        self.key_ok[:, 0, 0, :prompt_len] = prompt_mask.bool() if prompt_mask is not None else True
        # A generated token's position: the valid prompt tokens before it, then one more per step.
        self.positions = self.key_ok[:, 0, 0, :prompt_len].sum(-1, keepdim=True)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None

    def _step(self) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        x = model.model.embed_tokens(self.tokens)
        rope = rope_cos_sin(self.positions, cfg.kv_channels, cfg.rope_theta, x.dtype)
        for i, layer in enumerate(model.model.layers):
            x, _ = layer(x, rope, self.key_ok, (self.cache.k[i], self.cache.v[i]), self.slot)
        return model.lm_head(model.model.norm(x))[:, -1]

    def __call__(self, tokens_B: torch.Tensor) -> torch.Tensor:
        """The logits [B, V] after feeding tokens_B at the cache's next slot (which it then fills). With a graph
        they are its output buffer, which the next call overwrites: read them (as generate samples) first."""
        slot = self.cache.length
        if slot >= self.key_ok.size(-1):
            raise ValueError(f"cache: all {slot} positions are filled")
        self.tokens.copy_(tokens_B.reshape(-1, 1))
        self.slot.fill_(slot)
        self.key_ok[..., slot] = True
        if not self.use_graph:
            logits = self._step()
        elif self.graph is not None:
            with torch.cuda.device(self.tokens.device):
                self.graph.replay()
            logits = self.logits
        else:  # first step: run it eagerly off the default stream (compiles, autotunes), then capture
            start = time.perf_counter()
            # The model's device, which need not be the current one (cuda:1, a torchrun rank): the capture
            # records the current device's work only.
            with torch.cuda.device(self.tokens.device):
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    logits = self._step()
                torch.cuda.current_stream().wait_stream(stream)
                logits = logits.clone()  # a copy made on this stream: the warm-up's tensors belong to the side one
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=torch.cuda.Stream()):  # recorded, not run
                    self.logits = self._step()
                torch.cuda.synchronize()
            self.capture_s = time.perf_counter() - start
        self.positions += 1
        self.cache.length = slot + 1
        return logits


def _integer_ids(t) -> bool:
    """A tensor of integer ids (not float, complex or bool)."""
    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _described(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


class JetMoEForCausalLM(nn.Module):
    """JetMoE on scattermoe's MoA and GLU MoE layers; ``state_dict`` names are transformers' JetMoe names."""

    def __init__(self, cfg: JetMoEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = JetMoEModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.init_weights()

    def gradient_checkpointing_enable(self) -> None:
        """Keep only each decoder layer's input for the backward and recompute the rest there (activation
        checkpointing, as transformers' method of this name): a layer's activations, many times its input
        (the MoE's kept pre-activation alone, k x 2F wide, is 11x the input's width at JetMoE-8B's size), are
        then held for one layer at a time, for one more forward's compute."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def compile_decoder_layers(self, backend: Union[str, Callable] = "inductor", **options) -> "JetMoEForCausalLM":
        """``torch.compile`` (fullgraph) the decoder layers' forward, in place, for calls without a KV cache
        (training, evaluation; ``generate`` stays eager); the embedding, the head and the losses stay eager.

        All layers share each graph (their parameters are its inputs; Dynamo adds one per input shape, grad mode
        or train/eval mode, within its recompile limit), so compiling takes one layer's time, not 24. Per layer
        rather than the whole model, as torchtitan does: FSDP's per-layer gather hooks and gradient checkpointing
        stay outside the graph, the parameter and ``state_dict`` names do not change, and the router's aux losses,
        computed outside it, keep the gate gradient that torch 2.13's inductor drops when they share a graph with
        the gates (README, torch.compile; tests/test_compile.py checks every gradient under inductor).
        ``backend``: a torch.compile backend's name or a callable one; ``options`` go to torch.compile (e.g.
        ``mode="max-autotune-no-cudagraphs"``). A pickled or deep-copied model comes back eager."""
        why = None if callable(backend) else unknown_compile_backend(backend)
        if why:
            raise ValueError(f"backend: {why}")
        compiled = torch.compile(DecoderLayer.layer_forward, backend=backend, fullgraph=True, **options)
        for layer in self.model.layers:
            layer.compiled_layer_forward = compiled
        return self

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' init: N(0, initializer_range) matrices, zero biases, unit norms."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, self.config.initializer_range)
        if self.config.pad_token_id is not None:  # as nn.Embedding(padding_idx=...): the padding row is zero
            self.model.embed_tokens.weight[self.config.pad_token_id].zero_()
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> CausalLMOutput:
        """input_ids [B, S] int64; attention_mask [B, L] (1 = token, 0 = padding; L = cache fill + S) or None;
        labels [B, S] (next-token targets are labels[:, 1:]; -100 ignored); position_ids [B, S] or None
        (then counted from the mask, so left padding does not shift positions); cache: see ``generate``."""
        cfg = self.config
        if not _integer_ids(input_ids) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected integer token ids [B, S], got {_described(input_ids)}")
        B, S = input_ids.shape
        for name, t, shapes in (("labels", labels, [(B, S)]), ("position_ids", position_ids, [(B, S), (1, S)])):
            if t is not None and (not _integer_ids(t) or tuple(t.shape) not in shapes):
                raise ValueError(f"{name}: expected integer ids of shape {' or '.join(map(str, shapes))} (input_ids' "
                                 f"batch and length), got {_described(t)}")
        if S == 0:
            raise ValueError("input_ids: expected at least one token per row, got shape "
                             f"{tuple(input_ids.shape)}")
        start = cache.length if cache is not None else 0
        L = start + S
        if cache is not None:
            want = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.kv_channels)
            got = (cache.k.size(0), cache.k.size(2), cache.k.size(4))
            if got != want or cache.k.device != input_ids.device:
                raise ValueError(f"cache: made for {got[0]} layers of {got[1]} heads x {got[2]} on {cache.k.device}; "
                                 f"this model has {want[0]} layers of {want[1]} heads x {want[2]}, and input_ids are "
                                 f"on {input_ids.device}")
            if cache.k.size(1) != B or L > cache.k.size(3):
                raise ValueError(f"cache: holds {cache.k.size(3)} positions of a batch of {cache.k.size(1)}, "
                                 f"{start} filled; got {S} more of a batch of {B}")
        if attention_mask is not None and attention_mask.shape != (B, L):
            raise ValueError(f"attention_mask: expected shape {(B, L)} (batch, cache + new positions), "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(start, L, device=input_ids.device).expand(B, S)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        mask = None
        if attention_mask is not None or (start > 0 and S > 1):
            q_pos = torch.arange(start, L, device=input_ids.device)[:, None]
            k_pos = torch.arange(L, device=input_ids.device)[None, :]
            mask = (k_pos <= q_pos)[None, None]  # [1, 1, S, L] causal
            if attention_mask is not None:  # padding keys masked; a padding query still sees itself (no NaN row)
                mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)
        x = self.model.embed_tokens(input_ids)
        rope = rope_cos_sin(position_ids, cfg.kv_channels, cfg.rope_theta, x.dtype)
        routers: List[Tuple[torch.Tensor, torch.Tensor]] = []
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            if recompute:  # the routing recomputes to the same experts: the kernels are deterministic
                x, layer_routers = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, kv, start,
                                                                     use_reentrant=False)
            else:
                x, layer_routers = layer(x, rope, mask, kv, start)
            routers += layer_routers
        logits = self.lm_head(self.model.norm(x))
        if cache is not None:
            cache.length = L
        out = CausalLMOutput(logits=logits, router_logits=tuple(r[0] for r in routers))
        if labels is not None:
            out.loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(),
                                       ignore_index=-100)
        if cache is None:  # aux losses are a training signal: skipped in the decode loop
            valid = attention_mask.reshape(-1).bool() if attention_mask is not None else None
            out.aux_loss = cfg.aux_loss_coef * router_aux_loss(routers, cfg.num_local_experts, valid)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 callback: Optional[Callable[[torch.Tensor], None]] = None,
                 generator: Optional[torch.Generator] = None, stats: Optional[dict] = None,
                 cuda_graph: bool = False, top_k: int = 0) -> torch.Tensor:
        """input_ids [B, S] (left-padded when rows differ in length, with attention_mask [B, S]) ->
        [B, S + n], n <= max_new_tokens. One prefill over the prompt, then one position per step against a
        static KV cache (the prompt is never rerun). ``callback(tokens [B])`` gets each step's tokens (streaming).
        ``eos_token_id`` (an id or several): a row stops at it, and then produces the config's pad_token_id (or,
        without one, the first eos id) as transformers does; generation ends once all rows have. None (the
        default) never stops early: pass ``model.config.eos_token_id`` to stop where transformers would.
        ``stats`` (a dict), if given, receives prefill_s (prompt and first token), decode_s, new_tokens (and,
        with a CUDA graph, capture_s: the part of decode_s spent on the first step's eager run and capture).
        ``cuda_graph=True`` (CUDA only) runs the decode steps as replays of one CUDA graph (``StaticDecoder``):
        the same tokens, without a Python and launch cost per kernel; the first decode step captures it.
        Sampling (``temperature`` > 0) keeps the ``top_k`` most likely tokens (0: all), then the ``top_p`` nucleus
        of those, as transformers' warpers do (whose generation_config defaults top_k to 50; here it is off)."""
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)  # numpy ints too; not floats or bools
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids: expected a [batch, sequence] tensor of token ids, got "
                             + (f"shape {tuple(input_ids.shape)} (add a batch dimension: input_ids[None])"
                                if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__))
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: expected input_ids' shape {tuple(input_ids.shape)} (one entry per "
                             f"prompt token, 1 = token, 0 = padding), got {tuple(attention_mask.shape)}")
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name}: expected a number, got {value!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k: expected an int >= 0 (0: no top-k filter), got {top_k!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature: expected a finite value >= 0 (0: greedy), got {temperature}")
        if attention_mask is not None and bool(
                (attention_mask.bool().any(-1) & ~attention_mask[:, -1].bool()).any()):
            raise ValueError("attention_mask: a row ends in padding; pad prompts on the left, so that every "
                             "row's last prompt token is in the last column")
        B, S = input_ids.shape
        device = input_ids.device
        cache = KVCache(self.config, B, S + max_new_tokens, device, self.model.embed_tokens.weight.dtype)
        full_mask = None  # [B, S + max_new_tokens]; None when nothing is padded (then the fast causal path)
        if attention_mask is not None and not bool(attention_mask.all()):
            full_mask = torch.ones(B, S + max_new_tokens, dtype=torch.long, device=device)
            full_mask[:, :S] = attention_mask
        decoder = None
        if cuda_graph:  # refused here, before the prefill, off CUDA
            decoder = StaticDecoder(self, cache, S, full_mask[:, :S] if full_mask is not None else None, graph=True)
        try:  # an int, a list, a tensor or a numpy value of ids
            eos = torch.as_tensor([] if eos_token_id is None else eos_token_id).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            eos = None
        if eos is None or eos.numel() and (eos.dtype.is_floating_point or eos.dtype.is_complex
                                           or eos.dtype == torch.bool):  # 2.5 would be read as 2
            raise TypeError(f"eos_token_id: expected an id or a sequence of ids, got {eos_token_id!r}")
        eos = eos.long()
        if eos.numel() and not bool(((eos >= 0) & (eos < self.config.vocab_size)).all()):
            raise ValueError(f"eos_token_id: expected ids in [0, vocab_size={self.config.vocab_size}), got "
                             f"{eos_token_id!r}")
        # What a finished row produces: the pad id, else the first eos id (transformers' open-end fill).
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (
            int(eos[0]) if eos.numel() else None)
        eos = eos.to(device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        was_training = self.training
        self.eval()
        _sync(device)
        t0 = time.perf_counter()
        logits = self(input_ids, attention_mask=full_mask[:, :S] if full_mask is not None else None,
                      cache=cache).logits[:, -1]
        new_tokens: List[torch.Tensor] = []
        t1 = t0
        for step in range(max_new_tokens):
            tokens = sample(logits, temperature, top_p, generator, top_k)
            if eos.numel():
                tokens = tokens.masked_fill(finished, pad)
                finished |= torch.isin(tokens, eos)
            new_tokens.append(tokens)
            if callback is not None:
                callback(tokens)
            if step == 0:
                _sync(device)
                t1 = time.perf_counter()
            if step == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):
                break
            if decoder is not None:
                logits = decoder(tokens)
                continue
            L = cache.length + 1
            logits = self(tokens[:, None], attention_mask=full_mask[:, :L] if full_mask is not None else None,
                          cache=cache).logits[:, -1]
        _sync(device)
        if stats is not None:
            stats.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, new_tokens=len(new_tokens))
            if decoder is not None:  # the first decode step's eager run and the graph's capture, in decode_s
                stats["capture_s"] = decoder.capture_s
        self.train(was_training)
        return torch.cat([input_ids, torch.stack(new_tokens, 1)], 1) if new_tokens else input_ids

    def num_parameters(self, active: bool = False) -> int:
        """All parameters (tied ones once), or those one token reads (K of E experts, no embedding table)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        experts = sum(p.numel() for n, p in self.named_parameters() if n.endswith("linear.weight"))  # [E, ...]
        unused = experts // self.config.num_local_experts * (self.config.num_local_experts
                                                             - self.config.num_experts_per_tok)
        return total - self.model.embed_tokens.weight.numel() - unused

    def decode_step_weight_bytes(self) -> int:
        """Weight bytes one decode step reads at batch 1: all but the unused experts, plus the lm_head matrix
        (a tied one is read whole there, though the embedding lookup reads one row)."""
        n = self.num_parameters(active=True)
        if self.config.tie_word_embeddings:
            n += self.lm_head.weight.numel()
        return n * self.lm_head.weight.element_size()

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, dtype: Optional[Union[torch.dtype, str]] = None,
                        device: Union[str, torch.device] = "cpu") -> "JetMoEForCausalLM":
        """Load a HF-layout checkpoint (config.json + safetensors, sharded or not), tensor by tensor. dtype: a
        torch dtype or its name ("bfloat16"); None or "auto" keeps the stored dtype."""
        from .checkpoint import load_pretrained
        return load_pretrained(path_or_hub_id, dtype=dtype, device=device)

    def save_pretrained(self, out_dir: str, max_shard_size: int = 5 * 1024 ** 3,
                        state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write config.json + model.safetensors (or shards + index), loadable by transformers. state_dict:
        the weights to write instead of this module's own (e.g. gathered from a sharded copy of it)."""
        from .checkpoint import save_pretrained
        save_pretrained(self, out_dir, max_shard_size=max_shard_size, state_dict=state_dict)
