"""DISP-LLM: the math against brute force, the decoder layer against the masked dense block, the checkpoint
format (old and new) and the command line's refusals. Tiny random models: no quality claims here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimc
from slimc import disp, obs
from slimc.capture import capture_block
from slimc.calibrate import decoder_layers
from slimc.errors import SlimcError
from slimc.layout import INDEX_SETS, index_buffer, layer_layouts
from slimc.passes import MaterializeDims, PruneReadDims, PruneWriteDims, apply_dims
from slimc.plan import BlockShape, LayerPlan, PruningPlan

from conftest import reload_without_slimc, save_tiny_dir, tiny_model

FIXTURES = Path(__file__).with_name("fixtures")
TEXT = " ".join(f"word{i % 97} and thing{i % 13}." for i in range(3000))


def _hessian(n, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, n, dtype=torch.float64)
    return X, 2 / tokens * X.T @ X


def test_obs_column_update_equals_least_squares_optimum():
    """Removing input columns P with the OBS update gives the weights on the kept columns K that minimise
    ||X W^T - X_K W_K'^T||: W_K' = W H[:, K] H[K, K]^-1."""
    X, H = _hessian(12)
    W = torch.randn(5, 12, dtype=torch.float64)
    cols = torch.tensor([1, 4, 7, 10])
    kept = torch.tensor([c for c in range(12) if c not in cols.tolist()])
    updated, _ = obs.obs_remove(W, torch.linalg.inv(H), cols)
    lstsq = torch.linalg.lstsq(X[:, kept], X @ W.T).solution.T
    assert torch.allclose(updated[:, kept], lstsq, atol=1e-9)
    assert updated[:, cols].abs().max() == 0


def test_read_dims_pass_keeps_the_cheapest_and_compensates():
    """PruneReadDims on stacked readers: error no worse than any random choice of the same size, and the
    compensated weights beat plain zeroing on the calibration inputs."""
    model = tiny_model("llama")
    block = decoder_layers(model)[0]
    X, H = _hessian(64, seed=3)
    X, H = X.float(), H
    paths = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    W = torch.cat([block.get_submodule(p).weight.data for p in paths])
    r = PruneReadDims()(block, None, paths=paths, keep=40, hessian=H)
    Wn = torch.cat([r.weights[p] for p in paths])
    removed = torch.tensor([c for c in range(64) if c not in r.kept.tolist()])
    assert Wn[:, removed].abs().max() == 0
    err = ((X @ (W - Wn).T).pow(2)).sum()
    zeroed = W.clone()
    zeroed[:, removed] = 0
    assert err < ((X @ (W - zeroed).T).pow(2)).sum()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # a random selection, even compensated, is worse
        perm = torch.randperm(64, generator=g)
        res = obs.obs_remove(W.double(), torch.linalg.inv(H), perm[:24])[0]
        assert err <= ((X.double() @ (W.double() - res).T).pow(2)).sum() * 1.0001


def test_write_dims_pass_drops_the_rows_that_write_least():
    model = tiny_model("qwen2")
    block = decoder_layers(model)[0]
    X, H = _hessian(block.self_attn.o_proj.in_features, seed=1)
    r = PruneWriteDims()(block, None, path="self_attn.o_proj", keep=50, hessian=H)
    energy = (X.float() @ block.self_attn.o_proj.weight.data.T).pow(2).sum(0)
    assert set(r.kept.tolist()) == set(energy.argsort(descending=True)[:50].tolist())
    w = r.weights["self_attn.o_proj"]
    removed = [i for i in range(64) if i not in r.kept.tolist()]
    assert w[removed].abs().max() == 0 and torch.equal(w[r.kept], block.self_attn.o_proj.weight.data[r.kept])


def test_disp_params_match_dense_count_and_real_tensors():
    s = BlockShape(8, 4, 8, 96, 0, 0, 0, hidden_size=64, qkv_bias=True)
    full = s.disp_params(8, 4, 96, 64, 64, 64, 64)
    by_hand = (8 + 8) * 8 * (64 + 1) + 64 * 64 + 3 * 64 * 96
    assert full == by_hand
    # one dim fewer everywhere removes exactly the columns / rows that hidden dim owns
    assert full - s.disp_params(8, 4, 96, 63, 63, 63, 63) == (8 + 8) * 8 + 64 + 2 * 96 + 96


def _shape():
    return BlockShape(8, 4, 8, 96, 8 * 64 + 8 * 64, 2 * 8 * 64, 3 * 64, hidden_size=64)


def test_allocate_takes_the_cheapest_error_per_parameter_first():
    s = _shape()
    dense = disp.dense_counts(s).params(s)
    curves = {"attn_in": torch.full((64,), 100.0), "attn_out": torch.full((64,), 100.0),
              "mlp_in": torch.full((64,), 100.0), "mlp_out": torch.zeros(64)}
    c = disp.allocate(s, curves, 0.05 * dense)
    assert (c.attn_in, c.attn_out, c.mlp_in) == (64, 64, 64) and c.mlp_out < 64  # only the free site moved
    # more than the free site can give: it is used down to its minimum, then the next cheapest per parameter
    c = disp.allocate(s, curves, 0.4 * dense)
    assert c.mlp_out == disp.MIN_DIMS
    assert abs((dense - c.params(s)) - 0.4 * dense) <= 2 * 96 * 2  # within one unit of the target


def test_allocate_refuses_what_the_dims_cannot_give():
    s = _shape()
    dense = disp.dense_counts(s).params(s)
    with pytest.raises(SlimcError, match="more hidden dims than the block has"):
        disp.allocate(s, {"attn_out": torch.zeros(64)}, 0.5 * dense)


def test_solve_disp_plan_hits_the_requested_sparsity_or_refuses():
    shapes = [_shape()] * 4
    plan = disp.solve_disp_plan(shapes, 0.4, "log", "disp")
    removed = sum(layer.target_ratio * layer.dense_params for layer in plan.layers) / plan.block_params_dense
    assert abs(removed - 0.4) < 1e-6
    ratios = [layer.target_ratio for layer in plan.layers]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]  # the incremental shape
    with pytest.raises(SlimcError, match="more hidden dims"):
        disp.solve_disp_plan(shapes, 0.9, "uniform", "disp")


def _masked_and_materialized(family):
    """Mask some hidden dims of every block of a tiny model (compensated reads, zeroed write rows), then cut them
    out and build slimc's model: both must compute the same logits."""
    from slimc.materialize import build_slim_model

    model = tiny_model(family, vocab_size=128).eval()
    layers = decoder_layers(model)
    sample = torch.randn(1, 6, 64)
    pos = torch.arange(6)[None]
    emb = model.model.rotary_emb(sample, pos)
    structures, index_sets = [], []
    g = torch.Generator().manual_seed(0)
    for i, block in enumerate(layers):
        s = capture_block(block, (sample,), {"position_embeddings": emb, "position_ids": pos})
        structures.append(s)
        a, m = s.attention, s.mlp
        sets = {}
        for name, keep in zip(INDEX_SETS, (40 + i, 50, 30, 60 - i)):
            if name.endswith("_in"):
                paths = [a.q, a.k, a.v] if name == "attn_in" else [m.gate, m.up]
                r = PruneReadDims()(block, s, paths=paths, keep=keep, hessian=_hessian(64, seed=i)[1])
            else:
                path = a.o if name == "attn_out" else m.down
                n_in = block.get_submodule(path).in_features
                r = PruneWriteDims()(block, s, path=path, keep=keep, hessian=_hessian(n_in, seed=i)[1])
            apply_dims(block, r)
            sets[name] = r.kept
        index_sets.append(sets)
    ids = torch.randint(0, 128, (2, 9), generator=g)
    with torch.no_grad():
        masked = model(ids).logits
    for block, s, sets in zip(layers, structures, index_sets):
        MaterializeDims()(block, s, index_sets=sets)
    n = model.config.num_attention_heads
    plan = PruningPlan(0.3, "log", "query", 1, 1, [
        LayerPlan(n, model.config.num_key_value_heads, 96, attn_in_dims=len(x["attn_in"]), attn_out_dims=len(x["attn_out"]),
                  mlp_in_dims=len(x["mlp_in"]), mlp_out_dims=len(x["mlp_out"])) for x in index_sets], 1, 1)
    slim = build_slim_model(model, family, plan, torch.float32)
    with torch.no_grad():
        return masked, slim(ids).logits, slim


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_materialized_disp_model_equals_the_masked_dense_model(family):
    masked, cut, slim = _masked_and_materialized(family)
    assert torch.allclose(masked, cut, atol=1e-5), (masked - cut).abs().max()
    layer = slim.model.layers[1]
    assert layer.self_attn.q_proj.in_features == 41 and layer.mlp.down_proj.out_features == 59
    assert layer.attn_in_index.dtype == torch.long and len(layer.mlp_out_index) == 59


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_slim_layers_decode_on_a_kv_cache_without_deprecated_keywords(family):
    """Token-by-token decoding on the cache equals the full forward, and slimc passes transformers the cache
    keyword the installed release takes (5.25 warns about `past_key_values`, 5.40 drops it: a cache slimc
    passed under the old name would then be silently ignored)."""
    import warnings

    from transformers import DynamicCache

    from slimc.compat import with_cache

    _, full_logits, slim = _masked_and_materialized(family)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        full = slim(ids).logits
        steps = [slim(ids[:, :5], **with_cache(slim, cache)).logits]
        steps += [slim(ids[:, t : t + 1], **with_cache(slim, cache)).logits for t in range(5, 9)]
    assert cache.get_seq_length() == 9
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_layer_without_index_sets_is_the_family_layer():
    """slimc's decoder layer with no index sets computes what the stock layer computes, weight for weight."""
    from slimc.modeling_slimc import CLASSES

    stock = tiny_model("qwen3")
    config_cls, lm_cls = CLASSES["qwen3"]
    ours = lm_cls(config_cls(**{k: v for k, v in stock.config.to_dict().items() if k != "model_type"})).eval()
    ours.load_state_dict(stock.state_dict())
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, stock(ids).logits)


def test_checkpoint_of_the_previous_format_loads_with_identical_logits():
    """tests/fixtures/legacy_slimc_qwen2: written by slimc before DISP (model_type slimc_qwen2, no dim lists),
    with the logits it produced then."""
    from slimc.load import load_model

    ref = load_file(str(FIXTURES / "legacy_slimc_qwen2_logits.safetensors"))
    loaded = load_model(str(FIXTURES / "legacy_slimc_qwen2"), allow_slimc=True)
    with torch.no_grad():
        logits = loaded.model(ref["input_ids"]).logits
    # the same weights through the same layers; transformers releases move the family modules' float32
    # rounding (5.25 by 1.8e-7 on these logits of ~0.1), so equal within rounding, not bit for bit
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)
    assert all(not layout.is_disp for layout in layer_layouts(loaded.model.config))


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    d = save_tiny_dir(tmp_path_factory.mktemp("disp") / "src", "qwen2", vocab_size=300)
    (d.parent / "calib.txt").write_text(TEXT)
    return d


def _compile(src, out, **kw):
    opts = dict(calib=str(src.parent / "calib.txt"), calib_samples=8, seq_len=32, keep_model=True, sparsity=0.4)
    opts.update(kw)
    return slimc.compile(str(src), str(out), **opts)


@pytest.mark.parametrize("method,train,channels", [("disp", 0, False), ("slimgpt+disp", 0, False),
                                                   ("disp", 6, False), ("slimgpt+disp", 6, False),
                                                   ("slimgpt+disp", 6, True)])
def test_disp_compile_reloads_without_slimc_and_tokenizer_does_not_ask(method, train, channels, tiny_src, tmp_path):
    out = tmp_path / "out"
    res = _compile(tiny_src, out, method=method, disp_train=train, disp_seq_len=16, disp_train_channels=channels)
    if train:
        report = json.loads((out / "report.json").read_text())
        assert report["disp_train"]["steps"] == train and report["disp_train"]["tokens"] == train * 16
        assert "disp-train: 6 steps" in (out / "README.md").read_text()
        # --disp-train-channels learns the FFN channels too (the paper's intermediate mask)
        assert report["disp_train"]["channels_learned"] == channels
        assert ("FFN-channel choices" in (out / "README.md").read_text()) == channels
    plan = json.loads((out / "slimc_plan.json").read_text())
    if method == "slimgpt+disp":
        assert all(layer["intermediate_size"] % 8 == 0 for layer in plan["layers"])  # --align-ffn 8 (hf)
    assert abs(plan["achieved_sparsity"] - 0.4) <= 0.01 and plan["method"] == method
    assert all(layer["attn_in_dims"] is not None for layer in plan["layers"])
    cfg = json.loads((out / "config.json").read_text())
    assert any(d < 64 for key in ("layer_attn_in_dims", "layer_mlp_out_dims") for d in cfg[key])
    tensors = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in tensors  # stock names, physically narrowed
    for i, n in enumerate(cfg["layer_attn_in_dims"]):
        assert tensors[f"model.layers.{i}.self_attn.q_proj.weight"].shape[1] == n
    ids = torch.randint(0, 140, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = res.model(ids).logits
    logits, words, printed = reload_without_slimc(out, ids, tmp_path)
    assert "custom code" not in printed and "PreTrainedTokenizerFast" not in words
    assert words[:2] == ["Qwen2Tokenizer", "SlimcQwen2ForCausalLM"]
    assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("cut", ["masked", "compensated"])
def test_disp_train_cut_masked_writes_the_model_the_masks_were_trained_on(cut, tiny_src, tmp_path):
    """--method disp changes nothing but the hidden dims, so the model the hypernetwork trained is the source
    behind hard masks. The masked cut writes exactly that model; the compensated cut refits the kept columns
    and does not."""
    from transformers import AutoModelForCausalLM

    from slimc.disp_train import MaskedModel, MaskSites

    res = _compile(tiny_src, tmp_path / "out", method="disp", disp_train=6, disp_seq_len=16, disp_train_cut=cut)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["disp_train"]["cut"] == cut
    assert ("cut as the masks trained them" in (tmp_path / "out" / "README.md").read_text()) == (cut == "masked")
    src = AutoModelForCausalLM.from_pretrained(tiny_src, dtype=torch.float32)
    layers = decoder_layers(src)
    hidden = src.config.hidden_size
    masks = torch.ones(len(layers), len(INDEX_SETS), hidden)
    state = res.model.state_dict()
    for i in range(len(layers)):
        for k, name in enumerate(INDEX_SETS):
            index = state.get(f"model.layers.{i}.{index_buffer(name)}")
            if index is not None:
                masks[i, k] = 0
                masks[i, k, index] = 1
    assert masks.sum() < masks.numel()  # some dims went
    masked = MaskedModel([MaskSites(b.input_layernorm, b.self_attn.o_proj, b.post_attention_layernorm, b.mlp.down_proj)
                          for b in layers])
    masked.masks = masks
    ids = torch.randint(0, 140, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained, written = src(ids).logits, res.model(ids).logits
    masked.remove()
    assert torch.allclose(written, trained, atol=1e-5) == (cut == "masked")


def test_disp_compile_distils_the_slim_model_and_keeps_its_index_sets(tmp_path):
    """--distill-epochs on a DISP model trains the narrowed weights in slimc's own layer (the stock one cannot
    run them), keeps every index set, and casts to the output dtype after."""
    # larger initial weights than tiny_src's: peaked logits, so pruning costs a KL that distillation can win back
    src = save_tiny_dir(tmp_path / "src", "qwen2", vocab_size=300, initializer_range=0.3)
    (tmp_path / "calib.txt").write_text(TEXT)
    plain = _compile(src, tmp_path / "plain", method="slimgpt+disp", dtype="bfloat16", calib_samples=32)
    out = tmp_path / "kd"
    res = _compile(src, out, method="slimgpt+disp", dtype="bfloat16", calib_samples=32, distill_epochs=3, distill_lr=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert report["distill"]["steps"] > 0 and report["distill"]["kept"]
    assert report["distill"]["kl_after"] < report["distill"]["kl_before"]
    assert report["distill"]["kl_after"] == min(report["distill"]["epoch_kls"])
    lever = next(lv for lv in report["levers"] if lv["lever"] == "distill")
    assert f"kept epoch {report['distill']['best_epoch']} " in lever["setting"]
    before, after = plain.model.state_dict(), res.model.state_dict()
    assert before.keys() == after.keys()
    index_names = [k for k in after if k.endswith("_index")]
    assert index_names and all(torch.equal(before[k], after[k]) and after[k].dtype == torch.long for k in index_names)
    moved = [k for k in after if ".layers." in k and after[k].dim() == 2 and not torch.equal(before[k], after[k])]
    assert moved and all(after[k].dtype == torch.bfloat16 for k in moved)
    tensors = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    buffers = lambda m: {k: b.dtype for k, b in m.named_buffers()}  # noqa: E731 -- rotary inv_freq as the direct build's
    assert buffers(res.model) == buffers(plain.model)


def test_disp_plan_is_reused_and_refused_on_another_width(tiny_src, tmp_path):
    first = _compile(tiny_src, tmp_path / "a", method="slimgpt+disp")
    again = _compile(tiny_src, tmp_path / "b", plan=str(tmp_path / "a" / "slimc_plan.json"))
    assert again.report["plan"]["method"] == "slimgpt+disp"
    keys = ("num_attention_heads", "intermediate_size", "attn_in_dims", "attn_out_dims", "mlp_in_dims", "mlp_out_dims")
    for x, y in zip(first.report["plan"]["layers"], again.report["plan"]["layers"]):
        assert [x[k] for k in keys] == [y[k] for k in keys]
    wide = save_tiny_dir(tmp_path / "wide", "qwen2", vocab_size=300, hidden_size=32, head_dim=4)
    (wide.parent / "calib.txt").write_text(TEXT)
    with pytest.raises(SlimcError, match="another width"):
        _compile(wide, tmp_path / "c", plan=str(tmp_path / "a" / "slimc_plan.json"))
    assert not (tmp_path / "c").exists()


def _cli(args):
    proc = subprocess.run([sys.executable, "-m", "slimc.cli", *args], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    return proc.returncode, lines, proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--disp-train", "5"], "needs --method disp or slimgpt+disp"),
    (["--method", "disp", "--disp-train", "5", "--disp-train-channels"], "needs --method slimgpt+disp and --disp-train"),
    (["--method", "slimgpt+disp", "--disp-train-channels"], "needs --method slimgpt+disp and --disp-train"),
    (["--method", "disp", "--disp-train-cut", "masked"], "needs --disp-train STEPS"),
    (["--method", "disp", "--sparsity", "0.9", "--schedule", "uniform"], "more hidden dims"),
    (["--method", "disp", "--plan-only"], "reuse OUT/slimc_plan.json"),
    (["--method", "slimgpt+disp", "--reconstruct"], "not combined"),
])
def test_bad_disp_requests_are_one_line_errors(args, message, tiny_src, tmp_path):
    out = tmp_path / "out"
    rc, lines, err = _cli(["compile", str(tiny_src), "-o", str(out), "--calib", str(tiny_src.parent / "calib.txt"),
                           "--calib-samples", "4", "--seq-len", "32", *args])
    assert rc == 2 and lines[-1].startswith("slimc: error:") and message in lines[-1], err
    assert "Traceback" not in err and not out.exists()


def _mask_training_problem():
    """A tiny 3-block Llama with its block shapes, its dense widths and the sites the masks act on."""
    from slimc.disp_train import MaskSites
    from slimc.capture import block_shape

    model = tiny_model("llama", vocab_size=128)
    layers = decoder_layers(model)
    sample = torch.randn(1, 6, 64)
    pos = torch.arange(6)[None]
    emb = model.model.rotary_emb(sample, pos)
    structures = [capture_block(b, (sample,), {"position_embeddings": emb, "position_ids": pos}) for b in layers]
    shapes = [block_shape(b, s) for b, s in zip(layers, structures)]
    widths = [(8, 4, 96)] * 3
    sites = [MaskSites.of(b, s) for b, s in zip(layers, structures)]
    return model, layers, shapes, widths, sites


def test_disp_train_moves_the_kept_fraction_to_its_target_and_selects_at_the_budget():
    """The hypernetwork, started from "keep everything" (30 % over budget), learns masks whose parameter count
    reaches the target; the final selection sits at the budget exactly (within one hidden dim)."""
    from slimc.disp_train import budget_selection, kept_params, train_masks

    model, layers, shapes, widths, sites = _mask_training_problem()
    init = torch.ones(3, 4, 64, dtype=torch.bool)
    dense = float(kept_params(init.float(), shapes, widths))
    target = 0.7 * dense
    windows = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    before = [p.clone() for p in model.parameters()]
    r = train_masks(model, sites, shapes, widths, init, windows, steps=60, target_params=target, lr=0.1, lam=5.0)
    assert abs(r.kept_fraction_last - 1) < 0.1, r.kept_fraction_last  # started at 1/0.7 = 1.43
    assert r.flipped > 0 and r.tokens == 60 * 16
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights frozen
    assert all(not h for h in (module._forward_hooks for s in sites for module in vars(s).values()))  # hooks gone
    kept = float(kept_params(r.keep.float(), shapes, widths))
    assert target - 2 * 96 * 2 <= kept <= target and r.keep.sum(-1).min() >= 8
    # budget_selection is monotone in the budget
    logits = torch.randn(3, 4, 64)
    (small, _), (large, _) = (budget_selection(logits, shapes, widths, f * dense, 8) for f in (0.5, 0.8))
    assert bool((small <= large).all())


def test_hypernetwork_starts_from_its_seed_whatever_ran_before():
    """The hypernetwork's weights depend on --seed only, and building it leaves the global random state alone."""
    from slimc.disp_train import MaskHypernetwork

    init = torch.rand(3, 4, 16) > 0.5
    torch.manual_seed(1)
    a = MaskHypernetwork(3, 16, init, seed=5)
    after = torch.rand(4)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(4), after)  # the construction drew nothing from the global state
    torch.rand(1000)  # the global state moved, as other compile stages move it
    b, c = MaskHypernetwork(3, 16, init, seed=5), MaskHypernetwork(3, 16, init, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.gru.weight_hh_l0, c.gru.weight_hh_l0)


def test_disp_train_learns_ffn_channels_with_the_dims_and_keeps_widths_aligned():
    """slimgpt+disp's learned masks include the FFN channels (the paper's intermediate mask): started from a
    selection that keeps every channel and dim (over budget), the hypernetwork moves the parameter count to its
    target, channel choices change, and the final selection is at the budget with each block's FFN width a
    multiple of the alignment step."""
    from slimc.disp_train import budget_selection, kept_params, train_masks

    model, layers, shapes, widths, sites = _mask_training_problem()
    init, init_channels = torch.ones(3, 4, 64, dtype=torch.bool), torch.ones(3, 96, dtype=torch.bool)
    dense = float(kept_params(init.float(), shapes, widths, init_channels.float()))
    target = 0.7 * dense
    windows = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    r = train_masks(model, sites, shapes, widths, init, windows, steps=60, target_params=target, lr=0.1, lam=5.0,
                    init_channels=init_channels, channel_step=8)
    assert abs(r.kept_fraction_last - 1) < 0.1, r.kept_fraction_last
    assert r.channels is not None and r.channels_flipped > 0
    assert all(not h for h in (b.mlp.down_proj._forward_pre_hooks for b in layers))  # hooks gone
    counts = r.channels.sum(-1)
    assert bool((counts % 8 == 0).all()) and int(counts.min()) >= 8
    kept = float(kept_params(r.keep.float(), shapes, widths, r.channels.float()))
    assert target - 8 * shapes[0].channel_params <= kept <= target
    # at any budget, every block's width is a multiple of the step
    logits, channel_logits = torch.randn(3, 4, 64), torch.randn(3, 96)
    dims, channels = budget_selection(logits, shapes, widths, 0.6 * dense, 8, channel_logits, 8)
    assert channels.shape == (3, 96) and bool((channels.sum(-1) % 8 == 0).all())
    # the kept channels of a block are its highest logits
    for c, lg in zip(channels, channel_logits):
        assert lg[c].min() >= lg[~c].max()


def test_output_energy_hook_equals_the_hessian_row_energy():
    """What the cheap output hook measures is w_j H w_j^T of the Hessian it replaces."""
    from slimc.calibrate import collect_hessians

    block = decoder_layers(tiny_model("llama"))[0]
    x = torch.randn(5, 7, 64)
    with collect_hessians(block, ["mlp.down_proj"], output_energies=("mlp.down_proj",)) as acc:
        for chunk in x.split(2):
            block.mlp(chunk)
    expected = disp.row_energies(block.mlp.down_proj.weight.data, acc["mlp.down_proj"].H)
    assert torch.allclose(acc["mlp.down_proj", "energy"].energy, expected, rtol=1e-4)


def test_greedy_column_curve_counts_what_compensation_loses():
    """With pairs of correlated inputs, removing one of a pair is nearly free (its twin compensates) but the
    greedy path's curve keeps counting once twins go too: its total exceeds the sum of the same number of
    cheapest independent single-column errors."""
    X, H = _hessian(16, seed=5)
    X[:, 8:] = X[:, :8] + 0.05 * X[:, 8:]  # pairs of correlated inputs
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(6, 16, dtype=torch.float64)
    curve = obs.greedy_column_curve(W, H, 12, step=2, percdamp=1e-9)
    Hinv = obs.inverse_hessian(H, 1e-9)
    independent = obs.column_errors(W, Hinv).sort().values[:12]
    assert curve.sum() > independent.sum()
    assert len(curve) == 12 and bool((curve >= 0).all())
