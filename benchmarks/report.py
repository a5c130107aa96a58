"""Outputs of run.py: hardware record, results.json, results.md (every figure beside its baseline) and PNG plots.

Every file is written under a temp name and renamed, and results.json last, so a reader that finds results.json finds
a finished run.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from biobert.files import atomic_write


def hardware() -> dict:
    import psutil
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
                platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for mod in ("deepspeed", "transformers", "tokenizers", "h5py", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is recorded, not fatal
            info[mod] = None
    return info



def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def markdown(results: dict) -> str:
    hw = results["hardware"]
    lines = [f"# Benchmark results ({'quick' if results['quick'] else 'full'} run)", "",
             f"Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB; GPU: {hw['gpu'] or 'none'}; "
             f"torch {hw['torch']}, deepspeed {hw['deepspeed']}, transformers {hw['transformers']}.  ",
             f"Data: {'; '.join(f'{k}: {v}' for k, v in results['data'].items())}.  ",
             f"Started {results['started']}, took {results['wall_s']:.0f} s.", "",
             "Ratio = ours / baseline (for peak memory and data-wait fraction: baseline / ours), so > 1 means we win. "
             "Baseline measured in the same run on the same inputs.", ""]
    for suite in results["suites"]:
        rows = [r for r in results["rows"] if r["suite"] == suite]
        if not rows:
            continue
        lines += [f"## {suite}", "", "| case | metric | ours | baseline | ratio | baseline is |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['metric']} ({r['unit']}) | {_fmt(r['ours'])} | {_fmt(r['baseline'])} | "
                         f"{_fmt(r['ratio'])} | {r['baseline_name']} |")
        lines.append("")
    if results.get("errors"):
        lines += ["## errors", ""] + [f"- {e}" for e in results["errors"]] + [""]
    if results.get("plots"):
        lines += ["## plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[str]:
    """throughput vs micro-batch (per seq len) and vs world size, ours beside the baseline. Returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    train = [r for r in results["rows"] if r["suite"] == "train" and r["metric"] == "samples/s"]
    grid = [r for r in train if "[scaling]" not in r["case"]]
    series: dict[tuple, list] = {}
    for r in grid:
        p = r["params"]
        series.setdefault((p["model"], p["seq_len"], p["zero_stage"], p["precision"]), []).append(r)
    series = {k: sorted(v, key=lambda r: r["params"]["micro_batch"]) for k, v in series.items() if len(v) >= 1}
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (model, seq, zero, prec), rs in sorted(series.items()):
            mb = [r["params"]["micro_batch"] for r in rs]
            label = f"{model} seq {seq} Z{zero} {prec}"
            (line,) = ax.plot(mb, [r["ours"] for r in rs], "o-", label=f"ours {label}")
            ax.plot(mb, [r["baseline"] for r in rs], "s--", color=line.get_color(), alpha=0.6, label=f"HF {label}")
        ax.set(xlabel="micro-batch size (per rank)", ylabel="samples/s", title="Training throughput vs micro-batch",
               yscale="log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["params"]["micro_batch"] for rs in series.values() for r in rs}))
        _plain_ticks(ax)
        ax.legend(fontsize=7)
        made.append(_save(fig, out / "train_vs_micro_batch.png"))
    scaling = results.get("extra", {}).get("scaling") or []
    if scaling:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for eng, style in (("ours", "o-"), ("hf_baseline", "s--")):
            pts = sorted((s["world_size"], s["samples_per_s"]) for s in scaling if s["engine"] == eng)
            ws = [p[0] for p in pts]
            ax.plot(ws, [p[1] for p in pts], style, label=eng)
            ax.plot(ws, [pts[0][1] * w / ws[0] for w in ws], ":", color="gray")
        ax.set(xlabel="world size (ranks)", ylabel="samples/s (global)", title="Training throughput vs world size "
               "(dotted: linear)", xticks=sorted({s["world_size"] for s in scaling}))
        ax.legend()
        made.append(_save(fig, out / "train_vs_world_size.png"))
    loader = [r for r in results["rows"] if r["suite"] == "loader"]
    if loader:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = [f"{r['params']['data']} {r['params']['masking']} {r['params']['seq_len']}" for r in loader]
        x = range(len(loader))
        ax.bar([i - 0.2 for i in x], [r["ours"] for r in loader], 0.4, label="our loader")
        ax.bar([i + 0.2 for i in x], [r["baseline"] for r in loader], 0.4, label="h5py+numpy")
        ax.set_xticks(list(x), labels, rotation=20, fontsize=8)
        ax.axhline(20000, color="gray", ls=":", label="target: 20k samples/s at seq 512")
        ax.set(ylabel="samples/s per process", yscale="log", title="Shard loader throughput")
        from matplotlib.ticker import NullFormatter, StrMethodFormatter

        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend()
        made.append(_save(fig, out / "loader.png"))
    return made


def _plain_ticks(ax) -> None:
    """Numbers, not 10^x, on log axes."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path) -> str:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path.name


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots(results, out)
    atomic_write(out / "results.md", markdown(results))
    atomic_write(out / "results.json", json.dumps(results, indent=2, default=str))
