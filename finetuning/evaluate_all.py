"""Run the BioBERT evaluation suite on one model: ``python finetuning/evaluate_all.py --model DIR --output-dir OUT``.

Tasks (under --data-root, default $BIOBERT_DATA or ../shared/data): NCBI-disease and BC5CDR-disease (NER), GAD
(RE, 10-fold CV), ChemProt (RE), BioASQ (QA). Any task flag (``--epochs 3``, ``--max-train-examples 200``...) is
passed to every task it applies to, on top of the recipe: the paper's ("biobert": 20 NER epochs, selection on dev)
when a GPU is present, else "quick" (CPU-sized); ``--recipe`` chooses. Writes OUT/<task>/..., OUT/summary.json and
OUT/summary.md, both naming the recipe used.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # finetuning/ on sys.path would shadow the stdlib `re` with finetuning/re.py
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetuning.common import write_json, write_text
from finetuning.config import FinetuneConfig, NERConfig, QAConfig, REConfig, build_parser, make_config

CONFIGS = {"ner": NERConfig, "re": REConfig, "qa": QAConfig}
SCORES = {"ner": ("precision", "recall", "f1"), "re": ("precision", "recall", "f1"),
          "qa": ("strict_accuracy", "lenient_accuracy", "mrr")}


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
    return Path(os.environ.get("BIOBERT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def task_config(task: SuiteTask, data_root: Path, output_dir: Path, overrides: dict,
                recipe: str = "quick") -> FinetuneConfig:
    """The task's config: the recipe's values, then the suite's per-task ones, then ``overrides`` (its fields only)."""
    cls = CONFIGS[task.kind]
    names = {f.name for f in dataclasses.fields(cls)} - {"recipe"}
    values = {**task.defaults, **{k: v for k, v in overrides.items() if k in names}}
    return make_config(cls, recipe, **values, data=str(data_root / task.subdir), output_dir=str(output_dir / task.name))


def default_recipe() -> str:
    """The paper's recipe where a GPU makes it affordable (20 NER epochs), the quick one on a CPU."""
    import torch

    return "biobert" if torch.cuda.is_available() else "quick"


def run_task(cfg: FinetuneConfig, kind: str) -> dict:
    if kind == "ner":
        from finetuning.ner import main
    elif kind == "re":
        from finetuning.re import main
    else:
        from finetuning.qa import main
    return main(cfg)


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| task | metric 1 | metric 2 | metric 3 | train ex/s | minutes |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{k}={r[k]:.4f}" + (f" +- {r[k + '_std']:.4f}" if k + "_std" in r else "") for k in SCORES[r["kind"]]]
        lines.append(f"| {r['task']} | " + " | ".join(cells) + f" | {r.get('train_examples_per_s', 0):.1f} | "
                     f"{r['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def _train_speed(metrics: dict) -> float:
    runs = [f["train"] for f in metrics.get("folds", [])] or ([metrics["train"]] if "train" in metrics else [])
    seen = sum(r["train_examples_seen"] for r in runs)
    secs = sum(r["train_seconds"] for r in runs)
    return seen / secs if secs else 0.0


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--output-dir", type=Path, default=Path("eval_out"))
    parser.add_argument("--tasks", nargs="+", default=[t.name for t in SUITE], choices=[t.name for t in SUITE])
    args, rest = parser.parse_known_args(argv)
    given = vars(build_parser(NERConfig, REConfig, QAConfig, only_given=True).parse_args(rest))
    given.pop("data", None)
    given.pop("output_dir", None)
    why = "given" if "recipe" in given else ("a GPU is present" if default_recipe() == "biobert" else "no GPU")
    recipe = given.pop("recipe", None) or default_recipe()
    print(f"recipe: {recipe} ({why}; --recipe biobert|quick to choose)", flush=True)
    rows = []
    for task in SUITE:
        if task.name not in args.tasks:
            continue
        cfg = task_config(task, args.data_root, args.output_dir, given, recipe)
        t0 = time.perf_counter()
        metrics = run_task(cfg, task.kind)
        row = {"task": task.name, "kind": task.kind, "recipe": recipe, "seconds": time.perf_counter() - t0,
               "train_examples_per_s": _train_speed(metrics)}
        row.update({k: metrics[k] for k in metrics if k.split("_std")[0] in SCORES[task.kind]})
        rows.append(row)
        print(f"{task.name}: " + " ".join(f"{k}={row[k]:.4f}" for k in SCORES[task.kind]))
    write_json(args.output_dir / "summary.json", rows)
    md = f"recipe: {recipe} ({why})\n\n" + summary_markdown(rows)
    write_text(args.output_dir / "summary.md", md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
