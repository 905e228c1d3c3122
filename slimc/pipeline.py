"""`slimc compile`: load -> capture -> plan -> calibrate & prune block by block -> materialize -> export."""
from __future__ import annotations

import copy
import functools
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .passes import (MaterializeChannels, MaterializeDims, MaterializeHeads, PruneChannels, PruneHeads, PruneReadDims,
                     PruneWriteDims, apply_dims)
from .passes.materialize import _head_rows, _set, linear_from, set_widths_from_weights
from .passes.prune_heads import head_widths

from . import __version__
from .calibrate import (BlockInputs, active_compute_dtype, block_halves, catch_block_inputs, collect_hessians,
                        compute_dtype, decoder_layers, resolve_compute_dtype, run_batches, run_block, to_device)
from .capture import BlockStructure, block_shape, capture_structures
from .config import DISP_METHODS, CompileConfig
from . import activations, disp, interrupt, scored, sensitivity
from .layout import INDEX_SETS
from .errors import Interrupted, SlimcError
from .load import DTYPES, LoadedModel, load_model, model_fingerprint
from .plan import BlockShape, LayerPlan, PruningPlan, solve_measured_plan, solve_plan
from .reconstruct import reconstruct_block
from .refit import refit_block
from .resume import PartialCompile


@dataclass
class CompileResult:
    output: Path
    report: dict
    model: torch.nn.Module | None = None  # the materialized model (in memory), when pruning ran


@dataclass
class StageTimer:
    """Seconds per stage. Entering a stage is a safe point for Ctrl-C: what is on disk (OUT.partial) is always
    consistent, and what is in memory is only lost work since the last finished block."""
    seconds: dict = field(default_factory=dict)
    block: str = ""  # "block 7 of 30" while the block loop runs

    @contextmanager
    def stage(self, name: str):
        interrupt.check(f"stopped in {self.block}" if self.block else f"stopped before the {name} stage")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def prune_blocks(loaded: LoadedModel, structures: list[BlockStructure], plan: PruningPlan, inputs,
                 cfg: CompileConfig, timer: StageTimer, shapes: list[BlockShape] | None = None,
                 state: dict | None = None, partial: PartialCompile | None = None,
                 done_rows: list[dict] | None = None, stream=None) -> list[dict]:
    """Block by block: calibrate, prune with the method's block pruner, and the pruned block's outputs become
    the next block's inputs. DISP methods leave each block's index sets in its row ("index_sets"). With
    `partial`, every finished block and what the next one needs are kept on disk; `done_rows` are the rows of
    blocks a resumed compile already finished (their weights restored, `inputs` the next block's). With
    `stream` (slimc.stream.BlockStream), each block is read from the source first and written out after."""
    device = torch.device(cfg.device)
    layers = decoder_layers(loaded.model)
    inputs.kwargs = to_device(inputs.kwargs, device)  # rotary tables etc. live with the block; hidden states stay cached
    prune_block = BLOCK_PRUNERS.get(cfg.method, _prune_block_slimgpt)
    rows = list(done_rows or [])
    # local reconstruction fits each pruned block to the dense model's outputs, so the dense stream is kept too
    state = {"dense_stream": inputs.hidden if cfg.reconstruct or cfg.refit else None, **(state or {})}
    n = len(layers)
    for i in (bar := tqdm(range(len(rows), n), desc="calibrate+prune", unit="block", initial=len(rows), total=n)):
        timer.block, state["layer"] = f"block {i + 1} of {n}", i
        if stream:
            stream.fetch(i)
        block = layers[i].to(device)
        shape = shapes[i] if shapes else block_shape(block, structures[i])
        row, out = prune_block(block, structures[i], shape, plan.layers[i], inputs, cfg, timer, device, state)
        rows.append({"layer": i, **row})
        bar.set_postfix(heads=row["heads"], ffn=row["ffn"], err=f"{row['rel_error']:.3g}")
        inputs.hidden = out
        layers[i] = block.to("cpu") if device.type != "cpu" else block
        if stream:  # into the output shards before progress.json says the block is done
            stream.finish(i, layers[i])
        activations.release_all()  # what random-access readers (reconstruction, refit) pulled in of spilled streams
        # the process's high-water mark so far: flat over the blocks when memory does not grow with depth
        rows[-1]["peak_rss_mb"] = round(peak_rss_mb())
        if partial:
            partial.save_block(i, None if stream else layers[i], rows[-1], out, state)
    timer.block = ""
    return rows


def peak_rss_mb() -> float:
    """This process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# calibration windows the report's block error is measured on (SlimGPT's passes need no dense output otherwise)
ERROR_WINDOWS = 16


def _relative_error(out: torch.Tensor, dense_out: torch.Tensor, rows: int = 8) -> float:
    """||out - dense_out||^2 / ||dense_out||^2 over the samples dense_out has (the first ones of out), a few at a
    time (the streams may be spilled files)."""
    err = ref = 0.0
    for start in range(0, dense_out.shape[0], rows):
        o, d = out[start : start + rows], dense_out[start : start + rows]
        err += float((o - d).double().pow(2).sum())
        ref += float(d.double().pow(2).sum())
        activations.release(out, start, start + rows)
        activations.release(dense_out, start, start + rows)
    return err / max(ref, 1e-12)


def _prune_block_slimgpt(block, s: BlockStructure, shape: BlockShape, target: LayerPlan, inputs, cfg: CompileConfig,
                         timer: StageTimer, device, state: dict) -> tuple[dict, torch.Tensor]:
    """SlimGPT (or magnitude): stats for o_proj, prune heads, stats for down_proj with the pruned attention in
    place, prune FFN channels, run the pruned block. A pre-norm residual block (block_halves) is run by halves:
    the three passes then cost about one and a half block forwards instead of three (BENCHMARKS.md §1)."""
    slimgpt = cfg.method == "slimgpt"
    head_pass = PruneHeads(cfg.method, cfg.gqa, cfg.head_score, cfg.compensate, cfg.percdamp,
                           sequential=cfg.gqa_order == "sequential")
    channel_pass = PruneChannels(cfg.method, cfg.compensate, cfg.percdamp, max_group=cfg.ffn_group_max)
    run = functools.partial(run_batches, batch_size=cfg.batch_size, device=device)
    halves = block_halves(block, inputs, device)
    # pass 1, the dense block: o_proj's Hessian -- the attention half is all it needs; the whole dense output is
    # needed only by the report's error, so with halves it is computed on the first ERROR_WINDOWS windows only
    with timer.stage("calibrate"), collect_hessians(block, [s.attention.o] if slimgpt else []) as acc:
        if halves is None:
            dense_out = run_block(block, inputs, cfg.batch_size, device)
        elif slimgpt:
            run(halves.attention, inputs.hidden, keep_outputs=False)
    if halves is not None:
        with timer.stage("calibrate"):
            dense_out = run_block(block, inputs, cfg.batch_size, device, stop=ERROR_WINDOWS)
    fits_dense = cfg.reconstruct or cfg.refit
    if fits_dense:
        with timer.stage("reconstruct" if cfg.reconstruct else "refit"):
            dense_target = dense_out if halves is None and state["dense_stream"] is inputs.hidden else run_block(
                block, BlockInputs(state["dense_stream"], inputs.kwargs), cfg.batch_size, device)
            dense_block = copy.deepcopy(block) if cfg.refit else None
    with timer.stage("prune"):
        heads = head_pass(block, s, num_heads=target.num_attention_heads, num_kv_heads=target.num_key_value_heads,
                          hessian=acc[s.attention.o].H if slimgpt else None)
        MaterializeHeads()(block, s, result=heads)
    # pass 2, the pruned attention in place: down_proj's Hessian. With halves, the attention half's outputs are
    # kept (the MLP half of pass 3 starts from them) and the MLP runs only as far as down_proj's input
    down_h = attended = None
    keep_attended = halves is not None and not fits_dense  # a fit after pass 2 changes the attention again
    if slimgpt or keep_attended:
        with timer.stage("calibrate"), collect_hessians(block, [s.mlp.down] if slimgpt else []) as acc:
            if halves is None:
                run_block(block, inputs, cfg.batch_size, device, keep_outputs=False)
            else:
                down = block.get_submodule(s.mlp.down)

                def attend(x):
                    h = halves.attention(x)
                    if slimgpt:
                        halves.mlp_input_stats(h, stop_at=down)
                    return h

                attended = run(attend, inputs.hidden, keep_outputs=keep_attended)
        down_h = acc[s.mlp.down].H if slimgpt else None
    with timer.stage("prune"):
        channels = channel_pass(block, s, width=target.intermediate_size, hessian=down_h)
        MaterializeChannels()(block, s, result=channels)
    fit = refitted = None
    if cfg.refit:
        with timer.stage("refit"):
            a, d = s.attention, s.attention.head_dim
            kv_rows = _head_rows(heads.kept_kv_heads, d)
            kept_rows = {a.q: _head_rows(heads.kept_heads, d), a.k: kv_rows, a.v: kv_rows,
                         s.mlp.gate: channels.kept, s.mlp.up: channels.kept}
            refitted = refit_block(block, dense_block, s, inputs, state["dense_stream"], kept_rows, cfg.batch_size,
                                   device, cfg.percdamp, dim_weights=state["fisher"][state["layer"]][1])
            del dense_block
    if cfg.reconstruct:
        with timer.stage("reconstruct"):
            fisher_weighted = cfg.reconstruct_weighting == "fisher"
            weights = state["fisher"][state["layer"]][1] if fisher_weighted else None
            fit = reconstruct_block(block, inputs, dense_target, cfg.reconstruct_epochs, cfg.reconstruct_lr,
                                    cfg.batch_size, device, cfg.seed, dim_weights=weights,
                                    step_batch=cfg.reconstruct_batch)
    if fits_dense:
        state["dense_stream"] = dense_target
    with timer.stage("calibrate"):  # pass 3, the pruned block: its outputs are the next block's inputs
        out = run_block(block, inputs, cfg.batch_size, device) if attended is None else run(halves.mlp, attended)
    del attended
    q, kv = head_widths(block, s)
    row = {"heads": q, "kv_heads": kv, "ffn": block.get_submodule(s.mlp.down).in_features,
           "target_ratio": target.target_ratio, "ratio": target.ratio, "rel_error": _relative_error(out, dense_out),
           "rel_error_windows": dense_out.shape[0], "attn_obs_error": heads.error, "ffn_obs_error": channels.error,
           "dense_heads": s.attention.num_heads, "dense_ffn": s.mlp.intermediate_size}
    if fit:
        row["reconstruct"] = {"error_before": fit.before, "error_after": fit.after, "kept": fit.kept}
    if refitted:
        row["refit"] = {"error_before": refitted.before, "error_after": refitted.after, "kept": refitted.kept}
    return row, out


def _prune_block_disp(block, s: BlockStructure, shape: BlockShape, target: LayerPlan, inputs, cfg: CompileConfig,
                      timer: StageTimer, device, state: dict) -> tuple[dict, torch.Tensor]:
    """DISP (hidden dims) or SlimGPT+DISP (hidden dims, heads, FFN channels), training-free.

    Pass 1 (dense block) collects the statistics of every reader and writer; the block's budget is split between
    its sites by error per parameter (`disp.allocate`) unless a reused plan fixes the counts. Attention: heads
    (OBS on o_proj), then read dims (OBS on the kept [q;k;v] rows: its input does not depend on the heads, so
    the statistics stay exact), then write rows of the compensated o_proj. Pass 2 re-collects the MLP's
    statistics with the pruned attention in place; FFN: channels, read dims, write rows, in the same order."""
    a, m = s.attention, s.mlp
    hidden, with_heads = shape.hidden_size, cfg.method == "slimgpt+disp"
    step = cfg.align_ffn
    # pass 1 (dense block): reader Hessians, writer output energies; o_proj's Hessian when heads may go (SlimGPT
    # needs it anyway) and down_proj's -- the expensive one, intermediate x intermediate -- only to score channels
    hessian_paths = [a.q, a.o, m.gate] + ([m.down] if with_heads else [])
    with timer.stage("calibrate"), collect_hessians(block, hessian_paths, output_energies=(a.o, m.down)) as acc:
        dense_out = run_block(block, inputs, cfg.batch_size, device)
    H = {p: h.H for p, h in acc.items() if isinstance(p, str)}
    lin = block.get_submodule
    with timer.stage("plan"):
        if target.attn_in_dims is not None:  # a reused plan fixes what the block keeps
            counts = disp.BlockCounts(target.num_attention_heads, target.num_key_value_heads,
                                      target.intermediate_size, *target.dims(hidden))
        else:
            curves = disp.site_curves(
                torch.cat([lin(p).weight.data for p in (a.q, a.k, a.v)]), H[a.q], acc[a.o, "energy"].energy,
                torch.cat([lin(p).weight.data for p in (m.gate, m.up)]), H[m.gate], acc[m.down, "energy"].energy,
                heads=(lin(a.o).weight.data, H[a.o], a.num_heads, a.num_kv_heads, a.head_dim, cfg.gqa) if with_heads else None,
                channels=(lin(m.down).weight.data, H[m.down], step) if with_heads else None, percdamp=cfg.percdamp)
            _measure_read_curves(block, s, curves, H, inputs, dense_out, cfg, device)
            # what earlier blocks removed above or below their own targets is carried to this one, so the
            # whole model lands on --sparsity although each block moves in whole units
            target_removed = target.target_ratio * target.dense_params + state.get("disp_debt", 0.0)
            counts = disp.allocate(shape, curves, max(0.0, target_removed), cfg.gqa, step)
            state["disp_debt"] = target_removed - (target.dense_params - counts.params(shape))
    kept: dict[str, torch.Tensor] = {}
    stash = {"weights": {}, "biases": {}, "hessians": {}}  # what --disp-train needs to redo the dims

    def keep_for_training(paths, hessians):
        if cfg.disp_train:
            for p in paths:
                stash["weights"][p] = lin(p).weight.data.clone()
                if lin(p).bias is not None:
                    stash["biases"][p] = lin(p).bias.data.clone()
            stash["hessians"].update(hessians)

    with timer.stage("prune"):
        H_o, attn_error = H[a.o], 0.0
        if counts.q != a.num_heads or counts.kv != a.num_kv_heads:
            heads = PruneHeads("slimgpt", cfg.gqa, cfg.head_score, cfg.compensate, cfg.percdamp)(
                block, s, num_heads=counts.q, num_kv_heads=counts.kv, hessian=H_o)
            MaterializeHeads()(block, s, result=heads)
            cols = _head_rows(heads.kept_heads, a.head_dim)
            H_o, attn_error = H_o[cols][:, cols], heads.error
        keep_for_training([a.q, a.k, a.v, a.o], {"attn_in": H[a.q], "attn_out": H_o})
        reads = PruneReadDims(cfg.percdamp)(block, s, paths=[a.q, a.k, a.v], keep=counts.attn_in, hessian=H[a.q])
        apply_dims(block, reads)
        writes = PruneWriteDims()(block, s, path=a.o, keep=counts.attn_out, hessian=H_o)
        apply_dims(block, writes)
        kept["attn_in"], kept["attn_out"] = reads.kept, writes.kept
    # pass 2, the pruned attention in place: the MLP's reader Hessian, and down_proj's Hessian only if channels go
    # (or may go: --disp-train-channels learns them)
    prune_channels = counts.inter != m.intermediate_size
    learn_channels = cfg.disp_train_channels  # CompileConfig allows it with slimgpt+disp and --disp-train only
    need_H_down = prune_channels or learn_channels
    with timer.stage("calibrate"), collect_hessians(block, [m.gate] + ([m.down] if need_H_down else []),
                                                    output_energies=() if need_H_down else (m.down,)) as acc:
        run_block(block, inputs, cfg.batch_size, device, keep_outputs=False)
    with timer.stage("prune"):
        ffn_error, down_energy, H_down = 0.0, None, acc[m.down].H if need_H_down else None
        if learn_channels:  # the full-width FFN and its statistics, to cut the learned channels from later
            stash["ffn_weights"] = {p: lin(p).weight.data.clone() for p in (m.gate, m.up, m.down)}
            stash["ffn_biases"] = {p: lin(p).bias.data.clone() for p in (m.gate, m.up, m.down) if lin(p).bias is not None}
            stash["hessians"]["ffn"] = H_down
            stash["channels"] = torch.arange(m.intermediate_size)  # the warm start, unless channels go below
        if prune_channels:
            channels = PruneChannels("slimgpt", cfg.compensate, cfg.percdamp)(block, s, width=counts.inter, hessian=H_down)
            MaterializeChannels()(block, s, result=channels)
            H_down, ffn_error = H_down[channels.kept][:, channels.kept], channels.error
            if learn_channels:
                stash["channels"] = channels.kept
        elif H_down is None:
            down_energy = acc[m.down, "energy"].energy
        keep_for_training([] if learn_channels else [m.gate, m.up, m.down],
                          {"mlp_in": acc[m.gate].H, "mlp_out": H_down if H_down is not None else down_energy})
        reads = PruneReadDims(cfg.percdamp)(block, s, paths=[m.gate, m.up], keep=counts.mlp_in, hessian=acc[m.gate].H)
        apply_dims(block, reads)
        writes = PruneWriteDims()(block, s, path=m.down, keep=counts.mlp_out, hessian=H_down, energy=down_energy)
        apply_dims(block, writes)
        kept["mlp_in"], kept["mlp_out"] = reads.kept, writes.kept
    with timer.stage("calibrate"):
        out = run_block(block, inputs, cfg.batch_size, device)
    params = counts.params(shape)
    row = {"heads": counts.q, "kv_heads": counts.kv, "ffn": counts.inter,
           **{f"{name}_dims": len(kept[name]) for name in INDEX_SETS},
           "target_ratio": target.target_ratio, "ratio": 1 - params / target.dense_params,
           "rel_error": _relative_error(out, dense_out), "attn_obs_error": attn_error, "ffn_obs_error": ffn_error,
           "dense_heads": a.num_heads, "dense_ffn": m.intermediate_size, "hidden": hidden,
           "index_sets": {name: idx for name, idx in kept.items() if len(idx) < hidden}}
    if cfg.disp_train:
        row["train_state"] = stash
    return row, out


def _learn_disp_masks(model, layers, structures: list[BlockStructure], rows: list[dict], shapes: list[BlockShape],
                      plan: PruningPlan, samples: torch.Tensor, cfg: CompileConfig) -> dict:
    """--disp-train: restore each block's weights from before its hidden dims were cut (slimgpt+disp: and its
    full-width FFN, from before its channels were cut), learn the masks with the hypernetwork (warm-started from
    the training-free selection, weights frozen), then cut the learned channels and dims with the same
    compensation as the training-free path (--disp-train-cut compensated) or exactly as the masks trained them
    (masked). Leaves the new widths and index sets in the rows."""
    from .disp_train import MaskSites, train_masks

    hidden = shapes[0].hidden_size
    init_keep = torch.ones(len(layers), len(INDEX_SETS), hidden, dtype=torch.bool)
    learn_channels = cfg.disp_train_channels
    init_channels = (torch.zeros(len(layers), shapes[0].intermediate_size, dtype=torch.bool) if learn_channels
                     else None)
    sites = []
    for i, (block, s, row) in enumerate(zip(layers, structures, rows)):
        state = row["train_state"]
        for p, w in state["weights"].items():
            block.get_submodule(p).weight.data.copy_(w)
        for p, b in state["biases"].items():
            block.get_submodule(p).bias.data.copy_(b)
        if learn_channels:  # back to the full-width FFN, the channel masks choose its width
            for p, w in state["ffn_weights"].items():
                _set(block, p, linear_from(w, state["ffn_biases"].get(p)))
            set_widths_from_weights(block, s)
            init_channels[i, state["channels"]] = True
        for k, name in enumerate(INDEX_SETS):
            if name in row["index_sets"]:
                init_keep[i, k] = False
                init_keep[i, k, row["index_sets"][name]] = True
        sites.append(MaskSites.of(block, s))
    n = samples.shape[1] // cfg.disp_seq_len
    windows = samples[:, : n * cfg.disp_seq_len].reshape(-1, cfg.disp_seq_len) if n else samples
    widths = [(row["heads"], row["kv_heads"], row["ffn"]) for row in rows]
    target = plan.block_params_dense * (1 - cfg.sparsity)
    result = train_masks(model, sites, shapes, widths, init_keep, windows, cfg.disp_train, target,
                         cfg.disp_lr, cfg.disp_lambda, cfg.seed, disp.MIN_DIMS, init_channels, cfg.align_ffn)
    # the masks were trained on the uncompensated weights; "compensated" refits the kept columns as the
    # training-free path does, "masked" writes the model the hypernetwork was trained on
    compensate = cfg.compensate and cfg.disp_train_cut == "compensated"
    for i, (block, s, row) in enumerate(zip(layers, structures, rows)):
        a, m = s.attention, s.mlp
        state = row.pop("train_state")
        if learn_channels:
            kept_channels = result.channels[i].nonzero().squeeze(1)
            H_down = state["hessians"]["ffn"]
            if len(kept_channels) < shapes[i].intermediate_size:
                cut = PruneChannels("slimgpt", compensate, cfg.percdamp)(
                    block, s, width=len(kept_channels), hessian=H_down, kept=kept_channels)
                MaterializeChannels()(block, s, result=cut)
                row["ffn_obs_error"] = cut.error
            state["hessians"]["mlp_out"] = H_down[kept_channels][:, kept_channels]
            row["ffn"] = len(kept_channels)
        keep = {name: result.keep[i, k].nonzero().squeeze(1) for k, name in enumerate(INDEX_SETS)}
        for name, paths in (("attn_in", [a.q, a.k, a.v]), ("mlp_in", [m.gate, m.up])):
            apply_dims(block, PruneReadDims(cfg.percdamp, compensate=compensate)(
                block, s, paths=paths, keep=len(keep[name]), hessian=state["hessians"][name], kept=keep[name]))
        for name, path in (("attn_out", a.o), ("mlp_out", m.down)):
            stats = state["hessians"][name]  # a Hessian, or (down_proj without channel pruning) output energies
            apply_dims(block, PruneWriteDims()(block, s, path=path, keep=len(keep[name]), kept=keep[name],
                                               **({"energy": stats} if stats.dim() == 1 else {"hessian": stats})))
        row["index_sets"] = {name: idx for name, idx in keep.items() if len(idx) < hidden}
        row.update({f"{name}_dims": len(idx) for name, idx in keep.items()})
        params = shapes[i].disp_params(row["heads"], row["kv_heads"], row["ffn"], *(len(keep[n]) for n in INDEX_SETS))
        row["ratio"] = 1 - params / plan.layers[i].dense_params
    return {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
            "window_tokens": windows.shape[1], "loss_first": result.loss_first, "loss_last": result.loss_last,
            "kept_over_target_last_step": result.kept_fraction_last, "dims_flipped": result.flipped,
            "channels_learned": learn_channels, "channels_flipped": result.channels_flipped, "cut": cfg.disp_train_cut,
            "lr": cfg.disp_lr, "lambda": cfg.disp_lambda}


READ_PROBE_WINDOWS = 8  # calibration windows the read-curve probe runs the block on


def _measure_read_curves(block, s: BlockStructure, curves: dict, H: dict, inputs, dense_out: torch.Tensor,
                         cfg: CompileConfig, device) -> None:
    """Put the read-dim curves on a measured scale. A read site's curve is exact in its projections' outputs, but
    what that costs the block's output is not linear: q/k errors pass through the softmax, gate/up errors through
    the activation and the product. So cut half of the site's dims (OBS, compensated), run the block on a few
    windows, and scale the curve so its first half sums to the block-output error actually measured (H's units)."""
    a, m = s.attention, s.mlp
    k = min(READ_PROBE_WINDOWS, inputs.hidden.shape[0])
    probe_inputs, reference = BlockInputs(inputs.hidden[:k], inputs.kwargs), dense_out[:k]
    for site, paths, hessian in (("attn_in", [a.q, a.k, a.v], H[a.q]), ("mlp_in", [m.gate, m.up], H[m.gate])):
        width = block.get_submodule(paths[0]).in_features
        cut = width // 2
        saved = {p: block.get_submodule(p).weight.data.clone() for p in paths}
        apply_dims(block, PruneReadDims(cfg.percdamp)(block, s, paths=paths, keep=width - cut, hessian=hessian))
        out = run_block(block, probe_inputs, cfg.batch_size, device)
        for p, w in saved.items():
            block.get_submodule(p).weight.data.copy_(w)
        measured = 2 / (reference.shape[0] * reference.shape[1]) * float((out - reference).double().pow(2).sum())
        curves[site] = curves[site] * (measured / max(float(curves[site][:cut].sum()), 1e-30))


def _record_disp_layers(plan: PruningPlan, rows: list[dict], shapes: list[BlockShape]) -> None:
    """Write the widths each DISP block ended with into the plan (counts only; index sets go to the safetensors)."""
    for layer, row, shape in zip(plan.layers, rows, shapes):
        layer.num_attention_heads, layer.num_key_value_heads, layer.intermediate_size = row["heads"], row["kv_heads"], row["ffn"]
        for name in INDEX_SETS:
            setattr(layer, f"{name}_dims", row[f"{name}_dims"])
        layer.params = shape.disp_params(row["heads"], row["kv_heads"], row["ffn"], *layer.dims(shape.hidden_size))
    plan.block_params_pruned = sum(layer.params for layer in plan.layers)


def _check_plan_fits(plan: PruningPlan, shapes: list[BlockShape]) -> None:
    if len(plan.layers) != len(shapes):
        raise SlimcError(f"plan has {len(plan.layers)} layers, the model has {len(shapes)}")
    for i, (layer, s) in enumerate(zip(plan.layers, shapes)):
        q, kv, f = layer.num_attention_heads, layer.num_key_value_heads, layer.intermediate_size
        if not (0 < q <= s.num_heads and 0 < kv <= s.num_kv_heads and 0 < f <= s.intermediate_size and q % kv == 0):
            raise SlimcError(f"plan layer {i} ({q} heads / {kv} KV heads / FFN {f}) does not fit the model "
                             f"({s.num_heads} / {s.num_kv_heads} / {s.intermediate_size})")
        dims = [v for v in (layer.attn_in_dims, layer.attn_out_dims, layer.mlp_in_dims, layer.mlp_out_dims) if v is not None]
        if any(not 0 < d <= s.hidden_size for d in dims):
            raise SlimcError(f"plan layer {i} keeps {max(dims)} hidden dims but the model's hidden size is "
                             f"{s.hidden_size}: the plan was made for a model of another width")


def _reuse_plan(path: str, shapes: list[BlockShape], cfg: CompileConfig) -> tuple[PruningPlan, CompileConfig]:
    """A saved plan's widths, re-counted on this model; its GQA mode and (for DISP) its method win."""
    import dataclasses

    plan = PruningPlan.load(path)
    _check_plan_fits(plan, shapes)
    is_disp = plan.selects_hidden_dims
    # the plan's head counts were chosen for its own GQA mode, its hidden-dim counts by its own method
    method = plan.method if is_disp else (cfg.method if cfg.method not in DISP_METHODS else "slimgpt")
    for layer, s in zip(plan.layers, shapes):
        widths = (layer.num_attention_heads, layer.num_key_value_heads, layer.intermediate_size)
        layer.params = s.disp_params(*widths, *layer.dims(s.hidden_size)) if is_disp else s.params(*widths)
        layer.dense_params = s.params(s.num_heads, s.num_kv_heads, s.intermediate_size)
        layer.output_bias = method == "flap"  # the compensation biases belong to FLAP, not to the widths
        if layer.output_bias:
            layer.params += s.added_output_bias_params
    plan.block_params_pruned = sum(layer.params for layer in plan.layers)
    plan.block_params_dense = sum(layer.dense_params for layer in plan.layers)
    return plan, dataclasses.replace(cfg, gqa=plan.gqa, method=method)


@contextmanager
def _staging_dir(output: Path, overwrite: bool):
    """A temp dir beside OUT, renamed to OUT only when everything was written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield tmp
        if output.exists():
            if not overwrite:
                raise SlimcError(f"output {output} appeared while compiling; not overwritten")
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _distillation_windows(cfg: CompileConfig, tokenizer, samples: torch.Tensor) -> torch.Tensor:
    """The calibration windows (plain and chat), then `--distill-windows` windows of fresh text of the same length
    (`data.distillation_windows`)."""
    if not cfg.distill_windows:
        return samples
    from . import data

    return torch.cat([samples, data.distillation_windows(tokenizer, cfg.calib, cfg.distill_windows, samples.shape[1],
                                                         cfg.seed)])


def _chat_generation(cfg: CompileConfig, loaded: LoadedModel, stream) -> tuple[str, object]:
    """--chat-data, and how the dense model is held while it answers the self-generated instructions (which
    any kind may need: with no text to frame, every chat window is self-generated). A streamed compile reads
    every block in for that moment when the fp32 model fits in half the RAM, else frames text instead."""
    if not stream:
        return cfg.chat_data, None
    from .stream import dense_fp32_bytes, fits_beside, whole_dense_model

    nbytes = dense_fp32_bytes(loaded.model)
    if fits_beside(nbytes):
        return cfg.chat_data, lambda: whole_dense_model(loaded)
    too_big = (f"--stream: the dense model ({nbytes / 2**30:.1f} GiB in fp32) is more than half this machine's RAM, "
               "too much to answer the chat-calibration instructions")
    if cfg.chat_data != "framed":
        print(f"slimc: {too_big}; calibrating on framed text instead", file=sys.stderr)

    @contextmanager
    def refuse():
        raise SlimcError(f"{too_big}, and there is no text to frame: pass --chat-calib off, or a text as --calib")
        yield

    return "framed", refuse


# the block pruner of each method (SlimGPT's handles slimgpt and magnitude)
BLOCK_PRUNERS = {"disp": _prune_block_disp, "slimgpt+disp": _prune_block_disp,
                 "wanda-sp": scored.prune_block_scored, "flap": scored.prune_block_scored}


def compile_model(cfg: CompileConfig, keep_model: bool = False) -> CompileResult:
    """Checks OUT and OUT.partial, compiles, and keeps or removes the partial state: kept when the compile
    stopped after finishing a block (or was interrupted), removed once OUT is written."""
    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:
        raise SlimcError(f"output {output} already exists (use --overwrite to replace it)")
    partial = None if cfg.plan_only else PartialCompile(output)
    streamed = _use_stream(cfg, keep_model)
    if not streamed:
        _check_whole_model_fits(cfg)
    resuming = bool(partial and partial.exists() and cfg.resume)
    if partial and partial.exists() and not resuming:
        if not cfg.overwrite:
            raise SlimcError(f"{partial.path} holds an unfinished compile ({partial.describe()}): pass --resume to "
                             "continue it, or --overwrite to start over")
        partial.discard()
    elif cfg.resume and partial and not resuming:
        print(f"slimc: --resume: nothing to resume at {partial.path}; starting fresh", file=sys.stderr)
    try:
        with compute_dtype(resolve_compute_dtype(cfg.compute_dtype, cfg.device)):
            result = _compile_model(cfg, keep_model, partial, resuming, streamed)
    except Interrupted as e:
        raise Interrupted(f"{e}; {partial.resume_hint()}" if partial and partial.exists() else str(e)) from None
    except BaseException:
        if partial and partial.exists() and partial.progress().get("blocks_done", 0) == 0:
            partial.discard()  # nothing finished: an error leaves nothing behind
        raise
    if partial:
        partial.discard()
    return result


def _activation_placement(cfg: CompileConfig, shape: tuple[int, int, int],
                          partial: PartialCompile | None) -> activations.SpillDir | None:
    """RAM, or files when the streams live at once exceed --activation-budget: a block's inputs, its dense and
    its pruned outputs (3), and with --reconstruct / --refit the dense model's stream and its next one (5)."""
    import tempfile

    streams = 5 if cfg.reconstruct or cfg.refit else 3
    directory = (Path(cfg.offload_dir) if cfg.offload_dir else partial.path / "activations" if partial
                 else Path(tempfile.gettempdir()))  # --plan-only keeps no partial state; its files die with it
    spill = activations.choose(shape, streams, cfg.activation_budget_bytes(), directory)
    if spill:
        need = streams * activations.stream_bytes(shape)
        print(f"slimc: the calibration activations take {need / 2**30:.1f} GiB ({streams} streams of {list(shape)} fp32), "
              f"more than the activation budget: they spill to {directory}", file=sys.stderr)
    return spill


def _check_whole_model_fits(cfg: CompileConfig) -> None:
    """A compile that holds the whole model in fp32 is refused in one line, before loading, when that alone is
    more than the machine's RAM (a local source; a hub id's size is not known before it is fetched)."""
    from .load import resolve_spec, read_source_config
    from .source import streamable_source
    from .stream import dense_fp32_bytes, memory_total

    if not streamable_source(cfg.model):
        return
    path, extra = resolve_spec(cfg.model)
    files = [Path(path) / extra["gguf_file"]] if "gguf_file" in extra else list(Path(path).glob("*.safetensors"))
    # no format holds a weight in under 1 bit: counting the weights (parsing a GGUF takes seconds) only matters
    # for a checkpoint that big
    if 32 * sum(f.stat().st_size for f in files) <= memory_total():
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(read_source_config(cfg.model).config, dtype=torch.float32)
    nbytes = dense_fp32_bytes(skeleton)
    if nbytes <= memory_total():
        return
    why = ", ".join(cfg.needs_whole_model()) or ("--stream off" if cfg.stream == "off" else "this compile")
    hint = (" (--target onnx exports one fp32 graph of the whole model: compile with --target hf here)"
            if cfg.target == "onnx" else "; without it the compile streams one block at a time")
    raise SlimcError(f"{why} needs the whole model in memory: {nbytes / 2**30:.1f} GiB in fp32, more than this "
                     f"machine's {memory_total() / 2**30:.1f} GiB of RAM{hint}")


def _use_stream(cfg: CompileConfig, keep_model: bool) -> bool:
    """--stream on / off as asked; auto streams a local safetensors or GGUF source unless an option needs the whole
    model (or the Python API asked for the pruned model in memory)."""
    # a reused DISP plan brings its method along (see _reuse_plan), and with it the need for every block at once
    disp_plan = bool(cfg.plan) and PruningPlan.load(cfg.plan).selects_hidden_dims
    if cfg.stream == "on" and disp_plan:
        raise SlimcError(f"--stream on: the plan {cfg.plan} selects hidden dimensions per block (DISP), which needs "
                         "the whole model in memory; pass --stream off")
    if cfg.stream != "auto":
        return cfg.stream == "on"
    from .source import streamable_source

    return not (keep_model or cfg.plan_only or disp_plan or cfg.needs_whole_model()) and streamable_source(cfg.model)


def _compile_model(cfg: CompileConfig, keep_model: bool, partial: PartialCompile | None,
                   resuming: bool, streamed: bool) -> CompileResult:
    from . import chat, data, report as report_mod
    from .exporters.hf import PLAN_FILE, write_hf

    output = Path(cfg.output)
    if cfg.target == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise SlimcError(f"--target onnx needs {', '.join(missing)} (pip install 'slimc[onnx]')")
    torch.manual_seed(cfg.seed)
    timer = StageTimer()
    t_start = time.perf_counter()
    stream = None
    with timer.stage("load"):
        if streamed:  # decoder blocks on the meta device, each read from the source when it is worked on
            from .source import load_skeleton
            from .stream import BlockStream

            loaded = load_skeleton(cfg.model)
            stream = BlockStream(loaded)
        else:
            loaded = load_model(cfg.model, dtype="float32")  # prune in fp32; the output takes the source's dtype
        model = loaded.model
        layers = decoder_layers(model)
        fingerprint = model_fingerprint(model, loaded.source)
    if resuming:
        partial.check(cfg, fingerprint, streamed)  # before the slow stages: a changed option is refused at once
    elif partial:
        partial.start(cfg, fingerprint, streamed)
    out_dtype = DTYPES[cfg.dtype] if cfg.dtype else loaded.dtype
    measured = cfg.schedule == "measured" and not cfg.plan  # the plan needs each layer's measured costs
    need_calib = not cfg.plan_only or measured
    with timer.stage("calibration data"):
        n, seq_len, strict = cfg.calibration_request()
        samples = data.calibration_samples(loaded.tokenizer, cfg.calib, n if need_calib else 1, seq_len, cfg.seed, strict)
        n_plain, chat_mix = samples.shape[0], None
        if need_calib and chat.chat_calibration_enabled(cfg.chat_calib, loaded.tokenizer):
            chat_data, materialize = _chat_generation(cfg, loaded, stream)
            chat_windows, chat_mix = chat.calibration_windows(
                model, loaded.tokenizer, cfg.calib, n_plain, seq_len, cfg.seed, cfg.chat_mix,
                chat_data, fingerprint, materialize)
            samples = torch.cat([samples, chat_windows])
        spill = _activation_placement(cfg, (samples.shape[0], samples.shape[1], model.config.hidden_size), partial)
        inputs = catch_block_inputs(model, samples, device="cpu", spill=spill)
    with timer.stage("capture"):
        structures = capture_structures(layers, inputs, stream)
        shapes = [block_shape(b, s) for b, s in zip(layers, structures)]
    if cfg.tp > 1 and model.config.num_attention_heads % cfg.tp:
        raise SlimcError(f"--tp {cfg.tp}: the model's {model.config.num_attention_heads} attention heads cannot be split "
                         f"over {cfg.tp} GPUs (vLLM checks the global head count)")
    block_state = {}
    if (cfg.refit or cfg.reconstruct and cfg.reconstruct_weighting == "fisher") and not cfg.plan_only:
        with timer.stage("refit" if cfg.refit else "reconstruct"):  # the stream's Fisher weighs each fit's error
            block_state["fisher"] = sensitivity.stream_fisher(model, layers, structures, samples, cfg.device)
    if cfg.method == "flap":
        with timer.stage("calibrate"):  # FLAP's statistics come from the dense model, before any block is cut
            block_state["flap_stats"] = scored.dense_stats(layers, structures, inputs, cfg.batch_size, cfg.device)
    if measured:
        with timer.stage("measure"):
            fisher = block_state.get("fisher") or sensitivity.stream_fisher(model, layers, structures, samples, cfg.device)
            curves = sensitivity.measure_curves(layers, structures, shapes, inputs, fisher, cfg.gqa,
                                                math.lcm(cfg.align_ffn, cfg.tp),
                                                cfg.tp, cfg.gqa_order == "sequential", cfg.percdamp, cfg.batch_size,
                                                cfg.device)
    with timer.stage("plan"):
        if cfg.plan:
            plan, cfg = _reuse_plan(cfg.plan, shapes, cfg)
        elif measured:
            plan = solve_measured_plan(shapes, curves, cfg.sparsity, cfg.gqa, cfg.align_ffn, cfg.tp)
        elif cfg.method == "flap":
            plan = scored.flap_plan(shapes, block_state["flap_stats"], layers, structures, cfg.sparsity, cfg.gqa,
                                    cfg.align_ffn, cfg.tp)
        elif cfg.method in DISP_METHODS:
            plan = disp.solve_disp_plan(shapes, cfg.sparsity, cfg.schedule, cfg.method, cfg.gqa, cfg.align_ffn)
        else:
            plan = solve_plan(shapes, cfg.sparsity, cfg.schedule, cfg.gqa, cfg.align_ffn, cfg.tp, cfg.head_rounding)
        plan.source_model, plan.method, plan.seed, plan.slimc_version = cfg.model, cfg.method, cfg.seed, __version__
        plan.calibration = {"source": cfg.calib, "samples": n_plain if need_calib else n, "seq_len": seq_len}
        if chat_mix:
            plan.calibration["chat"] = chat_mix
    if cfg.plan_only:
        with _staging_dir(output, cfg.overwrite) as tmp:
            (tmp / PLAN_FILE).write_text(plan.to_json())
        print(report_mod.format_plan(plan))
        return CompileResult(output, {"plan": plan.to_dict()})

    params_before = sum(p.numel() for p in model.parameters())
    partial.check_plan(plan.to_json())
    if stream:  # the output's layout follows from the plan: embeddings, norm and lm_head are written now
        from .stream import WEIGHTS_DIR

        stream.open_output(plan, out_dtype, partial.path / WEIGHTS_DIR, cfg.max_shard_bytes(),
                           resume=resuming and partial.progress()["blocks_done"] > 0)
    done_rows = []
    if resuming:
        with timer.stage("resume"):
            resumed = partial.load(None if stream else layers, structures)
            done_rows = resumed.rows
            if resumed.hidden is not None:
                inputs.hidden = activations.place(resumed.hidden, spill)
            block_state.update({k: activations.place(v, spill) for k, v in resumed.state.items()})
            for i in range(len(done_rows) if stream else 0):
                stream.skip(i)
    rows = prune_blocks(loaded, structures, plan, inputs, cfg, timer, shapes, block_state, partial, done_rows,
                        stream)
    del inputs
    disp_trained = None
    if cfg.disp_train:
        with timer.stage("disp-train"):
            disp_trained = _learn_disp_masks(model, layers, structures, rows, shapes, plan, samples, cfg)
    if cfg.method in DISP_METHODS:
        _record_disp_layers(plan, rows, shapes)
        with timer.stage("materialize"):
            for block, s, row in zip(layers, structures, rows):
                MaterializeDims()(block, s, index_sets=row.pop("index_sets"))
    with timer.stage("materialize"):
        from .materialize import build_slim_model, cast_state

        if stream:  # every tensor is in the shards already; the report's sample reads them back block by block
            stream.close()
            params_after = stream.params()
            slim = stream.load_written()
        else:
            # distillation trains the slim model (the one a DISP block runs in: it reads and writes its index
            # sets), in fp32; the output's dtype comes after it
            slim = build_slim_model(model, loaded.family, plan, torch.float32 if cfg.distill_epochs else out_dtype)
            del model, loaded.model
            params_after = sum(p.numel() for p in slim.parameters())
    distilled = None
    if cfg.distill_epochs:
        from .distill import distill

        with timer.stage("distill"):
            teacher = load_model(cfg.model, dtype="float32").model
            distilled = distill(slim, teacher, _distillation_windows(cfg, loaded.tokenizer, samples),
                                cfg.distill_epochs, cfg.distill_lr, seed=cfg.seed).__dict__
            del teacher
        cast_state(slim, out_dtype).eval()
    with timer.stage("sample"):
        sample = report_mod.greedy_sample(slim, loaded.tokenizer)
        chat_probe = chat.probe(slim, loaded.tokenizer) if chat.has_chat_template(loaded.tokenizer) else None
    timer.seconds["total"] = time.perf_counter() - t_start
    report = report_mod.build_report(cfg, plan, rows, params_before, params_after, timer.seconds, sample, chat_probe,
                                     distilled, active_compute_dtype())
    report["streamed"] = streamed
    if resuming:
        report["resumed"] = {"blocks_already_done": len(done_rows)}
    if disp_trained:
        report["disp_train"] = disp_trained
    with _staging_dir(output, cfg.overwrite) as tmp:
        if stream:
            from .exporters.hf import write_hf_files

            stream.move_into(tmp)
            write_hf_files(stream.skeleton.config, type(stream.skeleton).__name__, loaded.model.generation_config,
                           loaded.tokenizer, plan.to_json(), tmp)
        else:
            write_hf(slim, loaded.tokenizer, plan.to_json(), tmp, cfg.max_shard_bytes())
        if cfg.target == "vllm":
            from .exporters.vllm import check_servable

            check_servable(tmp, cfg.tp)
        if cfg.target == "onnx":
            from .exporters.onnx import export_onnx

            with timer.stage("export onnx"):
                report["onnx"] = export_onnx(slim, tmp)
            report["seconds"] = timer.seconds
        report_mod.write_report(report, tmp)
    print(report_mod.format_report(report))
    return CompileResult(output, report, slim if keep_model else None)


def compile(model: str, output: str, sparsity: float = 0.2, keep_model: bool = False, **options) -> CompileResult:  # noqa: A001
    """Python API of `slimc compile`: returns the output path and the report (options: see CompileConfig)."""
    return compile_model(CompileConfig(model=model, output=output, sparsity=sparsity, **options), keep_model=keep_model)
