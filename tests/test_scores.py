"""Wanda-sp and FLAP: scores, bias compensation and the global allocation against direct computations on
random matrices; the orderings the papers argue for; compiled end to end on a tiny model."""
import itertools
import json

import pytest
import torch

import slimc
from slimc import scores

from conftest import reload_without_slimc, save_tiny_dir

TEXT = " ".join(f"word{i % 97} and thing{i % 13}." for i in range(3000))


def _inputs(n=200, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d) + torch.linspace(-1, 1, d)


def test_input_moments_equal_direct_statistics():
    lin = torch.nn.Linear(12, 5)
    X = _inputs()
    acc = scores.InputMoments(lin)
    for chunk in X.split(37):  # several batches, uneven
        lin(chunk.view(1, -1, 12))
    acc.handle.remove()
    Xd = X.double()
    torch.testing.assert_close(acc.mean, Xd.mean(0))
    torch.testing.assert_close(acc.variance, Xd.var(0, unbiased=True))
    torch.testing.assert_close(acc.norm, Xd.norm(dim=0))


def test_wanda_and_fluctuation_scores_equal_their_definitions():
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(5, 12, generator=g), _inputs()
    norm, var = X.double().norm(dim=0), X.double().var(0)
    wanda = scores.wanda_column_scores(W, norm)
    fluct = scores.fluctuation_scores(W, var)
    for j in range(12):
        assert wanda[j].item() == pytest.approx(sum(abs(W[i, j].item()) * norm[j].item() for i in range(5)) / 5)
        assert fluct[j].item() == pytest.approx(var[j].item() * sum(W[i, j].item() ** 2 for i in range(5)))
    units = torch.arange(12).view(3, 4)
    torch.testing.assert_close(scores.unit_scores(wanda, units), wanda.view(3, 4).sum(1))
    torch.testing.assert_close(scores.unit_scores(wanda, units, "mean"), wanda.view(3, 4).mean(1))


def test_wanda_keeps_a_small_weight_on_a_large_input_over_a_large_weight_on_a_small_one():
    """Wanda's argument against magnitude pruning: the input scale matters."""
    W = torch.tensor([[0.1, 1.0], [0.1, 1.0]])
    norm = torch.tensor([100.0, 1.0])
    s = scores.wanda_column_scores(W, norm)
    assert scores.lowest_units(s, 1).tolist() == [0]  # magnitude alone would keep column 1


def test_flap_removes_a_constant_feature_first_and_its_bias_makes_that_exact():
    """FLAP's argument: a feature that does not fluctuate carries no information beyond its mean."""
    X = _inputs(d=6)
    X[:, 2] = 1.7  # constant over every token
    g = torch.Generator().manual_seed(2)
    W = torch.randn(4, 6, generator=g) * 5  # large weights: magnitude or Wanda would keep column 2
    s = scores.fluctuation_scores(W, X.double().var(0))
    assert s[2] == 0 and s.argmin() == 2
    removed = torch.tensor([2])
    b = scores.baseline_bias(W, X.double().mean(0), removed)
    keep = torch.tensor([0, 1, 3, 4, 5])
    torch.testing.assert_close(X[:, keep] @ W[:, keep].T + b, X @ W.T, rtol=1e-5, atol=1e-5)


def test_baseline_bias_keeps_the_mean_output():
    X, g = _inputs(), torch.Generator().manual_seed(3)
    W = torch.randn(5, 12, generator=g)
    removed = torch.tensor([1, 4, 7, 11])
    keep = torch.tensor([j for j in range(12) if j not in removed.tolist()])
    b = scores.baseline_bias(W, X.double().mean(0), removed)
    pruned = X[:, keep] @ W[:, keep].T + b
    torch.testing.assert_close(pruned.mean(0), (X @ W.T).mean(0), rtol=1e-4, atol=1e-4)
    assert scores.baseline_bias(W, X.mean(0), torch.tensor([], dtype=torch.long)).abs().sum() == 0


def test_lowest_units_per_partition():
    s = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0])
    assert scores.lowest_units(s, 2).tolist() == [0, 2, 4, 5]
    part = torch.tensor([0, 0, 0, 1, 1, 1])
    assert scores.lowest_units(s, 2, part).tolist() == [0, 2, 4, 5]  # 1 from each part: 1 and 3
    assert scores.lowest_units(s, 4, part).tolist() == [0, 4]
    with pytest.raises(ValueError):
        scores.lowest_units(s, 3, part)


def test_head_steps_are_non_decreasing():
    g = torch.Generator().manual_seed(4)
    head = torch.randn(9, generator=g)
    steps = scores.flap_head_steps(head, torch.arange(9) // 3)
    assert len(steps) == 3 and bool((steps[1:] >= steps[:-1]).all())
    assert steps[0].item() == pytest.approx(torch.stack([head[p * 3:(p + 1) * 3].min() for p in range(3)]).mean().item())


def test_flap_allocation_against_brute_force():
    """Tiny instance: every prefix combination of (head steps, channels) per layer; the greedy allocation
    removes the lowest standardized scores first, so no other choice removing as much removes lower scores."""
    g = torch.Generator().manual_seed(5)
    layers = [scores.LayerCandidates(torch.randn(3, generator=g).sort().values, 7, torch.randn(5, generator=g), 2)
              for _ in range(2)]
    budget = 15
    got = scores.flap_allocate(layers, budget, min_head_steps_kept=1, min_channels_kept=1)

    def cost(choice):  # (removed params, summed score of what goes)
        params = score = 0.0
        for layer, (h, c) in zip(layers, choice):
            params += h * layer.head_step_params + c * layer.channel_params
            score += float(layer.head_steps.sort().values[:h].sum() + layer.channel_scores.sort().values[:c].sum())
        return params, score

    removed, _ = cost(got)
    assert abs(removed - budget) <= 2  # within one channel of the budget
    # every unit that went scores no higher than every unit of the same kind that stayed (global ranking)
    gone, kept = [], []
    for layer, (h, c) in zip(layers, got):
        hs, cs = layer.head_steps.sort().values, layer.channel_scores.sort().values
        gone += hs[:h].tolist() + cs[:c].tolist()
        kept += cs[c:-1].tolist()  # channels that could still go (one must stay)
    assert max(gone) <= min(kept) + 1e-12 or not kept
    # brute force: among choices removing at least as many parameters, none removes a lower score total
    options = [[(h, c) for h in range(3) for c in range(5)] for _ in layers]
    for choice in itertools.product(*options):
        p, s = cost(choice)
        if removed <= p <= budget + 2:
            assert s >= cost(got)[1] - 1e-9 or p > removed


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = save_tiny_dir(tmp_path_factory.mktemp("tiny"), "llama", tie_word_embeddings=True, vocab_size=300)
    (d.parent / "calib.txt").write_text(TEXT)
    return d


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_compile_reload_without_slimc(tiny_dir, tmp_path, method):
    out = tmp_path / method
    res = slimc.compile(str(tiny_dir), str(out), sparsity=0.3, method=method, calib=str(tiny_dir.parent / "calib.txt"),
                        calib_samples=8, seq_len=32, keep_model=True, align_ffn=1)
    plan = json.loads((out / "slimc_plan.json").read_text())
    assert abs(plan["achieved_sparsity"] - 0.3) <= 0.01 and plan["method"] == method
    blocks = sum(p.numel() for n, p in res.model.named_parameters() if ".layers." in n and "layernorm" not in n)
    assert blocks == plan["block_params_pruned"]
    ids = torch.randint(0, 140, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = res.model(ids).logits
    logits, _, _ = reload_without_slimc(out, ids, tmp_path)
    torch.testing.assert_close(logits, expected)
    cfg = json.loads((out / "config.json").read_text())
    biases = [n for n, _ in res.model.named_parameters() if n.endswith(("o_proj.bias", "down_proj.bias"))]
    if method == "flap":
        assert cfg["layer_output_bias"] == [1, 1, 1] and len(biases) == 6
        assert plan["schedule"] == "flap-adaptive"
        assert any(p.abs().sum() > 0 for n, p in res.model.named_parameters() if n.endswith("down_proj.bias"))
    else:
        assert cfg["layer_output_bias"] == [0, 0, 0] and not biases


def test_flap_bias_lowers_the_block_error(tiny_dir, tmp_path):
    """The same FLAP widths and units with and without the compensation bias: the bias must help."""
    from slimc.calibrate import decoder_layers

    kw = dict(sparsity=0.4, method="flap", calib=str(tiny_dir.parent / "calib.txt"), calib_samples=8, seq_len=32,
              keep_model=True, align_ffn=1)
    res = slimc.compile(str(tiny_dir), str(tmp_path / "f"), **kw)
    errors = [r["rel_error"] for r in res.report["layers"]]
    for layer in decoder_layers(res.model):
        layer.self_attn.o_proj.bias.data.zero_()
        layer.mlp.down_proj.bias.data.zero_()
    dense, tok = (lambda m: (m.model, m.tokenizer))(slimc.load.load_model(str(tiny_dir)))
    # text of the calibration kind (the bias is the removed features' mean on such text), not in the windows used
    ids = tok(TEXT[-2000:], return_tensors="pt").input_ids[:, : 4 * 32].reshape(4, 32)
    with torch.no_grad():
        ref = dense(ids).logits
        no_bias = (res.model(ids).logits - ref).pow(2).mean()
    res2 = slimc.compile(str(tiny_dir), str(tmp_path / "f2"), **kw)
    with torch.no_grad():
        with_bias = (res2.model(ids).logits - ref).pow(2).mean()
    assert all(e >= 0 for e in errors)
    assert with_bias < no_bias


def test_flap_plan_only_is_refused_in_one_line(tiny_dir, tmp_path, capsys):
    from slimc.cli import main

    assert main(["compile", str(tiny_dir), "-o", str(tmp_path / "o"), "--method", "flap", "--plan-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plan-only: --method flap" in err[0] and not (tmp_path / "o").exists()


def test_flap_reuses_a_plan_with_its_biases(tiny_dir, tmp_path):
    """A slimgpt plan reused by flap: the widths are the plan's, the biases FLAP's (and counted)."""
    kw = dict(calib=str(tiny_dir.parent / "calib.txt"), calib_samples=8, seq_len=32, align_ffn=1)
    slimc.compile(str(tiny_dir), str(tmp_path / "p"), 0.3, plan_only=True, **kw)
    res = slimc.compile(str(tiny_dir), str(tmp_path / "o"), 0.3, method="flap", plan=str(tmp_path / "p" / "slimc_plan.json"),
                        keep_model=True, **kw)
    src = json.loads((tmp_path / "p" / "slimc_plan.json").read_text())
    got = json.loads((tmp_path / "o" / "slimc_plan.json").read_text())
    assert [l["intermediate_size"] for l in got["layers"]] == [l["intermediate_size"] for l in src["layers"]]
    assert all(l["output_bias"] for l in got["layers"])
    blocks = sum(p.numel() for n, p in res.model.named_parameters() if ".layers." in n and "layernorm" not in n)
    assert blocks == got["block_params_pruned"] == src["block_params_pruned"] + 3 * 2 * 64
