"""An unfinished compile's state, kept beside OUT in OUT.partial/ so a killed or interrupted compile continues
from its last finished block (`--resume`) and ends with the same bytes as a run straight through.

    OUT.partial/
      progress.json            what was started (options, source fingerprint, plan) and how many blocks are done
      block-00007.safetensors  block 7 as pruned (fp32, exact), its report row in the metadata (tensors beside)
      stream-00008.safetensors what block 8 needs: its inputs, the dense stream (--reconstruct / --refit),
                               the RNG state; only the newest is kept. Spilled streams (slimc.activations)
                               are not copied: the metadata names their files, kept until the next block
      weights/                 --stream: the output shards, each finished block already in its place
      activations/             the spilled activation streams (unless --offload-dir puts them elsewhere)

Every file is written to a temporary name and renamed into place, and progress.json, renamed last, only names
files that are complete: a SIGKILL at any moment leaves the previous consistent state.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__, activations
from .errors import SlimcError

FORMAT = "slimc.partial/1"
PROGRESS = "progress.json"
# options that leave the pruned tensors alone, free to differ between the first run and --resume
FREE_OPTIONS = ("overwrite", "resume", "max_shard_size", "activation_budget", "offload_dir")
# entries of the block loop's state that a block hands to the next one (slimc.pipeline.prune_blocks)
CARRIED_TENSORS = ("dense_stream",)
CARRIED_VALUES = ("disp_debt",)


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


@dataclass
class Resumed:
    """What a resumed compile starts from."""
    blocks_done: int
    rows: list[dict] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # the next block's inputs (None when no block was done)
    state: dict = field(default_factory=dict)  # CARRIED_* entries of the block loop's state


class PartialCompile:
    def __init__(self, output: Path):
        self.path = partial_dir(Path(output))

    def exists(self) -> bool:
        return (self.path / PROGRESS).is_file()

    def progress(self) -> dict:
        try:
            return json.loads((self.path / PROGRESS).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SlimcError(f"cannot read {self.path / PROGRESS} ({e}): use --overwrite to start over") from e

    def describe(self) -> str:
        done = self.progress().get("blocks_done", 0)
        return f"{done} block{'s' if done != 1 else ''} finished"

    def resume_hint(self) -> str:
        return f"{self.path} keeps {self.describe()}: re-run the same command with --resume to continue"

    def discard(self) -> None:
        stream = self.progress().get("stream") if self.exists() else None
        if stream:  # spilled streams kept under another --offload-dir
            for path in _spilled_files(self.path / stream):
                activations.unpin(path)
        shutil.rmtree(self.path, ignore_errors=True)

    # -- starting and checking -------------------------------------------------------------------------------

    @staticmethod
    def _options(cfg, streamed: bool) -> dict:
        # a streamed compile's finished blocks sit in the output shards, laid out by --max-shard-size
        free = [k for k in FREE_OPTIONS if not (streamed and k == "max_shard_size")]
        return {**{k: v for k, v in cfg.to_dict().items() if k not in free}, "streamed": streamed}

    def start(self, cfg, fingerprint: str, streamed: bool) -> None:
        """A fresh compile: an empty partial dir whose progress names the options and the source."""
        self.discard()
        self.path.mkdir(parents=True)
        self._write_progress({"format": FORMAT, "slimc_version": __version__, "options": self._options(cfg, streamed),
                              "source_fingerprint": fingerprint, "plan": None, "blocks_done": 0, "stream": None})

    def check(self, cfg, fingerprint: str, streamed: bool) -> None:
        """Refuse, in one line, to resume with options or a source that would change the result."""
        p = self.progress()
        if p.get("format") != FORMAT:
            raise SlimcError(f"{self.path} was written by another slimc (format {p.get('format')!r}): "
                             "use --overwrite to start over")
        if p.get("slimc_version") != __version__:
            raise SlimcError(f"{self.path} was started by slimc {p.get('slimc_version')}, this is {__version__}: "
                             "use --overwrite to start over")
        saved, now = p["options"], self._options(cfg, streamed)
        if saved.get("streamed") != streamed:  # the partial state's format differs: finished blocks are elsewhere
            was = "--stream on" if saved.get("streamed") else "--stream off"
            raise SlimcError(f"--resume: {self.path} was started by a {'streamed' if saved.get('streamed') else 'whole-model'} "
                             f"compile: re-run with {was}, or --overwrite to start over")
        changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if changed:
            what = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now.get(k)!r})" for k in changed)
            raise SlimcError(f"--resume: {self.path} was started with {what}: re-run with the same options, or "
                             "--overwrite to start over")
        if p["source_fingerprint"] != fingerprint:
            raise SlimcError(f"--resume: the weights or config of {cfg.model} changed since {self.path} was started: "
                             "use --overwrite to start over")

    def check_plan(self, plan_json: str) -> None:
        """The plan is recomputed on resume; it must be the one the finished blocks were pruned to."""
        p = self.progress()
        if p["plan"] is None:
            self._write_progress({**p, "plan": plan_json})
        elif p["plan"] != plan_json:
            raise SlimcError(f"--resume: the plan made now differs from the one {self.path} was pruned with (the "
                             "calibration text changed?): use --overwrite to start over")

    # -- block boundaries ------------------------------------------------------------------------------------

    def save_block(self, i: int, block: nn.Module | None, row: dict, hidden: torch.Tensor, state: dict) -> None:
        """Block i is finished: keep it, then what block i + 1 needs, then say so in progress.json. A streamed
        compile passes no block: its tensors are in the output shards already."""
        tensors = {f"block.{k}": v.detach().contiguous() for k, v in block.state_dict().items()} if block else {}
        row_json = _split_tensors(row, tensors)
        _save(tensors, self.path / f"block-{i:05d}.safetensors", {"row": json.dumps(row_json)})
        stream, spilled = {"rng": torch.get_rng_state()}, {}
        for key, t in (("hidden", hidden), *((k, state.get(k)) for k in CARRIED_TENSORS)):
            if t is None:
                continue
            path = _whole_spilled_stream_file(t)
            if path is not None:  # its file is the state: pinned, not copied
                activations.pin(path)
                spilled[key] = {"file": str(path.resolve()), "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
            else:
                stream[key] = t.contiguous()
        values = {k: state[k] for k in CARRIED_VALUES if k in state}
        name = f"stream-{i + 1:05d}.safetensors"
        _save(stream, self.path / name, {"values": json.dumps(values), "spilled": json.dumps(spilled)})
        old = self.progress()
        self._write_progress({**old, "blocks_done": i + 1, "stream": name})
        if old.get("stream") and old["stream"] != name:
            for path in _spilled_files(self.path / old["stream"]) - {Path(v["file"]) for v in spilled.values()}:
                activations.unpin(path)
            (self.path / old["stream"]).unlink(missing_ok=True)

    def load(self, layers, structures) -> Resumed:
        """Restore the finished blocks into `layers` (their pruned shapes and weights; None: a streamed compile,
        whose finished blocks stay in the output shards) and the loop's state."""
        p = self.progress()
        done = p["blocks_done"]
        resumed = Resumed(done)
        for i in range(done):
            with safe_open(self.path / f"block-{i:05d}.safetensors", "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                row = json.loads(f.metadata()["row"])
            if layers is not None:
                _load_block(layers[i], structures[i], {k[len("block."):]: v for k, v in tensors.items()
                                                       if k.startswith("block.")})
            resumed.rows.append(_join_tensors(row, tensors))
        if p["stream"]:
            with safe_open(self.path / p["stream"], "pt") as f:
                spilled = json.loads(f.metadata().get("spilled", "{}"))
                tensors = {k: f.get_tensor(k) for k in ("hidden", *CARRIED_TENSORS) if k in f.keys()}
                for key, where in spilled.items():  # pinned again: this run may be killed before the next block too
                    path = Path(where["file"])
                    tensors[key] = activations.open_spilled(path, tuple(where["shape"]), getattr(torch, where["dtype"]))
                    activations.pin(path)
                resumed.hidden = tensors.get("hidden")
                torch.set_rng_state(f.get_tensor("rng"))
                resumed.state = {k: tensors[k] for k in CARRIED_TENSORS if k in tensors}
                resumed.state.update(json.loads(f.metadata()["values"]))
        return resumed

    def _write_progress(self, progress: dict) -> None:
        tmp = self.path / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(progress, indent=1))
        os.replace(tmp, self.path / PROGRESS)


def _whole_spilled_stream_file(t: torch.Tensor) -> Path | None:
    """The file of a spilled stream that `t` covers whole (not a view of part of it), else None."""
    path = activations.spill_path(t)
    whole = (path is not None and t.is_contiguous() and t.data_ptr() == t.untyped_storage().data_ptr()
             and t.numel() * t.element_size() == path.stat().st_size)
    return path if whole else None


def _spilled_files(stream_file: Path) -> set[Path]:
    """The spilled streams a stream-*.safetensors names."""
    try:
        with safe_open(stream_file, "pt") as f:
            return {Path(v["file"]) for v in json.loads(f.metadata().get("spilled", "{}")).values()}
    except Exception:  # noqa: BLE001 -- a missing or torn file names nothing to keep
        return set()


def _save(tensors: dict, path: Path, metadata: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.clone() if _shares_storage(v, tensors) else v for k, v in tensors.items()}, tmp, metadata)
    os.replace(tmp, path)


def _shares_storage(t: torch.Tensor, tensors: dict) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(v.untyped_storage().data_ptr() == ptr for v in tensors.values()) > 1


def _split_tensors(obj, tensors: dict):
    """JSON-able copy of a report row; its tensors (DISP index sets, --disp-train's stash) go into `tensors`
    under generated names, a {"__tensor__": name} placeholder in their place."""
    if isinstance(obj, torch.Tensor):
        name = f"row.{len(tensors)}"
        tensors[name] = obj.detach().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"row keys must be strings to be saved, got {list(obj)[:3]}")
        return {k: _split_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors) for v in obj]
    return obj


def _join_tensors(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _load_block(block: nn.Module, s, state: dict) -> None:
    """Give a dense block the parameters of its pruned self: each tensor replaces the one of its name (pruned
    linears are smaller; FLAP adds output biases), linears' feature counts and the head / FFN attributes follow."""
    from .passes.materialize import set_widths_from_weights

    for name, t in state.items():
        path, _, leaf = name.rpartition(".")
        module = block.get_submodule(path)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(t, requires_grad=old is not None and old.requires_grad)
        elif leaf in module._buffers:
            module._buffers[leaf] = t
        else:
            raise SlimcError(f"the saved block has {name}, which this model's block does not: use --overwrite")
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
    set_widths_from_weights(block, s)
