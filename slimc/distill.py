"""Recovery by distillation: after pruning, train the pruned model's kept linear weights to match the dense
model's next-token distributions on the calibration windows (KL divergence, dense as teacher).

Block-wise OBS (and local reconstruction) fit each block to its own dense outputs; what a user sees is the
whole model's output distribution. Distilling on the calibration windows — the chat-formatted ones carry the
dense model's own answers — pulls that back towards the dense model. Embeddings, norms and biases stay fixed;
a slice of the windows is held out and judges every epoch: the model leaves with the weights of the epoch whose
held-out KL was lowest, or as it came if none went below where it started (a second epoch can fit the training
windows at the cost of the held-out ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibrate import forward_precision
from .reconstruct import HOLDOUT_EVERY, judge_split  # noqa: F401 (HOLDOUT_EVERY: the split's period, for callers)


@dataclass
class DistillResult:
    kl_before: float  # mean per-token KL(dense || pruned) on the held-out windows
    kl_after: float  # of the weights the model leaves with
    kept: bool  # False: no epoch lowered the held-out KL, the weights are the ones distillation started from
    best_epoch: int  # 0 when not kept
    epoch_kls: list[float]  # held-out KL after each epoch
    steps: int  # trained, whichever epoch was kept
    tokens: int


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student)."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def _held_out_kl(student, teacher, windows: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    # a pass of two models over every held-out window: minutes on CPU once fresh windows join them
    for s in tqdm(range(0, len(windows), batch_size), desc="distill: held-out KL", unit="batch", leave=False):
        ids = windows[s : s + batch_size]
        with forward_precision(ids.device):
            student_logits, teacher_logits = student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits
        total += float(_kl(student_logits, teacher_logits)) * len(ids)
    return total / max(len(windows), 1)


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, epochs: int, lr: float,
            batch_size: int = 2, seed: int = 0) -> DistillResult:
    device = next(student.parameters()).device
    windows = windows.to(device)
    train, held = judge_split(windows)
    # the decoder blocks' linear weights: embeddings (tied to lm_head) and norms stay as they are
    weights = [p for n_, p in student.named_parameters() if ".layers." in n_ and p.dim() == 2]
    grads = {p: p.requires_grad for p in student.parameters()}
    # the weights to leave with if training ends now: the start, then the best epoch's (one copy at a time)
    best_weights = [w.detach().clone() for w in weights]
    for p in student.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    best_kl = _held_out_kl(student, teacher, held, batch_size)
    before, best_epoch, epoch_kls = best_kl, 0, []
    opt = torch.optim.Adam(weights, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = tokens = 0
    try:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(train), generator=gen)
            for s in tqdm(range(0, len(order), batch_size), desc=f"distill {epoch}/{epochs}", unit="step",
                          leave=False):
                ids = train[order[s : s + batch_size]]
                with torch.no_grad(), forward_precision(device):
                    target = teacher(ids, use_cache=False).logits
                with torch.enable_grad():
                    with forward_precision(device):
                        logits = student(ids, use_cache=False).logits
                    loss = _kl(logits, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                steps += 1
                tokens += ids.numel()
            epoch_kls.append(_held_out_kl(student, teacher, held, batch_size))
            if epoch_kls[-1] < best_kl:
                best_kl, best_epoch = epoch_kls[-1], epoch
                best_weights = None  # freed before the copy below: never two copies at once
                if epoch < epochs:  # the last epoch's weights are the model's own: nothing to copy
                    best_weights = [w.detach().clone() for w in weights]
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
    if best_epoch != epochs:
        with torch.no_grad():
            for w, s_ in zip(weights, best_weights):
                w.copy_(s_)
    return DistillResult(before, best_kl, best_epoch > 0, best_epoch, epoch_kls, steps, tokens)
