"""Chat calibration data and chat-fidelity metrics on tiny models with a real chat template."""
import json

import pytest
import torch
import transformers

from slimc import chat
from slimc.cli import main
from slimc.errors import SlimcError

from conftest import TINY_CHAT_TEMPLATE, char_tokenizer, save_tiny_dir, tiny_model

TEXT = "\n".join(" ".join(f"word{(i * 7 + j) % 89} thing{j % 11}." for j in range(20)) for i in range(60))


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(TINY_CHAT_TEMPLATE)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_builtin_prompt_sets_are_disjoint_and_well_formed():
    sets = {name: [c[-1]["content"] for c in chat.builtin_prompts(name)] for name in chat.PROMPT_SETS}
    assert len(sets["calibration"]) >= 64 and len(sets["eval"]) >= 32 and len(sets["probe"]) >= 16
    for a in sets:
        assert len(set(sets[a])) == len(sets[a])
        for b in sets:
            if a < b:
                assert not set(sets[a]) & set(sets[b]), (a, b)


def test_framed_windows_carry_role_markers_and_assistant_turns(tok):
    convs = chat.framed_conversations(TEXT, seed=0)
    assert convs and all([m["role"] for m in c] == ["user", "assistant"] for c in convs)
    windows = chat.pack_windows(tok, convs, seq_len=1024, n_windows=4)
    assert windows.shape == (4, 1024)
    for row in windows.tolist():
        # every window opens like a real chat: the template's system prompt at position 0
        assert row[:10] == _ids(tok, "<|system|>")
        assert _contains(row, _ids(tok, "<|user|>")) and _contains(row, _ids(tok, "<|assistant|>"))
    first = convs[0][1]["content"][:40]
    assert _contains(windows[0].tolist(), _ids(tok, "<|assistant|>" + first))


def test_pack_windows_stops_when_conversations_run_out(tok):
    convs = chat.framed_conversations(TEXT, seed=0)[:3]
    assert chat.pack_windows(tok, convs, seq_len=64, n_windows=10).shape[0] <= 3


def test_self_generated_set_deterministic_cached_and_rendered(tok, tmp_path, monkeypatch):
    model = tiny_model("llama", vocab_size=140)
    monkeypatch.setattr(chat, "SELF_GEN_TOKENS", 6)
    calls = []
    real = chat.generate_answers

    def counting(*a, **k):
        calls.append(len(a[2]))
        return real(*a, **k)

    monkeypatch.setattr(chat, "generate_answers", counting)
    first = chat.self_generated_conversations(model, tok, TEXT, seed=0, model_key="m", cache=tmp_path)
    assert calls == [len(chat.builtin_prompts("calibration")) + chat.SELF_GEN_DERIVED]
    again = chat.self_generated_conversations(model, tok, TEXT, seed=0, model_key="m", cache=tmp_path)
    assert again == first and len(calls) == 1  # from the cache: nothing generated
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in first)
    other = chat.self_generated_conversations(model, tok, TEXT, seed=1, model_key="m", cache=tmp_path)
    assert len(calls) == 2 and [c[0] for c in other] != [c[0] for c in first]
    # a different model never reads another model's answers
    chat.self_generated_conversations(model, tok, TEXT, seed=0, model_key="other", cache=tmp_path)
    assert len(calls) == 3
    # another number of derived instructions is another set, cached apart
    fewer = chat.self_generated_conversations(model, tok, TEXT, seed=0, model_key="m", cache=tmp_path, n_derived=1)
    assert calls[-1] == len(chat.builtin_prompts("calibration")) + 1 and len(calls) == 4
    assert len(fewer) <= calls[-1] and fewer != first


def test_calibration_windows_mix(tok, monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMC_CACHE", str(tmp_path))
    monkeypatch.setattr(chat, "SELF_GEN_TOKENS", 4)
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    model = tiny_model("llama", vocab_size=140)
    windows, info = chat.calibration_windows(model, tok, str(path), n_plain=8, seq_len=128, seed=0, mix=0.5,
                                             kind="framed", model_key="m")
    assert windows.shape == (4, 128) and info["framed"]["windows"] == 4 and "self_generated" not in info
    windows, info = chat.calibration_windows(model, tok, str(path), n_plain=8, seq_len=128, seed=0, mix=1.0,
                                             kind="both", model_key="m")
    assert windows.shape == (8, 128)
    assert info["self_generated"]["windows"] == 4 and info["framed"]["windows"] == 4
    assert "4 self-generated" in chat.describe_mix({"source": "x", "samples": 8, "seq_len": 128, "chat": info})


def markov_model(chain: dict[str, str], tok, vocab=144) -> transformers.LlamaForCausalLM:
    """A real Llama whose greedy next token depends only on the current one: the blocks add nothing to the
    residual, the embedding is one-hot, lm_head maps each character to its successor in `chain`
    (a value None means the end-of-turn token)."""
    cfg = transformers.LlamaConfig(hidden_size=vocab, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=8, vocab_size=vocab, tie_word_embeddings=False,
                                   eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.norm.weight.fill_(1)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1)
            layer.post_attention_layernorm.weight.fill_(1)
        for cur, nxt in chain.items():
            c = _ids(tok, cur)[0]
            n = tok.eos_token_id if nxt is None else _ids(tok, nxt)[0]
            model.lm_head.weight[n, c] = 1.0
    return model


ANSWER = "Yes,mr.dog"  # every character distinct, so a one-character memory spells it out


@pytest.fixture(scope="module")
def rigged(tok):
    answering = {">": ANSWER[0], **{a: b for a, b in zip(ANSWER, ANSWER[1:])}, ANSWER[-1]: None}
    silent = {">": None}
    return markov_model(answering, tok), markov_model(silent, tok)


def test_chat_metrics_on_rigged_models(tok, rigged):
    answering, silent = rigged
    prompts = chat.prompts_of([[{"role": "user", "content": "Say hello"}], [{"role": "user", "content": "Anything?"}]])
    reference = chat.generate_answers(answering, tok, prompts, 16, progress=False)
    assert [a.text for a in reference] == [ANSWER, ANSWER]
    assert reference[0].ids[-1] == tok.eos_token_id  # the end-of-turn token is part of the reference
    good = chat.chat_fidelity(answering, tok, prompts, reference, 16, progress=False)
    bad = chat.chat_fidelity(silent, tok, prompts, reference, 16, progress=False)
    assert good["answered"] == 1.0 and good["agreement"] == 1.0
    assert bad["answered"] == 0.0 and bad["agreement"] == 0.0
    assert good["reference_tokens"] == bad["reference_tokens"] == 2 * (len(ANSWER) + 1)
    # the answering model puts logit sqrt(hidden) on each reference token, the silent one puts 0 on all
    assert good["nll"] < 0.1 < 5 < bad["nll"]


def test_answer_nll_matches_direct_log_softmax(tok):
    model = tiny_model("llama", vocab_size=140)
    prompts = chat.prompts_of([[{"role": "user", "content": "ab"}], [{"role": "user", "content": "a longer one"}]])
    answers = [chat.Answer("", [60, 61, 1]), chat.Answer("", [70, 1])]
    total, count = chat.answer_nll(model, tok, prompts, answers, batch_size=2)
    want = 0.0
    for p, a in zip(prompts, answers):
        ids = _ids(tok, chat.render(tok, p, add_generation_prompt=True))
        seq = torch.tensor([ids + a.ids])
        with torch.no_grad():
            logp = model(seq).logits[0].log_softmax(-1)
        want -= sum(float(logp[len(ids) + k - 1, t]) for k, t in enumerate(a.ids))
    assert count == 5 and total == pytest.approx(want, rel=1e-4)


def test_echo_of_the_system_prompt_is_not_an_answer(tok):
    prompt = [{"role": "user", "content": "Who are you, a tiny helpful test model?"}]
    runs = chat.echo_grams(tok, prompt)
    assert not chat.is_answer("You are a tiny helpful test model made by slimc.", runs)
    assert not chat.is_answer("Yes.", runs)  # too short
    assert not chat.is_answer("The\n\nThe\n\nThe\n\nThe plant plant plant", runs)  # degenerate: two distinct words
    # repeating the user's own words is fine: only the template's text counts as an echo
    assert chat.is_answer("I am a tiny helpful test model, and I can answer questions.", runs)


def test_rouge_l():
    assert chat.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert chat.rouge_l("a b c d", "x y z") == 0.0
    # LCS of (a b c d) and (a c d e) is 3: P = 3/4, R = 3/4
    assert chat.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert chat.rouge_l("", "") == 1.0 and chat.rouge_l("", "x") == 0.0


@pytest.mark.parametrize("line, why", [
    ("{not json", "not JSON"),
    ('{"text": "hi"}', "expected"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
])
def test_malformed_conversation_file(tmp_path, line, why):
    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n' + line + "\n")
    with pytest.raises(SlimcError, match=f"line 2: .*{why}"):
        chat.read_conversations(path)


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip()]
    assert rc == 2 and lines[-1].startswith("slimc: error:") and "Traceback" not in err, err
    return lines[-1]


def test_cli_malformed_jsonl_one_line_nothing_written(tmp_path, capsys):
    model = save_tiny_dir(tmp_path / "m", chat_template=TINY_CHAT_TEMPLATE, vocab_size=140)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    out = tmp_path / "out"
    rc = main(["compile", str(model), "-o", str(out), "--calib", str(bad), "--calib-samples", "2", "--seq-len", "16"])
    assert "bad.jsonl line 1" in _one_line_error(capsys, rc)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    rc = main(["eval", str(model), "--chat", str(bad)])
    assert "bad.jsonl line 1" in _one_line_error(capsys, rc)


def test_cli_chat_eval_of_a_model_without_template(tmp_path, capsys):
    model = save_tiny_dir(tmp_path / "m", vocab_size=140)
    rc = main(["eval", str(model), "--chat"])
    assert "no chat template" in _one_line_error(capsys, rc)


def test_conversation_file_as_calibration_text(tok, tmp_path):
    from slimc import data

    path = tmp_path / "conv.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                             {"role": "assistant", "content": f"answer number {i} is here."}]}) + "\n")
    w = data.calibration_samples(tok, str(path), 4, 96, seed=0)
    assert w.shape == (4, 96) and all(r[:10] == _ids(tok, "<|system|>") for r in w.tolist())
    with pytest.raises(SlimcError, match="conversations fill"):
        data.calibration_samples(tok, str(path), 400, 96, seed=0)


def test_compile_mixes_chat_windows_reports_probe_and_writes_a_card(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(chat, "SELF_GEN_TOKENS", 4)
    monkeypatch.setattr(chat, "PROBE_TOKENS", 2)  # two characters can never make three words
    import slimc

    model = save_tiny_dir(tmp_path / "m", chat_template=TINY_CHAT_TEMPLATE, vocab_size=140)
    (tmp_path / "calib.txt").write_text(TEXT)
    opts = dict(calib=str(tmp_path / "calib.txt"), calib_samples=4, seq_len=128, sparsity=0.3)
    res = slimc.compile(str(model), str(tmp_path / "out"), **opts)
    mix = res.report["plan"]["calibration"]["chat"]
    assert mix["windows"] == 2 and mix["self_generated"]["windows"] == 1 and mix["framed"]["windows"] == 1
    probe = res.report["chat_probe"]
    assert probe["prompts"] == len(chat.builtin_prompts("probe")) and 0 <= probe["answered"] <= 1
    printed = capsys.readouterr().out
    assert "2 chat windows" in printed and "chat sample:" in printed
    # a random tiny model answers nothing: the warning is printed and lands in the model card
    assert probe["answered"] < chat.PROBE_MIN_ANSWERED and "warning: the pruned model answers only" in printed
    card = (tmp_path / "out" / "README.md").read_text()
    assert "self-generated" in card and "trust_remote_code=True" in card and "warning" in card
    off = slimc.compile(str(model), str(tmp_path / "off"), chat_calib="off", **opts)
    assert "chat" not in off.report["plan"]["calibration"]
    with pytest.raises(SlimcError, match="no chat template"):
        slimc.compile(str(save_tiny_dir(tmp_path / "plain", vocab_size=140)), str(tmp_path / "x"), chat_calib="on", **opts)


def _compiled_tiny_chat_model(tmp_path, monkeypatch):
    """A tiny chat model (a local dir) and its 30 % compile at tmp_path/out (plain calibration: quick)."""
    monkeypatch.setenv("SLIMC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(chat, "PROBE_TOKENS", 2)
    import slimc

    model = save_tiny_dir(tmp_path / "m", chat_template=TINY_CHAT_TEMPLATE, vocab_size=140)
    (tmp_path / "calib.txt").write_text(TEXT)
    slimc.compile(str(model), str(tmp_path / "out"), 0.3, calib=str(tmp_path / "calib.txt"), calib_samples=4,
                  seq_len=128, chat_calib="off")
    return model


def test_cli_chat_eval_names_a_missing_source_model(tmp_path, capsys, monkeypatch):
    import shutil

    shutil.rmtree(_compiled_tiny_chat_model(tmp_path, monkeypatch))  # the plan's source model is gone
    capsys.readouterr()
    rc = main(["eval", str(tmp_path / "out"), "--chat"])
    assert "pass --against MODEL" in _one_line_error(capsys, rc)


def test_cli_eval_chat_and_ppl_with_dense_beside(tmp_path, capsys, monkeypatch):
    model = _compiled_tiny_chat_model(tmp_path, monkeypatch)
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    rc = main(["eval", str(tmp_path / "out"), "--chat", "--chat-tokens", "6", "--ppl", str(tmp_path / "calib.txt"),
               "--seq-len", "64", "--against", str(model), "--json", str(out_json)])
    assert rc == 0
    r = json.loads(out_json.read_text())
    c, d = r["chat"], r["against"]["chat"]
    assert c["prompts"] == d["prompts"] == len(chat.builtin_prompts("eval")) and c["reference_model"] == str(model)
    # the dense side is scored on its own answers: full agreement
    assert d["agreement"] == 1.0 and d["reference_tokens"] == c["reference_tokens"] > 0 and 0 <= c["answered"] <= 1
    assert r["ppl"] > 1 and r["against"]["ppl"] > 1 and r["windows"] >= 1
    printed = capsys.readouterr().out
    assert "chat fidelity on 48 prompts" in printed and "model / dense" in printed
