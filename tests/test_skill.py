"""The dense skill kept above chance (slimc/skill.py) against direct computations and a paired bootstrap."""
import math

import pytest
import torch

from slimc import skill
from slimc.tasks import per_document_outcomes


def _bits(t: torch.Tensor) -> str:
    return "".join("1" if v else "0" for v in t.tolist())


def _row(outcomes: dict[str, torch.Tensor], chance: dict[str, float], per_doc: bool = True) -> dict:
    """A `slimc eval --tasks` result from 0/1 outcomes per task, with lm-eval's binomial standard errors."""
    tasks = {}
    for t, o in outcomes.items():
        n, acc = len(o), float(o.float().mean())
        tasks[t] = {"acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)), "n": n, "chance": chance[t]}
        if per_doc:
            tasks[t]["per_doc"] = {"acc": _bits(o)}
    return {"tasks": tasks}


def _correlated_pair(n: int, p_dense: float, p_flip: float, gen: torch.Generator):
    """Dense outcomes, and pruned ones that copy them except for a random fraction redrawn: positively
    correlated, as a pruned model and its source are on the same questions."""
    dense = torch.rand(n, generator=gen) < p_dense
    redraw = torch.rand(n, generator=gen) < p_flip
    pruned = torch.where(redraw, torch.rand(n, generator=gen) < 0.5, dense)
    return dense, pruned


def test_paired_covariance_is_the_sample_covariance_over_n():
    gen = torch.Generator().manual_seed(0)
    a, b = _correlated_pair(500, 0.6, 0.3, gen)
    expected = float(torch.cov(torch.stack([a.double(), b.double()]))[0, 1]) / 500
    assert skill.paired_covariance(_bits(a), _bits(b)) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        skill.paired_covariance("0101", "010")


def test_kept_value_and_skilled_tasks_by_hand():
    chance = {"piqa": 0.5, "arc_easy": 0.25, "winogrande": 0.5}
    gen = torch.Generator().manual_seed(1)
    dense_o = {"piqa": torch.rand(1000, generator=gen) < 0.65, "arc_easy": torch.rand(600, generator=gen) < 0.55,
               "winogrande": torch.rand(1200, generator=gen) < 0.505}  # at chance: not a skilled task
    pruned_o = {"piqa": torch.rand(1000, generator=gen) < 0.6, "arc_easy": torch.rand(600, generator=gen) < 0.45,
                "winogrande": torch.rand(1200, generator=gen) < 0.52}
    dense, pruned = _row(dense_o, chance), _row(pruned_o, chance)
    assert skill.skilled_tasks(dense) == ["piqa", "arc_easy"]
    k = skill.kept_above_chance(pruned, dense)
    d, p = dense["tasks"], pruned["tasks"]
    by_hand = ((p["piqa"]["acc"] - 0.5) / (d["piqa"]["acc"] - 0.5)
               + (p["arc_easy"]["acc"] - 0.25) / (d["arc_easy"]["acc"] - 0.25)) / 2
    assert k.value == pytest.approx(by_hand) and k.tasks == ("piqa", "arc_easy") and k.paired


def test_paired_error_matches_a_paired_bootstrap_and_is_below_the_independent_one():
    gen = torch.Generator().manual_seed(2)
    chance = {"piqa": 0.5, "arc_easy": 0.25}
    pairs = {"piqa": _correlated_pair(1800, 0.66, 0.35, gen), "arc_easy": _correlated_pair(600, 0.55, 0.35, gen)}
    dense = _row({t: d for t, (d, _) in pairs.items()}, chance)
    pruned = _row({t: p for t, (_, p) in pairs.items()}, chance)
    k = skill.kept_above_chance(pruned, dense)
    independent = skill.kept_above_chance(_row({t: p for t, (_, p) in pairs.items()}, chance, per_doc=False), dense)
    assert k.paired and not independent.paired and independent.value == pytest.approx(k.value)
    # brute force: resample documents (the same ones for both models), recompute the ratio
    boot = torch.zeros(2000, dtype=torch.float64)
    for t, (d, p) in pairs.items():
        idx = torch.randint(len(d), (2000, len(d)), generator=gen)
        boot += ((p[idx].double().mean(1) - chance[t]) / (d[idx].double().mean(1) - chance[t])) / len(pairs)
    assert k.stderr == pytest.approx(float(boot.std()), rel=0.15)
    assert k.stderr < 0.8 * independent.stderr  # correlated outcomes: the paired error is clearly smaller


def test_papers_convention_reads_acc_norm_where_the_papers_do():
    dense = {"tasks": {"hellaswag": {"acc": 0.26, "acc_stderr": 0.01, "acc_norm": 0.40, "acc_norm_stderr": 0.01,
                                     "chance": 0.25},
                       "piqa": {"acc": 0.65, "acc_stderr": 0.01, "acc_norm": 0.64, "acc_norm_stderr": 0.01,
                                "chance": 0.5}}}
    row = {"tasks": {"hellaswag": {"acc": 0.26, "acc_stderr": 0.01, "acc_norm": 0.37, "acc_norm_stderr": 0.01},
                     "piqa": {"acc": 0.62, "acc_stderr": 0.01, "acc_norm": 0.5, "acc_norm_stderr": 0.01}}}
    assert skill.skilled_tasks(dense, "acc") == ["piqa"]  # hellaswag acc is within two errors of chance
    k = skill.kept_above_chance(row, dense, "papers")
    assert k.tasks == ("hellaswag", "piqa") and not k.paired
    assert k.value == pytest.approx(((0.37 - 0.25) / 0.15 + (0.62 - 0.5) / 0.15) / 2)
    assert "hellaswag acc_norm" in skill.format_kept(k) and "piqa acc" in skill.format_kept(k)


def test_no_skilled_task_gives_nan_and_says_so():
    dense = {"tasks": {"boolq": {"acc": 0.5, "acc_stderr": 0.02, "chance": 0.5}}}
    k = skill.kept_above_chance({"tasks": {"boolq": {"acc": 0.6, "acc_stderr": 0.02}}}, dense)
    assert math.isnan(k.value) and k.tasks == ()
    assert "no task where the dense model is above chance" in skill.format_kept(k)


def test_per_document_outcomes_from_lm_eval_samples():
    samples = [{"doc_id": 2, "filter": "none", "acc": 1.0, "acc_norm": 0.0, "perplexity": 3.2},
               {"doc_id": 0, "filter": "none", "acc": 0.0, "acc_norm": 1.0, "perplexity": 1.5},
               {"doc_id": 1, "filter": "none", "acc": True, "acc_norm": True, "perplexity": 9.0}]
    assert per_document_outcomes(samples) == {"acc": "011", "acc_norm": "110"}


def test_a_task_whose_error_is_null_in_the_json_is_not_counted():
    dense = {"tasks": {"piqa": {"acc": 0.7, "acc_stderr": None, "chance": 0.5},
                       "arc_easy": {"acc": 0.5, "acc_stderr": 0.02, "chance": 0.25}}}
    row = {"tasks": {"piqa": {"acc": 0.6, "acc_stderr": 0.02}, "arc_easy": {"acc": 0.45, "acc_stderr": 0.02}}}
    assert skill.skilled_tasks(dense) == ["arc_easy"]
    assert skill.kept_above_chance(row, dense).value == pytest.approx(0.8)
