"""Zero-shot tasks: offline data through lm-eval, scored for real on a model whose log-likelihoods are rigged
for (or against) the gold answer; subsets; the CLI's bad inputs."""
import pytest
import torch
import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast

from conftest import char_tokenizer, strict_json_loads

lm_eval = pytest.importorskip("lm_eval")
from slimc import tasks as tasks_mod  # noqa: E402
from slimc.cli import main  # noqa: E402

ALL = list(tasks_mod.TASKS)
BOOST = 30.0  # logit given to (or taken from) the next token of a gold sequence; every other logit is 0


class RiggedLM(transformers.LlamaForCausalLM):
    """A causal LM that knows the gold sequences (context + gold continuation, as lm-eval tokenizes them):
    wherever the input so far is a prefix of one, the next gold token gets +BOOST (sign=1) or -BOOST (-1)."""

    def __init__(self, config, sign=1.0):
        super().__init__(config)
        self.sign, self.trie = sign, {}

    def add_gold(self, ids):
        node = self.trie
        for t in ids:
            node = node.setdefault(t, {})

    def forward(self, input_ids=None, **kwargs):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.config.vocab_size)
        for i in range(b):
            node = self.trie
            for pos, tok in enumerate(input_ids[i].tolist()):
                node = node.get(tok) if node is not None else None
                if not node:
                    break
                for nxt in node:
                    logits[i, pos, nxt] = self.sign * BOOST
        return CausalLMOutputWithPast(logits=logits)


def rigged(sign, names, limit):
    tok = char_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=160, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                   num_attention_heads=1, num_key_value_heads=1,
                                   max_position_embeddings=8192)  # no truncation of BoolQ's passages
    model = RiggedLM(cfg, sign).eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
    golds = 0
    with tasks_mod.prepared_tasks(names, limit) as (_, tasks, samples, _sizes):
        for name, task in tasks.items():
            task.build_all_requests(samples=samples[name], rank=0, world_size=1)
            for inst in task.instances:
                # WinoGrande varies the context, not the continuation: its gold index is what doc_to_text gives
                gold = task.doc_to_text(inst.doc) if name == "winogrande" else task.doc_to_target(inst.doc)
                if name == "lambada" or inst.idx == gold:  # LAMBADA's one continuation is the gold one
                    context, continuation = inst.arguments
                    ctx, cont = lm._encode_pair(context, continuation)
                    model.add_gold(ctx + cont)
                    golds += 1
    assert golds >= limit * len(names)
    return model, tok


@pytest.mark.parametrize("sign,expected", [(1.0, 1.0), (-1.0, 0.0)])
def test_rigged_model_scores_every_task_perfectly_or_not_at_all(sign, expected):
    model, tok = rigged(sign, ALL, limit=2)
    r = tasks_mod.run_tasks(model, tok, ALL, limit=2, batch_size=8)
    assert set(r["tasks"]) == set(ALL)
    for name, row in r["tasks"].items():
        assert row["n"] == 2 and row["acc"] == expected, (name, row)
    assert r["average"] == expected and r["limit"] == 2


def test_subset_is_seeded_sorted_and_the_same_for_every_call():
    a = tasks_mod.subset(1838, 50)
    assert a == tasks_mod.subset(1838, 50) and a == sorted(a) and len(set(a)) == 50
    assert a != list(range(50))  # not simply the first documents
    assert tasks_mod.subset(20, 50) == list(range(20)) and tasks_mod.subset(20, None) == list(range(20))


def test_offline_tasks_read_the_fetched_validation_splits():
    with tasks_mod.prepared_tasks(["piqa", "boolq", "arc_easy"], 5) as (_, tasks, samples, sizes):
        assert sizes == {n: len(list(t.eval_docs)) for n, t in tasks.items()}
        assert sizes == {"piqa": 1838, "boolq": 3270, "arc_easy": 570}
        doc = list(tasks["boolq"].eval_docs)[0]
        assert tasks["boolq"].doc_to_target(doc) in (0, 1)  # google/boolq's boolean answer, mapped
        assert all(len(v) == 5 for v in samples.values())


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(tasks_mod.SlimcError, match="offline tasks are piqa, hellaswag"):
        tasks_mod.parse_task_list("piqa,no_such_task_xyz")
    assert tasks_mod.parse_task_list("all") == list(tasks_mod.PAPER_TASKS)
    with pytest.raises(tasks_mod.SlimcError, match="distinct"):
        tasks_mod.parse_task_list("piqa,piqa")


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "piqa,nope_task"], "unknown task 'nope_task'"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be a positive integer"),
    (["--limit", "5"], "--limit subsets the --tasks documents"),
    (["--tasks", ""], "--tasks wants a comma-separated list"),
])
def test_eval_bad_inputs_print_one_line(tmp_path, capsys, argv, message):
    assert main(["eval", str(tmp_path / "never-loaded"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_eval_cli_tasks_json(tmp_path, capsys):
    from conftest import save_tiny_dir

    d = save_tiny_dir(tmp_path / "tiny", vocab_size=160, max_position_embeddings=4096)
    out = tmp_path / "r.json"
    assert main(["eval", str(d), "--tasks", "piqa,winogrande", "--limit", "4", "--json", str(out),
                 "--against", str(d)]) == 0
    r = strict_json_loads(out.read_text())  # strict JSON: a NaN would be written as null
    assert r["against"]["tasks"] == r["tasks"]  # the same model beside itself: the dense column, same documents
    assert "ppl" not in r  # --tasks alone scores tasks only
    assert set(r["tasks"]) == {"piqa", "winogrande"}
    for row in r["tasks"].values():
        assert row["n"] == 4 and 0 <= row["acc"] <= 1 and row["acc_stderr"] >= 0
        # each document's outcome is logged, and they average to the reported accuracy
        assert len(row["per_doc"]["acc"]) == 4 and row["per_doc"]["acc"].count("1") / 4 == pytest.approx(row["acc"])
    assert r["average"] == pytest.approx((r["tasks"]["piqa"]["acc"] + r["tasks"]["winogrande"]["acc"]) / 2)
    assert set(r["kept_above_chance"]) == {"acc", "papers"}
    for k in r["kept_above_chance"].values():  # a random tiny model beats chance nowhere: no share to give
        assert k["tasks"] == [] and k["value"] is None
    out = capsys.readouterr().out
    assert "piqa" in out and "dense skill kept above chance (acc" in out


def test_missing_task_data_says_how_to_fetch_it(tmp_path, monkeypatch):
    import slimc.assets

    monkeypatch.setattr(slimc.assets, "task_data_dir", lambda: tmp_path)
    with pytest.raises(tasks_mod.SlimcError, match="task data for piqa missing .* run `slimc assets fetch`"):
        with tasks_mod.prepared_tasks(["piqa"], 2):
            pass
