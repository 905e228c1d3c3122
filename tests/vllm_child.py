"""Child process for tests/test_vllm_serving.py: load a checkpoint with vllm.LLM, greedy-decode token-id
prompts, report the loaded model's class and parameter shapes. Run as a script, since vLLM's engine and
workers start with `spawn` and re-import __main__ (hence the guard).

It does not call slimc.vllm_plugin.register(): the slimc architectures must reach vLLM through the installed
`vllm.general_plugins` entry point alone, as they do for `vllm serve DIR`.

    python tests/vllm_child.py MODEL_DIR REQUEST_JSON RESULT_JSON
REQUEST_JSON: {"ids": [[token ids], ...], "max_tokens": N, "tensor_parallel_size": TP (optional, default 1)}
"""
import json
import os
import sys


def main() -> None:
    model, request, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function by reference
    import torch
    from vllm import LLM, SamplingParams

    from slimc.vllm_mapping import loaded_param_shapes

    llm = LLM(model=model, dtype="float32", seed=0, max_model_len=128, enforce_eager=True,
              skip_tokenizer_init=True, enable_prefix_caching=False,
              tensor_parallel_size=request.get("tensor_parallel_size", 1),
              gpu_memory_utilization=0.5 if torch.cuda.is_available() else 0.2)
    greedy = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in request["ids"]], greedy, use_tqdm=False)
    with open(result, "w") as f:
        json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                   "loaded": llm.apply_model(loaded_param_shapes)[0]}, f)


if __name__ == "__main__":
    main()
