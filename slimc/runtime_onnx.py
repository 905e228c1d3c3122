"""Run a slimc ONNX decoder with onnxruntime: IO binding, the cache kept as OrtValues between steps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import SlimcError


class OnnxDecoder:
    def __init__(self, onnx_dir: str | Path, threads: int | None = None, provider: str | None = None,
                 spinning: bool = True):
        """spinning=False stops idle intra-op threads from busy-waiting: needed when several sessions take
        turns on the same cores (a side-by-side benchmark), where spinning threads of one steal the other's."""
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        io_path = onnx_dir / "io.json"
        if not io_path.is_file():
            raise SlimcError(f"{onnx_dir} has no io.json: compile with --target onnx first")
        self.io = json.loads(io_path.read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [provider] if provider else (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers()
            else ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(onnx_dir / self.io["file"]), opts, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.ort = ort
        self.n_layers, self.kv_heads, self.head_dim = self.io["num_layers"], self.io["kv_heads"], self.io["head_dim"]
        self.out_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int, length: int = 0, seed: int | None = None) -> list:
        """Past tensors (zeros, or random when seed is given, for benchmarks) of `length` positions."""
        rng = np.random.default_rng(seed) if seed is not None else None
        cache = []
        for heads in self.kv_heads:
            for _ in range(2):
                shape = (batch, heads, length, self.head_dim)
                arr = rng.standard_normal(shape, dtype=np.float32) if rng is not None else np.zeros(shape, np.float32)
                cache.append(self.ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0))
        return cache

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: list):
        """One forward; returns (logits OrtValue, new cache as OrtValues that never leave the device)."""
        binding = self.session.io_binding()
        for name, arr in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr, np.int64), self.device, 0))
        for i in range(self.n_layers):
            binding.bind_ortvalue_input(f"past.{i}.key", cache[2 * i])
            binding.bind_ortvalue_input(f"past.{i}.value", cache[2 * i + 1])
        for name in self.out_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0], outs[1:]

    def greedy(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding of one prompt: a prefill step, then one token per step through the cache."""
        ids = np.array([prompt], dtype=np.int64)
        n = ids.shape[1]
        logits, cache = self.step(ids, np.ones((1, n), np.int64), np.arange(n)[None], self.empty_cache(1))
        out = []
        for _ in range(max_new_tokens):
            token = int(logits.numpy()[0, -1].argmax())
            out.append(token)
            if token == eos_token_id:
                break
            n += 1
            logits, cache = self.step(np.array([[token]]), np.ones((1, n), np.int64), np.array([[n - 1]]), cache)
        return out
