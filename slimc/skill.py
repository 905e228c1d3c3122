"""How much of the dense model's zero-shot skill a pruned model keeps: pure arithmetic on `slimc eval --tasks`
results, no model involved.

A 135M model sits at or near chance on several of the papers' tasks, where a raw accuracy ratio says nothing.
"Kept above chance" is the mean over the *skilled* tasks -- those where the dense model beats chance by more
than two standard errors -- of (acc - chance) / (dense acc - chance).

Both models score the same documents. When both results carry each document's 0/1 outcome (`per_doc`, written
by `tasks.run_tasks`), the standard error uses the two models' covariance on those documents (paired); without
it, the two errors are taken as independent, which overstates the error of a ratio of positively correlated
accuracies (a conservative bar).

Two metric conventions: `acc` for every task (lm-eval's first metric, slimc's tables), and `papers` -- length-
normalized accuracy (`acc_norm`) for HellaSwag, ARC-Challenge and OpenBookQA, plain `acc` elsewhere, as
LLM-Pruner's zero-shot table reports them (the table SlimGPT's compares with; its figures are reproduced that
way in LLM-Pruner's issue #25).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CONVENTIONS = {
    "acc": {},
    "papers": {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"},
}


def metric_of(task: str, convention: str) -> str:
    return CONVENTIONS[convention].get(task, "acc")


@dataclass(frozen=True)
class Kept:
    value: float  # mean over `tasks` of the dense skill above chance kept; nan when no task is skilled
    stderr: float
    paired: bool  # the error used per-document outcomes on every task
    tasks: tuple[str, ...]
    convention: str


def _score(row: dict, task: str, metric: str) -> tuple[float, float] | None:
    r = row["tasks"].get(task, {})
    if r.get(metric) is None or r.get(f"{metric}_stderr") is None:  # absent, or null in a JSON (no error given)
        return None
    return r[metric], r[f"{metric}_stderr"]


def skilled_tasks(dense: dict, convention: str = "acc") -> list[str]:
    """Tasks with a known chance level where the dense model is more than two standard errors above it."""
    out = []
    for task, r in dense["tasks"].items():
        s = _score(dense, task, metric_of(task, convention))
        if s is not None and r.get("chance") is not None and s[0] - r["chance"] > 2 * s[1]:
            out.append(task)
    return out


def paired_covariance(a: str, b: str) -> float:
    """Covariance of two accuracy estimates from the same documents' 0/1 outcomes ("0110…", one character a
    document, the same order): the sample covariance of the outcomes over n."""
    n = len(a)
    if n != len(b) or n < 2:
        raise ValueError("per-document outcomes of different documents cannot be paired")
    x = [c == "1" for c in a]
    y = [c == "1" for c in b]
    mx, my = sum(x) / n, sum(y) / n
    return sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / (n - 1) / n


def kept_above_chance(row: dict, dense: dict, convention: str = "acc") -> Kept:
    """The dense skill kept above chance over the dense model's skilled tasks, with its delta-method error:
    per task r = (a - c) / (d - c), var(r) = (var a + r² var d - 2 r cov(a, d)) / (d - c)², averaged."""
    tasks = [t for t in skilled_tasks(dense, convention) if _score(row, t, metric_of(t, convention))]
    if not tasks:
        return Kept(math.nan, math.nan, False, (), convention)
    ratios, var, paired = [], 0.0, True
    for t in tasks:
        metric = metric_of(t, convention)
        (a, sa), (d, sd) = _score(row, t, metric), _score(dense, t, metric)
        gap = d - dense["tasks"][t]["chance"]
        r = (a - dense["tasks"][t]["chance"]) / gap
        ra, rd = row["tasks"][t].get("per_doc", {}).get(metric), dense["tasks"][t].get("per_doc", {}).get(metric)
        cov = 0.0
        if ra is not None and rd is not None and len(ra) == len(rd):
            cov = paired_covariance(ra, rd)
        else:
            paired = False
        ratios.append(r)
        var += max(sa * sa + r * r * sd * sd - 2 * r * cov, 0.0) / (gap * gap)
    return Kept(sum(ratios) / len(ratios), math.sqrt(var) / len(tasks), paired, tuple(tasks), convention)


def format_kept(k: Kept) -> str:
    if not k.tasks:
        return f"dense skill kept above chance ({k.convention}): no task where the dense model is above chance"
    err = "paired over the same documents" if k.paired else "errors taken as independent"
    metrics = ", ".join(f"{t} {metric_of(t, k.convention)}" for t in k.tasks)
    return f"dense skill kept above chance ({k.convention}: {metrics}): {k.value:.1%} ± {k.stderr:.1%} ({err})"
