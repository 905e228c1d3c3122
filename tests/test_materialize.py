"""Materialization is exact: cutting pruned heads/channels out gives the same logits as zeroing them."""
import copy

import pytest
import torch

from slimc.calibrate import catch_block_inputs, collect_hessians, decoder_layers, run_block
from slimc.capture import capture_structures
from slimc.materialize import build_slim_model
from slimc.passes import (MaterializeChannels, MaterializeHeads, PassConditionError, PruneChannels, PruneHeads,
                          apply_masked_channels, apply_masked_heads)
from slimc.plan import LayerPlan, PruningPlan

from conftest import tiny_model

TARGETS = {"groups": [(8, 4, 96), (4, 2, 40), (2, 1, 17)], "query": [(8, 4, 96), (4, 4, 40), (4, 4, 17)]}


def _prune(model, gqa, materialize, method="slimgpt"):
    """Prune every block to TARGETS with the same calibration; cut (materialize) or only zero (mask)."""
    layers = decoder_layers(model)
    inputs = catch_block_inputs(model, torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0)))
    structures = capture_structures(layers, inputs)
    for block, s, (q, kv, f) in zip(layers, structures, TARGETS[gqa]):
        with collect_hessians(block, [s.attention.o, s.mlp.down]) as acc:
            run_block(block, inputs, 4, "cpu")
        heads = PruneHeads(method, gqa)(block, s, num_heads=q, num_kv_heads=kv, hessian=acc[s.attention.o].H)
        ch = PruneChannels(method)(block, s, width=f, hessian=acc[s.mlp.down].H)
        if materialize:
            MaterializeHeads()(block, s, result=heads)
            MaterializeChannels()(block, s, result=ch)
        else:
            apply_masked_heads(block, s, heads)
            apply_masked_channels(block, s, ch)
        inputs.hidden = run_block(block, inputs, 4, "cpu")
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("gqa", ["groups", "query"])
def test_materialized_equals_masked(family, gqa):
    dense = tiny_model(family)
    masked = _prune(copy.deepcopy(dense), gqa, materialize=False)
    cut = _prune(copy.deepcopy(dense), gqa, materialize=True)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, d = masked(ids).logits, cut(ids).logits, dense(ids).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, d, atol=1e-3)  # pruning really changed the model
    layer = decoder_layers(cut)[2]
    assert layer.self_attn.q_proj.out_features == TARGETS[gqa][2][0] * 8
    assert layer.mlp.down_proj.in_features == 17


def test_slim_model_class_holds_the_cut_tensors():
    dense = tiny_model("llama", tie_word_embeddings=True)
    cut = _prune(copy.deepcopy(dense), "groups", materialize=True)
    plan = PruningPlan(0.3, "log", "groups", 1, 1, [LayerPlan(q, kv, f) for q, kv, f in TARGETS["groups"]], 1, 1)
    slim = build_slim_model(cut, "llama", plan, torch.float32)
    assert type(slim).__name__ == "SlimcLlamaForCausalLM"
    assert slim.config.layer_num_attention_heads == [8, 4, 2]
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(slim(ids).logits, cut(ids).logits)
    assert slim.lm_head.weight.data_ptr() == slim.model.embed_tokens.weight.data_ptr()
    n_cut = sum(p.numel() for p in cut.parameters())
    assert sum(p.numel() for p in slim.parameters()) == n_cut < sum(p.numel() for p in dense.parameters())


def test_prune_heads_refuses_uneven_gqa():
    model = tiny_model("llama")
    layers = decoder_layers(model)
    inputs = catch_block_inputs(model, torch.randint(0, 128, (2, 8)))
    s = capture_structures(layers, inputs)[0]
    with pytest.raises(PassConditionError, match="query heads over"):
        PruneHeads("magnitude", "query")(layers[0], s, num_heads=6, num_kv_heads=4)


def test_magnitude_prunes_lowest_norm_heads():
    model = tiny_model("llama")
    block = decoder_layers(model)[0]
    with torch.no_grad():  # make KV group 2 (query heads 4, 5) tiny
        block.self_attn.q_proj.weight[32:48] *= 1e-3
        block.self_attn.o_proj.weight[:, 32:48] *= 1e-3
        block.self_attn.k_proj.weight[16:24] *= 1e-3
        block.self_attn.v_proj.weight[16:24] *= 1e-3
    inputs = catch_block_inputs(model, torch.randint(0, 128, (2, 8)))
    s = capture_structures(decoder_layers(model), inputs)[0]
    r = PruneHeads("magnitude", "groups")(block, s, num_heads=6, num_kv_heads=3)
    assert r.kept_kv_heads.tolist() == [0, 1, 3]
    assert r.kept_heads.tolist() == [0, 1, 2, 3, 6, 7]
