"""The whole BioBERT pipeline as one command (what `make demo` runs), on real text.

    biobert demo --output-dir demo_out                                   # embedded real data, CPU, a few minutes
    biobert demo --output-dir runs/pubmed --corpus /data/pubmed /data/pmc_oa --vocab /models/biobert \\
        --run-config biobert_continued_seq512 --device cuda --nproc 8 \\
        --ner-data /data/NCBI-disease --seq-len 512 model.init=/models/biobert max_steps=100000   # real data, GPUs

Stages, each through its own public entry point (the seams are files, not shared state):
  1. data_prep        corpus -> HDF5 shards + manifest, with a held-out validation split (default: five CC-BY /
                      public-domain PMC Open Access articles shipped in data_prep/samples/pmc_oa, through the JATS
                      reader; the packaged MiniLM vocab)
  2. pretraining      launch/local.sh -> deepspeed launcher -> pretraining/run.py (2 CPU ranks, ZeRO-2 by default)
  3. export           newest complete checkpoint -> HuggingFace directory with its model card
  4. fine-tuning      NER with the general-domain start model and with the continued-pretrained export, same data and
                      seeds (default: 400/100/200 real NCBI-disease sentences, data_prep/samples/ncbi_disease)
  5. summary          summary.json, a PNG (training and validation loss, throughput, the two F1s), one closing line
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
    corpus: list[str] | None = option(None, "data_prep inputs (default: the five PMC OA articles in "
                                            "data_prep/samples/pmc_oa)")
    vocab: str | None = option(None, "vocab.txt or HF dir for data_prep (default: the packaged MiniLM's)")
    seq_len: int = option(128, "pretraining sequence length")
    dupe_factor: int = option(5, "data_prep copies of the corpus with other masks and pairs")
    validation_fraction: float = option(0.01, "documents held out for validation (at least one from 4 on)")
    run_config: str = option("demo_minilm_cpu", "pretraining recipe (a packaged name or a YAML path)")
    ds_config: str | None = option(None, "DeepSpeed JSON (default: the recipe's)")
    device: str = option("cpu", "where the pretraining ranks run", choices=("auto", "cpu", "cuda"))
    nproc: int = option(2, "pretraining ranks (GPUs, or CPU processes)")
    ner_data: str | None = option(None, "NER dir with train/devel/test .tsv (default: the NCBI-disease sample in "
                                        "data_prep/samples/ncbi_disease)")
    ner_epochs: float = option(3.0, "NER fine-tuning epochs")
    ner_max_train: int | None = option(None, "subsample NER training sentences")
    ner_seeds: list[int] = option(factory=lambda: [1], help="fine-tuning seeds, the same for both models")
    baseline: str | None = option("auto", "the general-domain model fine-tuned beside the continued one ('auto': the "
                                          "model pretraining starts from; 'none': skip)")
    overrides: list[str] = option(factory=list, help="pretraining overrides, key=value (e.g. max_steps=50)",
                                  positional=True)


def parse_args(argv=None) -> DemoConfig:
    return parse(DemoConfig, argv, prog="biobert demo", description=__doc__)


def prepare_data(args, out: Path) -> dict:
    from data_prep import demo

    summary = demo.main(demo.PrepDemoConfig(output_dir=str(out / "shards"), inputs=args.corpus, vocab=args.vocab,
                                            seq_len=args.seq_len, dupe_factor=args.dupe_factor,
                                            validation_fraction=args.validation_fraction))
    val = summary.get("validation") or {}
    return {"shard_dir": str(out / "shards"), "inputs": summary["inputs"],
            **{k: summary[k] for k in ("docs", "tokens", "instances", "shards")},
            "validation_docs": val.get("documents", 0), "validation_instances": val.get("instances", 0)}


def start_model(args) -> str:
    """What pretraining continues from: a model.init= override, else the recipe's (so the baseline is that model)."""
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key.strip().lstrip("-") in ("model.init", "model_init"):
            return value
    from biobert.config import read_file
    from pretraining.config import resolve_run_config

    return str((read_file(resolve_run_config(args.run_config)).get("model") or {}).get("init") or "minilm")


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


def finetune_ner(args, model: str, out: Path, seed: int) -> dict:
    from finetuning.config import NERConfig
    from finetuning.ner import main as ner_main
    from launch.demo_ner import sample_dir

    cfg = NERConfig(model=str(model), data=str(args.ner_data or sample_dir()), output_dir=str(out),
                    max_seq_len=min(args.seq_len, 128), window_overlap=16, epochs=args.ner_epochs, batch_size=16,
                    learning_rate=1e-4, num_threads=2, max_train_examples=args.ner_max_train, progress=False,
                    seed=seed, save_model=False)
    return ner_main(cfg)


def compare_ner(args, models: dict[str, str], out: Path) -> dict:
    """Each model fine-tuned with every seed on the same data: {name: {f1, precision, recall, f1_per_seed, ...}}."""
    import statistics

    result = {}
    for name, model in models.items():
        runs = [finetune_ner(args, model, out / name / f"seed{seed}", seed) for seed in args.ner_seeds]
        row = {"model": str(model), "seeds": list(args.ner_seeds), "f1_per_seed": [r["f1"] for r in runs],
               "test_source": runs[0].get("test_source")}
        for key in ("precision", "recall", "f1"):
            row[key] = statistics.fmean(r[key] for r in runs)
        row["f1_std"] = statistics.stdev(row["f1_per_seed"]) if len(runs) > 1 else 0.0
        result[name] = row
    return result


def validation_records(records: list[dict]) -> list[tuple[int, float]]:
    """(step, validation MLM loss) from metrics.jsonl records, flat (val_mlm_loss) or nested (validation.mlm_loss)."""
    out = []
    for r in records:
        val = r.get("validation") if isinstance(r.get("validation"), dict) else {
            k[4:]: v for k, v in r.items() if k.startswith("val_")}
        loss = val.get("mlm_loss", val.get("loss"))
        if isinstance(loss, (int, float)):
            out.append((r["step"], float(loss)))
    return out


def plot(records: list[dict], ner: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    steps = [r["step"] for r in train]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.8))
    ax1.plot(steps, [r["mlm_loss"] for r in train], label="train MLM")
    ax1.plot(steps, [r["nsp_loss"] for r in train], label="train NSP", alpha=0.6)
    val = validation_records(records)
    if val:
        ax1.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation MLM")
    else:
        ax1.text(0.5, 0.92, "no validation records in metrics.jsonl", transform=ax1.transAxes, ha="center",
                 fontsize=8, color="gray")
    ax1.set(xlabel="step", ylabel="loss", title="pretraining loss")
    ax1.legend()
    ax2.plot([r["step"] for r in train], [r["samples_per_s"] for r in train], color="tab:green")
    ax2.set(xlabel="step", ylabel="samples/s", title="throughput (all ranks)")
    names = list(ner)
    ax3.bar(names, [ner[n]["f1"] for n in names], yerr=[ner[n]["f1_std"] for n in names], color=["gray", "tab:blue"])
    for i, n in enumerate(names):
        ax3.text(i, ner[n]["f1"], f"{ner[n]['f1']:.3f}", ha="center", va="bottom")
    ax3.set(ylabel="entity F1", title="NER test F1, same data and seeds", ylim=(0, 1))
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
    base = start_model(args) if args.baseline == "auto" else args.baseline
    models = ({} if base in (None, "none") else {"general-domain start": base}) | {"continued": str(model_dir)}
    ner = compare_ner(args, models, out / "ner")
    plot(records, ner, out / "pipeline.png")
    val = validation_records(records)
    summary = {
        "data": data,
        "pretraining": {k: pre.get(k) for k in ("steps", "first_loss", "final_loss", "final_mlm_acc", "samples_per_s",
                                                "tokens_per_s", "tflops", "data_wait_fraction")},
        "validation": {"first": val[0] if val else None, "final": val[-1] if val else None},
        "model_dir": str(model_dir),
        "ner": ner,
        "ner_data": str(args.ner_data or "data_prep/samples/ncbi_disease (NCBI disease corpus sample, CC BY 4.0)"),
        "plot": str(out / "pipeline.png"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(out / "summary.json", summary)
    print(summary_line(summary, args), flush=True)
    return summary


def summary_line(summary: dict, args: DemoConfig) -> str:
    d, p, ner = summary["data"], summary["pretraining"], summary["ner"]
    held = f" ({d['validation_docs']} held out)" if d["validation_docs"] else ""
    val = summary["validation"]
    val_text = f", validation MLM loss {val['first'][1]:.3f} -> {val['final'][1]:.3f}" if val["final"] else ""
    seeds = ",".join(map(str, args.ner_seeds))
    f1s = ", ".join(f"{name} {r['f1']:.3f}" + (f" ± {r['f1_std']:.3f}" if len(args.ner_seeds) > 1 else "")
                    for name, r in ner.items())
    return (f"pipeline summary | {d['docs']} documents{held}, {d['instances']} instances in {d['shards']} shards | "
            f"pretraining {p['steps']} steps, loss {p['first_loss']:.3f} -> {p['final_loss']:.3f}{val_text}, "
            f"{p['samples_per_s']:.2f} samples/s ({args.nproc} {args.device} ranks) | NER test F1 (seeds {seeds}): "
            f"{f1s} | plot {summary['plot']} | {summary['seconds']:.0f} s")


def cli(argv: list[str] | None = None) -> int:
    main(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
