"""The whole BioBERT pipeline as one command (what `make demo` runs).

    biobert demo --output-dir demo_out                                   # embedded default, CPU, a few minutes
    biobert demo --output-dir runs/pubmed --corpus /data/pubmed /data/pmc_oa --vocab /models/biobert \\
        --run-config biobert_continued_seq512 --device cuda --nproc 8 \\
        --ner-data /data/NCBI-disease --seq-len 512 model.init=/models/biobert max_steps=100000   # real data, GPUs

Stages, each through its own public entry point (the seams are files, not shared state):
  1. data_prep        corpus -> HDF5 shards + manifest  (default: the embedded demo corpus, the packaged MiniLM vocab)
  2. pretraining      launch/local.sh -> deepspeed launcher -> pretraining/run.py (2 CPU ranks, ZeRO-2 by default)
  3. export           newest complete checkpoint -> HuggingFace directory
  4. fine-tuning      NER on that directory (default: a generated disease-NER set; --ner-data for a real one)
  5. summary          summary.json, a PNG of the loss and throughput curves, one closing line
Trailing key=value arguments are pretraining overrides (e.g. max_steps=50 optimizer.lr=1e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from biobert.config import option, parse
from biobert.errors import run
from biobert.files import atomic_output, atomic_write_json

LAUNCH = Path(__file__).resolve().parent


@dataclass(kw_only=True)
class DemoConfig:
    """The whole pipeline, each stage through its public entry point."""

    output_dir: str = option("demo_out", "everything goes here: shards/, pretrain/, model/, ner/, summary.json")
    corpus: list[str] | None = option(None, "data_prep inputs (default: the embedded demo corpus)")
    vocab: str | None = option(None, "vocab.txt or HF dir for data_prep (default: the packaged MiniLM's)")
    seq_len: int = option(128, "pretraining sequence length")
    run_config: str = option("demo_minilm_cpu", "pretraining recipe (a packaged name or a YAML path)")
    ds_config: str | None = option(None, "DeepSpeed JSON (default: the recipe's)")
    device: str = option("cpu", "where the pretraining ranks run", choices=("auto", "cpu", "cuda"))
    nproc: int = option(2, "pretraining ranks (GPUs, or CPU processes)")
    ner_data: str | None = option(None, "NER dir with train/devel/test .tsv (default: generated)")
    ner_epochs: float = option(3.0, "NER fine-tuning epochs")
    ner_max_train: int | None = option(None, "subsample NER training sentences")
    overrides: list[str] = option(factory=list, help="pretraining overrides, key=value (e.g. max_steps=50)",
                                  positional=True)


def parse_args(argv=None) -> DemoConfig:
    return parse(DemoConfig, argv, prog="biobert demo", description=__doc__)


def prepare_data(args, out: Path) -> dict:
    shards = out / "shards"
    if args.corpus:
        from data_prep import run
        from pretraining.hub import resolve_model_dir

        vocab = args.vocab or str(resolve_model_dir("minilm"))
        summary = run.main(run.PrepConfig(inputs=args.corpus, output_dir=str(shards), vocab=vocab,
                                          seq_len=args.seq_len, dupe_factor=5))
    else:
        from data_prep import demo

        summary = demo.main(shards, vocab=args.vocab, seq_len=args.seq_len)
    return {"shard_dir": str(shards), **{k: summary[k] for k in ("docs", "tokens", "instances", "shards")}}


def pretrain(args, out: Path) -> Path:
    """Runs the real launcher (a subprocess: the deepspeed launcher starts the ranks); returns the run's output dir."""
    run_dir = out / "pretrain"
    env = {**os.environ, "DEVICE": args.device, "NPROC": str(args.nproc), "CONFIG": args.run_config,
           "PYTHON": sys.executable}
    if args.ds_config:
        env["DS_CONFIG"] = args.ds_config
    cmd = ["bash", str(LAUNCH / "local.sh"), f"output_dir={run_dir}", f"data.shard_dir={out / 'shards'}",
           *args.overrides]
    print("pipeline: " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"pretraining exited {rc} (75 = stopped by a signal after a checkpoint: "
                           "run the same command again to resume)")
    return run_dir


def read_metrics(run_dir: Path) -> tuple[list[dict], dict]:
    records, summary = [], {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "summary" in rec:
            summary = rec["summary"]
        else:
            records.append(rec)
    return records, summary


def finetune_ner(args, model_dir: Path, out: Path) -> dict:
    from finetuning.config import NERConfig
    from finetuning.ner import main as ner_main

    data = args.ner_data
    if data is None:
        from launch.demo_ner import write_demo_ner

        data = write_demo_ner(out / "ner_data")
    cfg = NERConfig(model=str(model_dir), data=str(data), output_dir=str(out / "ner"), max_seq_len=min(args.seq_len, 128),
                    window_overlap=16, epochs=args.ner_epochs, batch_size=16, learning_rate=1e-4, num_threads=2,
                    max_train_examples=args.ner_max_train, progress=False)
    return ner_main(cfg)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(steps, [r["loss"] for r in records], label="total")
    ax1.plot(steps, [r["mlm_loss"] for r in records], label="MLM")
    ax1.plot(steps, [r["nsp_loss"] for r in records], label="NSP")
    ax1.set(xlabel="step", ylabel="loss", title="pretraining loss")
    ax1.legend()
    ax2.plot(steps, [r["samples_per_s"] for r in records], color="tab:green")
    ax2.set(xlabel="step", ylabel="samples/s", title="throughput (all ranks)")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(args: DemoConfig) -> dict:
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_data(args, out)
    run_dir = pretrain(args, out)
    records, pre = read_metrics(run_dir)

    from pretraining.export import export

    model_dir = export(run_dir / "checkpoints", out / "model")
    ner = finetune_ner(args, model_dir, out)
    plot(records, out / "pipeline.png")
    summary = {
        "data": data,
        "pretraining": {k: pre.get(k) for k in ("steps", "first_loss", "final_loss", "final_mlm_acc", "samples_per_s",
                                                "tokens_per_s", "tflops", "data_wait_fraction")},
        "model_dir": str(model_dir),
        "ner": {k: ner.get(k) for k in ("precision", "recall", "f1")},
        "plot": str(out / "pipeline.png"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(out / "summary.json", summary)
    p = summary["pretraining"]
    print(f"pipeline summary | {data['instances']} instances in {data['shards']} shards | pretraining "
          f"{p['steps']} steps, loss {p['first_loss']:.3f} -> {p['final_loss']:.3f}, "
          f"{p['samples_per_s']:.2f} samples/s ({args.nproc} {args.device} ranks) | NER F1 {ner['f1']:.3f} "
          f"(P {ner['precision']:.3f}, R {ner['recall']:.3f}) | plot {summary['plot']} | {summary['seconds']:.0f} s",
          flush=True)
    return summary


def cli(argv: list[str] | None = None) -> int:
    main(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
