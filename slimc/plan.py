"""The pruning plan: per-layer widths chosen by the Incremental Pruning Ratio schedule.

A plan is decided before any calibration: each layer gets a parameter target r_i from the schedule shape,
rounds its attention to whole head units (a KV group, or one query head per group), and lets its FFN width
take up the rest of its target. One scale is solved so that the parameters removed over all blocks hit the
requested sparsity. The plan is stored as JSON inside every checkpoint.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SlimcError

PLAN_FORMAT = "slimc.plan/1"
SCHEDULES = ("log", "linear", "uniform", "measured")  # measured: slimc.sensitivity + slimc.allocate
SHAPED_SCHEDULES = SCHEDULES[:3]  # a ratio per layer from a formula, known before any calibration
GQA_MODES = ("groups", "query")
HEAD_ROUNDINGS = ("floor", "nearest")
SHAPE_RATIO = 4.0  # r_last / r_first, the published SlimGPT shape (LLaMA-7B 20%: 0.0625 -> 0.25)
MAX_LAYER_RATIO = 0.95
TOLERANCE = 0.01  # achieved sparsity must be within +-1 point of the request


@dataclass
class BlockShape:
    """Dense widths of one decoder block and the parameters owned by each prunable unit."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    q_head_params: int  # q rows + o columns (+ q bias) of one query head
    kv_head_params: int  # k and v rows (+ biases) of one KV head
    channel_params: int  # gate and up rows + down column (+ biases) of one FFN channel
    other_params: int = 0  # block linear params not tied to any unit (e.g. o_proj/down_proj bias)
    hidden_size: int = 0  # residual width (needed to count DISP's hidden dims)
    qkv_bias: bool = False
    o_bias: bool = False
    gate_up_bias: bool = False
    down_bias: bool = False

    @property
    def added_output_bias_params(self) -> int:
        """Parameters of the o_proj / down_proj biases FLAP's compensation adds where the family has none."""
        return self.hidden_size * (int(not self.o_bias) + int(not self.down_bias))

    def head_unit(self, gqa: str) -> tuple[int, int, int]:
        """(how many units, query heads per unit, KV heads per unit) of a GQA mode: "groups", a unit is one KV
        head with all its query heads; "query", one query head from every KV group (KV heads stay)."""
        group = self.num_heads // self.num_kv_heads
        if gqa == "groups":
            return self.num_kv_heads, group, 1
        if gqa == "query":
            return group, self.num_kv_heads, 0
        raise SlimcError(f"unknown --gqa mode {gqa!r} (choose from {', '.join(GQA_MODES)})")

    def heads_without(self, units: int, gqa: str) -> tuple[int, int]:
        """(query heads, KV heads) left after removing `units` head units."""
        _, unit_q, unit_kv = self.head_unit(gqa)
        return self.num_heads - units * unit_q, self.num_kv_heads - units * unit_kv

    def params(self, q: int, kv: int, inter: int) -> int:
        return q * self.q_head_params + kv * self.kv_head_params + inter * self.channel_params + self.other_params

    def disp_params(self, q: int, kv: int, inter: int, attn_in: int, attn_out: int, mlp_in: int, mlp_out: int) -> int:
        """Parameters of a block that reads attn_in / mlp_in and writes attn_out / mlp_out hidden dims: every
        hidden dim counts the columns (reads) or rows (writes) it removes. Equals params() at full width."""
        d = self.head_dim
        attention = (q + 2 * kv) * d * (attn_in + self.qkv_bias) + attn_out * (q * d + self.o_bias)
        mlp = 2 * inter * (mlp_in + self.gate_up_bias) + mlp_out * (inter + self.down_bias)
        return attention + mlp


@dataclass
class LayerPlan:
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    target_ratio: float = 0.0
    params: int = 0
    dense_params: int = 0
    # DISP: hidden dims the block reads / writes (None: the whole residual; methods without DISP)
    attn_in_dims: int | None = None
    attn_out_dims: int | None = None
    mlp_in_dims: int | None = None
    mlp_out_dims: int | None = None
    # FLAP: o_proj and down_proj carry a compensation bias (created where the family has none)
    output_bias: bool = False

    def dims(self, hidden: int) -> tuple[int, int, int, int]:
        return tuple(hidden if v is None else v for v in (self.attn_in_dims, self.attn_out_dims,
                                                          self.mlp_in_dims, self.mlp_out_dims))

    @property
    def ratio(self) -> float:
        return 1 - self.params / self.dense_params if self.dense_params else 0.0


@dataclass
class PruningPlan:
    sparsity: float
    schedule: str
    gqa: str
    align_ffn: int
    tp: int
    layers: list[LayerPlan]
    block_params_dense: int
    block_params_pruned: int
    scale: float = 0.0
    source_model: str = ""
    method: str = ""
    calibration: dict = field(default_factory=dict)
    head_rounding: str = "floor"
    seed: int = 0
    slimc_version: str = ""
    format: str = PLAN_FORMAT

    @property
    def selects_hidden_dims(self) -> bool:
        """A DISP plan: each block reads and writes its own hidden-dim index sets (a reused one keeps its method)."""
        from .config import DISP_METHODS

        return self.method in DISP_METHODS and bool(self.layers) and self.layers[0].attn_in_dims is not None

    @property
    def achieved_sparsity(self) -> float:
        return 1 - self.block_params_pruned / self.block_params_dense

    def to_dict(self) -> dict:
        d = asdict(self)
        d["achieved_sparsity"] = self.achieved_sparsity
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "PruningPlan":
        if d.get("format") != PLAN_FORMAT:
            raise SlimcError(f"not a slimc plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})")
        d = {k: v for k, v in d.items() if k != "achieved_sparsity"}
        d["layers"] = [LayerPlan(**layer) for layer in d["layers"]]
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        p = Path(path)
        if not p.is_file():
            raise SlimcError(f"plan file not found: {p}")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise SlimcError(f"cannot read plan {p}: {e}") from e


def schedule_ratios(schedule: str, n_layers: int, scale: float) -> list[float]:
    """Per-layer parameter targets. log: r_i = s(1 + 3 ln(i+1)/ln n) (SlimGPT's Incremental Pruning Ratio,
    r_last = 4 r_first); linear: same endpoints, linear in i; uniform: s everywhere."""
    if schedule not in SHAPED_SCHEDULES:
        raise SlimcError(f"unknown schedule {schedule!r} (choose from {', '.join(SHAPED_SCHEDULES)})")
    if schedule == "uniform" or n_layers == 1:
        return [scale] * n_layers
    k = SHAPE_RATIO - 1
    if schedule == "log":
        return [scale * (1 + k * math.log(i + 1) / math.log(n_layers)) for i in range(n_layers)]
    return [scale * (1 + k * i / (n_layers - 1)) for i in range(n_layers)]


def tp_ok(q: int, kv: int, tp: int) -> bool:
    return q % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def layer_widths(shape: BlockShape, ratio: float, gqa: str, align_ffn: int, tp: int,
                 head_rounding: str = "floor") -> LayerPlan:
    """Widths of one layer for a parameter target `ratio`: heads rounded to whole units, FFN takes the rest.

    head_rounding="floor" removes a head unit only when the layer's target covers it whole; "nearest" rounds
    to the closest unit count. Head units are coarse (a third of a SmolLM2 layer's attention), and on held-out
    Brown text removing fewer heads and more FFN channels was clearly better (BENCHMARKS.md)."""
    n_units = shape.head_unit(gqa)[0]
    ideal = ratio * n_units
    if head_rounding not in HEAD_ROUNDINGS:
        raise SlimcError(f"unknown head rounding {head_rounding!r} (choose from {', '.join(HEAD_ROUNDINGS)})")
    over = (lambda u: u > ideal + 1e-9) if head_rounding == "floor" else (lambda u: False)
    candidates = sorted(range(n_units), key=lambda u: (over(u), abs(u - ideal), u))  # keep >= 1 unit
    for u in candidates:
        q, kv = shape.heads_without(u, gqa)
        if tp_ok(q, kv, tp):
            break
    else:
        raise SlimcError(
            f"no head count is valid for tensor parallel {tp} with {shape.num_heads} query / "
            f"{shape.num_kv_heads} KV heads"
        )
    dense = shape.params(shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
    attn_removed = (shape.num_heads - q) * shape.q_head_params + (shape.num_kv_heads - kv) * shape.kv_head_params
    ffn_removed = max(0.0, ratio * dense - attn_removed)
    step = math.lcm(align_ffn, tp)
    kept = shape.intermediate_size - ffn_removed / shape.channel_params
    kept = int(round(kept / step)) * step
    kept = min(shape.intermediate_size, max(step, kept))
    if kept % tp:
        raise SlimcError(f"FFN width {shape.intermediate_size} cannot be split for tensor parallel {tp}")
    return LayerPlan(q, kv, kept, target_ratio=ratio, params=shape.params(q, kv, kept), dense_params=dense)


def solve_plan(
    shapes: list[BlockShape], sparsity: float, schedule: str = "log", gqa: str = "query",
    align_ffn: int = 1, tp: int = 1, head_rounding: str = "floor",
) -> PruningPlan:
    """Find the schedule scale whose rounded per-layer widths remove `sparsity` of the block parameters."""
    if not 0 < sparsity <= 0.9:
        raise SlimcError(f"sparsity must be in (0, 0.9], got {sparsity}")
    if align_ffn < 1 or tp < 1:
        raise SlimcError("--align-ffn and --tp must be positive integers")
    n = len(shapes)
    dense = sum(s.params(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes)

    def build(scale: float) -> tuple[list[LayerPlan], float]:
        ratios = [min(r, MAX_LAYER_RATIO) for r in schedule_ratios(schedule, n, scale)]
        layers = [layer_widths(s, r, gqa, align_ffn, tp, head_rounding) for s, r in zip(shapes, ratios)]
        return layers, 1 - sum(layer.params for layer in layers) / dense

    hi = MAX_LAYER_RATIO  # at this scale every layer is capped: the most the schedule can remove
    best_layers, best_achieved = build(hi)
    if best_achieved < sparsity - TOLERANCE:
        raise SlimcError(
            f"sparsity {sparsity:.0%} cannot be met: with the {schedule} schedule, at least one KV group / query "
            f"head per group, FFN multiples of {math.lcm(align_ffn, tp)}, at most {best_achieved:.1%} of the "
            "block parameters can be removed"
        )
    lo, best_scale = 0.0, hi
    for _ in range(60):
        mid = (lo + hi) / 2
        layers, achieved = build(mid)
        if abs(achieved - sparsity) < abs(best_achieved - sparsity):
            best_layers, best_achieved, best_scale = layers, achieved, mid
        if achieved < sparsity:
            lo = mid
        else:
            hi = mid
    if abs(best_achieved - sparsity) > TOLERANCE:
        raise SlimcError(
            f"sparsity {sparsity:.0%} cannot be met within 1 point with these unit sizes (closest: "
            f"{best_achieved:.1%}); try another --gqa mode or a smaller --align-ffn"
        )
    pruned = sum(layer.params for layer in best_layers)
    return PruningPlan(
        sparsity=sparsity, schedule=schedule, gqa=gqa, align_ffn=align_ffn, tp=tp, layers=best_layers,
        block_params_dense=dense, block_params_pruned=pruned, scale=best_scale, head_rounding=head_rounding,
    )


def solve_measured_plan(shapes: list[BlockShape], curves: list, sparsity: float, gqa: str = "query",
                        align_ffn: int = 1, tp: int = 1) -> PruningPlan:
    """Widths from measured cost curves (`slimc.sensitivity.LayerCurves`, one per layer): the block-parameter
    budget `sparsity` split over every layer's heads and FFN channels by error per parameter removed."""
    from .allocate import allocate

    if not 0 < sparsity <= 0.9:
        raise SlimcError(f"sparsity must be in (0, 0.9], got {sparsity}")
    dense = sum(s.params(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes)
    flat = [c for layer in curves for c in (layer.heads, layer.channels)]
    removed = allocate(flat, sparsity * dense)
    layers = []
    for i, s in enumerate(shapes):
        units, channels = removed[2 * i], removed[2 * i + 1]
        q, kv = s.heads_without(units, gqa)
        inter = s.intermediate_size - channels
        layer_dense = s.params(s.num_heads, s.num_kv_heads, s.intermediate_size)
        params = s.params(q, kv, inter)
        layers.append(LayerPlan(q, kv, inter, target_ratio=1 - params / layer_dense, params=params,
                                dense_params=layer_dense))
    pruned = sum(layer.params for layer in layers)
    achieved = 1 - pruned / dense
    if abs(achieved - sparsity) > TOLERANCE:
        raise SlimcError(f"sparsity {sparsity:.0%} cannot be met within 1 point by the measured schedule (closest: "
                         f"{achieved:.1%}): the layers cannot give up that much")
    return PruningPlan(sparsity=sparsity, schedule="measured", gqa=gqa, align_ffn=align_ffn, tp=tp, layers=layers,
                       block_params_dense=dense, block_params_pruned=pruned)
