"""vLLM model classes for slimc checkpoints. Imported only by vLLM (through the lazy "module:Class" strings that
slimc.vllm_plugin registers); never import it from slimc itself.

Each class is vLLM's own Llama (or Mistral) model; the one change is that decoder layer i is built from a copy
of the HF config holding layer i's query heads, KV heads, FFN width and an explicit head_dim
(`slimc.vllm_mapping.layer_config`). Weight loading is vLLM's unchanged: HF q/k/v and gate/up tensors are
loaded into each layer's own stacked qkv_proj / gate_up_proj, whose shard sizes come from that layer's
widths, so per-layer shapes need nothing extra.

Run for real by tests/test_vllm_serving.py on vLLM's CPU build 0.32.0 (all four classes: loaded shapes and greedy
tokens against transformers); not yet on a GPU.

How the per-layer config reaches a layer -- the same in vLLM 0.26.0 and 0.33.0:
  LlamaForCausalLM(vllm_config=, prefix=, layer_type=) -> _init_model -> LlamaModel(layer_type=)
  -> make_layers: layer_type(vllm_config=vllm_config, prefix="model.layers.{i}")
  -> LlamaDecoderLayer(vllm_config, prefix, config=None, attn_layer_type=LlamaAttention) reads
     `config or vllm_config.model_config.hf_config`; LlamaAttention takes head_dim from config.head_dim.
So layer_type is a LlamaDecoderLayer subclass that reads i from its prefix and passes config=<layer i's copy>.
LlamaModel is not subclassed, so its @support_torch_compile wrapper stays vLLM's.

What differs between 0.26.0 and 0.33.0 around this (none of it needs a code path of its own here):
  - tied lm_head: 0.26 LlamaForCausalLM.load_weights skips "lm_head." when tie_word_embeddings; 0.33 ties
    through ParallelLMHead.tie_weights and no longer skips. slimc writes no lm_head.weight when tied.
  - FlashAttention's metadata builder takes num_heads_q / num_heads_kv for its FA3 ahead-of-time scheduling
    from the model-wide config (the unpruned counts) in 0.26, and from the attention group's own layers /
    KV spec in 0.33. 0.26's Triton builder already uses the group's layers; both versions split attention
    groups by per-layer query-head count (gpu_model_runner AttentionGroupKey). If FLASH_ATTN misbehaves on
    0.26, serve with attention backend TRITON_ATTN (benchmarks/gpu_vllm_check.py --attention-backend).
  - 0.33 adds pipeline-parallel aux-hidden-state plumbing to LlamaModel.forward and a fused act+quant MLP
    path; Qwen3Model gains a `decoder_layer_type` class attribute in 0.33 (hard-coded in 0.26).

Qwen2/Qwen3 are served on vLLM's Llama blocks, not on vLLM's Qwen classes: Qwen2Attention derives head_dim
as hidden_size // num_heads (wrong once heads are pruned) and Qwen3ForCausalLM hard-codes its model and (in
0.26) its layer class. Qwen2 = Llama layer with biased q/k/v and unbiased o_proj (LlamaDecoderLayer's
`qkv_bias` hook); Qwen3 = Llama layer whose attention adds Qwen3's per-head RMSNorm on q and k before RoPE.
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM

from slimc.vllm_mapping import layer_config


def _config_for(vllm_config: Any, prefix: str, config: Any) -> Any:
    """Layer-i copy of the model config; i is the last component of vLLM's layer prefix."""
    base = config if config is not None else vllm_config.model_config.hf_config
    return layer_config(base, int(prefix.rsplit(".", 1)[-1]))


class SlimcLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer built with this layer's own widths."""

    def __init__(self, vllm_config: Any, prefix: str = "", config: Any = None,
                 attn_layer_type: type[torch.nn.Module] = LlamaAttention) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=_config_for(vllm_config, prefix, config),
                         attn_layer_type=attn_layer_type)


class SlimcQwen3Attention(LlamaAttention):
    """Llama attention plus Qwen3's RMSNorm over each query and key head (before RoPE)."""

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # (tokens, heads * head_dim) -> (tokens, heads, head_dim): a view, the norm runs per head
        q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class SlimcQwen3DecoderLayer(SlimcLlamaDecoderLayer):
    def __init__(self, vllm_config: Any, prefix: str = "", config: Any = None) -> None:
        super().__init__(vllm_config, prefix, config, attn_layer_type=SlimcQwen3Attention)


class SlimcMistralDecoderLayer(MistralDecoderLayer):
    """vLLM's Mistral decoder layer (Llama layer + Mistral attention extras) with this layer's own widths."""

    def __init__(self, vllm_config: Any, prefix: str = "", config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=_config_for(vllm_config, prefix, config))


class SlimcLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: Any, prefix: str = "",
                 layer_type: type[torch.nn.Module] = SlimcLlamaDecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


class SlimcQwen2ForCausalLM(SlimcLlamaForCausalLM):
    """Qwen2 = Llama with biased q/k/v; layer_config sets the bias flags from slimc_base_model_type."""


class SlimcQwen3ForCausalLM(SlimcLlamaForCausalLM):
    def __init__(self, *, vllm_config: Any, prefix: str = "",
                 layer_type: type[torch.nn.Module] = SlimcQwen3DecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


class SlimcMistralForCausalLM(MistralForCausalLM):
    def __init__(self, *, vllm_config: Any, prefix: str = "",
                 layer_type: type[torch.nn.Module] = SlimcMistralDecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
