"""DISP-LLM's learned selection (`--disp-train STEPS`): a hypernetwork emits every block's four hidden-dim masks
and, with `--disp-train-channels` (slimgpt+disp), the FFN channel mask too -- the paper's five selections (its
`virtual_gate` is the intermediate one). The model's weights stay frozen and only the hypernetwork trains.

    block embeddings -> bi-GRU over the blocks -> LayerNorm -> GELU -> one Linear per mask -> mask logits
    masks = Gumbel-sigmoid(logits), hard 0/1 in the forward, the soft value's gradient in the backward
    loss  = LM cross-entropy + lambda * |log(kept block params / target block params)|

Warm start: a per-block prior (a learnable bias on the logits) starts at +-WARM for the dims the training-free
selection kept / removed, and the Linear heads start at zero, so step 0 reproduces the training-free masks.
The masks act on the frozen model through hooks: a block's normalized input is multiplied by its read mask
before q/k/v (gate/up), its o_proj (down_proj) output by its write mask -- exactly what index_select / index_add
of the kept dims compute -- and down_proj's input by the channel mask (a removed channel contributes nothing).
Learning the channels moves budget between a block's FFN width and its hidden dims, and between blocks, by
the LM loss; heads stay as the training-free allocation left them (the paper does not prune heads).
Training needs the whole model for backward (activations of one window). The model's forward runs in the
compile's compute dtype (`--compute-dtype`), like the calibration's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .calibrate import forward_precision
from .layout import INDEX_SETS

WARM = 3.0  # |prior logit| of the warm start: sigmoid(3) = 0.95, so early Gumbel noise flips a few dims only
TAU = 0.5  # Gumbel-sigmoid temperature (the paper's)


def _warm_prior(keep: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.where(keep, WARM, -WARM).float())


def _zero_linear(n_in: int, n_out: int) -> nn.Linear:
    head = nn.Linear(n_in, n_out)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class MaskHypernetwork(nn.Module):
    def __init__(self, n_layers: int, hidden: int, init_keep: torch.Tensor, width: int = 64, seed: int = 0,
                 init_channels: torch.Tensor | None = None):
        """init_keep: bool [n_layers, 4, hidden], the training-free selection (True = kept); init_channels: bool
        [n_layers, intermediate], its FFN channels, when those are learned too."""
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("block_inputs", torch.randn(n_layers, width, generator=g))  # fixed, as in the paper
        # the GRU's initial weights from --seed, not from the global random state: that depends on whatever ran
        # before in the compile, and two runs that differed there learned different selections (BENCHMARKS.md §6);
        # the zeroed heads draw too (nn.Linear's init), inside the fork so the global state is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.gru = nn.GRU(width, width, bidirectional=True, batch_first=True)
            self.heads = nn.ModuleList(_zero_linear(2 * width, hidden) for _ in INDEX_SETS)
            self.channel_head = None if init_channels is None else _zero_linear(2 * width, init_channels.shape[1])
        self.norm = nn.LayerNorm(2 * width)
        self.prior = _warm_prior(init_keep)
        self.channel_prior = None if init_channels is None else _warm_prior(init_channels)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dim logits [n_layers, 4, hidden], channel logits [n_layers, intermediate] or None)."""
        h, _ = self.gru(self.block_inputs[None])
        h = F.gelu(self.norm(h[0]))
        dims = torch.stack([head(h) for head in self.heads], 1) + self.prior
        return dims, None if self.channel_head is None else self.channel_head(h) + self.channel_prior


def gumbel_sigmoid_masks(logits: torch.Tensor, tau: float = TAU, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard 0/1 masks in the forward pass, the Gumbel-sigmoid's gradient in the backward (straight-through)."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + u.log() - (-u).log1p()) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


@dataclass
class MaskSites:
    """Where a block's masks act: the two norms whose outputs are read, and the two writers (the MLP's writer
    also reads the FFN channels, masked on its input)."""

    attn_norm: nn.Module
    attn_writer: nn.Module
    mlp_norm: nn.Module
    mlp_writer: nn.Module

    @classmethod
    def of(cls, block: nn.Module, structure) -> "MaskSites":
        """The sites of a decoder block, its writers found by graph capture (a `capture.BlockStructure`)."""
        return cls(block.input_layernorm, block.get_submodule(structure.attention.o),
                   block.post_attention_layernorm, block.get_submodule(structure.mlp.down))


class MaskedModel:
    """Hooks that multiply a frozen model's block reads and writes by the current dim masks ([n_layers, 4,
    hidden]) and, when given, down_proj's input by the channel masks ([n_layers, intermediate])."""

    def __init__(self, sites: list[MaskSites], channels: bool = False):
        self.masks: torch.Tensor | None = None
        self.channel_masks: torch.Tensor | None = None
        self.handles = []
        for i, s in enumerate(sites):
            for module, k in ((s.attn_norm, 0), (s.attn_writer, 1), (s.mlp_norm, 2), (s.mlp_writer, 3)):
                self.handles.append(module.register_forward_hook(self._hook(i, k)))
            if channels:
                self.handles.append(s.mlp_writer.register_forward_pre_hook(self._channel_hook(i)))

    def _hook(self, layer: int, k: int):
        def hook(module, args, output):
            return output * self.masks[layer, k].to(output.dtype)
        return hook

    def _channel_hook(self, layer: int):
        def hook(module, args):
            return (args[0] * self.channel_masks[layer].to(args[0].dtype),) + tuple(args[1:])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def kept_params(masks: torch.Tensor, shapes, widths, channel_masks: torch.Tensor | None = None) -> torch.Tensor:
    """Block parameters kept under `masks` (differentiable in the mask sums); widths: (q, kv, ffn) per layer, the
    FFN width taken from `channel_masks` instead when the channels are learned."""
    total = masks.new_zeros(())
    for i, (layer_masks, shape, (q, kv, inter)) in enumerate(zip(masks, shapes, widths)):
        if channel_masks is not None:
            inter = channel_masks[i].sum()
        total = total + shape.disp_params(q, kv, inter, *layer_masks.sum(-1))
    return total


@dataclass
class TrainResult:
    keep: torch.Tensor  # bool [n_layers, 4, hidden], the learned selection at the exact budget
    channels: torch.Tensor | None  # bool [n_layers, intermediate], the learned FFN channels (None: not learned)
    steps: int
    tokens: int
    seconds: float
    loss_first: float
    loss_last: float
    kept_fraction_last: float  # kept / target block params of the last step's sampled masks
    flipped: int  # dims whose keep/remove decision differs from the warm start
    channels_flipped: int = 0  # FFN channels whose keep/remove decision differs from the warm start


def _ranks(logits: torch.Tensor) -> torch.Tensor:
    """Each logit's rank within its row, 0 = highest."""
    return logits.argsort(dim=-1, descending=True).argsort(dim=-1)


def budget_selection(logits: torch.Tensor, shapes, widths, target: float, min_dims: int,
                     channel_logits: torch.Tensor | None = None, channel_step: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministic masks from the learned logits at exactly the budget: one logit threshold over all blocks and
    masks, found by bisection. Each index set keeps at least `min_dims` (its highest logits); a block's FFN width
    (channels above the threshold) is rounded to a multiple of `channel_step` (--align-ffn), at least one step.
    Returns (dims [n_layers, 4, hidden], channels [n_layers, intermediate] or None)."""
    dim_ranks = _ranks(logits)
    channel_ranks = None if channel_logits is None else _ranks(channel_logits)

    def keep_at(t):
        dims = dim_ranks < (logits > t).sum(-1, keepdim=True).clamp(min=min_dims)
        if channel_logits is None:
            return dims, None
        n = ((channel_logits > t).sum(-1, keepdim=True).float() / channel_step).round().long().clamp(min=1)
        return dims, channel_ranks < (n * channel_step).clamp(max=channel_logits.shape[-1])

    def params(t):
        dims, channels = keep_at(t)
        return float(kept_params(dims.float(), shapes, widths, None if channels is None else channels.float()))

    values = logits if channel_logits is None else torch.cat([logits.flatten(), channel_logits.flatten()])
    lo, hi = float(values.min()) - 1, float(values.max()) + 1
    for _ in range(60):
        mid = (lo + hi) / 2
        if params(mid) > target:
            lo = mid
        else:
            hi = mid
    return keep_at(hi)


def train_masks(model: nn.Module, sites: list[MaskSites], shapes, widths, init_keep: torch.Tensor,
                windows: torch.Tensor, steps: int, target_params: float, lr: float = 1e-3, lam: float = 2.0,
                seed: int = 0, min_dims: int = 8, init_channels: torch.Tensor | None = None,
                channel_step: int = 1) -> TrainResult:
    """Train the hypernetwork for `steps` windows (rows of `windows`, cycled in a seeded order) on the frozen
    `model` and return the learned selection at exactly `target_params` kept block parameters. With
    `init_channels` (bool [n_layers, intermediate]; the model's FFNs at that full width) the FFN channels are
    learned too, each block's width a multiple of `channel_step`."""
    n_layers, _, hidden = init_keep.shape
    hyper = MaskHypernetwork(n_layers, hidden, init_keep, seed=seed, init_channels=init_channels)
    opt = torch.optim.AdamW(hyper.parameters(), lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    masked = MaskedModel(sites, channels=init_channels is not None)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows), generator=g)
    t0, first, loss_value, kept_frac = time.perf_counter(), math.nan, math.nan, math.nan
    was_training = model.training
    model.eval()  # no dropout: only the masks are random
    try:
        for step in (bar := tqdm(range(steps), desc="disp-train", unit="step")):
            dim_logits, channel_logits = hyper()
            masked.masks = gumbel_sigmoid_masks(dim_logits, generator=g)
            if channel_logits is not None:
                masked.channel_masks = gumbel_sigmoid_masks(channel_logits, generator=g)
            ids = windows[order[step % len(windows)]][None]
            # the frozen model's matmuls in the compile's compute dtype (bfloat16 where the CPU has AMX); the
            # hypernetwork, the masks and the budget term stay float32, and autocast computes the loss in float32
            with forward_precision(ids.device):
                ce = model(ids, labels=ids, use_cache=False).loss
            kept = kept_params(masked.masks, shapes, widths, masked.channel_masks)
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
        dim_logits, channel_logits = hyper()
        keep, channels = budget_selection(dim_logits, shapes, widths, target_params, min_dims, channel_logits,
                                          channel_step)
    return TrainResult(keep, channels, steps, steps * windows.shape[1], time.perf_counter() - t0, first, loss_value,
                       kept_frac, int((keep != init_keep).sum()),
                       0 if channels is None else int((channels != init_channels).sum()))
