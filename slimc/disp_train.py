"""DISP-LLM's learned selection (`--disp-train STEPS`): a hypernetwork emits every block's four hidden-dim masks;
the model's weights stay frozen and only the hypernetwork trains.

    block embeddings -> bi-GRU over the blocks -> LayerNorm -> GELU -> one Linear per index set -> mask logits
    masks = Gumbel-sigmoid(logits), hard 0/1 in the forward, the soft value's gradient in the backward
    loss  = LM cross-entropy + lambda * |log(kept block params / target block params)|

Warm start: a per-block prior (a learnable bias on the logits) starts at +-WARM for the dims the training-free
selection kept / removed, and the Linear heads start at zero, so step 0 reproduces the training-free masks.
The masks act on the frozen model through hooks: a block's normalized input is multiplied by its read mask
before q/k/v (gate/up), its o_proj (down_proj) output by its write mask -- exactly what index_select / index_add
of the kept dims compute. Training needs the whole model for backward (activations of one window).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .layout import INDEX_SETS

WARM = 3.0  # |prior logit| of the warm start: sigmoid(3) = 0.95, so early Gumbel noise flips a few dims only
TAU = 0.5  # Gumbel-sigmoid temperature (the paper's)


class MaskHypernetwork(nn.Module):
    def __init__(self, n_layers: int, hidden: int, init_keep: torch.Tensor, width: int = 64, seed: int = 0):
        """init_keep: bool [n_layers, 4, hidden], the training-free selection (True = kept)."""
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("block_inputs", torch.randn(n_layers, width, generator=g))  # fixed, as in the paper
        self.gru = nn.GRU(width, width, bidirectional=True, batch_first=True)
        self.norm = nn.LayerNorm(2 * width)
        self.heads = nn.ModuleList(nn.Linear(2 * width, hidden) for _ in INDEX_SETS)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.prior = nn.Parameter(torch.where(init_keep, WARM, -WARM).float())

    def forward(self) -> torch.Tensor:
        h, _ = self.gru(self.block_inputs[None])
        h = F.gelu(self.norm(h[0]))
        return torch.stack([head(h) for head in self.heads], 1) + self.prior  # [n_layers, 4, hidden]


def gumbel_sigmoid_masks(logits: torch.Tensor, tau: float = TAU, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard 0/1 masks in the forward pass, the Gumbel-sigmoid's gradient in the backward (straight-through)."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + u.log() - (-u).log1p()) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


@dataclass
class MaskSites:
    """Where a block's masks act: the two norms whose outputs are read, and the two writers."""

    attn_norm: nn.Module
    attn_writer: nn.Module
    mlp_norm: nn.Module
    mlp_writer: nn.Module


class MaskedModel:
    """Hooks that multiply a frozen model's block reads and writes by the current masks ([n_layers, 4, hidden])."""

    def __init__(self, sites: list[MaskSites]):
        self.masks: torch.Tensor | None = None
        self.handles = []
        for i, s in enumerate(sites):
            for module, k in ((s.attn_norm, 0), (s.attn_writer, 1), (s.mlp_norm, 2), (s.mlp_writer, 3)):
                self.handles.append(module.register_forward_hook(self._hook(i, k)))

    def _hook(self, layer: int, k: int):
        def hook(module, args, output):
            return output * self.masks[layer, k].to(output.dtype)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def kept_params(masks: torch.Tensor, shapes, widths) -> torch.Tensor:
    """Block parameters kept under `masks` (differentiable in the mask sums); widths: (q, kv, ffn) per layer."""
    total = masks.new_zeros(())
    for layer_masks, shape, (q, kv, inter) in zip(masks, shapes, widths):
        total = total + shape.disp_params(q, kv, inter, *layer_masks.sum(-1))
    return total


@dataclass
class TrainResult:
    keep: torch.Tensor  # bool [n_layers, 4, hidden], the learned selection at the exact budget
    steps: int
    tokens: int
    seconds: float
    loss_first: float
    loss_last: float
    kept_fraction_last: float  # kept / target block params of the last step's sampled masks
    flipped: int  # dims whose keep/remove decision differs from the warm start


def budget_selection(logits: torch.Tensor, shapes, widths, target: float, min_dims: int) -> torch.Tensor:
    """Deterministic masks from the learned logits at exactly the budget: one logit threshold over all blocks and
    index sets, found by bisection, each index set keeping at least `min_dims` (its highest logits)."""
    order = logits.argsort(dim=-1, descending=True)
    floor = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order[..., :min_dims], True)

    def keep_at(t):
        return (logits > t) | floor

    lo, hi = float(logits.min()) - 1, float(logits.max()) + 1
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(kept_params(keep_at(mid).float(), shapes, widths)) > target:
            lo = mid
        else:
            hi = mid
    return keep_at(hi)


def train_masks(model: nn.Module, sites: list[MaskSites], shapes, widths, init_keep: torch.Tensor,
                windows: torch.Tensor, steps: int, target_params: float, lr: float = 1e-3, lam: float = 2.0,
                seed: int = 0, min_dims: int = 8) -> TrainResult:
    """Train the hypernetwork for `steps` windows (rows of `windows`, cycled in a seeded order) on the frozen
    `model` and return the learned selection at exactly `target_params` kept block parameters."""
    n_layers, _, hidden = init_keep.shape
    hyper = MaskHypernetwork(n_layers, hidden, init_keep, seed=seed)
    opt = torch.optim.AdamW(hyper.parameters(), lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    masked = MaskedModel(sites)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows), generator=g)
    t0, first, loss_value, kept_frac = time.perf_counter(), math.nan, math.nan, math.nan
    was_training = model.training
    model.eval()  # no dropout: only the masks are random
    try:
        for step in (bar := tqdm(range(steps), desc="disp-train", unit="step")):
            masked.masks = gumbel_sigmoid_masks(hyper(), generator=g)
            ids = windows[order[step % len(windows)]][None]
            ce = model(ids, labels=ids, use_cache=False).loss
            kept = kept_params(masked.masks, shapes, widths)
            loss = ce + lam * (kept / target_params).log().abs()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value, kept_frac = float(loss.detach()), float(kept.detach() / target_params)
            first = loss_value if step == 0 else first
            bar.set_postfix(loss=f"{loss_value:.3f}", ce=f"{float(ce.detach()):.3f}", kept=f"{kept_frac:.3f}")
    finally:
        masked.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    with torch.no_grad():
        keep = budget_selection(hyper(), shapes, widths, target_params, min_dims)
    return TrainResult(keep, steps, steps * windows.shape[1], time.perf_counter() - t0, first, loss_value, kept_frac,
                       int((keep != init_keep).sum()))
