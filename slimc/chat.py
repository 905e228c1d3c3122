"""Chat-format calibration data and chat-fidelity metrics, for instruct models.

An instruct model lives on its chat template: role markers, a system prompt, the assistant turn. Pruning
statistics taken on plain prose alone say nothing about those tokens, and a pruned model calibrated that way
can keep its perplexity yet stop answering. So whenever the source has a chat template, calibration mixes in
chat-formatted windows of two kinds:
- self-generated: the dense model answers a built-in set of instructions plus instructions derived from the
  calibration text; those conversations, rendered with its own template, are what the model must keep doing
  (one fixed-size set per model, text and seed, cached: generation is slow on a CPU);
- framed: calibration text framed as conversations (cheap, unlimited).

Fidelity is measured against the dense model's own greedy answers: the pruned model's per-token NLL of those
answers (teacher-forced), the share of prompts it answers (a few words that do not echo the system prompt),
and ROUGE-L agreement with the dense answers.

Prompt sets (`slimc/prompts/*.jsonl`, one `{"messages": [...]}` per line) never overlap: `calibration` feeds
the self-generated set, `probe` is the compile report's check and the text defaults were chosen on, `eval` is
the default set of `slimc eval --chat` that BENCHMARKS.md reports on.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import SlimcError

PROMPTS_DIR = Path(__file__).parent / "prompts"
PROMPT_SETS = ("calibration", "probe", "eval")
ROLES = ("system", "user", "assistant")
SELF_GEN_VERSION = 1  # bump when the recipe of the self-generated set changes (invalidates the cache)
SELF_GEN_DERIVED = 48  # instructions derived from the calibration text, on top of the built-in ones
SELF_GEN_TOKENS = 192  # longest self-generated answer
EVAL_TOKENS = 128  # longest answer when measuring fidelity
PROBE_TOKENS = 64
MIN_ANSWER_WORDS = 3  # distinct words
# an answer sharing this many consecutive words with the template's own text echoes it: 4 catches the
# paraphrased echoes seen on pruned SmolLM2 ("You're a helpful AI assistant, trained by Hugging Face")
ECHO_WORDS = 4
PROBE_MIN_ANSWERED = 0.75

Conversation = list  # [{"role": ..., "content": ...}, ...]


# ---------------------------------------------------------------------------------------------- data

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def is_conversation_file(source: str) -> bool:
    return str(source).endswith(".jsonl") and Path(source).expanduser().is_file()


def read_conversations(path: str | Path) -> list[Conversation]:
    """Conversations from a JSONL file, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SlimcError(f"conversation file not found: {path}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimcError(f"{path} line {n}: not JSON ({e.msg})") from None
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list) or not messages:
            raise SlimcError(f'{path} line {n}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise SlimcError(f"{path} line {n}: each message needs a role ({', '.join(ROLES)}) and a string content")
        out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not out:
        raise SlimcError(f"{path} holds no conversations")
    return out


def builtin_prompts(name: str) -> list[Conversation]:
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}")
    return read_conversations(PROMPTS_DIR / f"{name}.jsonl")


def prompts_of(conversations: list[Conversation]) -> list[Conversation]:
    """Each conversation cut before its last assistant turn (the turn the model is asked to produce)."""
    out = []
    for conv in conversations:
        cut = len(conv) - 1 if conv[-1]["role"] == "assistant" else len(conv)
        if not any(m["role"] == "user" for m in conv[:cut]):
            raise SlimcError("every chat prompt needs a user message")
        out.append(conv[:cut])
    return out


def chat_prompts(spec: str) -> list[Conversation]:
    """`--chat SPEC`'s prompts: "builtin" (the eval set) or a JSONL file of conversations."""
    return prompts_of(builtin_prompts("eval") if spec == "builtin" else read_conversations(spec))


def render(tokenizer, conversation: Conversation, add_generation_prompt: bool = False) -> str:
    if not has_chat_template(tokenizer):
        raise SlimcError("this model's tokenizer has no chat template: chat prompts and chat calibration need one")
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    # the template already wrote every special token the model expects (BOS included, where it has one)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def paragraphs(text: str, min_words: int = 40, max_words: int = 150) -> list[str]:
    """Lines of prepared text (one paragraph each) long enough to carry a task, short enough for a prompt."""
    return [p.strip() for p in text.splitlines() if min_words <= len(p.split()) <= max_words]


_DERIVED_TASKS = (
    "Summarize this passage in one or two sentences:\n\n{p}",
    "What is the following text about?\n\n{p}",
    "Explain the main point of this passage in simple words:\n\n{p}",
    "Suggest a short title for this passage and say why it fits:\n\n{p}",
)


def derived_instructions(text: str, n: int, seed: int) -> list[Conversation]:
    """n instructions about passages of the calibration text (seeded choice), for the dense model to answer."""
    paras = paragraphs(text)
    rng = random.Random(f"derived-{seed}")
    picked = rng.sample(paras, min(n, len(paras)))
    return [[{"role": "user", "content": _DERIVED_TASKS[i % len(_DERIVED_TASKS)].format(p=p)}]
            for i, p in enumerate(picked)]


def framed_conversations(text: str, seed: int) -> list[Conversation]:
    """Every usable paragraph of the calibration text framed as a conversation (seeded order and framing):
    the assistant turn is real text, so these cost nothing to make."""
    rng = random.Random(f"framed-{seed}")
    paras = paragraphs(text)
    rng.shuffle(paras)
    out = []
    for p in paras:
        words = p.split()
        kind = rng.randrange(3)
        if kind == 0:
            cut = max(8, len(words) // 3)
            user, answer = "Continue this text:\n\n" + " ".join(words[:cut]), " ".join(words[cut:])
        elif kind == 1:
            user, answer = f'Write a paragraph that begins with "{" ".join(words[:6])}".', p
        else:
            user, answer = "Rewrite the following passage in clear, plain English:\n\n" + p, p
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    return out


def pack_windows(tokenizer, conversations: list[Conversation], seq_len: int, n_windows: int) -> torch.Tensor:
    """[<= n_windows, seq_len] windows of rendered conversations: each window starts at a conversation (so the
    template's opening, system prompt included, sits at position 0 as in real use) and is filled up with the
    next ones, the last cut at the window's end; the next window starts afresh. Fewer windows when the
    conversations run out."""
    rows, row = [], []
    for conv in conversations:
        if len(rows) == n_windows:
            break
        row.extend(_ids(tokenizer, render(tokenizer, conv)))
        if len(row) >= seq_len:
            rows.append(row[:seq_len])
            row = []
    return torch.tensor(rows, dtype=torch.long) if rows else torch.empty(0, seq_len, dtype=torch.long)


# ----------------------------------------------------------------------------------------- generation

@dataclass
class Answer:
    text: str
    ids: list[int]  # generated ids, the end-of-turn token included when the model stopped on it


def stop_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _pad_id(model, tokenizer) -> int:
    for v in (tokenizer.pad_token_id, getattr(model.generation_config, "pad_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            return v
    return 0


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[Conversation], max_new_tokens: int, batch_size: int = 16,
                     desc: str = "chat answers", progress: bool = True) -> list[Answer]:
    """Greedy answers to each prompt rendered with the model's chat template (batched, left-padded)."""
    encoded = [_ids(tokenizer, render(tokenizer, c, add_generation_prompt=True)) for c in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    stops, pad = stop_ids(model, tokenizer), _pad_id(model, tokenizer)
    device = next(model.parameters()).device
    answers: list[Answer | None] = [None] * len(prompts)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=stops or None)
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stops), None)
            new = new if end is None else new[: end + 1]
            text = tokenizer.decode(new if end is None else new[:-1], skip_special_tokens=True).strip()
            answers[i] = Answer(text, new)
    return answers  # type: ignore[return-value]


def _cached_answers(path: Path, make) -> list[Answer]:
    if path.is_file():
        return [Answer(**a) for a in json.loads(path.read_text())]
    import tempfile

    answers = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", dir=path.parent)
    with open(fd, "w") as f:
        json.dump([a.__dict__ for a in answers], f)
    Path(tmp).replace(path)  # atomic: a killed or concurrent run never leaves a half-written entry
    return answers


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def self_generated_conversations(model, tokenizer, text: str | None, seed: int, model_key: str,
                                 cache: Path | None = None, materialize=None,
                                 n_derived: int = SELF_GEN_DERIVED) -> list[Conversation]:
    """The dense model's own conversations: built-in calibration instructions plus `n_derived` instructions
    about passages of `text`, answered greedily, in a seeded order. Cached per model, instruction set and seed.
    `materialize`: a context manager that holds the model's weights while it generates (a streamed compile)."""
    from .assets import cache_dir

    prompts = builtin_prompts("calibration") + (derived_instructions(text, n_derived, seed) if text else [])
    random.Random(f"self-{seed}").shuffle(prompts)
    path = (cache or cache_dir() / "chat-calib") / f"{_key(SELF_GEN_VERSION, model_key, prompts, SELF_GEN_TOKENS)}.json"
    def make():
        with materialize() if materialize else nullcontext():
            return generate_answers(model, tokenizer, prompts, SELF_GEN_TOKENS, desc="self-generated chat calibration")

    answers = _cached_answers(path, make)
    # an empty answer teaches nothing about the assistant turn
    return [p + [{"role": "assistant", "content": a.text}] for p, a in zip(prompts, answers) if a.text]


def reference_answers(model, tokenizer, prompts: list[Conversation], max_new_tokens: int, model_key: str,
                      cache: Path | None = None) -> list[Answer]:
    """The dense model's greedy answers to `prompts`, cached per model, prompts and length."""
    from .assets import cache_dir

    path = (cache or cache_dir() / "chat-reference") / f"{_key(model_key, prompts, max_new_tokens)}.json"
    return _cached_answers(path, lambda: generate_answers(model, tokenizer, prompts, max_new_tokens,
                                                          desc="dense reference answers"))


# ------------------------------------------------------------------------------------ calibration mix

def chat_calibration_enabled(mode: str, tokenizer) -> bool:
    if mode == "off":
        return False
    if mode == "on" and not has_chat_template(tokenizer):
        raise SlimcError("--chat-calib on: this model's tokenizer has no chat template")
    return has_chat_template(tokenizer)


def calibration_windows(model, tokenizer, source: str, n_plain: int, seq_len: int, seed: int, mix: float,
                        kind: str, model_key: str, materialize=None) -> tuple[torch.Tensor, dict]:
    """round(mix * n_plain) chat windows: self-generated conversations, framed calibration text, or half each
    ("both"); one kind fills in where the other runs out. Returns the windows and a description of the mix."""
    from .data import load_text

    n_chat = round(mix * n_plain)
    text = None if is_conversation_file(source) else load_text(source, "calibration")
    framed = framed_conversations(text, seed) if text else []
    want_self = {"self": n_chat, "framed": 0, "both": (n_chat + 1) // 2}[kind]
    if not framed:
        want_self = n_chat  # nothing to frame (a conversation file as --calib): all self-generated
    own = self_generated_conversations(model, tokenizer, text, seed, model_key, materialize=materialize) if want_self else []
    w_self = pack_windows(tokenizer, own, seq_len, want_self)
    w_framed = pack_windows(tokenizer, framed, seq_len, n_chat - w_self.shape[0])
    info = {"windows": 0, "seq_len": seq_len, "kind": kind, "mix": mix}
    if own:
        info["self_generated"] = {"conversations": len(own), "windows": int(w_self.shape[0])}
    if w_framed.shape[0]:
        info["framed"] = {"source": source, "windows": int(w_framed.shape[0])}
    windows = torch.cat([w_self, w_framed])
    info["windows"] = int(windows.shape[0])
    return windows, info


def describe_mix(calibration: dict) -> str:
    """One line: what calibration was made of."""
    plain = f"{calibration.get('samples')} x {calibration.get('seq_len')} tokens of {calibration.get('source')}"
    chat = calibration.get("chat")
    if not chat:
        return f"calibration: {plain} (no chat windows)"
    parts = []
    if "self_generated" in chat:
        sg = chat["self_generated"]
        parts.append(f"{sg['windows']} self-generated (from {sg['conversations']} conversations of the dense model)")
    if "framed" in chat:
        parts.append(f"{chat['framed']['windows']} framed {chat['framed']['source']} text")
    return f"calibration: {plain} + {chat['windows']} chat windows: " + (", ".join(parts) or "none")


# ---------------------------------------------------------------------------------------------- metrics

def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def echo_grams(tokenizer, prompt: Conversation, n: int = ECHO_WORDS) -> set[tuple]:
    """Runs of n words that the template wrote into the rendered prompt (its system prompt, role markers) and
    the user did not: an answer repeating one of them echoes the template instead of answering."""
    text = render(tokenizer, prompt, add_generation_prompt=True)
    for m in prompt:
        if m["role"] != "system" and m["content"]:
            text = text.replace(m["content"], "\x00")
    user = set()
    for m in prompt:
        if m["role"] != "system":
            user |= _grams(words(m["content"]), n)
    return {g for part in text.split("\x00") for g in _grams(words(part), n)} - user


def _grams(ws: list[str], n: int) -> set[tuple]:
    # a text shorter than n words counts whole, so a short system prompt can still be echoed
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)} if len(ws) >= n else ({tuple(ws)} if ws else set())


def is_answer(answer: str, template_grams: set[tuple]) -> bool:
    """At least a few distinct words (a degenerate "The The The ..." is no answer), none of the template's own
    word runs (see echo_grams) among them."""
    a = words(answer)
    if len(set(a)) < MIN_ANSWER_WORDS:
        return False
    lengths = {len(g) for g in template_grams}
    return not any(tuple(a[i : i + k]) in template_grams for k in lengths for i in range(len(a) - k + 1))


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words (longest common subsequence)."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@torch.no_grad()
def answer_nll(model, tokenizer, prompts: list[Conversation], answers: list[Answer], batch_size: int = 8) -> tuple[float, int]:
    """Teacher-forced NLL (sum, token count) of the given answer ids after each rendered prompt."""
    device = next(model.parameters()).device
    seqs = [(_ids(tokenizer, render(tokenizer, p, add_generation_prompt=True)), a.ids) for p, a in zip(prompts, answers)]
    total, count = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        batch = [(p, a) for p, a in seqs[s : s + batch_size] if a]
        if not batch:
            continue
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.full_like(ids, -100)
        for row, (p, a) in enumerate(batch):
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            mask[row, : len(p) + len(a)] = 1
            target[row, len(p) : len(p) + len(a)] = torch.tensor(a)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, :-1].float()
        tgt = target[:, 1:].to(device)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                       reduction="sum"))
        count += int((tgt != -100).sum())
    return total, count


def chat_fidelity(model, tokenizer, prompts: list[Conversation], reference: list[Answer],
                  max_new_tokens: int = EVAL_TOKENS, answers: list[Answer] | None = None,
                  progress: bool = True) -> dict:
    """Fidelity of `model` to the reference answers: NLL of them, share answered, ROUGE-L agreement."""
    if answers is None:
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, desc="chat answers", progress=progress)
    nll, tokens = answer_nll(model, tokenizer, prompts, reference)
    answered = [is_answer(a.text, echo_grams(tokenizer, p)) for p, a in zip(prompts, answers)]
    agreement = [rouge_l(a.text, r.text) for a, r in zip(answers, reference)]
    return {"prompts": len(prompts), "nll": nll / max(tokens, 1), "reference_tokens": tokens,
            "answered": sum(answered) / len(prompts), "agreement": sum(agreement) / len(prompts),
            "answers": [{"prompt": p[-1]["content"], "answer": a.text, "answered": ok, "agreement": g}
                        for p, a, ok, g in zip(prompts, answers, answered, agreement)]}


def probe(model, tokenizer, progress: bool = False) -> dict:
    """The compile report's chat check: how many built-in probe prompts the model answers."""
    prompts = prompts_of(builtin_prompts("probe"))
    answers = generate_answers(model, tokenizer, prompts, PROBE_TOKENS, desc="chat probe", progress=progress)
    ok = [is_answer(a.text, echo_grams(tokenizer, p)) for p, a in zip(prompts, answers)]
    return {"prompts": len(prompts), "answered": sum(ok) / len(prompts),
            "sample": {"prompt": prompts[0][-1]["content"], "answer": answers[0].text}}
