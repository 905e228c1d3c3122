"""End to end on a tiny random model: compile -> reload in a fresh process without slimc -> same logits."""
import json
import os

import pytest
import torch

import slimc
from slimc.cli import main
from slimc.errors import SlimcError

from conftest import reload_without_slimc, save_tiny_dir, strict_json_loads

TEXT = " ".join(f"word{i % 97} and thing{i % 13}." for i in range(3000))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a local HF directory, with a real (byte-level) tokenizer file."""
    d = save_tiny_dir(tmp_path_factory.mktemp("tiny"), "llama", tie_word_embeddings=True, vocab_size=300)
    (d.parent / "calib.txt").write_text(TEXT)
    return d


def _one_line_error(rc, err):
    """Exit status 2, exactly one `slimc: error:` line at the end, no traceback (progress bars may precede)."""
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip()]
    assert rc == 2 and lines[-1].startswith("slimc: error:"), err
    assert err.count("slimc: error:") == 1 and "Traceback" not in err


def _compile(tiny_dir, out, **kw):
    opts = dict(calib=str(tiny_dir.parent / "calib.txt"), calib_samples=8, seq_len=32, keep_model=True)
    opts.update(kw)
    return slimc.compile(str(tiny_dir), str(out), **opts)


def test_compile_reload_without_slimc_same_logits(tiny_dir, tmp_path):
    out = tmp_path / "out"
    res = _compile(tiny_dir, out, sparsity=0.3)
    assert res.output == out and (out / "model.safetensors").is_file()
    assert {"config.json", "modeling_slimc.py", "slimc_plan.json", "report.json", "widths.png"} <= set(os.listdir(out))
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())
    ids = torch.randint(0, 140, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = res.model(ids).logits
    # a fresh interpreter where importing slimc fails: only transformers + the checkpoint's own modeling file
    logits, (_, name, n_params), _ = reload_without_slimc(out, ids, tmp_path)
    assert name == "SlimcLlamaForCausalLM"
    torch.testing.assert_close(logits, expected)
    plan = json.loads((out / "slimc_plan.json").read_text())
    assert int(n_params) == res.report["params"]["model_after"]
    assert strict_json_loads((out / "report.json").read_text())["params"] == res.report["params"]
    assert abs(plan["achieved_sparsity"] - 0.3) <= 0.01
    blocks = sum(p.numel() for n, p in res.model.named_parameters() if ".layers." in n and "layernorm" not in n)
    assert blocks == plan["block_params_pruned"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_num_attention_heads"] == [l["num_attention_heads"] for l in plan["layers"]]


def test_report_json_is_strict_json():
    """report.json and --json outputs are read by other tools: a non-finite number is null, never NaN."""
    from slimc.report import strict_json

    text = strict_json({"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf"), "e": 2}})
    assert strict_json_loads(text) == {"a": None, "b": [1.5, None], "c": {"d": None, "e": 2}}


def test_default_calibration_size_uses_a_short_text_whole_and_says_so(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:6000])
    res = slimc.compile(str(tiny_dir), str(tmp_path / "out"), 0.3, calib=str(short))  # 128 x 512 by default
    n = res.report["plan"]["calibration"]["samples"]
    assert 0 < n < 128 and res.report["plan"]["calibration"]["seq_len"] == 512
    assert f"holds {n} windows of 512 tokens" in capsys.readouterr().err
    with pytest.raises(SlimcError, match="use fewer --calib-samples"):  # a size the user chose is refused
        slimc.compile(str(tiny_dir), str(tmp_path / "out2"), 0.3, calib=str(short), calib_samples=128)
    assert not (tmp_path / "out2").exists()


def test_plan_only_then_reuse(tiny_dir, tmp_path):
    plan_dir = tmp_path / "plan"
    _compile(tiny_dir, plan_dir, sparsity=0.4, plan_only=True)
    assert os.listdir(plan_dir) == ["slimc_plan.json"]
    res = _compile(tiny_dir, tmp_path / "out", plan=str(plan_dir / "slimc_plan.json"), method="magnitude")
    plan = json.loads((plan_dir / "slimc_plan.json").read_text())
    assert [r["ffn"] for r in res.report["layers"]] == [l["intermediate_size"] for l in plan["layers"]]


def test_measured_schedule_compiles_plans_and_reuses(tiny_dir, tmp_path):
    """--schedule measured: the widths come from the measured curves (not a formula), the budget is met, and
    --plan-only calibrates to write the same plan a full compile uses."""
    res = _compile(tiny_dir, tmp_path / "out", sparsity=0.3, schedule="measured")
    plan = json.loads((tmp_path / "out" / "slimc_plan.json").read_text())
    assert plan["schedule"] == "measured" and abs(plan["achieved_sparsity"] - 0.3) <= 0.01
    levers = {lever["lever"]: lever for lever in res.report["levers"]}
    assert levers["schedule"]["setting"] == "measured" and levers["schedule"]["seconds"] > 0
    assert levers["reconstruct"]["setting"] == "off"
    assert "levers: schedule measured (" in (tmp_path / "out" / "README.md").read_text()
    ratios = [l["params"] / l["dense_params"] for l in plan["layers"]]
    assert [r["ffn"] for r in res.report["layers"]] == [l["intermediate_size"] for l in plan["layers"]]
    _compile(tiny_dir, tmp_path / "plan", sparsity=0.3, schedule="measured", plan_only=True)
    again = json.loads((tmp_path / "plan" / "slimc_plan.json").read_text())
    assert [l["params"] / l["dense_params"] for l in again["layers"]] == ratios


def test_refit_runs_in_every_block_and_is_reported(tiny_dir, tmp_path):
    res = _compile(tiny_dir, tmp_path / "out", sparsity=0.3, refit=True)
    assert all("refit" in row and row["refit"]["error_after"] <= row["refit"]["error_before"]
               for row in res.report["layers"])
    levers = {lever["lever"]: lever for lever in res.report["levers"]}
    assert levers["refit"]["setting"].startswith("kept in") and levers["refit"]["seconds"] > 0


def test_existing_output_refused_and_untouched(tiny_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["compile", str(tiny_dir), "-o", str(out), "--calib", str(tiny_dir.parent / "calib.txt")])
    err = capsys.readouterr().err
    _one_line_error(rc, err)
    assert "already exists" in err
    assert os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("args, message", [
    (["compile", "/nonexistent/model", "-o", "X"], "model not found"),
    (["compile", "TINY", "-o", "X", "--sparsity", "0.95"], "sparsity"),
    (["compile", "TINY", "-o", "X", "--calib-samples", "5000", "--calib", "CALIB"], "calib"),
    (["compile", "TINY", "-o", "X", "--calib", "/no/such/text.txt"], "not found"),
    (["compile", "TINY", "-o", "X", "--schedule", "measured", "--method", "flap"], "schedule measured"),
    (["compile", "TINY", "-o", "X", "--schedule", "measured", "--method", "disp"], "schedule measured"),
    (["compile", "TINY", "-o", "X", "--refit", "--method", "flap"], "runs as published"),
])
def test_user_errors_are_one_line(tiny_dir, tmp_path, capsys, args, message):
    args = [a.replace("TINY", str(tiny_dir)).replace("CALIB", str(tiny_dir.parent / "calib.txt")) for a in args]
    args[args.index("-o") + 1] = str(tmp_path / "o")
    rc = main(args)
    err = capsys.readouterr().err
    _one_line_error(rc, err)
    assert message in err.lower()
    assert not (tmp_path / "o").exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [["compile", "M", "-o", "X", "--compute-dtype", "float16"],
                                  ["compile", "M"], ["eval"], ["compile", "M", "-o", "X", "--no-such-option"]])
def test_bad_arguments_are_one_line_not_the_usage_block(capsys, args):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("slimc") and "error: " in lines[0], err
    assert "usage:" not in err


def test_unsupported_architecture_refused(tmp_path, capsys):
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    rc = main(["compile", str(tmp_path / "gpt2"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    _one_line_error(rc, err)
    assert "unsupported architecture 'GPT2LMHeadModel'" in err


def test_vllm_target_tensor_parallel(tiny_dir, tmp_path):
    res = _compile(tiny_dir, tmp_path / "tp2", sparsity=0.3, target="vllm", tp=2)
    cfg = json.loads((res.output / "config.json").read_text())
    for q, kv, f in zip(cfg["layer_num_attention_heads"], cfg["layer_num_key_value_heads"], cfg["layer_intermediate_size"]):
        assert q % 2 == 0 and (kv % 2 == 0 or 2 % kv == 0) and f % 2 == 0
    with pytest.raises(SlimcError, match="cannot be split over 16 GPUs"):
        _compile(tiny_dir, tmp_path / "tp16", sparsity=0.3, target="vllm", tp=16)
    assert not (tmp_path / "tp16").exists()


def test_plan_that_breaks_tp_is_refused_at_export(tiny_dir, tmp_path):
    _compile(tiny_dir, tmp_path / "plan", sparsity=0.3, plan_only=True, gqa="query")
    plan = tmp_path / "plan" / "slimc_plan.json"
    d = json.loads(plan.read_text())
    d["layers"][0]["intermediate_size"] = 95  # odd FFN width
    plan.write_text(json.dumps(d))
    with pytest.raises(SlimcError, match="not servable with --tp 2"):
        _compile(tiny_dir, tmp_path / "out", plan=str(plan), target="vllm", tp=2)
    assert not (tmp_path / "out").exists()


def test_vllm_mapping_matches_what_compile_wrote(tiny_dir, tmp_path):
    from safetensors import safe_open

    from slimc.vllm.mapping import expected_vllm_params, hf_param_shapes, stack_hf_shapes

    res = _compile(tiny_dir, tmp_path / "v", sparsity=0.3, target="vllm")
    cfg = json.loads((res.output / "config.json").read_text())
    with safe_open(str(res.output / "model.safetensors"), "pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert written == hf_param_shapes(cfg)
    assert stack_hf_shapes(written) == expected_vllm_params(cfg)


def test_installed_package_declares_vllm_plugin_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("slimc") == "slimc.vllm.plugin:register"
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("slimc") == "slimc.cli:main"


def test_hub_id_without_a_route_to_the_hub_loads_from_the_cache_or_fails_at_once(tmp_path, monkeypatch):
    """No connection to the hub: a hub id in the local hub cache still loads, any other fails in one line
    without huggingface_hub's ~30 s of retries."""
    import time

    from huggingface_hub import constants

    import slimc.load as load

    # a hub snapshot as huggingface_hub lays it out: models--org--name/{refs/main, snapshots/<rev>/...}
    repo = tmp_path / "hub" / "models--some-org--tiny-llama"
    save_tiny_dir(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test: the check sets it
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(load, "hub_reachable", lambda timeout=3.0: False)

    src = load.read_source_config("some-org/tiny-llama")
    saved = json.loads((repo / "snapshots" / "0123abcd" / "config.json").read_text())
    assert constants.HF_HUB_OFFLINE and src.family == "llama"
    assert src.config.num_hidden_layers == saved["num_hidden_layers"]
    start = time.monotonic()
    with pytest.raises(SlimcError, match="offline: the Hugging Face hub is unreachable .* not in the local hub cache"):
        load.read_source_config("some-org/not-cached")
    assert time.monotonic() - start < 10  # no retries with backoff


def test_reachable_hub_is_left_online(monkeypatch):
    from huggingface_hub import constants

    import slimc.load as load

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(load, "hub_reachable", lambda timeout=3.0: True)
    assert load.resolve_spec("some-org/any-model") == ("some-org/any-model", {})
    assert not constants.HF_HUB_OFFLINE
