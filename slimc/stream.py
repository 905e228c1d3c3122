"""`--stream`: one decoder block in memory at a time. Each block's weights are read from the source when the block
is calibrated (slimc.source) and its pruned tensors are cast to the output dtype and written into the output
shards at once (slimc.checkpoint); embeddings, final norm and lm_head are written once, at the start. The
shards grow inside OUT.partial/weights, so a resumed compile finds the finished blocks where they will stay."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointWriter, state_entries
from .load import LoadedModel
from .materialize import copy_missing_buffers, slim_skeleton
from .plan import PruningPlan
from .source import fetch_block, release_block

WEIGHTS_DIR = "weights"


def memory_total() -> int:
    """Bytes of RAM: a machine's fixed size (not what is free now), so a choice made from it is the same on every run."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits_beside(nbytes: int) -> bool:
    """Whether a whole model of `nbytes` may be held for a moment (the dense model answering the self-generated
    chat set): at most half the machine's RAM."""
    return nbytes <= memory_total() // 2


class BlockStream:
    """Fetches block i from the source and, once pruned, writes it to the output (`open_output`) and drops it."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.writer = None

    def fetch(self, i: int) -> nn.Module:
        return fetch_block(self.loaded, i)

    def release(self, i: int) -> None:
        release_block(self.loaded, i)

    def open_output(self, plan: PruningPlan, out_dtype: torch.dtype, directory: Path, max_shard_bytes: int | None,
                    resume: bool) -> None:
        """The output shards' layout is fixed by the plan; everything outside the blocks is written now (a
        resumed compile rewrites the same bytes)."""
        self.out_dtype = out_dtype
        self.skeleton = slim_skeleton(self.loaded.model.config, self.loaded.family, plan, out_dtype)
        directory.mkdir(parents=True, exist_ok=True)
        self.writer = CheckpointWriter(directory, state_entries(self.skeleton, out_dtype), max_shard_bytes, resume)
        self.directory = directory
        model = self.loaded.model
        with torch.no_grad(), self.loaded.source.open() as reader:
            for name, v in model.state_dict().items():
                if not name.startswith("model.layers.") and name in self.writer.where:
                    self.writer.write(name, self._cast(reader.get(name) if v.is_meta else v))
        # the blocks' inputs are cached: from here on the embeddings are only in the output
        model.model.embed_tokens.to("meta")

    def _cast(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(self.out_dtype) if v.is_floating_point() else v

    @torch.no_grad()
    def finish(self, i: int, block: nn.Module) -> None:
        for name, v in block.state_dict().items():
            self.writer.write(f"model.layers.{i}.{name}", self._cast(v))
        self.release(i)

    def skip(self, i: int) -> None:
        """Block i was finished by the run a resumed compile continues: its bytes are in the shards already."""
        self.writer.written.update(n for n in self.writer.where if n.startswith(f"model.layers.{i}."))

    def close(self) -> list[str]:
        self.writer.close()
        return self.writer.files()

    def move_into(self, out_dir: Path) -> None:
        for name in self.writer.files():
            os.replace(self.directory / name, out_dir / name)

    def params(self) -> int:
        return sum(e.numel for _, e in self.writer.where.values())

    @torch.no_grad()
    def load_written(self) -> nn.Module:
        """The pruned model read back from the written shards for the report's sample, one block at a time as
        well: each decoder block's weights are read in just before it runs and dropped right after, so
        `generate` (KV cache and all) works unchanged and memory stays at one block."""
        from safetensors import safe_open

        model = self.skeleton
        files = {name: self.directory / s.file for name, (s, _) in self.writer.where.items()}

        def read(names):
            out = {}
            for path in {files[n] for n in names}:
                with safe_open(path, "pt") as f:
                    out.update({n: f.get_tensor(n) for n in names if files[n] == path})
            return out

        outside = [n for n in files if not n.startswith("model.layers.")]
        model.load_state_dict(read(outside), strict=False, assign=True)
        if model.config.tie_word_embeddings:
            model.tie_weights()
        copy_missing_buffers(model, self.loaded.model, skip_prefix="model.layers.")  # blocks: loaded by the hooks
        for i, block in enumerate(model.model.layers):
            prefix = f"model.layers.{i}."
            names = [n for n in files if n.startswith(prefix)]

            def load(module, args, prefix=prefix, names=names):
                state = {n[len(prefix):]: t for n, t in read(names).items()}
                module.load_state_dict(state, strict=True, assign=True)

            block.register_forward_pre_hook(load)
            block.register_forward_hook(_drop_weights)
        model.generation_config = self.loaded.model.generation_config
        return model.eval()


def _drop_weights(module, args, output) -> None:
    module.to("meta")  # returns None: a forward hook's return value would replace the block's output


@contextmanager
def whole_dense_model(loaded: LoadedModel):
    """Every block of a streamed source in memory, for a moment (the dense model's own chat answers)."""
    from .source import fetch_rest, release

    names = fetch_rest(loaded)
    try:
        yield loaded.model
    finally:
        release(loaded, names)


def dense_fp32_bytes(model: nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters())

