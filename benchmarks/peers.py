"""Peer structured-pruning tools on SmolLM2-135M-Instruct, cut to slimc's `--sparsity` measure.

Runs two peers as their users run them and writes each result as a plain Hugging Face directory that stock
transformers loads (`AutoModelForCausalLM.from_pretrained(dir)`, no trust_remote_code):

- torch-pruning 1.6.1, its LLM recipe (examples/LLMs/prune_llm.py): `tp.pruner.BasePruner` with
  `GroupMagnitudeImportance(p=2, group_reduction="mean")` (data-free), local (per-layer) ranking, one
  pruning_ratio for channels and heads, `num_heads` for q/k/v, whole heads only (`prune_head_dims=False`),
  lm_head ignored. The recipe prunes the residual (hidden) width too, so embeddings, norms and lm_head shrink
  with it. Adapted to transformers 5: no KV cache while tracing; round_to 36 instead of the example's 4,
  since transformers 5's LlamaConfig refuses a hidden_size that is not a multiple of num_attention_heads;
  the config's widths and each attention's `num_key_value_groups` rewritten after pruning; lm_head re-tied.
  Three configurations are tried in turn, every failure kept in the record: the example's head pruning;
  head counts given for k/v only (which avoids its crash, rejected when the query heads it removes do not
  match the KV heads it removes); heads kept (hidden + FFN channels).
  `torch-pruning-ffn` is the same recipe with the embedding and attention projections in ignored_layers:
  FFN channels only, the like-for-like comparison with optipfair.
- optipfair 0.4.2, `prune_model(pruning_type="MLP_GLU", neuron_selection_method="MAW")` with a calibration
  dataloader (its data-driven MAW: weight ranges x activation norms). FFN channels only, the same width in
  every layer; the FFN pruning percentage is derived from the target fraction.

The fraction is slimc's: parameters of the decoder blocks' q/k/v/o and gate/up/down projections removed
(embeddings, norms and lm_head not counted). Each peer's widths are uniform and discrete, so each run picks the
setting whose fraction is nearest the target and reports the fraction really removed, counted on the output.

Usage, from the repository root with the main .venv active (each peer runs in a venv of its own under
/work/peer-venvs so its pins never touch the main environment):

    python benchmarks/peers.py setup                          # create /work/peer-venvs/<peer>, ~2 min each
    python benchmarks/peers.py prune --out bench-out/peers    # dense dir + calibration, then every peer x target
    python benchmarks/peers.py verify --out bench-out/peers   # stock-transformers load + forward, slimc eval PPL

`prune` writes bench-out/peers/dense/ (SmolLM2's GGUF dequantized to a dense fp32 HF dir, what every peer
starts from), calib-128x512-seed0.pt (windows of the Brown calibration split chosen by slimc.data, 128 x 512 as
slimc's defaults; no evaluation file is read), <peer>-<pct>/ for each output with its <peer>-<pct>.log, and
peers.json (per output: peer, requested, achieved_fraction, what_was_pruned, seconds = the run's wall time,
prune_seconds = load to saved, attempts with their exceptions, error if any). `verify` adds `verify` to each
entry (loads, forward finite, the fraction recounted against dense/, perplexity on the Brown evaluation split
by `slimc eval OUT --ppl brown --max-tokens 16384 --seq-len 2048`) and the dense model's perplexity.
`--peers` / `--targets` pick a subset (e.g. `--peers optipfair --targets 0.5`); results merge into peers.json.

On 2 CPU cores: torch-pruning under a minute per output, optipfair about 8 minutes (its calibration pass
over 65k tokens), verify about 2 minutes per output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

VENVS = Path("/work/peer-venvs")
# the peers' own pins, then what the runs here need; torch is installed first and alone (see setup)
PEERS = {"torch-pruning": ["torch-pruning==1.6.1"], "optipfair": ["optipfair==0.4.2"]}
COMMON = ["transformers>=5.17", "gguf", "accelerate", "safetensors"]
TORCH = "torch==2.13.0"
TARGETS = (0.2, 0.5)
RESULT_TAG = "@@peer-result "  # prefix of the one stdout line a peer run hands back to `prune`

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# --------------------------------------------------------------------------------------------------------
# counting (runs in every venv: torch and transformers only)
# --------------------------------------------------------------------------------------------------------

def block_params(model) -> int:
    """Parameters (weights and biases) of every decoder block's attention and FFN projections: the quantity
    slimc's --sparsity is a fraction of."""
    total = 0
    for layer in model.model.layers:
        for name in BLOCK_LINEARS:
            total += sum(p.numel() for p in layer.get_submodule(name).parameters())
    return total


def model_params(model) -> int:
    """Unique parameters (a tied lm_head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def widths(model) -> dict:
    """Per-layer widths, collapsed to one value when every layer has the same."""
    head_dim = model.config.head_dim
    per_layer = {"q_heads": [], "kv_heads": [], "intermediate": []}
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        per_layer["q_heads"].append(a.q_proj.out_features / head_dim)
        per_layer["kv_heads"].append(a.k_proj.out_features / head_dim)
        per_layer["intermediate"].append(m.gate_proj.out_features)
    out = {"hidden": model.model.embed_tokens.weight.shape[1], "head_dim": head_dim}
    for key, values in per_layer.items():
        values = [int(v) if float(v).is_integer() else v for v in values]
        out[key] = values[0] if len(set(values)) == 1 else values
    return out


def load_dense(dense_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32)
    return model.eval()


def forward_ok(model) -> None:
    """A few (arbitrary) tokens through the model; raise unless the logits span the vocabulary and are finite."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690, 260]]), use_cache=False).logits
    if logits.shape[-1] != model.config.vocab_size or not torch.isfinite(logits).all():
        raise RuntimeError(f"forward gave logits of shape {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")


def save_output(model, tokenizer, out: Path) -> None:
    """The model as a plain HF directory (config.json, model.safetensors, generation config, tokenizer),
    written beside OUT and renamed at the end, so OUT is whole or absent."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def dense_tokenizer(dense_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(dense_dir))


# --------------------------------------------------------------------------------------------------------
# torch-pruning (runs in its venv)
# --------------------------------------------------------------------------------------------------------

def _tp_kept(channels: int, ratio: float, round_to: int) -> int:
    """Channels torch-pruning 1.6.1 keeps of a group under local ranking: int(C * (1 - ratio)), rounded down to
    a multiple of round_to (BasePruner._prune and _round_to)."""
    kept = int(channels * (1 - ratio))
    return channels if kept >= channels else kept - kept % round_to


def _tp_q_heads_kept(heads: int, kv_heads: int, ratio: float) -> int:
    """Query heads torch-pruning keeps under GQA with local ranking: ceil(ratio * heads) heads to remove, spread
    as ceil(that / kv_heads) per KV group, so at least one per group as soon as ratio > 0."""
    per_group = math.ceil(math.ceil(ratio * heads) / kv_heads)
    return heads - per_group * kv_heads


def _tp_round_to(cfg, mode: str) -> int:
    """The example's round_to=4, raised to a multiple of the query-head count whenever the hidden size is cut:
    transformers 5's LlamaConfig refuses (on save and on load) a hidden_size that is not a multiple of
    num_attention_heads. lcm(4, 9) = 36 also covers 6 and 3 heads, the counts head pruning can leave."""
    return 4 if mode == "ffn-only" else math.lcm(4, cfg.num_attention_heads)


def _tp_fraction(cfg, ratio: float, mode: str) -> tuple[float, dict]:
    """Predicted fraction of block parameters removed by a `mode` pass at `ratio` (no biases in Llama). The
    kv-heads pass is predicted as the heads pass: it runs at the same ratio, only to be judged."""
    d, h0, f0 = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    q0, kv0 = cfg.num_attention_heads, cfg.num_key_value_heads
    round_to = _tp_round_to(cfg, mode)
    h = h0 if mode == "ffn-only" else _tp_kept(h0, ratio, round_to)
    f = _tp_kept(f0, ratio, round_to)
    q = _tp_q_heads_kept(q0, kv0, ratio) if mode in ("heads", "kv-heads") else q0

    def per_layer(hidden, q_heads, inter):
        return (q_heads + 2 * kv0) * d * hidden + q_heads * d * hidden + 3 * hidden * inter

    frac = 1 - per_layer(h, q, f) / per_layer(h0, q0, f0)
    return frac, {"hidden": h, "q_heads": q, "kv_heads": kv0, "intermediate": f}


def _tp_ratio_for(cfg, target: float, mode: str) -> tuple[float, float, dict]:
    """The recipe's single ratio whose predicted fraction is nearest `target` (widths are discrete)."""
    best = None
    for i in range(1, 1900):
        ratio = i / 2000
        frac, w = _tp_fraction(cfg, ratio, mode)
        if best is None or abs(frac - target) < abs(best[1] - target) - 1e-12:
            best = (ratio, frac, w)
    return best


def _tp_prune(model, ratio: float, mode: str, example_ids) -> None:
    """One pass of the prune_llm.py recipe. mode:
    - "heads": num_heads for q, k and v, as the example sets them;
    - "kv-heads": num_heads for k/v only, which avoids the crash;
    - "no-heads": num_heads for k/v only, so the attention group is still known as one, and
      prune_num_heads=False: with prune_head_dims=False its channels are then left alone (given no num_heads
      at all it would be cut as plain channels, e.g. k/v 192 -> 168 rows at ratio 0.1175, not whole heads);
    - "ffn-only": the embedding and every attention projection ignored too, which makes the hidden and the
      attention groups unprunable: only the FFN groups are cut."""
    import torch_pruning as tp

    cfg = model.config
    num_heads, ignored = {}, [model.lm_head]
    for layer in model.model.layers:
        a = layer.self_attn
        if mode == "ffn-only":
            ignored += [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
            continue
        if mode == "heads":
            num_heads[a.q_proj] = cfg.num_attention_heads
        num_heads[a.k_proj] = cfg.num_key_value_heads
        num_heads[a.v_proj] = cfg.num_key_value_heads
    if mode == "ffn-only":
        ignored.append(model.model.embed_tokens)
    prune_heads = mode in ("heads", "kv-heads")
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=example_ids,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        output_transform=lambda out: out.logits,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=prune_heads,
        prune_head_dims=False,  # whole heads only, so RoPE's head_dim stays 64
        head_pruning_ratio=ratio if prune_heads else 0.0,
        # BasePruner merges num_heads into this dict; its default is a shared mutable, so pass our own
        out_channel_groups={},
        round_to=_tp_round_to(cfg, mode),
    )
    for group in pruner.step(interactive=True):
        group.prune()


def _tp_adapt_to_transformers5(model) -> None:
    """After pruning: rewrite the config's widths (head_dim stays explicit: hidden_size is no longer heads x 64)
    and each attention's num_key_value_groups (read by its SDPA path); re-tie lm_head to the embedding, which
    torch-pruning pruned as two separate tensors. The example did the same for transformers 4's attributes."""
    import torch

    cfg = model.config
    d = cfg.head_dim
    layers = model.model.layers
    shapes = {(l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features, l.mlp.gate_proj.out_features)
              for l in layers}
    if len(shapes) != 1:
        raise RuntimeError(f"torch-pruning left non-uniform layers {sorted(shapes)}; stock Llama cannot load them")
    q_out, kv_out, inter = shapes.pop()
    if q_out % d or kv_out % d:
        raise RuntimeError(f"q/k widths {q_out}/{kv_out} are not whole heads of {d}")
    heads, kv_heads = q_out // d, kv_out // d
    if heads % kv_heads:
        raise RuntimeError(f"{heads} query heads do not split over {kv_heads} KV heads")
    cfg.hidden_size = model.model.embed_tokens.weight.shape[1]
    cfg.intermediate_size = inter
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv_heads
    cfg.head_dim = d
    for layer in layers:
        layer.self_attn.num_key_value_groups = heads // kv_heads
    if cfg.tie_word_embeddings:
        if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
            raise RuntimeError("tied lm_head and embedding were pruned differently")
        model.lm_head.weight = model.model.embed_tokens.weight


def _tp_judge(cfg, mode: str, w: dict) -> str | None:
    """Why a pass that ran must still be rejected, or None. Only whole KV groups may leave under GQA (3 query
    heads per KV head here), and the passes that keep heads must really keep every attention row."""
    q_lost, kv_lost = cfg.num_attention_heads - w["q_heads"], cfg.num_key_value_heads - w["kv_heads"]
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    if mode in ("heads", "kv-heads") and kv_lost and q_lost != kv_lost * group:
        return (f"rejected: runs, but removed {kv_lost} of {cfg.num_key_value_heads} KV heads and only {q_lost} of "
                f"{cfg.num_attention_heads} query heads (q_proj {cfg.num_attention_heads * cfg.head_dim} -> "
                f"{w['q_heads'] * cfg.head_dim} rows); GQA needs {group} query heads gone per KV head, so the "
                f"surviving query heads no longer match their KV heads")
    if mode in ("no-heads", "ffn-only") and (q_lost or kv_lost):
        return f"rejected: attention rows were cut although heads were to be kept: {w}"
    return None


def run_torch_pruning(dense_dir: Path, target: float, calib_path: Path, out: Path, ffn_only: bool = False) -> dict:
    """The recipe at the ratio nearest `target`: head pruning first, then the fallbacks, each failure recorded.
    ffn_only: the FFN-only variant alone (hidden width and attention kept), to compare with optipfair."""
    import torch

    dense = load_dense(dense_dir)
    cfg = dense.config
    dense_block, dense_model = block_params(dense), model_params(dense)
    del dense
    # the example traces with a short text; any few real tokens do (magnitude importance reads no data)
    example_ids = torch.load(calib_path)[:1, :32]
    attempts = []

    def attempt(mode: str):
        ratio, predicted, predicted_widths = _tp_ratio_for(cfg, target, mode)
        rec = {"mode": mode, "pruning_ratio": ratio, "predicted_fraction": round(predicted, 5),
               "predicted_widths": predicted_widths}
        attempts.append(rec)
        model = load_dense(dense_dir)
        model.config.use_cache = False  # a DynamicCache in the outputs breaks tracing (Torch-Pruning#461)
        print(f"torch-pruning: mode={mode} pruning_ratio={ratio} (predicted fraction {predicted:.4f})", file=sys.stderr)
        try:
            _tp_prune(model, ratio, mode, example_ids)
            _tp_adapt_to_transformers5(model)
            forward_ok(model)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["where"] = _where(e)
        else:
            rec["widths"] = widths(model)
            rec["error"] = _tp_judge(cfg, mode, rec["widths"])
        if rec["error"]:
            print(f"torch-pruning: mode={mode} failed: {rec['error']} {rec.get('where', '')}", file=sys.stderr)
            return None
        del rec["error"]
        return model

    t0 = time.perf_counter()
    # "heads" crashes on SmolLM2 as on Llama-3.2 (Torch-Pruning#516): q/k/v/o land in one group indexed by
    # v_proj's 192 output channels, whose importance is reshaped into ch_groups = 9 rows (q's head count)
    # before any head logic runs. "kv-heads" gives head counts to k/v only, which avoids the reshape; it runs
    # at the same ratio and is kept only if what it removes is whole KV groups.
    for mode in ["ffn-only"] if ffn_only else ["heads", "kv-heads", "no-heads"]:
        model = attempt(mode)
        if model is not None:
            break
    else:
        return {"error": "every torch-pruning configuration failed", "attempts": attempts,
                "prune_seconds": time.perf_counter() - t0}
    pruned_block = block_params(model)
    w, ratio = attempts[-1]["widths"], attempts[-1]["pruning_ratio"]
    if mode == "ffn-only":
        what = (f"FFN channels only, uniform: {cfg.intermediate_size}->{w['intermediate']} in all "
                f"{cfg.num_hidden_layers} layers (embedding and attention projections in ignored_layers, so hidden "
                f"width and heads kept)")
    else:
        what = (f"uniform widths in all {cfg.num_hidden_layers} layers: hidden (residual) {cfg.hidden_size}->"
                f"{w['hidden']} (embedding, norms, lm_head input and every block's in/out dims), FFN channels "
                f"{cfg.intermediate_size}->{w['intermediate']}, query heads {cfg.num_attention_heads}->{w['q_heads']}, "
                f"KV heads {cfg.num_key_value_heads}->{w['kv_heads']}"
                + (" (heads kept: head pruning failed, see attempts)" if mode == "no-heads" else ""))
    what += f"; GroupMagnitudeImportance(p=2), data-free, pruning_ratio={ratio}, round_to={_tp_round_to(cfg, mode)}"
    save_output(model, dense_tokenizer(dense_dir), out)
    return {"achieved_fraction": 1 - pruned_block / dense_block, "what_was_pruned": what, "mode": mode,
            "widths": w, "attempts": attempts,
            "params": {"block_dense": dense_block, "block_pruned": pruned_block,
                       "model_dense": dense_model, "model_pruned": model_params(model)},
            "prune_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------------
# optipfair (runs in its venv)
# --------------------------------------------------------------------------------------------------------

def run_optipfair(dense_dir: Path, target: float, calib_path: Path, out: Path, batch_size: int = 4) -> dict:
    import torch
    from optipfair import prune_model
    from torch.utils.data import DataLoader, TensorDataset

    t0 = time.perf_counter()
    model = load_dense(dense_dir)
    cfg = model.config
    dense_block, dense_model = block_params(model), model_params(model)
    inter, layers = cfg.intermediate_size, cfg.num_hidden_layers
    # one FFN channel = a gate row, an up row and a down column (+ their biases if any)
    channel = 3 * cfg.hidden_size + (2 if cfg.mlp_bias else 0)
    # optipfair removes int(pct / 100 * I) channels from every layer: ask for the count nearest the target,
    # at most I - 1 (its own cap), and pass pct a half channel above it so float rounding cannot lose one
    want = round(target * dense_block / (layers * channel))
    n_remove = max(1, min(inter - 1, want))
    pct = (n_remove + 0.5) / inter * 100
    note = "" if n_remove == want else f" (nearest reachable: {want} channels would be needed)"
    print(f"optipfair: MLP_GLU/MAW, pruning_percentage={pct:.4f} -> remove {n_remove} of {inter} channels per "
          f"layer{note}", file=sys.stderr)
    calib = torch.load(calib_path)
    loader = DataLoader(TensorDataset(calib), batch_size=batch_size)
    model = prune_model(model, pruning_type="MLP_GLU", neuron_selection_method="MAW", pruning_percentage=pct,
                        dataloader=loader, show_progress=False)
    forward_ok(model)
    w = widths(model)
    pruned_block = block_params(model)
    what = (f"FFN channels only, uniform: {inter}->{w['intermediate']} in all {layers} layers (gate/up rows, down "
            f"columns); data-driven MAW (weight ranges x activation norms, {calib.shape[0]} x {calib.shape[1]} Brown "
            f"calibration tokens); pruning_percentage={pct:.4f}; attention, hidden width and embeddings untouched"
            + note)
    save_output(model, dense_tokenizer(dense_dir), out)
    return {"achieved_fraction": 1 - pruned_block / dense_block, "what_was_pruned": what, "widths": w,
            "pruning_percentage": pct,
            "params": {"block_dense": dense_block, "block_pruned": pruned_block,
                       "model_dense": dense_model, "model_pruned": model_params(model)},
            "prune_seconds": time.perf_counter() - t0}


RUNNERS = {"torch-pruning": run_torch_pruning, "optipfair": run_optipfair,
           "torch-pruning-ffn": lambda *a: run_torch_pruning(*a, ffn_only=True)}
VENV_OF = {"torch-pruning-ffn": "torch-pruning"}  # a variant runs in its peer's venv


def _where(e: BaseException) -> str:
    """file:line of the innermost frame of an exception, for the record."""
    tb = traceback.extract_tb(e.__traceback__)
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno} ({tb[-1].name})" if tb else ""


def peer_main(args) -> int:
    """Inner command: one peer at one target, in the peer's venv; the result goes back as one tagged line."""
    from importlib.metadata import version

    try:
        result = RUNNERS[args.peer](Path(args.dense), args.target, Path(args.calib), Path(args.out))
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}", "where": _where(e)}
    pkg = PEERS[VENV_OF.get(args.peer, args.peer)][0].split("==")[0]
    result["versions"] = {p: version(p) for p in (pkg, "torch", "transformers")}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------
# outer commands (main .venv)
# --------------------------------------------------------------------------------------------------------

def setup(venvs: Path, peers: list[str]) -> None:
    """One venv per peer. torch goes in first, pinned: the local wheel is the CPU build, while an unpinned
    torch pulled in by a peer's requirements would resolve to the multi-GB CUDA build."""
    for peer in peers:
        venv = venvs / peer
        py = venv / "bin" / "python"
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, *PEERS[peer], *COMMON], check=True)
        shown = subprocess.run([str(py), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
        keep = {PEERS[peer][0].split("==")[0], "torch", "transformers"}
        print(f"{peer}: " + ", ".join(" ".join(l.split()) for l in shown.splitlines()
                                      if l.split() and l.split()[0].lower() in keep))


def write_dense_and_calib(out: Path, samples: int, seq_len: int, seed: int) -> tuple[Path, Path]:
    """bench-out/peers/dense (slimc's own dense SmolLM2: the GGUF dequantized to fp32, as `slimc compile` loads
    it) and calib.pt (windows from the Brown calibration split, chosen by slimc.data as for a compile)."""
    import torch

    from slimc import data
    from slimc.load import load_model

    dense_dir, calib = out / "dense", out / f"calib-{samples}x{seq_len}-seed{seed}.pt"
    if not (dense_dir / "model.safetensors").is_file() or not calib.is_file():
        loaded = load_model("smollm2-135m")
        if not (dense_dir / "model.safetensors").is_file():
            save_output(loaded.model, loaded.tokenizer, dense_dir)
        ids = data.calibration_samples(loaded.tokenizer, "brown", samples, seq_len, seed)
        torch.save(ids.clone(), calib)
    return dense_dir, calib


def prune(args) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dense_dir, calib = write_dense_and_calib(out, args.calib_samples, args.seq_len, args.seed)
    summary_path = out / "peers.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"outputs": []}
    for peer in args.peers.split(","):
        py = Path(args.venvs) / VENV_OF.get(peer, peer) / "bin" / "python"
        for target in (float(t) for t in args.targets.split(",")):
            name = f"{peer}-{round(target * 100)}"
            cmd = [str(py), str(Path(__file__).resolve()), "_peer", peer, "--target", str(target),
                   "--dense", str(dense_dir), "--calib", str(calib), "--out", str(out / name)]
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
            lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
            if lines:
                result = json.loads(lines[-1][len(RESULT_TAG):])
            else:
                result = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
            entry = {"name": name, "peer": peer, "requested": target, "achieved_fraction": None,
                     "what_was_pruned": None, "seconds": round(seconds, 1), "dir": str(out / name), **result}
            if "prune_seconds" in entry:
                entry["prune_seconds"] = round(entry["prune_seconds"], 1)
            if entry.get("error"):  # no output: drop one an earlier run may have left
                entry["dir"] = None
                shutil.rmtree(out / name, ignore_errors=True)
            summary["outputs"] = sorted([e for e in summary["outputs"] if e["name"] != name] + [entry],
                                        key=lambda e: (e["peer"], e["requested"]))
            summary_path.write_text(json.dumps(summary, indent=2))
            _print_entry(entry)
    print(f"wrote {summary_path}")


def _print_entry(e: dict) -> None:
    frac = "-" if e.get("achieved_fraction") is None else f"{e['achieved_fraction']:.4f}"
    print(f"   {e['name']}: requested {e['requested']:.2f}, achieved {frac}, {e['seconds']} s")
    for a in e.get("attempts", []):
        if a.get("error"):
            print(f"   attempt {a['mode']} (pruning_ratio {a['pruning_ratio']}): {a['error']}")
    if e.get("what_was_pruned"):
        print(f"   pruned: {e['what_was_pruned']}")
    if e.get("error"):
        print(f"   ERROR: {e['error']}")


def verify(args) -> None:
    """Every output through stock transformers (no trust_remote_code): load, forward, recount the fraction
    against the dense dir; then perplexity with `slimc eval` (Brown evaluation split)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out).resolve()
    summary_path = out / "peers.json"
    summary = json.loads(summary_path.read_text())
    dense_dir = out / "dense"
    dense_block = block_params(load_dense(dense_dir))
    slimc_cli = Path(sys.executable).parent / "slimc"

    def ppl(path: Path) -> float:
        tmp = out / "_eval.json"
        cmd = [str(slimc_cli), "eval", str(path), "--ppl", "brown", "--max-tokens", str(args.max_tokens),
               "--seq-len", str(args.seq_len), "--json", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"slimc eval exited {proc.returncode}: {proc.stderr.strip()[-1000:]}")
        value = json.loads(tmp.read_text())["ppl"]
        tmp.unlink()
        return value

    if "dense_ppl" not in summary or args.force:
        summary["dense_ppl"] = ppl(dense_dir)
        print(f"dense: PPL {summary['dense_ppl']:.3f}")
    for e in summary["outputs"]:
        if not e.get("dir"):
            continue
        v: dict = {}
        try:
            model = AutoModelForCausalLM.from_pretrained(e["dir"], dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(e["dir"])
            ids = tok("The capital of France is", return_tensors="pt").input_ids
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits
            v["loads"] = True
            v["forward_finite"] = bool(torch.isfinite(logits).all())
            v["achieved_fraction"] = 1 - block_params(model) / dense_block
            v["model_params"] = model_params(model)
            del model
            if "ppl" not in e.get("verify", {}) or args.force:
                t0 = time.perf_counter()
                v["ppl"] = ppl(Path(e["dir"]))
                v["eval_seconds"] = round(time.perf_counter() - t0, 1)
            else:
                v["ppl"] = e["verify"]["ppl"]
        except Exception as ex:
            v["error"] = f"{type(ex).__name__}: {ex}"
        e["verify"] = v
        summary_path.write_text(json.dumps(summary, indent=2))
        ppl_s = f"{v['ppl']:.3f}" if "ppl" in v else "-"
        print(f"{e['name']}: loads={v.get('loads', False)} finite={v.get('forward_finite')} "
              f"fraction={v.get('achieved_fraction', float('nan')):.4f} PPL {ppl_s}" + (f" ERROR {v['error']}" if "error" in v else ""))
    print(f"wrote {summary_path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{setup,prune,verify}")
    s = sub.add_parser("setup", help="create one venv per peer")
    s.add_argument("--venvs", default=str(VENVS))
    s.add_argument("--peers", default=",".join(PEERS))
    r = sub.add_parser("prune", help="run every peer at every target")
    r.add_argument("--out", default="bench-out/peers")
    r.add_argument("--venvs", default=str(VENVS))
    r.add_argument("--peers", default=",".join(RUNNERS))
    r.add_argument("--targets", default=",".join(str(t) for t in TARGETS))
    r.add_argument("--calib-samples", type=int, default=128)
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("verify", help="load each output with stock transformers; perplexity via slimc eval")
    v.add_argument("--out", default="bench-out/peers")
    v.add_argument("--max-tokens", type=int, default=16384)
    v.add_argument("--seq-len", type=int, default=2048)
    v.add_argument("--force", action="store_true", help="measure again even where peers.json has a PPL")
    i = sub.add_parser("_peer")  # inner: one peer run, inside the peer's venv (prune calls it)
    i.add_argument("peer", choices=list(RUNNERS))
    i.add_argument("--target", type=float, required=True)
    i.add_argument("--dense", required=True)
    i.add_argument("--calib", required=True)
    i.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.command == "setup":
        setup(Path(args.venvs), args.peers.split(","))
    elif args.command == "prune":
        prune(args)
    elif args.command == "verify":
        verify(args)
    else:
        return peer_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
