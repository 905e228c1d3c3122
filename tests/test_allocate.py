"""Measured per-layer allocation: the hull, the budget split against brute force, the curves against the OBS
greedy they come from, and `--schedule measured` end to end on a tiny model."""
import itertools
import random

import pytest
import torch

from slimc import obs
from slimc.allocate import CostCurve, allocate, curve_error, lower_hull
from slimc.calibrate import BlockInputs, catch_block_inputs, decoder_layers
from slimc.plan import BlockShape, solve_measured_plan
from slimc.sensitivity import LayerCurves, channel_curve, head_curve, measure_curves, stream_fisher

from conftest import tiny_model


def _convex_curve(rng, n, unit_params):
    steps = sorted(rng.uniform(0.1, 5.0) for _ in range(n))  # increasing marginal errors: convex
    errors = [0.0]
    for s in steps:
        errors.append(errors[-1] + s * unit_params)
    return CostCurve(list(range(n + 1)), errors, unit_params)


def _brute_force(curves, feasible):
    best = None
    for ks in itertools.product(*(c.counts for c in curves)):
        removed = sum(k * c.unit_params for k, c in zip(ks, curves))
        if feasible(removed):
            err = sum(curve_error(c, k) for k, c in zip(ks, curves))
            best = err if best is None else min(best, err)
    return best


def test_lower_hull_drops_points_above_the_chord():
    # 1 is dearer than 2 itself; 2 (4.0) lies above the chord 0 -> 3 (3.33 at 2); 3 lies below the chord 0 -> 4
    assert lower_hull([0, 1, 2, 3, 4], [0.0, 5.0, 4.0, 5.0, 8.0]) == [0, 3, 4]
    assert lower_hull([0, 1, 2, 3], [0.0, 1.0, 3.0, 6.0]) == [0, 1, 2, 3]  # convex: every point stays
    assert lower_hull([0, 1, 2], [0.0, 1.0, 2.0]) == [0, 2]  # collinear: the middle point adds nothing


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_for_equal_units(seed):
    """Convex curves, every unit the same size: the greedy split is the brute-force optimum at every budget."""
    rng = random.Random(seed)
    curves = [_convex_curve(rng, rng.randint(2, 4), 3) for _ in range(4)]
    total = sum(c.counts[-1] * 3 for c in curves)
    for budget in range(0, total + 1, 3):
        got = allocate(curves, budget)
        assert sum(k * 3 for k in got) == budget
        err = sum(curve_error(c, k) for c, k in zip(curves, got))
        assert err == pytest.approx(_brute_force(curves, lambda r: r == budget), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_of_mixed_units_beats_every_split_that_removes_as_much(seed):
    """Units of different sizes (heads against channels): whatever the greedy removes, no split that removes at
    least as many parameters has less error when it took whole hull segments cheapest first (the Lagrangian
    optimum), and it never stops while some curve could still take one more step."""
    rng = random.Random(100 + seed)
    curves = [_convex_curve(rng, rng.randint(1, 3), rng.choice([1, 2, 5])) for _ in range(4)]
    total = sum(c.counts[-1] * c.unit_params for c in curves)
    prefixes = 0
    for budget in range(0, total + 1):
        got = allocate(curves, budget)
        removed = sum(k * c.unit_params for k, c in zip(got, curves))
        assert removed <= budget
        for k, c in zip(got, curves):  # maximal: the next allowed count of every curve would overshoot
            nxt = [n for n in c.counts if n > k]
            assert not nxt or removed + (nxt[0] - k) * c.unit_params > budget
        err = sum(curve_error(c, k) for c, k in zip(curves, got))
        if _is_prefix(curves, got):
            prefixes += 1
            assert err <= _brute_force(curves, lambda r: r >= removed) + 1e-9
    assert prefixes >= 3


def _is_prefix(curves, got):
    """Every segment taken is no dearer per parameter than every segment left (unit steps: convex curves)."""
    taken, left = [], []
    for c, k in zip(curves, got):
        for i in range(1, len(c.counts)):
            (taken if c.counts[i] <= k else left).append((c.errors[i] - c.errors[i - 1]) / c.unit_params)
    return not taken or not left or max(taken) <= min(left)


def test_nonconvex_curve_reaches_its_cheap_tail():
    """A unit that is dear alone but makes the next ones cheap: the hull sees the pair, a plain greedy would not."""
    dear_first = CostCurve([0, 1, 2, 3], [0.0, 10.0, 10.5, 11.0], 1)
    steady = CostCurve([0, 1, 2, 3], [0.0, 4.0, 8.0, 12.0], 1)
    got = allocate([dear_first, steady], 3)
    assert got == [3, 0]  # 11.0 for three units, against 12.0 from the steady curve


def test_allowed_counts_are_respected():
    every_other = CostCurve([0, 2, 4], [0.0, 1.0, 2.0], 1)  # e.g. widths that must stay multiples of 2
    assert allocate([every_other], 3) == [2]


def _shape(**kw):
    base = dict(num_heads=8, num_kv_heads=4, head_dim=8, intermediate_size=96, q_head_params=8 * 64 * 2,
                kv_head_params=8 * 64 * 2, channel_params=3 * 64, hidden_size=64)
    return BlockShape(**{**base, **kw})


def test_measured_plan_hits_the_budget_and_spares_the_expensive_layer():
    shape = _shape()
    unit = 4 * shape.q_head_params  # one query head from each of the 4 KV groups
    cheap = LayerCurves(CostCurve([0, 1], [0.0, 1e-3], unit),
                        CostCurve(list(range(0, 89, 8)), [1e-4 * k for k in range(0, 89, 8)], shape.channel_params))
    dear = LayerCurves(CostCurve([0, 1], [0.0, 10.0], unit),
                       CostCurve(list(range(0, 89, 8)), [1.0 * k for k in range(0, 89, 8)], shape.channel_params))
    plan = solve_measured_plan([shape, shape], [cheap, dear], 0.3, gqa="query", align_ffn=8)
    assert abs(plan.achieved_sparsity - 0.3) <= 0.01
    assert plan.schedule == "measured"
    assert plan.layers[1].params == plan.layers[1].dense_params  # all of the budget from the cheap layer
    assert plan.layers[0].num_attention_heads == 4 and plan.layers[0].intermediate_size % 8 == 0
    with pytest.raises(Exception, match="cannot be met"):
        solve_measured_plan([shape, shape], [cheap, dear], 0.9, gqa="query", align_ffn=8)


def _block_stats(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 64, generator=g)
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    return W, 2 / X.shape[0] * X.T @ X


@pytest.mark.parametrize("gqa,sequential", [("query", False), ("query", True), ("groups", False)])
def test_head_curve_follows_the_pruning_greedy(gqa, sequential):
    """The curve's error at u units is what pruning exactly u units along the same greedy costs."""
    W, H = _block_stats()
    shape = _shape()
    curve = head_curve(W, H, shape, gqa, tp=1, sequential=sequential, percdamp=0.01)
    head_cols = torch.arange(64).view(8, 8)
    for u, err in zip(curve.counts, curve.errors):
        if u == 0:
            assert err == 0.0
            continue
        if gqa == "groups":
            res = obs.prune_units_greedy(W, H, head_cols.view(4, 16), u)
        else:
            res = obs.prune_units_greedy(W, H, head_cols, 4 * u, partition=torch.arange(8) // 2, sequential=sequential)
        assert err == pytest.approx(res.error, rel=1e-9)
    assert curve.counts == ([0, 1] if gqa == "query" else [0, 1, 2, 3])


def test_head_curve_leaves_out_counts_tensor_parallelism_cannot_split():
    W, H = _block_stats()
    curve = head_curve(W, H, _shape(), "groups", tp=2, sequential=False, percdamp=0.01)
    assert curve.counts == [0, 2, 3]  # 3 KV heads cannot be split over 2 GPUs; 1 is replicated


def test_channel_curve_counts_and_growth():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 96, generator=g)
    X = torch.randn(600, 96, generator=g)
    curve = channel_curve(W, 2 / 600 * X.T @ X, _shape(), step=8, percdamp=0.01)
    assert all((96 - k) % 8 == 0 for k in curve.counts) and curve.counts[-1] == 88
    assert all(b >= a for a, b in zip(curve.errors, curve.errors[1:]))
    # the first group of the greedy removes the cheapest columns: below the mean cost of all of them
    assert curve.errors[1] / 8 < curve.errors[-1] / 88


def _tiny_setup():
    from slimc.capture import block_shape, capture_structures

    model = tiny_model("llama")
    samples = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = catch_block_inputs(model, samples)
    layers = decoder_layers(model)
    structures = capture_structures(layers, inputs)
    shapes = [block_shape(b, s) for b, s in zip(layers, structures)]
    return model, samples, inputs, layers, structures, shapes


def test_stream_fisher_is_the_mean_squared_loss_gradient_at_each_output():
    model, samples, _, layers, structures, _ = _tiny_setup()
    fisher = stream_fisher(model, layers, structures, samples, "cpu")
    assert all(p.requires_grad for p in model.parameters())  # left as found
    # the same gradients by retain_grad on the outputs, one window at a time
    outs, expected = {}, [[0, 0] for _ in layers]

    def keeper(key):
        def hook(module, args, output):  # returns None: the output itself is left alone
            output.retain_grad()
            outs[key] = output
        return hook

    hooks = [layers[i].get_submodule(p).register_forward_hook(keeper((i, j)))
             for i, s in enumerate(structures) for j, p in enumerate((s.attention.o, s.mlp.down))]
    for r in range(samples.shape[0]):
        ids = samples[r : r + 1]
        logits = model(ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="sum").backward()
        for (i, j), o in outs.items():
            expected[i][j] = expected[i][j] + o.grad.double().pow(2).reshape(-1, o.shape[-1]).sum(0)
    for h in hooks:
        h.remove()
    for i in range(len(layers)):
        for j in range(2):
            torch.testing.assert_close(fisher[i][j], expected[i][j] / samples.numel())
            assert fisher[i][j].min() >= 0 and fisher[i][j].sum() > 0


def test_measure_curves_on_a_tiny_model_leaves_the_stream_alone():
    model, samples, inputs, layers, structures, shapes = _tiny_setup()
    before = inputs.hidden.clone()
    fisher = stream_fisher(model, layers, structures, samples, "cpu")
    curves = measure_curves(layers, structures, shapes, inputs, fisher, "query", 8, 1, False, 0.01, 2, "cpu")
    assert torch.equal(inputs.hidden, before)
    assert len(curves) == 3
    assert all(c.heads.counts == [0, 1] and c.channels.counts[-1] == 88 for c in curves)
    plan = solve_measured_plan(shapes, curves, 0.3, "query", 8)
    assert abs(plan.achieved_sparsity - 0.3) <= 0.01
