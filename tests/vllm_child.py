"""Child process for tests/test_vllm_serving.py: load a checkpoint with vllm.LLM, greedy-decode token-id
prompts, report the loaded model's class and parameter shapes. Run as a script, since vLLM's engine and
workers start with `spawn` and re-import __main__ (hence the guard).

It does not call slimc.vllm.plugin.register(): the slimc architectures must reach vLLM through the installed
`vllm.general_plugins` entry point alone, as they do for `vllm serve DIR`.

    python tests/vllm_child.py MODEL_DIR REQUEST_JSON RESULT_JSON
REQUEST_JSON: {"ids": [[token ids], ...], "max_tokens": N, "tensor_parallel_size": TP (optional, default 1)}

The KV cache is sized for the prompts (vLLM's default, a share of RAM, is 4 GiB here to zero and warm up), and
tensor parallel 1 runs vLLM's engine and its worker inside this process (the default layout spawns both, each
re-importing vLLM): ~20 s a test instead of ~55 s. Tensor parallel 2 keeps the default layout, the one
`vllm serve` uses, so the entry point is also proven in spawned engine and worker processes.
"""
import json
import os
import sys


def main() -> None:
    model, request, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function by reference
    tp = request.get("tensor_parallel_size", 1)
    one_process = tp == 1
    if one_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read when vLLM starts its engine
    from vllm import LLM, SamplingParams

    from slimc.vllm.mapping import loaded_param_shapes

    llm = LLM(model=model, dtype="float32", seed=0, max_model_len=128, enforce_eager=True,
              skip_tokenizer_init=True, enable_prefix_caching=False,
              tensor_parallel_size=tp, kv_cache_memory_bytes=64 << 20, max_num_batched_tokens=256, max_num_seqs=8,
              distributed_executor_backend="uni" if one_process else None)
    greedy = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in request["ids"]], greedy, use_tqdm=False)
    with open(result, "w") as f:
        json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                   "loaded": llm.apply_model(loaded_param_shapes)[0]}, f)


if __name__ == "__main__":
    main()
