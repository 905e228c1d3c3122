"""Perplexity: tokenize the evaluation text once, cut non-overlapping windows, score all but each window's
first token (the protocol of the reference figures in the docs)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import skill


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """windows: LongTensor [n, seq_len]. Returns {"ppl", "nll", "tokens"}."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    it = range(0, windows.shape[0], batch_size)
    for start in tqdm(it, desc="perplexity", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}


def _source_model(spec: str) -> str | None:
    """The source model named in a slimc output's plan, if `spec` is one."""
    import json
    from pathlib import Path

    plan = Path(spec).expanduser() / "slimc_plan.json"
    return json.loads(plan.read_text()).get("source_model") if plan.is_file() else None


def run_eval(model: str, ppl: str | None = None, seq_len: int = 2048, max_tokens: int | None = 100_000,
             batch_size: int = 1, dtype: str | None = None, device: str = "cpu", chat: str | None = None,
             chat_tokens: int = 128, against: str | None = None, tasks: str | None = None,
             limit: int | None = None, task_batch_size: int = 16) -> dict:
    """`slimc eval`: perplexity (unless only --chat or --tasks was asked for), chat fidelity and zero-shot task
    accuracy, for `model` and, with `against`, for the dense model beside it in the same run."""
    from . import chat as chat_mod, data, tasks as tasks_mod
    from .errors import SlimcError
    from .load import load_model, model_fingerprint

    if seq_len < 2:
        raise SlimcError("--seq-len must be at least 2")
    if chat_tokens < 1:
        raise SlimcError("--chat-tokens must be a positive integer")
    if limit is not None and limit < 1:
        raise SlimcError("--limit must be a positive integer")
    if batch_size < 1 or task_batch_size < 1:
        raise SlimcError("--batch-size must be a positive integer")
    if limit is not None and tasks is None:
        raise SlimcError("--limit subsets the --tasks documents; pass --tasks too")
    task_names = tasks_mod.parse_task_list(tasks) if tasks is not None else None  # before minutes of loading
    do_ppl = ppl is not None or (chat is None and tasks is None)
    ppl = ppl or "brown"
    prompts = None
    if chat:  # read the prompts before minutes of loading: a bad file fails at once
        prompts = chat_mod.chat_prompts(chat)
    loaded = load_model(model, dtype=dtype, device=device, allow_slimc=True)
    if chat and not chat_mod.has_chat_template(loaded.tokenizer):
        raise SlimcError(f"--chat: {model} has no chat template")
    reference_spec = against or (_source_model(model) if chat else None)
    dense = None
    if reference_spec:
        try:
            dense = load_model(reference_spec, dtype=dtype, device=device, allow_slimc=True)
        except SlimcError as e:
            if against:
                raise
            raise SlimcError(f"the reference for --chat, the plan's source model, does not load here ({e}); "
                             f"pass --against MODEL") from e
    result: dict = {"model": model}
    if do_ppl:
        windows = data.eval_windows(loaded.tokenizer, ppl, seq_len, max_tokens)
        result.update(perplexity(loaded.model, windows, batch_size))
        result.update(text=ppl, seq_len=seq_len, windows=int(windows.shape[0]))
        if against:
            result["against"] = {"model": against, **perplexity(dense.model, windows, batch_size)}
    if chat:
        ref = dense or loaded  # a model with no plan and no --against is its own reference
        reference = chat_mod.reference_answers(ref.model, ref.tokenizer, prompts, chat_tokens,
                                               model_fingerprint(ref.model))
        result["chat"] = chat_mod.chat_fidelity(loaded.model, loaded.tokenizer, prompts, reference, chat_tokens,
                                                answers=reference if dense is None else None)
        result["chat"].update(prompt_set=chat, reference_model=reference_spec or model, max_new_tokens=chat_tokens)
        if against:
            result.setdefault("against", {"model": against})["chat"] = chat_mod.chat_fidelity(
                dense.model, dense.tokenizer, prompts, reference, chat_tokens, answers=reference)
    if task_names:
        scores = tasks_mod.run_tasks(loaded.model, loaded.tokenizer, task_names, limit, task_batch_size, device)
        result.update(scores)
        if against:
            result.setdefault("against", {"model": against}).update(
                tasks_mod.run_tasks(dense.model, dense.tokenizer, task_names, limit, task_batch_size, device))
            result["kept_above_chance"] = {
                c: dataclasses.asdict(skill.kept_above_chance(result, result["against"], c)) for c in skill.CONVENTIONS}
    return result


def format_eval(r: dict) -> str:
    lines = []
    dense = r.get("against", {})
    if "ppl" in r:
        lines.append(f"perplexity {r['ppl']:.3f} over {r['tokens']:,} tokens ({r['windows']} windows of {r['seq_len']}) "
                     f"on {r['text']}")
        if "ppl" in dense:
            lines.append(f"dense {dense['model']}: perplexity {dense['ppl']:.3f} (model / dense = "
                         f"{r['ppl'] / dense['ppl']:.3f})")
    c = r.get("chat")
    if c:
        d = dense.get("chat")
        which = "built-in eval set" if c["prompt_set"] == "builtin" else c["prompt_set"]
        lines.append(f"chat fidelity on {c['prompts']} prompts ({which}), greedy answers of at most "
                     f"{c['max_new_tokens']} tokens; reference: the greedy answers of {c['reference_model']}")
        lines.append(f"  {'':42} {'model':>8}" + (f" {'dense':>8}" if d else ""))
        rows = [("NLL of the reference answers (nats/token)", "nll", "{:8.3f}"),
                ("answered (>= 3 distinct words, no template echo)", "answered", "{:8.1%}"),
                ("agreement with the reference (ROUGE-L F1)", "agreement", "{:8.3f}")]
        for label, key, fmt in rows:
            lines.append(f"  {label:42} " + fmt.format(c[key]) + (" " + fmt.format(d[key]) if d else ""))
        lines.append(f"  ({c['reference_tokens']:,} reference tokens)")
    if "tasks" in r:
        from .tasks import format_tasks

        lines += format_tasks(r, dense if "tasks" in dense else None)
        for k in r.get("kept_above_chance", {}).values():
            lines.append("  " + skill.format_kept(skill.Kept(**k)))
    return "\n".join(lines)
