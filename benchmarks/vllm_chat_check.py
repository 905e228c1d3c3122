"""A pruned instruct model asked chat questions through vLLM's OpenAI server, as a user would, against the same
model's greedy answers in transformers. Run it in the vLLM environment (vLLM's CPU build, or vLLM on a GPU):

    .venv-vllm/bin/python benchmarks/vllm_chat_check.py OUT --prompts 12 --max-tokens 64

Starts `python -m vllm.entrypoints.openai.api_server --model OUT` on 127.0.0.1, sends each built-in eval
prompt to /v1/chat/completions (temperature 0; vLLM applies the checkpoint's own chat template), and prints
per prompt whether each side answered and whether the two texts agree.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a slimc output directory")
    p.add_argument("--prompts", type=int, default=12, help="how many of the built-in eval prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--json", help="write the per-prompt results here")
    args = p.parse_args()

    from slimc import chat
    from slimc.load import load_model

    prompts = chat.prompts_of(chat.builtin_prompts("eval"))[: args.prompts]
    loaded = load_model(args.model, allow_slimc=True)
    # batch 1: no padding, so transformers' greedy path is the plain one vLLM is compared with
    hf = chat.generate_answers(loaded.model, loaded.tokenizer, prompts, args.max_tokens, batch_size=1)
    model_name, tokenizer = loaded.model.config.architectures[0], loaded.tokenizer
    del loaded

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
           "--served-model-name", "slimc"]
    log = open(os.path.join(args.model, "..", f".vllm-chat-check-{port}.log"), "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"vLLM server exited with {server.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                if time.time() - t0 > args.startup_timeout:
                    raise SystemExit(f"vLLM server not up after {args.startup_timeout:.0f} s; see {log.name}")
                time.sleep(2)
        up = time.time() - t0
        rows = []
        for conv, ref in zip(prompts, hf):
            r = post(f"http://127.0.0.1:{port}/v1/chat/completions",
                     {"model": "slimc", "messages": conv, "temperature": 0, "max_tokens": args.max_tokens})
            text = r["choices"][0]["message"]["content"].strip()
            grams = chat.echo_grams(tokenizer, conv)
            rows.append({"prompt": conv[-1]["content"], "vllm": text, "transformers": ref.text,
                         "vllm_answered": chat.is_answer(text, grams), "hf_answered": chat.is_answer(ref.text, grams),
                         "same_text": text == ref.text, "rouge_l": chat.rouge_l(text, ref.text)})
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    n = len(rows)
    summary = {"model": args.model, "architecture": model_name, "server_startup_s": up, "prompts": n,
               "vllm_answered": sum(r["vllm_answered"] for r in rows) / n,
               "transformers_answered": sum(r["hf_answered"] for r in rows) / n,
               "same_text": sum(r["same_text"] for r in rows) / n,
               "mean_rouge_l": sum(r["rouge_l"] for r in rows) / n}
    for r in rows:
        print(f"[{'x' if r['vllm_answered'] else ' '}|{'=' if r['same_text'] else '~'}] {r['prompt']}\n"
              f"    vLLM: {r['vllm'][:120]!r}")
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
