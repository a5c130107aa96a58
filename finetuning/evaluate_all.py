"""The BioBERT evaluation suite on one model: ``biobert evaluate --model DIR --output-dir OUT``.

Tasks (under --data-root, default $BIOBERT_DATA or ../shared/data): NCBI-disease and BC5CDR-disease (NER), GAD
(RE, 10-fold CV), ChemProt (RE), BioASQ (QA). Any task flag (``--epochs 3``, ``--max-train-examples 200``...) is
passed to every task it applies to. Writes OUT/<task>/..., OUT/summary.json and OUT/summary.md: the paper's layout
(dataset, metric: P/R/F1 or strict/lenient/MRR; ours beside BioBERT v1.1 and BERT as reported in Lee et al. 2019),
with the test set each of our numbers comes from; a dev-only score is marked as such, never shown as a test score.
Task flags go on top of the recipe: the paper's ("biobert": 20 NER epochs, selection on dev) when a GPU is present,
else "quick" (CPU-sized); ``--recipe`` chooses. summary.json and summary.md name the recipe used.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from biobert.config import option, parse_suite
from biobert.errors import run
from biobert.files import atomic_write, atomic_write_json
from finetuning.common import headline
from finetuning.config import TASK_CONFIGS, FinetuneConfig, build_task, field_names

CONFIGS = TASK_CONFIGS
SCORES = {"ner": ("precision", "recall", "f1"), "re": ("precision", "recall", "f1"),
          "qa": ("strict_accuracy", "lenient_accuracy", "mrr")}
METRIC_NAMES = {"precision": "P", "recall": "R", "f1": "F1", "strict_accuracy": "strict acc.",
                "lenient_accuracy": "lenient acc.", "mrr": "MRR"}

# Lee et al. (2019), "BioBERT: a pre-trained biomedical language representation model for biomedical text mining",
# Bioinformatics 36(4):1234-1240, doi:10.1093/bioinformatics/btz682: percentages as reported. Only cells we could check
# against a transcription of the paper's tables are filled: Table 6 (NER), BioBERT v1.1 (+PubMed) column, as listed in
# the "BioBERT (Lee et al., 2019)" rows of github.com/lingluodlut/BioNER-Progress (README: NCBI-disease, CDR-Disease).
# The BERT column, the RE (Table 7) and QA (Table 8) numbers could not be verified here: left empty rather than recalled
# from memory. Note the paper's test sets: official test splits for NER and ChemProt, 10-fold CV for GAD, BioASQ 4b-6b
# batches for QA; ours are named in each row ("test set").
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "NCBI-disease": {"biobert_v1.1": {"precision": 88.22, "recall": 91.25, "f1": 89.71}, "bert": {}},
    "BC5CDR-disease": {"biobert_v1.1": {"precision": 86.47, "recall": 87.84, "f1": 87.15}, "bert": {}},
    "GAD": {"biobert_v1.1": {}, "bert": {}},
    "ChemProt": {"biobert_v1.1": {}, "bert": {}},
    "BioASQ": {"biobert_v1.1": {}, "bert": {}},
}


@dataclass(frozen=True)
class SuiteTask:
    name: str
    kind: str  # ner | re | qa
    subdir: str  # under the data root
    defaults: dict = field(default_factory=dict)


SUITE = (
    SuiteTask("NCBI-disease", "ner", "ner/NCBI-disease-IOB"),
    SuiteTask("BC5CDR-disease", "ner", "ner/BC5CDR-disease-IOB"),
    SuiteTask("GAD", "re", "re/GAD", {"cv_folds": 10}),
    SuiteTask("ChemProt", "re", "re/ChemProt"),
    SuiteTask("BioASQ", "qa", "qa/BioASQ"),
)


def default_data_root() -> Path:
    """$BIOBERT_DATA, else ../shared/data beside the working directory (where a checkout keeps it)."""
    import os

    return Path(os.environ.get("BIOBERT_DATA") or Path.cwd().parent / "shared" / "data")


def task_config(task: SuiteTask, data_root: Path, output_dir: Path, overrides: dict,
                recipe: str = "quick") -> FinetuneConfig:
    """The task's config: the recipe's values < the suite's per-task ones < ``overrides`` (the keys this task has)."""
    cls = CONFIGS[task.kind]
    names = field_names(cls) - {"recipe"}
    values = {**task.defaults, **{k: v for k, v in overrides.items() if k in names}}
    values.update(data=str(data_root / task.subdir), output_dir=str(output_dir / task.name), recipe=recipe)
    return build_task(cls, values, task.name)


def default_recipe() -> str:
    """The paper's recipe where a GPU makes it affordable (20 NER epochs), the quick one on a CPU."""
    import torch

    return "biobert" if torch.cuda.is_available() else "quick"


def run_task(cfg: FinetuneConfig, kind: str) -> dict:
    if kind == "ner":
        from finetuning.ner import main
    elif kind == "re":
        from finetuning.relation import main
    else:
        from finetuning.qa import main
    return main(cfg)


def _ours(row: dict, key: str) -> str:
    if key not in row:
        return ""
    cell = f"{100 * row[key]:.2f}" + (f" ± {100 * row[key + '_std']:.2f}" if key + "_std" in row else "")
    return cell + (" (dev only)" if row.get("split") == "dev" else "")


def summary_markdown(rows: list[dict]) -> str:
    """The paper's layout: one row per dataset and metric, ours beside the reported numbers, then speed."""
    lines = ["| type | dataset | metric | ours | BioBERT v1.1 (reported) | BERT (reported) | our test set |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER.get(r["task"], {})
        source = {"test": r.get("test_source") or "test split", "dev": "none: dev only (dev also chose the epoch)",
                  "none": "none"}[r.get("split", "test")]
        for i, key in enumerate(SCORES[r["kind"]]):
            reported = [paper.get(m, {}).get(key) for m in ("biobert_v1.1", "bert")]
            cells = [r["kind"].upper() if i == 0 else "", r["task"] if i == 0 else "", METRIC_NAMES[key],
                     _ours(r, key), *("" if v is None else f"{v:.2f}" for v in reported), source if i == 0 else ""]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Scores in %. Reported: Lee et al., Bioinformatics 2019 (finetuning/evaluate_all.py: PAPER says "
              "which cells are filled and from where).", "",
              "| dataset | train ex/s | minutes |", "|---|---|---|"]
    lines += [f"| {r['task']} | {r.get('train_examples_per_s', 0):.1f} | {r['seconds'] / 60:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def _train_speed(metrics: dict) -> float:
    runs = [f["train"] for f in metrics.get("folds", [])] or ([metrics["train"]] if "train" in metrics else [])
    seen = sum(r["train_examples_seen"] for r in runs)
    secs = sum(r["train_seconds"] for r in runs)
    return seen / secs if secs else 0.0


@dataclass(kw_only=True)
class SuiteConfig:
    """The BioBERT evaluation suite on one model."""

    data_root: str | None = option(None, "the shared data directory (default: $BIOBERT_DATA, else ../shared/data)")
    output_dir: str = option("eval_out", "OUT/<task>/... per task, OUT/summary.json and OUT/summary.md")
    tasks: list[str] = option(factory=lambda: [t.name for t in SUITE], help="tasks to run",
                              choices=[t.name for t in SUITE])

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - {t.name for t in SUITE})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: choose from {[t.name for t in SUITE]}")


def main(cfg: SuiteConfig, task_overrides: dict) -> list[dict]:
    data_root, out = Path(cfg.data_root) if cfg.data_root else default_data_root(), Path(cfg.output_dir)
    task_overrides = dict(task_overrides)
    why = "given" if "recipe" in task_overrides else ("a GPU is present" if default_recipe() == "biobert" else "no GPU")
    recipe = task_overrides.pop("recipe", None) or default_recipe()
    print(f"recipe: {recipe} ({why}; --recipe biobert|quick to choose)", flush=True)
    rows = []
    for task in SUITE:
        if task.name not in cfg.tasks:
            continue
        task_cfg = task_config(task, data_root, out, task_overrides, recipe)
        t0 = time.perf_counter()
        metrics = run_task(task_cfg, task.kind)
        scores, split = headline(metrics, SCORES[task.kind])
        row = {"task": task.name, "kind": task.kind, "recipe": recipe, "seconds": time.perf_counter() - t0,
               "train_examples_per_s": _train_speed(metrics), "split": split,
               "test_source": metrics.get("test_source"), **scores}
        rows.append(row)
        note = {"test": "", "dev": " (dev only: no test split)", "none": " (no score)"}[split]
        print(f"{task.name}: " + " ".join(f"{k}={row[k]:.4f}" for k in SCORES[task.kind] if k in row) + note)
    atomic_write_json(out / "summary.json", rows)
    md = f"recipe: {recipe} ({why})\n\n" + summary_markdown(rows)
    atomic_write(out / "summary.md", md)
    print(md)
    return rows


def cli(argv: list[str] | None = None) -> int:
    cfg, tasks = parse_suite(SuiteConfig, CONFIGS.values(), argv, prog="biobert evaluate", description=__doc__)
    for key in ("data", "output_dir"):
        if key in tasks:
            raise ValueError(f"--{key.replace('_', '-')} is set per task by the suite: use --data-root / --output-dir")
    main(cfg, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
