"""Rebuild a `--disp-train-cut masked` output with the other cut, from the same learned selection.

Two --disp-train runs of one recipe landed on different selections before the hypernetwork was seeded from
--seed (its GRU took the global random state, which the compile code before it moves), so comparing the two cuts
across such runs mixes the cut with the run. This compiles the source again with the masked output's options and `--disp-train-cut
compensated`, its mask training replaced by the selection the masked output holds: the learned hidden dims (its
index sets) and, with `--disp-train-channels`, the learned FFN channels (recovered by matching its gate_proj rows,
which the masked cut leaves untouched, against the source's). The training-free part of a compile is
deterministic here, so both outputs start from the same warm start.

    python benchmarks/disp_cut.py bench-out/disp-masked/plain-0.5-sd-dt2400-masked \
        --out bench-out/disp-masked/plain-0.5-sd-dt2400-masked-recut
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import slimc
import slimc.disp_train as disp_train
from slimc.config import CompileConfig
from slimc.layout import INDEX_SETS, index_buffer


def learned_dims(tensors: dict[str, torch.Tensor], n_layers: int, hidden: int) -> torch.Tensor:
    """The kept hidden dims of an output's safetensors, bool [n_layers, 4, hidden]."""
    keep = torch.ones(n_layers, len(INDEX_SETS), hidden, dtype=torch.bool)
    for i in range(n_layers):
        for k, name in enumerate(INDEX_SETS):
            index = tensors.get(f"model.layers.{i}.{index_buffer(name)}")
            if index is not None:
                keep[i, k] = False
                keep[i, k, index] = True
    return keep


def learned_channels(tensors: dict[str, torch.Tensor], model: str, keep: torch.Tensor) -> torch.Tensor:
    """Which source channels each block of a masked cut kept: its gate_proj rows are source rows, restricted to
    the block's MLP read dims."""
    from slimc.load import load_model

    dense = load_model(model).model
    n_layers = keep.shape[0]
    inter = dense.config.intermediate_size
    channels = torch.zeros(n_layers, inter, dtype=torch.bool)
    mlp_in = INDEX_SETS.index("mlp_in")
    for i in range(n_layers):
        cols = keep[i, mlp_in].nonzero().squeeze(1)
        source = dense.model.layers[i].mlp.gate_proj.weight.data[:, cols]
        written = tensors[f"model.layers.{i}.mlp.gate_proj.weight"].float()
        distance, match = torch.cdist(written, source, compute_mode="donot_use_mm_for_euclid_dist").min(1)
        if len(match.unique()) != len(match) or float(distance.max()) > 1e-4:
            raise SystemExit(f"block {i}: gate_proj rows do not match source rows (was it cut masked?)")
        channels[i, match] = True
    return channels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("masked", type=Path, help="a compile output of --disp-train ... --disp-train-cut masked")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    report = json.loads((args.masked / "report.json").read_text())
    cfg = CompileConfig.from_dict(report["config"])
    if cfg.disp_train_cut != "masked":
        raise SystemExit(f"{args.masked} was cut {cfg.disp_train_cut}, not masked")
    n_layers, hidden = len(report["layers"]), report["layers"][0]["hidden"]
    tensors = load_file(str(args.masked / "model.safetensors"))
    keep = learned_dims(tensors, n_layers, hidden)
    channels = learned_channels(tensors, cfg.model, keep) if cfg.disp_train_channels else None
    trained = report["disp_train"]

    def replay(*_args, **_kwargs):  # the masked output's selection instead of another training run
        return disp_train.TrainResult(keep, channels, 0, 0, 0.0, trained["loss_first"], trained["loss_last"],
                                      trained["kept_over_target_last_step"], trained["dims_flipped"],
                                      trained["channels_flipped"])

    disp_train.train_masks = replay
    options = {k: v for k, v in report["config"].items() if k not in ("format", "model", "output", "sparsity")}
    options.update(disp_train_cut="compensated", overwrite=True)
    res = slimc.compile(cfg.model, str(args.out), cfg.sparsity, **options)
    again = learned_dims(load_file(str(args.out / "model.safetensors")), n_layers, hidden)
    assert torch.equal(again, keep), "the recut output holds another dim selection"
    widths = [(r["heads"], r["kv_heads"], r["ffn"]) for r in res.report["layers"]]
    assert widths == [(r["heads"], r["kv_heads"], r["ffn"]) for r in report["layers"]], "widths differ"
    print(f"{args.out}: the selection of {args.masked}, cut compensated")


if __name__ == "__main__":
    main()
