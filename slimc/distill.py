"""Recovery by distillation: after pruning, train the pruned model's kept linear weights to match the dense
model's next-token distributions on the calibration windows (KL divergence, dense as teacher).

Block-wise OBS (and local reconstruction) fit each block to its own dense outputs; what a user sees is the
whole model's output distribution. Distilling on the calibration windows — the chat-formatted ones carry the
dense model's own answers — pulls that back towards the dense model. Embeddings, norms and biases stay fixed;
a slice of the windows is held out, and the result is kept only if the held-out KL went down.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .reconstruct import HOLDOUT_EVERY, judge_split  # noqa: F401 (HOLDOUT_EVERY: the split's period, for callers)


@dataclass
class DistillResult:
    kl_before: float  # mean per-token KL(dense || pruned) on the held-out windows
    kl_after: float
    kept: bool
    steps: int
    tokens: int


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student)."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def _held_out_kl(student, teacher, windows: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for s in range(0, len(windows), batch_size):
        ids = windows[s : s + batch_size]
        total += float(_kl(student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits)) * len(ids)
    return total / max(len(windows), 1)


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, epochs: int, lr: float,
            batch_size: int = 2, seed: int = 0) -> DistillResult:
    device = next(student.parameters()).device
    windows = windows.to(device)
    train, held = judge_split(windows)
    # the decoder blocks' linear weights: embeddings (tied to lm_head) and norms stay as they are
    weights = [p for n_, p in student.named_parameters() if ".layers." in n_ and p.dim() == 2]
    grads = {p: p.requires_grad for p in student.parameters()}
    saved = [w.detach().clone() for w in weights]
    for p in student.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    before = _held_out_kl(student, teacher, held, batch_size)
    opt = torch.optim.Adam(weights, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    try:
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=gen)
            for s in tqdm(range(0, len(order), batch_size), desc="distill", unit="step", leave=False):
                ids = train[order[s : s + batch_size]]
                with torch.no_grad():
                    target = teacher(ids, use_cache=False).logits
                with torch.enable_grad():
                    loss = _kl(student(ids, use_cache=False).logits, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                steps += 1
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
    after = _held_out_kl(student, teacher, held, batch_size)
    if not after < before:
        with torch.no_grad():
            for w, s_ in zip(weights, saved):
                w.copy_(s_)
    return DistillResult(before, min(before, after), after < before, steps, steps * batch_size * windows.shape[1])
