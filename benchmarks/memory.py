"""Peak memory and wall time of a compile held whole in memory against `--stream` (issue 13), side by side.

Every compile runs as `/usr/bin/time -v slimc compile ...` in its own process: the peak is the whole process's
maximum resident set (runtime, mapped file pages, the report's sample and chat probe included). Each pair runs
back to back, in-memory first, and the table gives the streamed / in-memory ratios; the two outputs' tensors
and config.json are compared byte for byte.

    python benchmarks/memory.py --out bench-out/memory smollm2   # SmolLM2 at 30 %, 32 x 512 calibration tokens
    python benchmarks/memory.py --out bench-out/memory depth     # random Llama-shaped bf16 models, 2/4/8/16 layers
        [--depths 2,16] [--modes stream]                          # some depths; only the streamed side
    python benchmarks/memory.py --out bench-out/memory resume    # SmolLM2 --stream SIGKILLed at 60 %, then --resume
    python benchmarks/memory.py --out bench-out/memory llama8b   # Llama-3.1-8B-shaped bf16, 8 of its 32 layers
    python benchmarks/memory.py --out bench-out/memory spill     # 2.6 GiB of activations: RAM vs --activation-budget

Random weights are for memory and speed only, never for quality.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# one width for the depth sweep: a 1B-class block (hidden 2048, 16 q / 4 KV heads of 128, FFN 5632)
DEPTH_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
                   head_dim=128, max_position_embeddings=4096)
DEPTHS = (2, 4, 8, 16)
# Llama-3.1-8B's block (hidden 4096, 32 q / 8 KV heads of 128, FFN 14336, vocab 128,256, untied lm_head)
LLAMA8B_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=8192, vocab_size=128_256, rope_theta=500_000.0)
SMOLLM2_ARGS = ["smollm2-135m", "--sparsity", "0.3", "--calib-samples", "32", "--seq-len", "512"]


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


def pair(name: str, args: list[str], out: Path, results: dict, results_path: Path,
         modes: tuple[str, ...] = ("memory", "stream")) -> None:
    """Each mode asked for and not yet in results: compiled, timed, and its output's digest kept."""
    row = results.get(name, {})
    for mode, extra in (("memory", ["--stream", "off"]), ("stream", ["--stream", "on"])):
        if mode not in modes or mode in row:
            continue
        target = out / f"{name}-{mode}"
        print(f"== {name}: {mode}", flush=True)
        row[mode] = timed_compile([*args, "-o", str(target), "--overwrite", *extra])
        row[mode]["digest"] = digest(target)
        row[mode]["seconds"] = json.loads((target / "report.json").read_text())["seconds"]
        results[name] = row
        results_path.write_text(json.dumps(results, indent=2))


def random_llama(directory: Path, layers: int, shape: dict = DEPTH_SHAPE) -> Path:
    """A Llama-shaped model with `layers` blocks, random bf16 weights (N(0, 0.02)), sharded safetensors written
    one tensor at a time (an 8B-shaped model never exists in memory), and SmolLM2's tokenizer: what a real bf16
    checkpoint on disk looks like, without its quality."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from slimc.checkpoint import CheckpointWriter, Entry
    from slimc.load import load_tokenizer, read_source_config

    tokenizer = load_tokenizer(read_source_config("smollm2-135m"))
    shape = {"vocab_size": len(tokenizer), **shape}
    config = LlamaConfig(**shape, num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    entries = [Entry(k, tuple(v.shape), torch.bfloat16) for k, v in skeleton.state_dict().items()]
    directory.mkdir(parents=True, exist_ok=True)
    writer = CheckpointWriter(directory, entries, 2 * 2**30)
    gen = torch.Generator().manual_seed(layers)
    for e in entries:
        t = torch.ones(e.shape) if e.name.endswith("norm.weight") else torch.randn(e.shape, generator=gen) * 0.02
        writer.write(e.name, t.to(torch.bfloat16))
    writer.close()
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def resume_after_kill(out: Path, results: dict, results_path: Path, fraction: float = 0.6) -> None:
    """A streamed SmolLM2 compile straight through, then the same command SIGKILLed once `fraction` of its
    blocks are finished and re-run with --resume: the resumed run's wall time against the full run's."""
    name = f"SmolLM2 --stream, SIGKILL after {fraction:.0%} of the blocks, then --resume"
    if name in results:
        return
    full_dir, killed_dir = out / "resume-full", out / "resume-killed"
    print("== resume: full run", flush=True)
    full = timed_compile([*SMOLLM2_ARGS, "-o", str(full_dir), "--overwrite", "--stream"])
    blocks = len(json.loads((full_dir / "report.json").read_text())["layers"])
    shutil.rmtree(killed_dir, ignore_errors=True)
    shutil.rmtree(out / "resume-killed.partial", ignore_errors=True)
    print("== resume: the run to kill", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "slimc.cli", "compile", *SMOLLM2_ARGS, "-o", str(killed_dir), "--stream"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "resume-killed.partial" / "progress.json"
    want = round(fraction * blocks)
    while proc.poll() is None:
        try:
            if json.loads(progress.read_text()).get("blocks_done", 0) >= want:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    killed_after = time.perf_counter() - t0
    done = json.loads(progress.read_text())["blocks_done"]
    print("== resume: --resume", flush=True)
    resumed = timed_compile([*SMOLLM2_ARGS, "-o", str(killed_dir), "--stream", "--resume"])
    results[name] = {"full": full, "killed_after_s": killed_after, "blocks_done_at_kill": done, "blocks": blocks,
                     "resumed": resumed, "same_bytes": digest(full_dir) == digest(killed_dir)}
    results_path.write_text(json.dumps(results, indent=2))


def markdown(results: dict) -> str:
    pairs = {k: v for k, v in results.items() if "stream" in v}
    text = markdown_pairs(pairs)
    for name, r in results.items():
        if "resumed" in r:
            text += (f"\n\n{name}: killed {r['killed_after_s']:.0f} s in with {r['blocks_done_at_kill']} of {r['blocks']} "
                     f"blocks done; --resume {r['resumed']['wall_s']:.0f} s against {r['full']['wall_s']:.0f} s straight "
                     f"through = {r['resumed']['wall_s'] / r['full']['wall_s']:.2f} x; peak RSS "
                     f"{r['resumed']['peak_rss_mb']:,.0f} MB; same bytes: {'yes' if r['same_bytes'] else 'NO'}")
        if "spilled" in r:
            ram, sp = r["ram"], r["spilled"]
            text += (f"\n\n{name}: activations in RAM peak RSS {ram['peak_rss_mb']:,.0f} MB, wall {ram['wall_s']:.0f} s; "
                     f"spilled (--activation-budget 256MB) {sp['peak_rss_mb']:,.0f} MB, wall {sp['wall_s']:.0f} s "
                     f"({sp['peak_rss_mb'] / ram['peak_rss_mb']:.2f} x RSS, {sp['wall_s'] / ram['wall_s']:.2f} x time); "
                     f"same bytes: {'yes' if ram['digest'] == sp['digest'] else 'NO'}")
        if "streamed_only" in r:
            s = r["streamed_only"]
            text += (f"\n\n{name}: --stream peak RSS {s['peak_rss_mb']:,.0f} MB, wall {s['wall_s']:.0f} s "
                     f"(stages: {', '.join(f'{k} {v:.0f}s' for k, v in s['seconds'].items())})")
            if "block_peak_rss_mb" in s:
                text += f"; peak RSS after each block, MB: {', '.join(f'{v:,}' for v in s['block_peak_rss_mb'])}"
    return text


def markdown_pairs(results: dict) -> str:
    head = ("| model | in-memory peak RSS MB | streamed peak RSS MB | streamed / in-memory | in-memory wall s | "
            "streamed wall s | streamed / in-memory | same bytes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in results.items():
        s = row["stream"]
        if "memory" not in row:  # the in-memory side was not run (--modes stream)
            lines.append(f"| {name} | — | {s['peak_rss_mb']:,.0f} | — | — | {s['wall_s']:.0f} | — | — |")
            continue
        m = row["memory"]
        lines.append(f"| {name} | {m['peak_rss_mb']:,.0f} | {s['peak_rss_mb']:,.0f} | {s['peak_rss_mb'] / m['peak_rss_mb']:.2f} | "
                     f"{m['wall_s']:.0f} | {s['wall_s']:.0f} | {s['wall_s'] / m['wall_s']:.2f} | "
                     f"{'yes' if m['digest'] == s['digest'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", choices=["smollm2", "depth", "resume", "llama8b", "spill"])
    p.add_argument("--out", default="bench-out/memory")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    p.add_argument("--modes", default="memory,stream",
                   help="which sides of each pair to run (a side already in results.json is kept)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "smollm2" in args.parts:
        pair("SmolLM2-135M (GGUF) 30 %, 32 x 512", SMOLLM2_ARGS, out, results, results_path)
    if "depth" in args.parts:
        for layers in map(int, args.depths.split(",")):
            src = random_llama(out / f"random-llama-{layers}", layers)
            pair(f"random Llama bf16, {layers} layers (hidden 2048, FFN 5632) 30 %, 16 x 256",
                 [str(src), "--sparsity", "0.3", "--calib-samples", "16", "--seq-len", "256", "--chat-calib", "off"],
                 out, results, results_path, modes=tuple(args.modes.split(",")))
    if "resume" in args.parts:
        resume_after_kill(out, results, results_path)
    if "llama8b" in args.parts:
        name = "random Llama-3.1-8B-shaped bf16, 8 of 32 layers, 30 %, 8 x 128, --stream"
        if "block_peak_rss_mb" not in results.get(name, {}).get("streamed_only", {}):  # runs before it lacked them
            src = random_llama(out / "random-llama8b-8", 8, LLAMA8B_SHAPE)
            target = out / "llama8b-stream"
            print(f"== {name}", flush=True)
            run = timed_compile([str(src), "-o", str(target), "--overwrite", "--stream", "--sparsity", "0.3",
                                 "--calib-samples", "8", "--seq-len", "128", "--chat-calib", "off", "--max-shard-size", "2GB"])
            report = json.loads((target / "report.json").read_text())
            run["seconds"] = report["seconds"]
            # the process's high-water mark after each block: flat when memory does not grow with depth
            run["block_peak_rss_mb"] = [row["peak_rss_mb"] for row in report["layers"]]
            results[name] = {"streamed_only": run}
            results_path.write_text(json.dumps(results, indent=2))
    if "spill" in args.parts:
        spill_pair(out, results, results_path)
    print(markdown(results))


def spill_pair(out: Path, results: dict, results_path: Path) -> None:
    """The 2-layer depth model calibrated on 112 x 1024 tokens (most of the Brown calibration split): 0.9 GiB a
    stream, 3 live at once. Both sides stream the weights; one keeps the activations in RAM (the default budget,
    a quarter of RAM, holds them), the other spills them past --activation-budget 256MB to files beside OUT."""
    name = "random Llama bf16, 2 layers (hidden 2048), 112 x 1024 calibration tokens (2.6 GiB of activations)"
    row = results.get(name, {})
    src = random_llama(out / "random-llama-2", 2)
    args = [str(src), "--sparsity", "0.3", "--calib-samples", "112", "--seq-len", "1024", "--chat-calib", "off",
            "--stream", "on"]
    for mode, extra in (("ram", []), ("spilled", ["--activation-budget", "256MB"])):
        if mode in row:
            continue
        target = out / f"spill-{mode}"
        print(f"== {name}: {mode}", flush=True)
        row[mode] = timed_compile([*args, "-o", str(target), "--overwrite", *extra])
        row[mode]["digest"] = digest(target)
        results[name] = row
        results_path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
