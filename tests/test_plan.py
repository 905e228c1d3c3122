"""Incremental Pruning Ratio schedule and the per-layer width solve."""
import json
import math

import pytest

from slimc.errors import SlimcError
from slimc.plan import BlockShape, PruningPlan, layer_widths, schedule_ratios, solve_plan

# SmolLM2-135M block: hidden 576, 9 q / 3 KV heads of 64, FFN 1536, no biases
SMOL = BlockShape(num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                  q_head_params=2 * 576 * 64, kv_head_params=2 * 576 * 64, channel_params=3 * 576)
TINY = BlockShape(8, 4, 8, 96, 2 * 64 * 8, 2 * 64 * 8, 3 * 64)


def test_log_schedule_shape():
    r = schedule_ratios("log", 30, 0.1)
    assert r[0] == pytest.approx(0.1) and r[-1] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(r, r[1:]))
    assert r[14] == pytest.approx(0.1 * (1 + 3 * math.log(15) / math.log(30)))
    assert schedule_ratios("uniform", 5, 0.2) == [0.2] * 5
    lin = schedule_ratios("linear", 5, 0.1)
    assert lin[2] == pytest.approx(0.25)


@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.3, 0.5])
@pytest.mark.parametrize("schedule", ["log", "linear", "uniform"])
@pytest.mark.parametrize("gqa", ["groups", "query"])
@pytest.mark.parametrize("rounding", ["floor", "nearest"])
def test_solved_plan_hits_target_within_one_point(sparsity, schedule, gqa, rounding):
    plan = solve_plan([SMOL] * 30, sparsity, schedule, gqa, head_rounding=rounding)
    assert abs(plan.achieved_sparsity - sparsity) <= 0.01
    for layer in plan.layers:
        assert layer.num_attention_heads % layer.num_key_value_heads == 0
        assert layer.num_key_value_heads >= 1 and layer.intermediate_size >= 1
    if schedule == "log":  # deep layers lose more than early ones
        assert plan.layers[-1].ratio > plan.layers[0].ratio


def test_gqa_units():
    groups = layer_widths(SMOL, 0.4, "groups", 1, 1)
    assert (groups.num_attention_heads, groups.num_key_value_heads) == (6, 2)
    query = layer_widths(SMOL, 0.4, "query", 1, 1)
    assert (query.num_attention_heads, query.num_key_value_heads) == (6, 3)


def test_head_rounding():
    # a 0.25 target is 0.75 of a head unit: nearest removes one unit, floor none (the FFN takes it all)
    nearest = layer_widths(SMOL, 0.25, "query", 1, 1, "nearest")
    floor = layer_widths(SMOL, 0.25, "query", 1, 1, "floor")
    assert nearest.num_attention_heads == 6 and floor.num_attention_heads == 9
    assert floor.intermediate_size < nearest.intermediate_size
    assert abs(floor.ratio - 0.25) < 0.01 and abs(nearest.ratio - 0.25) < 0.01


def test_ffn_alignment():
    plan = solve_plan([SMOL] * 30, 0.3, align_ffn=64)
    assert all(layer.intermediate_size % 64 == 0 for layer in plan.layers)
    assert abs(plan.achieved_sparsity - 0.3) <= 0.01


def test_tensor_parallel_divisibility():
    plan = solve_plan([TINY] * 4, 0.3, tp=2)
    for layer in plan.layers:
        assert layer.num_attention_heads % 2 == 0 and layer.intermediate_size % 2 == 0
        kv = layer.num_key_value_heads
        assert kv % 2 == 0 or 2 % kv == 0


def test_tensor_parallel_impossible_is_refused():
    with pytest.raises(SlimcError, match="tensor parallel 4"):
        solve_plan([SMOL] * 4, 0.2, gqa="groups", tp=4)  # 9, 6 or 3 query heads never split over 4 GPUs
    plan = solve_plan([SMOL] * 4, 0.2, gqa="groups", tp=2)  # but 6 query / 2 KV heads do split over 2
    assert {(l.num_attention_heads, l.num_key_value_heads) for l in plan.layers} == {(6, 2)}


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.95, 1.0])
def test_out_of_range_sparsity_refused(bad):
    with pytest.raises(SlimcError, match="sparsity"):
        solve_plan([SMOL] * 30, bad)


def test_unreachable_sparsity_refused():
    # one layer, FFN aligned to its whole width: only attention can go, far short of 90 %
    with pytest.raises(SlimcError, match="cannot be met"):
        solve_plan([SMOL], 0.9, align_ffn=1536)


def test_plan_round_trips_json(tmp_path):
    plan = solve_plan([SMOL] * 30, 0.2)
    plan.source_model, plan.calibration = "smollm2-135m", {"source": "brown", "samples": 4}
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    again = PruningPlan.load(path)
    assert again == plan
    assert json.loads(path.read_text())["achieved_sparsity"] == pytest.approx(plan.achieved_sparsity)


def test_not_a_plan_refused(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(SlimcError, match="not a slimc plan"):
        PruningPlan.load(tmp_path / "x.json")
    with pytest.raises(SlimcError, match="not found"):
        PruningPlan.load(tmp_path / "missing.json")
