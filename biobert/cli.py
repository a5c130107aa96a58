"""`biobert`: the front door to every stage. `biobert SUBCOMMAND --help` for each one's flags.

Each subcommand is a stage's own `cli(argv)`, imported only when called (so `biobert --help` and `biobert plan` stay
fast and torch-free). Errors a user can fix end in one line `error: ...` and exit 2 (biobert.errors); add `--debug`
anywhere for the traceback.
"""

from __future__ import annotations

import importlib
import sys

from biobert import __version__
from biobert.errors import run

# name -> (module, one line). Order = the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.run", "PubMed XML / PMC JATS / text -> NVIDIA-compatible HDF5 shards"),
    "validate": ("data_prep.validate", "check a shard directory against its manifest; print statistics"),
    "vocab": ("data_prep.vocab", "train a WordPiece vocab from a corpus"),
    "pretrain": ("pretraining.run", "(continued) pretraining with DeepSpeed: a recipe + key=value overrides"),
    "export": ("pretraining.export", "a training checkpoint -> a HuggingFace model directory"),
    "convert": ("pretraining.convert", "NVIDIA or TensorFlow BERT checkpoints -> a HuggingFace model directory"),
    "ner": ("finetuning.ner", "fine-tune and evaluate named entity recognition"),
    "re": ("finetuning.relation", "fine-tune and evaluate relation extraction (optionally k-fold CV)"),
    "qa": ("finetuning.qa", "fine-tune and evaluate factoid question answering (BioASQ)"),
    "evaluate": ("finetuning.evaluate_all", "the BioBERT evaluation suite on one model -> summary table"),
    "sweep": ("finetuning.sweep", "seeds x learning rates for one task -> mean +- std"),
    "bioasq": ("finetuning.bioasq", "convert BioASQ JSON <-> SQuAD format / submissions"),
    "curve": ("finetuning.pretraining_curve", "fine-tuning score vs pretraining steps, tokens or corpus size (Figure 2)"),
    "subset": ("finetuning.bench_data", "dense or sparse (entity-thinned) NER training subsets of a corpus"),
    "bench": ("benchmarks.run", "benchmark suite: data prep, loader, training, fine-tuning vs baselines"),
    "gpu-check": ("benchmarks.gpu_check", "numerics, sync and speed checks on one NVIDIA GPU -> JSON"),
    "plan": ("launch.env", "what a launch will do here: hosts, ranks, master, batch split"),
    "demo": ("launch.pipeline", "the whole pipeline on the embedded default (what `make demo` runs)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"biobert {__version__}: BioBERT at scale (data prep -> DeepSpeed pretraining -> NER/RE/QA)", "",
             "usage: biobert COMMAND [--help] [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "options for every command: --help, --print-config (where it has a config), --debug (tracebacks)",
              "also: python -m biobert COMMAND ..."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"biobert {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see biobert --help"
        print(f"error: unknown command {name!r}; {hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run(module.cli, rest)


if __name__ == "__main__":
    sys.exit(main())
