"""Peak memory and wall time of a compile held whole in memory against `--stream` (issue 13), side by side.

Every compile runs as `/usr/bin/time -v slimc compile ...` in its own process: the peak is the whole process's
maximum resident set (runtime, mapped file pages, the report's sample and chat probe included). Each pair runs
back to back, in-memory first, and the table gives the streamed / in-memory ratios; the two outputs' tensors
and config.json are compared byte for byte.

    python benchmarks/memory.py --out bench-out/memory smollm2   # SmolLM2 at 30 %, 32 x 512 calibration tokens
    python benchmarks/memory.py --out bench-out/memory depth     # random Llama-shaped bf16 models, 2/4/8/16 layers

Random weights are for memory and speed only, never for quality.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

# one width for the depth sweep: a 1B-class block (hidden 2048, 16 q / 4 KV heads of 128, FFN 5632)
DEPTH_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
                   head_dim=128, max_position_embeddings=4096)
DEPTHS = (2, 4, 8, 16)


def timed_compile(args: list[str]) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "slimc.cli", "compile", *args],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"compile failed: {proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60 ** k for k, x in enumerate(reversed(wall.split(":"))))
    return {"peak_rss_mb": rss / 1024, "wall_s": seconds}


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("model*.safetensors")) + [out / "config.json"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def pair(name: str, args: list[str], out: Path, results: dict, results_path: Path) -> None:
    if name in results:
        return
    row = {}
    for mode, extra in (("memory", []), ("stream", ["--stream"])):
        target = out / f"{name}-{mode}"
        print(f"== {name}: {mode}", flush=True)
        row[mode] = timed_compile([*args, "-o", str(target), "--overwrite", *extra])
        row[mode]["digest"] = digest(target)
        row[mode]["seconds"] = json.loads((target / "report.json").read_text())["seconds"]
    results[name] = row
    results_path.write_text(json.dumps(results, indent=2))


def random_llama(directory: Path, layers: int) -> Path:
    """A Llama-shaped model of DEPTH_SHAPE with `layers` blocks, random bf16 weights, sharded safetensors, and
    SmolLM2's tokenizer (vocab 49,152): what a real bf16 checkpoint on disk looks like, without its quality."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimc.load import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    config = LlamaConfig(**DEPTH_SHAPE, num_hidden_layers=layers, vocab_size=len(tokenizer),
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(layers)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="1GB")
    tokenizer.save_pretrained(directory)
    return directory


def markdown(results: dict) -> str:
    head = ("| model | in-memory peak RSS MB | streamed peak RSS MB | streamed / in-memory | in-memory wall s | "
            "streamed wall s | streamed / in-memory | same bytes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in results.items():
        m, s = row["memory"], row["stream"]
        lines.append(f"| {name} | {m['peak_rss_mb']:,.0f} | {s['peak_rss_mb']:,.0f} | {s['peak_rss_mb'] / m['peak_rss_mb']:.2f} | "
                     f"{m['wall_s']:.0f} | {s['wall_s']:.0f} | {s['wall_s'] / m['wall_s']:.2f} | "
                     f"{'yes' if m['digest'] == s['digest'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", choices=["smollm2", "depth"])
    p.add_argument("--out", default="bench-out/memory")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "smollm2" in args.parts:
        pair("SmolLM2-135M (GGUF) 30 %, 32 x 512", ["smollm2-135m", "--sparsity", "0.3", "--calib-samples", "32",
                                                   "--seq-len", "512"], out, results, results_path)
    if "depth" in args.parts:
        for layers in map(int, args.depths.split(",")):
            src = random_llama(out / f"random-llama-{layers}", layers)
            pair(f"random Llama bf16, {layers} layers (hidden 2048, FFN 5632) 30 %, 16 x 256",
                 [str(src), "--sparsity", "0.3", "--calib-samples", "16", "--seq-len", "256", "--chat-calib", "off"],
                 out, results, results_path)
    print(markdown(results))


if __name__ == "__main__":
    main()
