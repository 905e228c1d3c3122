"""CompileConfig: every option of `slimc compile`, validated up front, round-trips to JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from .errors import SlimcError
from .plan import GQA_MODES, HEAD_ROUNDINGS, SCHEDULES

# the option choices live here, without torch, so that the command line answers --help and argument errors at once
TARGETS = ("hf", "vllm", "onnx")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")  # slimc.calibrate.resolve_compute_dtype
CHAT_CALIB_MODES = ("auto", "on", "off")  # slimc.chat.chat_calibration_enabled
CHAT_DATA = ("self", "framed", "both")  # slimc.chat: self-generated conversations, framed calibration text, or both
METHODS = ("slimgpt", "magnitude", "wanda-sp", "flap", "disp", "slimgpt+disp")
STREAM_MODES = ("auto", "on", "off")
DISP_METHODS = ("disp", "slimgpt+disp")  # each block reads / writes its own subset of the hidden dims
HEAD_SCORES = ("grouped", "column")
GQA_ORDERS = ("joint", "sequential")
RECONSTRUCT_WEIGHTINGS = ("fisher", "energy")
DISP_TRAIN_CUTS = ("compensated", "masked")  # how a learned DISP selection is cut (CompileConfig.disp_train_cut)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
CONFIG_FORMAT = "slimc.compile-config/1"
# Multiple that kept FFN widths are rounded to when --align-ffn is not given, per target, from measuring a
# gated MLP over a sweep of widths on the target's runtime (benchmarks/align_sweep.py, BENCHMARKS.md):
# torch CPU (hf) runs multiples of 8 ≈ 10 % cheaper per channel at prefill; onnxruntime CPU showed no
# width effect at all (±1 %). vllm: not measured yet (no GPU lent); 8 follows NVIDIA's tensor-core rule
# for 16-bit GEMMs (dimensions in multiples of 8) until a GPU sweep replaces it.
DEFAULT_ALIGN_FFN = {"hf": 8, "onnx": 1, "vllm": 8}
DEFAULT_CALIB_SAMPLES = 128
DEFAULT_SEQ_LEN = 512


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, option: str) -> int:
    """'500MB', '2GB', '1GiB' or a byte count -> bytes."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not m or float(m.group(1)) * SIZE_UNITS[m.group(2) or ""] < 1:
        raise SlimcError(f"{option} must be a size such as 500MB, 2GB or 1GiB (got {text!r})")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2) or ""])


@dataclass
class CompileConfig:
    model: str
    output: str
    sparsity: float = 0.2
    target: str = "hf"
    method: str = "slimgpt"
    schedule: str = "log"
    calib: str = "brown"
    calib_samples: int | None = None  # None: DEFAULT_CALIB_SAMPLES, or every window a shorter text holds (said so)
    seq_len: int | None = None  # None: DEFAULT_SEQ_LEN
    chat_calib: str = "auto"  # auto: chat windows whenever the tokenizer has a chat template
    chat_mix: float = 0.5  # chat windows per plain calibration window (added on top of --calib-samples)
    chat_data: str = "both"  # self-generated conversations, framed calibration text, or half each
    reconstruct: bool = False  # fit each pruned block's kept weights to the dense block's outputs
    reconstruct_epochs: int = 2
    reconstruct_lr: float = 3e-3  # chosen on held-out Brown 04-06 at 50 % (1e-4, 1e-3, 3e-3; BENCHMARKS §8)
    # calibration windows per Adam step: 2 beat 8 (then --batch-size) on held-out Brown at 50 %, at the same cost
    # (four times the steps on a quarter of the tokens each; BENCHMARKS.md §8)
    reconstruct_batch: int = 2
    reconstruct_weighting: str = "energy"  # energy: plain squared error; fisher: each dim by the loss's sensitivity
    # (a tie at 50 % on held-out text, BENCHMARKS.md §8: the plain one needs no backward pass)
    refit: bool = False  # closed-form refit of each pruned block's kept weights to the dense block (GPTAQ-style)
    distill_epochs: int = 0  # 0: off; else passes of whole-model distillation from the dense model after pruning
    distill_lr: float = 2e-4  # beat 5e-5 on held-out Brown and the probe prompts (BENCHMARKS.md §8)
    # more windows of fresh text to distil on besides the calibration windows: calibration holds too little text
    # for a second epoch, which only fits it (BENCHMARKS.md §8); Brown's train split for brown, else the --calib text
    distill_windows: int = 0
    disp_train: int = 0  # DISP: steps of hypernetwork mask training on top of the training-free selection (0: off)
    disp_lr: float = 1e-3  # the paper's AdamW learning rate
    disp_lambda: float = 2.0  # weight of the |log(kept / target)| parameter-budget term
    disp_seq_len: int = 256  # tokens per training sample
    # slimgpt+disp: learn the FFN channels too (the paper's fifth mask). Off: with 2,400 steps it was worse than
    # learning the dims alone on held-out Brown (126.1 vs 112.6 at 50 %, 381 vs 66 at 30 %, BENCHMARKS.md §6)
    disp_train_channels: bool = False
    # how --disp-train's learned selection is cut: with the OBS compensation of the kept columns (as the
    # training-free path), or as the masks trained it (the removed columns dropped, nothing refitted); compensated
    # won on held-out Brown for the same learned selection, dims alone and with channels (BENCHMARKS.md §6)
    disp_train_cut: str = "compensated"
    gqa: str = "query"
    gqa_order: str = "joint"  # query mode: one head from every KV group per round, or one head per round
    ffn_group_max: int = 1024  # largest group of FFN channels removed in one OBS round (SlimGPT's dynamic size)
    head_rounding: str = "floor"
    align_ffn: int | None = None  # None: DEFAULT_ALIGN_FFN[target]
    tp: int = 1
    dtype: str | None = None  # None: the source model's dtype
    # the dtype of the blocks' matmuls while calibrating, reconstructing and distilling (the weights stay float32);
    # auto: bfloat16 where the device runs it natively -- a tie with float32 on held-out Brown at 20/30/50 %, the
    # calibrate stage in 0.56 x the time on an AMX CPU (the float32 Hessians and OBS do not shrink; BENCHMARKS.md §1)
    compute_dtype: str = "auto"
    seed: int = 0
    device: str = "cpu"
    plan_only: bool = False
    plan: str | None = None
    compensate: bool = True
    head_score: str = "grouped"
    percdamp: float = 0.01
    batch_size: int = 8
    overwrite: bool = False
    resume: bool = False  # continue the unfinished compile kept in OUT.partial (slimc.resume)
    max_shard_size: str | None = None  # e.g. "2GB": shard the safetensors (None: one file)
    stream: str = "auto"  # on: one block in memory at a time (slimc.stream); auto: whenever the options and source allow
    activation_budget: str | None = None  # RAM for the calibration activations, e.g. "8GB" (None: a quarter of RAM)
    offload_dir: str | None = None  # where activations beyond the budget go (None: OUT.partial/activations)

    def __post_init__(self):
        def one_of(name, value, allowed):
            if value not in allowed:
                raise SlimcError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)} (got {value!r})")

        one_of("target", self.target, TARGETS)
        one_of("method", self.method, METHODS)
        one_of("schedule", self.schedule, SCHEDULES)
        one_of("gqa", self.gqa, GQA_MODES)
        one_of("gqa_order", self.gqa_order, GQA_ORDERS)
        one_of("head_score", self.head_score, HEAD_SCORES)
        one_of("head_rounding", self.head_rounding, HEAD_ROUNDINGS)
        one_of("chat_calib", self.chat_calib, CHAT_CALIB_MODES)
        one_of("chat_data", self.chat_data, CHAT_DATA)
        one_of("reconstruct_weighting", self.reconstruct_weighting, RECONSTRUCT_WEIGHTINGS)
        one_of("disp_train_cut", self.disp_train_cut, DISP_TRAIN_CUTS)
        one_of("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if not 0 < self.chat_mix <= 4:
            raise SlimcError(f"--chat-mix must be in (0, 4], got {self.chat_mix}")
        if self.align_ffn is None:
            self.align_ffn = DEFAULT_ALIGN_FFN[self.target]
        if self.dtype is not None:
            one_of("dtype", self.dtype, DTYPE_NAMES)
        if not 0 < self.sparsity <= 0.9:
            raise SlimcError(f"--sparsity must be in (0, 0.9], got {self.sparsity}")
        if self.distill_epochs < 0 or not self.distill_lr > 0 or self.distill_windows < 0:
            raise SlimcError("--distill-epochs and --distill-windows must be >= 0 and --distill-lr positive")
        if self.distill_windows and not self.distill_epochs:
            raise SlimcError("--distill-windows adds text to distil on: give --distill-epochs too")
        if self.disp_train < 0 or not self.disp_lr > 0 or not self.disp_lambda > 0 or self.disp_seq_len < 2:
            raise SlimcError("--disp-train must be >= 0; --disp-lr and --disp-lambda positive; --disp-seq-len >= 2")
        if self.schedule == "measured" and (self.method in DISP_METHODS or self.method == "flap"):
            raise SlimcError(f"--schedule measured splits the budget over heads and FFN channels; --method "
                             f"{self.method} chooses each layer's widths itself (use log, linear or uniform)")
        if self.method in DISP_METHODS:
            if self.reconstruct or self.refit:
                raise SlimcError(f"--reconstruct and --refit fit each block before its hidden dims are cut; they are not "
                                 f"combined with --method {self.method} (--distill-epochs is)")
            if self.plan_only:
                raise SlimcError(f"--plan-only: --method {self.method} chooses each block's widths from its calibration "
                                 "statistics; compile once and reuse OUT/slimc_plan.json with --plan")
            if self.tp > 1:
                raise SlimcError(f"--method {self.method} is served with --tp 1 only (index sets under tensor "
                                 "parallelism are not verified)")
        elif self.method in ("wanda-sp", "flap") and (self.reconstruct or self.refit):
            raise SlimcError(f"--reconstruct and --refit follow SlimGPT's OBS pruning (slimgpt, magnitude); --method "
                             f"{self.method} runs as published")
        elif self.method == "flap" and self.plan_only:
            raise SlimcError("--plan-only: --method flap chooses every layer's widths from calibration statistics "
                             "(its global search); compile once and reuse OUT/slimc_plan.json with --plan")
        elif self.disp_train:
            raise SlimcError(f"--disp-train learns DISP masks: it needs --method disp or slimgpt+disp "
                             f"(got {self.method})")
        if self.disp_train_channels and not (self.disp_train and self.method == "slimgpt+disp"):
            raise SlimcError("--disp-train-channels learns slimgpt+disp's FFN channels with the masks: it needs "
                             f"--method slimgpt+disp and --disp-train STEPS (got --method {self.method}, "
                             f"--disp-train {self.disp_train})")
        if self.disp_train_cut != "compensated" and not self.disp_train:
            raise SlimcError(f"--disp-train-cut {self.disp_train_cut} cuts what --disp-train learned: it needs "
                             "--disp-train STEPS")
        if not self.reconstruct_lr > 0:
            raise SlimcError(f"--reconstruct-lr must be positive, got {self.reconstruct_lr}")
        for name in ("calib_samples", "seq_len", "align_ffn", "tp", "batch_size", "reconstruct_epochs", "reconstruct_batch",
                     "ffn_group_max"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SlimcError(f"--{name.replace('_', '-')} must be a positive integer")
        one_of("stream", self.stream, STREAM_MODES)
        if self.stream == "on" and self.needs_whole_model():
            raise SlimcError(f"--stream: {', '.join(self.needs_whole_model())} needs the whole model in memory; "
                             "drop --stream for it")
        if self.max_shard_size is not None:
            self.max_shard_bytes()  # refuses a malformed size now, not after the compile
        if self.activation_budget is not None:
            self.activation_budget_bytes()
        if not self.device.startswith(("cpu", "cuda")):
            raise SlimcError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise SlimcError("--device cuda was asked for but no CUDA GPU is available")

    def needs_whole_model(self) -> list[str]:
        """What a streamed compile cannot do: each needs the whole model (or every block's index sets) at once."""
        whole = [("--target onnx", self.target == "onnx"), ("--schedule measured", self.schedule == "measured" and not self.plan),
                 ("--refit", self.refit), ("--reconstruct-weighting fisher", self.reconstruct and self.reconstruct_weighting == "fisher"),
                 ("--distill-epochs", self.distill_epochs > 0), (f"--method {self.method}", self.method in DISP_METHODS + ("flap",))]
        return [name for name, used in whole if used]

    def activation_budget_bytes(self) -> int | None:
        return None if self.activation_budget is None else parse_size(self.activation_budget, "--activation-budget")

    def max_shard_bytes(self) -> int | None:
        return None if self.max_shard_size is None else parse_size(self.max_shard_size, "--max-shard-size")

    def calibration_request(self) -> tuple[int, int, bool]:
        """(windows, tokens per window, strict): a size the user chose is refused when the text is too short;
        the defaults take what a shorter text holds instead."""
        strict = self.calib_samples is not None or self.seq_len is not None
        return self.calib_samples or DEFAULT_CALIB_SAMPLES, self.seq_len or DEFAULT_SEQ_LEN, strict

    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "CompileConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
