"""Graph capture: export one decoder block with torch.export and read its prunable structure off the fx graph.

What must shrink together is derived from the dataflow, not from module names:
- attention: the linears whose outputs reach the q / k / v operands of `scaled_dot_product_attention`, their
  head layout (read from the operands' shapes), and the linear that consumes the attention output;
- gated MLP: the `mul` whose two operands are two different linears (one through an activation), and the
  linear that consumes the product.
Anything else (fused qkv or gate_up, unknown attention ops, ungated MLPs) is refused with a clear message:
a wrong guess here would silently produce a wrong prune.

`capture_structures` captures each distinct block of a model once; `block_shape` reads off the live modules how many
parameters one query head, one KV head and one FFN channel own (the plan's cost model).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import fx, nn

from .compat import CACHE_KWARGS
from .errors import SlimcError
from .plan import BlockShape

_ACTIVATIONS = {"silu", "gelu", "relu", "gelu_tanh", "tanh", "sigmoid"}
# ops a head's data may pass through between its projection and the attention op (reshapes, RoPE, norms)
_LINEAR = torch.ops.aten.linear.default
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class AttentionStructure:
    q: str  # module paths relative to the block
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class MLPStructure:
    gate: str
    up: str
    down: str
    intermediate_size: int


@dataclass(frozen=True)
class BlockStructure:
    block_type: str
    attention: AttentionStructure
    mlp: MLPStructure

    def to_dict(self) -> dict:
        return asdict(self)


class UnsupportedBlockError(SlimcError):
    pass


def export_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """torch.export the block on one real input (non-strict: transformers code is plain Python)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in (*CACHE_KWARGS, "use_cache")}
    try:
        with torch.no_grad():
            return torch.export.export(block, args, kwargs, strict=False)
    except Exception as e:  # an export failure is a limitation of the block's code, report it as such
        raise UnsupportedBlockError(
            f"cannot capture decoder block {type(block).__name__} with torch.export: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _linear_producers(node: fx.Node) -> set[fx.Node]:
    """Linear nodes reached by walking backwards from `node` without passing through another linear."""
    found, stack, seen = set(), [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target == _LINEAR:
            found.add(n)
            continue
        for a in n.all_input_nodes:
            stack.append(a)
    return found


def _linear_consumers(node: fx.Node) -> set[fx.Node]:
    """Linear nodes reached by walking forward from `node`, stopping at the first linear on each path."""
    found, stack, seen = set(), list(node.users), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target == _LINEAR:
            found.add(n)
            continue
        stack.extend(n.users)
    return found


def analyze_block(ep: torch.export.ExportedProgram, block_type: str) -> BlockStructure:
    """Derive the pruning groups of one exported decoder block from its graph."""
    graph = ep.graph_module.graph
    param_of = ep.graph_signature.inputs_to_parameters  # placeholder name -> "self_attn.q_proj.weight"

    def module_of(linear: fx.Node) -> str:
        w = linear.args[1]
        fqn = param_of.get(w.name)
        if fqn is None or not fqn.endswith(".weight"):
            raise UnsupportedBlockError(f"{block_type}: a linear layer's weight is not a module parameter")
        return fqn[: -len(".weight")]

    attn_nodes = [n for n in graph.nodes if n.op == "call_function" and n.target == _SDPA]
    if len(attn_nodes) != 1:
        raise UnsupportedBlockError(
            f"{block_type}: expected one scaled_dot_product_attention op, found {len(attn_nodes)} "
            "(unknown attention implementation)"
        )
    sdpa = attn_nodes[0]
    qkv = []
    for role, operand in zip("qkv", sdpa.args[:3]):
        prods = _linear_producers(operand)
        if len(prods) != 1:
            raise UnsupportedBlockError(f"{block_type}: attention {role} does not come from exactly one linear")
        qkv.append(prods.pop())
    if len({id(n) for n in qkv}) != 3:
        raise UnsupportedBlockError(f"{block_type}: fused qkv projection (q, k, v share one linear) is not supported")
    q_val, k_val = sdpa.args[0].meta["val"], sdpa.args[1].meta["val"]
    num_heads, head_dim = int(q_val.shape[1]), int(q_val.shape[3])
    num_kv_heads = int(k_val.shape[1])
    outs = _linear_consumers(sdpa)
    if len(outs) != 1:
        raise UnsupportedBlockError(f"{block_type}: attention output does not feed exactly one linear")
    o = outs.pop()
    if num_heads % num_kv_heads:
        raise UnsupportedBlockError(f"{block_type}: {num_heads} query heads over {num_kv_heads} KV heads")

    gated = []
    for n in graph.nodes:
        if n.op != "call_function" or _op_name(n) != "mul" or len(n.all_input_nodes) != 2:
            continue
        srcs = []
        for a in n.args[:2]:
            through_act = isinstance(a, fx.Node) and _op_name(a) in _ACTIVATIONS
            src = a.args[0] if through_act else a
            if isinstance(src, fx.Node) and src.op == "call_function" and src.target == _LINEAR:
                srcs.append((src, through_act))
        if len(srcs) == 2:
            gated.append((n, srcs))
    if len(gated) != 1:
        fused = any(_op_name(n) in ("split", "chunk", "split_with_sizes") for n in graph.nodes
                    if any(p.target == _LINEAR for p in n.all_input_nodes if p.op == "call_function"))
        why = "fused gate_up projection is not supported" if fused else "no gated MLP (linear * act(linear)) found"
        raise UnsupportedBlockError(f"{block_type}: {why}")
    mul, ((a, a_act), (b, b_act)) = gated[0]
    if a is b:
        raise UnsupportedBlockError(f"{block_type}: fused gate_up projection is not supported")
    gate, up = (a, b) if a_act or not b_act else (b, a)
    downs = _linear_consumers(mul)
    if len(downs) != 1:
        raise UnsupportedBlockError(f"{block_type}: the gated product does not feed exactly one linear")
    down = downs.pop()
    inter = int(mul.meta["val"].shape[-1])
    return BlockStructure(
        block_type=block_type,
        attention=AttentionStructure(
            q=module_of(qkv[0]), k=module_of(qkv[1]), v=module_of(qkv[2]), o=module_of(o),
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        ),
        mlp=MLPStructure(gate=module_of(gate), up=module_of(up), down=module_of(down), intermediate_size=inter),
    )


def capture_block(block: nn.Module, args: tuple, kwargs: dict) -> BlockStructure:
    """Export `block` on a sample input and return its structure (checked against the live modules)."""
    ep = export_block(block, args, kwargs)
    s = analyze_block(ep, type(block).__name__)
    a = s.attention
    q, o = block.get_submodule(a.q), block.get_submodule(a.o)
    if q.out_features != a.num_heads * a.head_dim or o.in_features != a.num_heads * a.head_dim:
        raise UnsupportedBlockError(f"{s.block_type}: q/o projection widths disagree with the head layout")
    if block.get_submodule(s.mlp.down).in_features != s.mlp.intermediate_size:
        raise UnsupportedBlockError(f"{s.block_type}: down projection width disagrees with the MLP width")
    return s


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
    return BlockShape(a.num_heads, a.num_kv_heads, d, m.intermediate_size, q_head, kv_head, channel, other,
                      hidden_size=lin(a.q).in_features, qkv_bias=has_bias(a.q), o_bias=has_bias(a.o),
                      gate_up_bias=has_bias(m.gate), down_bias=has_bias(m.down))


def capture_structures(layers, inputs, stream=None) -> list[BlockStructure]:
    """Export blocks with torch.export and analyse their graphs; blocks with identical parameter shapes and
    class share one capture (exporting all 30+ blocks would cost seconds each for no new information). A streamed
    compile's blocks are on the meta device: each one exported is read from the source for the moment."""
    seen: dict = {}
    out = []
    sample = inputs.hidden[:1, : min(16, inputs.hidden.shape[1])]
    kwargs = _slice_kwargs(inputs.kwargs, sample.shape[1])
    for i, block in enumerate(layers):
        sig = (type(block), tuple((n, tuple(p.shape)) for n, p in block.named_parameters()))
        if sig not in seen:
            if stream:
                stream.fetch(i)
            seen[sig] = capture_block(block, (sample.to(next(block.parameters()).device),), kwargs)
            if stream:
                stream.release(i)
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
