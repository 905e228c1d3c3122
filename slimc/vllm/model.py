"""vLLM model classes for slimc checkpoints. Imported only by vLLM (through the lazy "module:Class" strings that
slimc.vllm.plugin registers); never import it from slimc itself.

Each class is vLLM's own Llama (or Mistral) model; the one change is that decoder layer i is built from a copy
of the HF config holding layer i's query heads, KV heads, FFN width and an explicit head_dim
(`slimc.vllm.mapping.layer_config`). Weight loading is vLLM's unchanged: HF q/k/v and gate/up tensors are
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

DISP layers (a checkpoint whose config has layer_attn_in_dims etc. below hidden_size): the layer's q/k/v and
gate/up read only their index set of the normalized residual (`index_select`) and o_proj / down_proj write
only theirs (`index_add`), with vLLM's own parallel linears built at those widths (`_DispLayer`). vLLM's layer
convention is kept: a layer returns (hidden_states, residual) whose sum is the residual stream, so the fused
add + RMSNorm of the next layer and of the final norm work unchanged.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM

from slimc.layout import INDEX_SETS, index_buffer, layer_layouts
from slimc.vllm.mapping import layer_config


def _config_for(vllm_config: Any, prefix: str, config: Any) -> Any:
    """Layer-i copy of the model config; i is the last component of vLLM's layer prefix."""
    base = config if config is not None else vllm_config.model_config.hf_config
    return layer_config(base, int(prefix.rsplit(".", 1)[-1]))


class _DispLayer:
    """Mixed in before a vLLM decoder layer: narrows its projections to the layer's hidden-dim index sets and
    runs the DISP forward, and gives o_proj / down_proj FLAP's compensation biases where the layout says so.
    A layer with neither is the vLLM layer, untouched."""

    def _setup_disp(self, vllm_config: Any, prefix: str, config: Any) -> None:
        base = config if config is not None else vllm_config.model_config.hf_config
        layout = layer_layouts(base)[int(prefix.rsplit(".", 1)[-1])]
        self.disp = layout.is_disp
        if self.disp and getattr(self, "ada_rms_norm_t_cond", None) is not None:
            raise ValueError("slimc DISP layers do not support Mistral's ada_rms_norm_t_cond (time-conditioned norm)")
        quant, attn, mlp = vllm_config.quant_config, self.self_attn, self.mlp
        if layout.has_index("attn_in"):
            attn.qkv_proj = QKVParallelLinear(
                hidden_size=layout.attn_in_dims, head_size=attn.head_dim, total_num_heads=attn.total_num_heads,
                total_num_kv_heads=attn.total_num_kv_heads, bias=attn.qkv_proj.bias is not None,
                quant_config=quant, prefix=f"{prefix}.self_attn.qkv_proj")
        if layout.has_index("attn_out") or layout.output_bias:
            attn.o_proj = RowParallelLinear(
                input_size=attn.total_num_heads * attn.head_dim, output_size=layout.attn_out_dims,
                bias=layout.output_bias or attn.o_proj.bias is not None, quant_config=quant,
                prefix=f"{prefix}.self_attn.o_proj")
        if layout.has_index("mlp_in"):
            mlp.gate_up_proj = MergedColumnParallelLinear(
                input_size=layout.mlp_in_dims, output_sizes=[layout.intermediate_size] * 2,
                bias=mlp.gate_up_proj.bias is not None, quant_config=quant, prefix=f"{prefix}.mlp.gate_up_proj")
        if layout.has_index("mlp_out") or layout.output_bias:
            mlp.down_proj = RowParallelLinear(
                input_size=layout.intermediate_size, output_size=layout.mlp_out_dims,
                bias=layout.output_bias or mlp.down_proj.bias is not None, quant_config=quant,
                prefix=f"{prefix}.mlp.down_proj")
        for name in INDEX_SETS:
            index = torch.zeros(layout.dims(name), dtype=torch.long) if layout.has_index(name) else None
            self.register_buffer(index_buffer(name), index)  # filled by SlimcLlamaForCausalLM.load_weights

    @staticmethod
    def _read(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        return x if index is None else x.index_select(-1, index)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.disp:  # kwargs: what the family's layer takes besides (e.g. Mistral's t_cond)
            return super().forward(positions, hidden_states, residual, **kwargs)
        # h: the whole residual stream (vLLM hands it over split in two: hidden_states + residual)
        if residual is None:
            h, x = hidden_states, self.input_layernorm(hidden_states)
        else:
            x, h = self.input_layernorm(hidden_states, residual)
        y = self.self_attn(positions=positions, hidden_states=self._read(x, self.attn_in_index))
        h = h + y if self.attn_out_index is None else h.index_add(-1, self.attn_out_index, y)

        y = self.mlp(self._read(self.post_attention_layernorm(h), self.mlp_in_index))
        if self.mlp_out_index is None:
            return y, h
        return torch.zeros_like(h).index_add_(-1, self.mlp_out_index, y), h


class SlimcLlamaDecoderLayer(_DispLayer, LlamaDecoderLayer):
    """vLLM's Llama decoder layer built with this layer's own widths (and index sets, for DISP)."""

    def __init__(self, vllm_config: Any, prefix: str = "", config: Any = None,
                 attn_layer_type: type[torch.nn.Module] = LlamaAttention) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=_config_for(vllm_config, prefix, config),
                         attn_layer_type=attn_layer_type)
        self._setup_disp(vllm_config, prefix, config)


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


class SlimcMistralDecoderLayer(_DispLayer, MistralDecoderLayer):
    """vLLM's Mistral decoder layer (Llama layer + Mistral attention extras) with this layer's own widths."""

    def __init__(self, vllm_config: Any, prefix: str = "", config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=_config_for(vllm_config, prefix, config))
        self._setup_disp(vllm_config, prefix, config)


def _load_with_index_sets(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]], load) -> set[str]:
    """Copy the DISP index sets (`model.layers.{i}.attn_in_index`, ...) into their layer buffers; every other
    tensor goes to vLLM's own loader."""
    suffixes = tuple(f".{index_buffer(name)}" for name in INDEX_SETS)
    loaded: set[str] = set()

    def rest():
        for name, tensor in weights:
            if name.endswith(suffixes):
                model.get_buffer(name).copy_(tensor)
                loaded.add(name)
            else:
                yield name, tensor

    return load(rest()) | loaded


class SlimcLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: Any, prefix: str = "",
                 layer_type: type[torch.nn.Module] = SlimcLlamaDecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return _load_with_index_sets(self, weights, super().load_weights)


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

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return _load_with_index_sets(self, weights, super().load_weights)
