"""Local reconstruction of a pruned block: a few passes of Adam on its kept linear weights so that its outputs
on the pruned stream match the dense model's block outputs on the dense stream.

OBS compensates only the columns of o_proj / down_proj that survive; the rows of q/k/v and gate/up are simply
deleted, and the error carried in from earlier pruned blocks is never corrected. Fitting every kept linear of
the block to the dense model's own outputs adjusts both. A slice of the calibration windows is held out: if
the fit does not lower the error there too, the block keeps its OBS weights.

What "error" means matters more than any learning rate: from SmolLM2's 11th block on, one hidden dim holds
~98 % of the stream's energy (max / median per-dim energy ~1e5), so a plain squared error over the block's
output is the error of that one dim, and a fit that minimizes it leaves every other dim to chance. Each dim's
error is therefore weighted (`dim_weights`: the stream's diagonal Fisher at the block output, what the
language-model loss feels there, `--reconstruct-weighting fisher`); without weights the fit is the plain squared
error. Measured at 50 % on held-out text the two tie (BENCHMARKS.md §8): Adam on the whole block moves every dim
anyway; the judge and the fit's emphasis are what the weights change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import activations
from .calibrate import BlockInputs, block_output, forward_precision

HOLDOUT_EVERY = 8  # every 8th calibration window judges the fit instead of feeding it


def judge_split(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, judge): every HOLDOUT_EVERY-th item judges, the rest are fitted on. Too few items to spare one:
    fit on all, judge on all."""
    is_judge = torch.arange(len(items)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    fit, judge = items[~is_judge], items[is_judge]
    return fit, (judge if len(judge) else fit)


@dataclass
class ReconstructResult:
    before: float  # relative squared error against the dense outputs on the held-out windows
    after: float
    kept: bool  # False: the fit did not help on the held-out windows and was undone


@torch.no_grad()
def _relative_error(block, inputs: BlockInputs, targets: torch.Tensor, idx: torch.Tensor, batch_size: int, device,
                    w: torch.Tensor) -> float:
    err = ref = 0.0
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        y = targets[b].to(device)
        with forward_precision(device):
            out = block_output(block, inputs.hidden[b].to(device), inputs.kwargs)
        err += float(((out.float() - y).pow(2) * w).sum())
        ref += float((y.pow(2) * w).sum())
    return err / max(ref, 1e-30)


def reconstruct_block(block: nn.Module, inputs: BlockInputs, targets: torch.Tensor, epochs: int, lr: float,
                      batch_size: int, device, seed: int = 0,
                      dim_weights: torch.Tensor | None = None, step_batch: int | None = None) -> ReconstructResult:
    """Fit the block's 2-D (linear) weights so block(inputs) ≈ targets, each output dim's squared error weighted
    by dim_weights (None: equally); norms and biases stay as they are. Each Adam step sees `step_batch` windows
    (None: batch_size, the judge's batching)."""
    step_batch = step_batch or batch_size
    hidden = targets.shape[-1]
    w = (torch.ones(hidden) if dim_weights is None else dim_weights.float()).to(device)
    w = w / w.mean().clamp_min(1e-30)
    train, held = judge_split(torch.arange(inputs.hidden.shape[0]))
    weights = [p for p in block.parameters() if p.dim() == 2]
    saved = [w.detach().clone() for w in weights]
    frozen = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(p.dim() == 2)
    before = _relative_error(block, inputs, targets, held, batch_size, device, w)
    opt = torch.optim.Adam(weights, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                order = train[torch.randperm(len(train), generator=gen)]
                for s in range(0, len(order), step_batch):
                    b = order[s : s + step_batch]
                    y = targets[b].to(device)
                    with forward_precision(device):
                        out = block_output(block, inputs.hidden[b].to(device), inputs.kwargs).float()
                    # relative to the target's (weighted) energy, so one lr fits every block's scale
                    loss = ((out - y).pow(2) * w).mean() / (y.pow(2) * w).mean().clamp_min(1e-30)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                activations.release(inputs.hidden)  # spilled streams: an epoch's random reads handed back
                activations.release(targets)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    after = _relative_error(block, inputs, targets, held, batch_size, device, w)
    if not after < before:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
    return ReconstructResult(before, min(after, before), after < before)
