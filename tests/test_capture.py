"""Structure discovery from the torch.export graph of one decoder block."""
import pytest
import torch
import transformers

from slimc.calibrate import catch_block_inputs, decoder_layers
from slimc.capture import UnsupportedBlockError, capture_block
from slimc.capture import capture_structures

from conftest import tiny_model


def _capture(model, layer=0):
    inputs = catch_block_inputs(model, torch.randint(0, 100, (1, 12)))
    return capture_block(decoder_layers(model)[layer], (inputs.hidden,), inputs.kwargs)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_discovers_heads_and_gated_mlp(family):
    s = _capture(tiny_model(family))
    a, m = s.attention, s.mlp
    assert (a.q, a.k, a.v, a.o) == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (8, 4, 8)
    assert (m.gate, m.up, m.down, m.intermediate_size) == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", 96)


def test_layout_read_from_graph_not_config():
    """Multi-head (no GQA) and a head_dim that is not hidden/heads: both must come from the graph shapes."""
    s = _capture(tiny_model("llama", num_attention_heads=4, num_key_value_heads=4, head_dim=32))
    assert (s.attention.num_heads, s.attention.num_kv_heads, s.attention.head_dim) == (4, 4, 32)


def test_gate_and_up_told_apart_by_activation():
    """Rename nothing, but swap the modules: discovery follows the data flow, not the names."""
    model = tiny_model("llama")
    mlp = decoder_layers(model)[0].mlp
    mlp.gate_proj, mlp.up_proj = mlp.up_proj, mlp.gate_proj
    s = _capture(model)
    assert (s.mlp.gate, s.mlp.up) == ("mlp.gate_proj", "mlp.up_proj")


def test_fused_qkv_is_refused_with_block_name():
    cfg = transformers.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                  num_key_value_heads=4, vocab_size=128, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = transformers.Phi3ForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedBlockError, match="Phi3DecoderLayer: fused qkv"):
        _capture(model)


def test_unknown_attention_op_is_refused():
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"  # matmul + softmax, no sdpa op
    with pytest.raises(UnsupportedBlockError, match="LlamaDecoderLayer: expected one scaled_dot_product_attention"):
        _capture(model)


def test_identical_blocks_share_one_capture():
    model = tiny_model("llama")
    inputs = catch_block_inputs(model, torch.randint(0, 100, (1, 12)))
    structures = capture_structures(decoder_layers(model), inputs)
    assert len(structures) == 3 and len({id(s) for s in structures}) == 1
