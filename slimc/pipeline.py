"""`slimc compile`: load -> capture -> plan -> calibrate & prune block by block -> materialize -> export."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .passes import MaterializeChannels, MaterializeHeads, PruneChannels, PruneHeads
from .passes.prune_heads import head_widths

from . import __version__
from .calibrate import BlockInputs, to_device, catch_block_inputs, collect_hessians, decoder_layers, run_block
from .capture import BlockStructure, capture_block
from .config import CompileConfig
from .errors import SlimcError
from .load import DTYPES, LoadedModel, load_model, model_fingerprint
from .plan import BlockShape, LayerPlan, PruningPlan, solve_plan
from .reconstruct import reconstruct_block


@dataclass
class CompileResult:
    output: Path
    report: dict
    model: torch.nn.Module | None = None  # the materialized model (in memory), when pruning ran


@dataclass
class StageTimer:
    seconds: dict = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def block_shape(block: torch.nn.Module, s: BlockStructure) -> BlockShape:
    """Parameters owned by one query head, one KV head and one FFN channel, read off the live modules."""
    a, m = s.attention, s.mlp
    lin = block.get_submodule

    def has_bias(path):
        return lin(path).bias is not None

    d = a.head_dim
    q_head = d * lin(a.q).in_features + d * has_bias(a.q) + d * lin(a.o).out_features
    kv_head = d * (lin(a.k).in_features + lin(a.v).in_features) + d * (has_bias(a.k) + has_bias(a.v))
    channel = lin(m.gate).in_features + lin(m.up).in_features + lin(m.down).out_features + has_bias(m.gate) + has_bias(m.up)
    other = lin(a.o).out_features * has_bias(a.o) + lin(m.down).out_features * has_bias(m.down)
    return BlockShape(a.num_heads, a.num_kv_heads, d, m.intermediate_size, q_head, kv_head, channel, other)


def capture_structures(layers, inputs) -> list[BlockStructure]:
    """Export blocks with torch.export and analyse their graphs; blocks with identical parameter shapes and
    class share one capture (exporting all 30+ blocks would cost seconds each for no new information)."""
    seen: dict = {}
    out = []
    sample = inputs.hidden[:1, : min(16, inputs.hidden.shape[1])].to(next(layers[0].parameters()).device)
    kwargs = _slice_kwargs(inputs.kwargs, sample.shape[1])
    for block in layers:
        sig = (type(block), tuple((n, tuple(p.shape)) for n, p in block.named_parameters()))
        if sig not in seen:
            seen[sig] = capture_block(block, (sample,), kwargs)
        out.append(seen[sig])
    return out


def _slice_kwargs(kwargs: dict, length: int) -> dict:
    """Block kwargs for a shorter sample: rotary tables and position ids are per position."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            if v.dim() == 4:  # [b, 1, q, k] attention mask
                return v[..., :length, :length]
            return v[:, :length]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


def prune_blocks(loaded: LoadedModel, structures: list[BlockStructure], plan: PruningPlan, inputs,
                 cfg: CompileConfig, timer: StageTimer) -> list[dict]:
    """Block by block: stats for o_proj, prune heads, stats for down_proj with the pruned attention in place,
    prune FFN, then the pruned block's outputs become the next block's inputs."""
    device = torch.device(cfg.device)
    layers = decoder_layers(loaded.model)
    inputs.kwargs = to_device(inputs.kwargs, device)  # rotary tables etc. live with the block; hidden states stay cached
    slimgpt = cfg.method == "slimgpt"
    head_pass = PruneHeads(cfg.method, cfg.gqa, cfg.head_score, cfg.compensate, cfg.percdamp)
    channel_pass = PruneChannels(cfg.method, cfg.compensate, cfg.percdamp)
    rows = []
    # local reconstruction fits each pruned block to the dense model's outputs, so the dense stream is kept too
    dense_stream = inputs.hidden if cfg.reconstruct else None
    for i in (bar := tqdm(range(len(layers)), desc="calibrate+prune", unit="block")):
        block, s, target = layers[i].to(device), structures[i], plan.layers[i]
        with timer.stage("calibrate"), collect_hessians(block, [s.attention.o] if slimgpt else []) as acc:
            dense_out = run_block(block, inputs, cfg.batch_size, device)
        if cfg.reconstruct:
            with timer.stage("reconstruct"):
                dense_target = dense_out if dense_stream is inputs.hidden else run_block(
                    block, BlockInputs(dense_stream, inputs.kwargs), cfg.batch_size, device)
        with timer.stage("prune"):
            heads = head_pass(block, s, num_heads=target.num_attention_heads, num_kv_heads=target.num_key_value_heads,
                              hessian=acc[s.attention.o].H if slimgpt else None)
            MaterializeHeads()(block, s, result=heads)
        down_h = None
        if slimgpt:
            with timer.stage("calibrate"), collect_hessians(block, [s.mlp.down]) as acc:
                run_block(block, inputs, cfg.batch_size, device, keep_outputs=False)
            down_h = acc[s.mlp.down].H
        with timer.stage("prune"):
            channels = channel_pass(block, s, width=target.intermediate_size, hessian=down_h)
            MaterializeChannels()(block, s, result=channels)
        fit = None
        if cfg.reconstruct:
            with timer.stage("reconstruct"):
                fit = reconstruct_block(block, inputs, dense_target, cfg.reconstruct_epochs, cfg.reconstruct_lr,
                                        cfg.batch_size, device, cfg.seed)
            dense_stream = dense_target
        with timer.stage("calibrate"):
            out = run_block(block, inputs, cfg.batch_size, device)
        err = float((out - dense_out).pow(2).sum() / dense_out.pow(2).sum().clamp_min(1e-12))
        q, kv = head_widths(block, s)
        rows.append({"layer": i, "heads": q, "kv_heads": kv, "ffn": block.get_submodule(s.mlp.down).in_features,
                     "target_ratio": target.target_ratio, "ratio": target.ratio, "rel_error": err,
                     "attn_obs_error": heads.error, "ffn_obs_error": channels.error,
                     "dense_heads": s.attention.num_heads, "dense_ffn": s.mlp.intermediate_size})
        if fit:
            rows[-1]["reconstruct"] = {"error_before": fit.before, "error_after": fit.after, "kept": fit.kept}
        bar.set_postfix(heads=q, ffn=rows[-1]["ffn"], err=f"{err:.3g}")
        inputs.hidden = out
        layers[i] = block.to("cpu") if device.type != "cpu" else block
    return rows


def _check_plan_fits(plan: PruningPlan, shapes: list[BlockShape]) -> None:
    if len(plan.layers) != len(shapes):
        raise SlimcError(f"plan has {len(plan.layers)} layers, the model has {len(shapes)}")
    for i, (layer, s) in enumerate(zip(plan.layers, shapes)):
        q, kv, f = layer.num_attention_heads, layer.num_key_value_heads, layer.intermediate_size
        if not (0 < q <= s.num_heads and 0 < kv <= s.num_kv_heads and 0 < f <= s.intermediate_size and q % kv == 0):
            raise SlimcError(f"plan layer {i} ({q} heads / {kv} KV heads / FFN {f}) does not fit the model "
                             f"({s.num_heads} / {s.num_kv_heads} / {s.intermediate_size})")


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


def compile_model(cfg: CompileConfig, keep_model: bool = False) -> CompileResult:
    from . import chat, data, report as report_mod
    from .exporters.hf import PLAN_FILE, write_hf

    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:
        raise SlimcError(f"output {output} already exists (use --overwrite to replace it)")
    if cfg.target == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise SlimcError(f"--target onnx needs {', '.join(missing)} (pip install 'slimc[onnx]')")
    torch.manual_seed(cfg.seed)
    timer = StageTimer()
    t_start = time.perf_counter()
    with timer.stage("load"):
        loaded = load_model(cfg.model, dtype="float32")  # prune in fp32; the output takes the source's dtype
        model = loaded.model
        layers = decoder_layers(model)
    out_dtype = DTYPES[cfg.dtype] if cfg.dtype else loaded.dtype
    need_calib = not cfg.plan_only
    with timer.stage("calibration data"):
        n = cfg.calib_samples if need_calib else 1
        samples = data.calibration_samples(loaded.tokenizer, cfg.calib, n, cfg.seq_len, cfg.seed)
        chat_mix = None
        if need_calib and chat.chat_calibration_enabled(cfg.chat_calib, loaded.tokenizer):
            chat_windows, chat_mix = chat.calibration_windows(
                model, loaded.tokenizer, cfg.calib, cfg.calib_samples, cfg.seq_len, cfg.seed, cfg.chat_mix,
                cfg.chat_data, model_fingerprint(model))
            samples = torch.cat([samples, chat_windows])
        inputs = catch_block_inputs(model, samples, device="cpu")
    with timer.stage("capture"):
        structures = capture_structures(layers, inputs)
        shapes = [block_shape(b, s) for b, s in zip(layers, structures)]
    if cfg.tp > 1 and model.config.num_attention_heads % cfg.tp:
        raise SlimcError(f"--tp {cfg.tp}: the model's {model.config.num_attention_heads} attention heads cannot be split "
                         f"over {cfg.tp} GPUs (vLLM checks the global head count)")
    with timer.stage("plan"):
        if cfg.plan:
            plan = PruningPlan.load(cfg.plan)
            _check_plan_fits(plan, shapes)
            plan.layers = [LayerPlan(l.num_attention_heads, l.num_key_value_heads, l.intermediate_size,
                                     l.target_ratio, s.params(l.num_attention_heads, l.num_key_value_heads, l.intermediate_size),
                                     s.params(s.num_heads, s.num_kv_heads, s.intermediate_size))
                           for l, s in zip(plan.layers, shapes)]
            plan.block_params_pruned = sum(l.params for l in plan.layers)
            plan.block_params_dense = sum(l.dense_params for l in plan.layers)
            cfg.gqa = plan.gqa  # the plan's head counts were chosen for its own GQA mode
        else:
            plan = solve_plan(shapes, cfg.sparsity, cfg.schedule, cfg.gqa, cfg.align_ffn, cfg.tp, cfg.head_rounding)
        plan.source_model, plan.method, plan.seed, plan.slimc_version = cfg.model, cfg.method, cfg.seed, __version__
        plan.calibration = {"source": cfg.calib, "samples": cfg.calib_samples, "seq_len": cfg.seq_len}
        if chat_mix:
            plan.calibration["chat"] = chat_mix
    if cfg.plan_only:
        with _staging_dir(output, cfg.overwrite) as tmp:
            (tmp / PLAN_FILE).write_text(plan.to_json())
        print(report_mod.format_plan(plan))
        return CompileResult(output, {"plan": plan.to_dict()})

    params_before = sum(p.numel() for p in model.parameters())
    rows = prune_blocks(loaded, structures, plan, inputs, cfg, timer)
    del inputs
    distilled = None
    if cfg.distill_epochs:
        from .distill import distill

        with timer.stage("distill"):
            teacher = load_model(cfg.model, dtype="float32").model
            distilled = distill(model, teacher, samples, cfg.distill_epochs, cfg.distill_lr, seed=cfg.seed).__dict__
            del teacher
    with timer.stage("materialize"):
        from .materialize import build_slim_model

        slim = build_slim_model(model, loaded.family, plan, out_dtype)
        del model, loaded.model
    params_after = sum(p.numel() for p in slim.parameters())
    with timer.stage("sample"):
        sample = report_mod.greedy_sample(slim, loaded.tokenizer)
        chat_probe = chat.probe(slim, loaded.tokenizer) if chat.has_chat_template(loaded.tokenizer) else None
    timer.seconds["total"] = time.perf_counter() - t_start
    report = report_mod.build_report(cfg, plan, rows, params_before, params_after, timer.seconds, sample, chat_probe)
    if distilled:
        report["distill"] = distilled
    with _staging_dir(output, cfg.overwrite) as tmp:
        if cfg.target == "vllm":
            from .exporters.vllm import write_vllm

            write_vllm(slim, loaded.tokenizer, plan.to_json(), tmp, cfg.tp)
        else:
            write_hf(slim, loaded.tokenizer, plan.to_json(), tmp)
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
