"""The BioBERT paper's Figure 2 from one command: fine-tuning score vs pretraining steps, tokens seen or corpus size.

    biobert curve RUN_DIR --task ner --data DIR --output-dir OUT --seeds 1 2 3 \\
        --epochs 3 --learning-rate 5e-5 --num-threads 1          # any task flag goes to every fine-tune
    biobert curve RUN_A RUN_B --by corpus --task ner --data DIR --output-dir OUT

RUN_DIR is a pretraining output dir (its ``checkpoints/`` and ``metrics.jsonl``). ``--by steps`` (default): every
complete checkpoint of each run is exported to a temporary HF directory and fine-tuned over the seeds; step 0 is the
general-domain start (the runs' ``model.init``, or ``--base-model``). Several runs give one curve each (recipes side
by side). ``--by corpus``: the newest checkpoint of each run, each pretrained on its own shard directory, against the
corpus size of that directory (its manifest's token count).

Writes OUT/curve.json (every seed's scores), OUT/curve.md (the table) and OUT/curve.png (mean +- std over seeds).
Resumable: OUT/curve.json is rewritten atomically after each fine-tune and finished (point, seed) pairs are not redone;
a rerun with other settings into the same OUT is refused. Pretraining keeps only ``checkpoint.keep_last`` checkpoints
(default 3): for a curve set ``checkpoint.keep_last`` to at least max_steps / checkpoint.every_steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from biobert import errors
from biobert.config import check_choices, option, parse_suite
from biobert.files import atomic_write, atomic_write_json
from finetuning.config import build_task
from finetuning.evaluate_all import CONFIGS, SCORES, run_task

log = logging.getLogger(__name__)
BASE = "step0"  # the key of the general-domain start


@dataclass(kw_only=True)
class CurveConfig:
    """Fine-tuning score vs pretraining progress (the paper's Figure 2); task flags go to every fine-tune."""

    runs: list[str] = option(help="pretraining output dirs (their checkpoints/ and metrics.jsonl)", positional=True)
    data: str = option(help="the task's data directory")
    output_dir: str = option("curve_out", "OUT/curve.{json,md,png} and each fine-tune's files")
    task: str = option("ner", "which fine-tuning task", choices=tuple(CONFIGS))
    seeds: list[int] = option(factory=lambda: [1, 2, 3], help="fine-tunes per point: mean +- std")
    by: str = option("steps", "steps: every checkpoint of each run; corpus: the newest checkpoint of runs on "
                              "different shard directories, against corpus size", choices=("steps", "corpus"))
    base_model: str | None = option(None, "step 0 (default: the runs' model.init)")
    steps: list[int] | None = option(None, "only these checkpoint steps (default: every complete checkpoint)")
    finetune: dict = option(factory=dict, help="task config fields (from the task flags)", flag=False)
    keep_exports: bool = option(False, "keep the exported HF dirs under OUT/.exports")

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.runs or not self.seeds:
            raise ValueError("give at least one pretraining run and one seed")
        if self.by == "corpus" and len(self.runs) < 2:
            raise ValueError("--by corpus compares runs on different corpora: give at least two runs")
        unknown = set(self.finetune) - {f.name for f in dataclasses.fields(CONFIGS[self.task])}
        if unknown or {"model", "seed", "output_dir", "data"} & set(self.finetune):
            raise ValueError(f"finetune settings {sorted(unknown or set(self.finetune))} are not {self.task} options "
                             "(model, seed, data and output dir are set by the curve)")


# ------------------------------------------------------------------------------------------------ what to evaluate


def _checkpoints_root(run: Path) -> Path:
    if (run / "checkpoints").is_dir():
        return run / "checkpoints"
    if any(run.glob("step_*")):
        return run
    raise FileNotFoundError(f"{run}: no checkpoints/ (expected a pretraining output dir)")


def run_info(run: str | Path) -> dict:
    """Complete checkpoints {step: folder}, the run config, tokens seen per step and the corpus size of a run."""
    import torch

    from pretraining import checkpoint as ckpt

    root = _checkpoints_root(Path(run))
    folders, problems = ckpt.scan(root)
    for why in problems:
        log.warning("skipping incomplete checkpoint: %s", why)
    if not folders:
        raise FileNotFoundError(f"{root}: no complete checkpoint")
    checkpoints = {int(ckpt.read_marker(f)["step"]): f for f in folders}
    client = torch.load(folders[-1] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True)
    config = client.get("run_config") or {}
    tokens: dict[int, float] = {}  # the last record of a step wins: a resumed run redoes the steps after its checkpoint
    metrics = root.parent / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        rec = json.loads(line)
        if "step" in rec:
            tokens[rec["step"]] = rec["tokens"]
    seen, total = {}, 0.0
    for step in range(1, max(checkpoints) + 1):
        total += tokens.get(step, float("nan"))
        if step in checkpoints:
            seen[step] = total  # NaN when metrics.jsonl misses a step: unknown rather than wrong
    manifest = Path(config.get("data", {}).get("shard_dir", "")) / "manifest.json"
    corpus = None
    if manifest.is_file():  # the shards' real tokens over the copies data_prep made: a directory cut down keeps true
        m = json.loads(manifest.read_text())
        corpus = sum(s["tokens"] for s in m["shards"]) / max(1, int(m.get("settings", {}).get("dupe_factor", 1)))
    keep = config.get("checkpoint", {}).get("keep_last")
    every = config.get("checkpoint", {}).get("every_steps")
    if keep and every and config.get("max_steps", 0) // every > keep:
        log.warning("%s kept only its last %d checkpoints (checkpoint.keep_last): the curve has only those; rerun "
                    "with checkpoint.keep_last=%d for every one", run, keep, config["max_steps"] // every)
    return dict(root=root, checkpoints=checkpoints, config=config, tokens_seen=seen, corpus_tokens=corpus)


def plan(cfg: CurveConfig) -> tuple[str, list[dict]]:
    """-> (base model, points). A point: key, series (run name), step, tokens seen, corpus tokens, checkpoint."""
    infos = {r: run_info(r) for r in cfg.runs}
    inits = {str(i["config"].get("model", {}).get("init")) for i in infos.values()}
    base = cfg.base_model
    if base is None:
        if len(inits) != 1 or inits == {"None"}:
            raise ValueError(f"the runs started from {sorted(inits)}: give the general-domain start as --base-model")
        base = inits.pop()
    points = [dict(key=BASE, series="start", step=0, tokens=0.0, corpus_tokens=0, checkpoint=None)]
    names = _series_names(cfg.runs)
    for run, info in infos.items():
        steps = sorted(info["checkpoints"]) if cfg.by == "steps" else [max(info["checkpoints"])]
        if cfg.steps:
            missing = sorted(set(cfg.steps) - set(info["checkpoints"]))
            if missing:
                raise ValueError(f"{run}: no complete checkpoint at step(s) {missing} (have {sorted(info['checkpoints'])})")
            steps = [s for s in steps if s in cfg.steps]
        if cfg.by == "corpus" and not info["corpus_tokens"]:
            raise ValueError(f"{run}: its shard dir has no manifest.json with token counts (needed for --by corpus)")
        for step in steps:
            points.append(dict(key=f"{names[run]}@{step}", series=names[run], step=step,
                               tokens=info["tokens_seen"].get(step), corpus_tokens=info["corpus_tokens"],
                               checkpoint=str(info["checkpoints"][step])))
    return base, [points[0], *coarse_to_fine(points[1:])]


def coarse_to_fine(points: list[dict]) -> list[dict]:
    """Evaluation order: each series' newest checkpoint first, then always the step farthest from those already done
    (and from step 0), so a curve stopped early already spans the whole run."""
    order, done = [], {}
    todo = sorted(points, key=lambda p: (p["series"], -p["step"]))
    while todo:
        def gap(p):
            seen = done.get(p["series"], [0])
            return (p["step"] == max(q["step"] for q in points if q["series"] == p["series"]),
                    min(abs(p["step"] - s) for s in seen), -len(seen))
        best = max(todo, key=gap)
        todo.remove(best)
        order.append(best)
        done.setdefault(best["series"], [0]).append(best["step"])
    return order


def _series_names(runs: list[str]) -> dict[str, str]:
    names = {r: Path(r).resolve().name for r in runs}
    if len(set(names.values())) < len(runs):  # same basename in different places: use the whole path
        names = {r: str(Path(r).resolve()) for r in runs}
    return names


# ------------------------------------------------------------------------------------------------------- evaluation


def settings(cfg: CurveConfig, base: str) -> dict:
    """What makes two results comparable: the task's whole config (minus per-point fields), data, base and mode."""
    task_cfg = build_task(CONFIGS[cfg.task], {**cfg.finetune, "data": cfg.data})
    fixed = {k: v for k, v in dataclasses.asdict(task_cfg).items() if k not in ("model", "seed", "output_dir",
                                                                                 "progress", "num_threads")}
    return dict(task=cfg.task, by=cfg.by, base_model=base, finetune=fixed)


def _load_results(path: Path, wanted: dict) -> dict:
    if not path.is_file():
        return {"settings": wanted, "points": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != wanted:
        raise ValueError(f"{path} holds a curve made with other settings ({results.get('settings')} vs {wanted}): "
                         "use another --output-dir or the same settings")
    return results


def _lock(out: Path) -> Path:
    """OUT/curve.lock (our pid): two curves writing one curve.json would each drop the other's results."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "curve.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # left by a killed curve
                continue
            except PermissionError:
                pass
            raise ValueError(f"{out} is being written by another curve (pid {pid}); wait for it or use another "
                             "--output-dir") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    raise ValueError(f"{lock}: could not take the lock")


def evaluate(cfg: CurveConfig, base: str, points: list[dict]) -> dict:
    out = Path(cfg.output_dir)
    lock = _lock(out)
    try:
        return _evaluate(cfg, base, points, out)
    finally:
        lock.unlink(missing_ok=True)


def _evaluate(cfg: CurveConfig, base: str, points: list[dict], out: Path) -> dict:
    path = out / "curve.json"
    results = _load_results(path, settings(cfg, base))
    metric_keys = SCORES[cfg.task]
    for point in points:
        done = results["points"].setdefault(point["key"], {**point, "seeds": {}})["seeds"]
        todo = [s for s in cfg.seeds if str(s) not in done]
        if not todo:
            continue
        model = base
        export_dir = out / ".exports" / point["key"].replace("/", "_")
        if point["checkpoint"]:
            from pretraining.export import export

            model = str(export(point["checkpoint"], export_dir))
        try:
            for seed in todo:
                task_cfg = build_task(CONFIGS[cfg.task], {
                    "save_model": False, **cfg.finetune, "data": cfg.data, "model": model, "seed": seed,
                    "output_dir": str(out / "finetune" / point["key"] / f"seed{seed}")})
                metrics = run_task(task_cfg, cfg.task)
                done[str(seed)] = {k: metrics[k] for k in metric_keys}
                atomic_write_json(path, results)  # after every fine-tune: a killed curve loses at most one
                log.warning("curve: %s seed %d -> %s", point["key"], seed, done[str(seed)])
        finally:
            if point["checkpoint"] and not cfg.keep_exports:
                shutil.rmtree(export_dir, ignore_errors=True)
                if not any(export_dir.parent.iterdir()):
                    export_dir.parent.rmdir()
    return results


def table(results: dict, seeds: list[int], metric: str) -> list[dict]:
    """One row per point (step 0, then by series and step, or by corpus size): mean and sample std of `metric` over
    the requested seeds that are done."""
    by_corpus = results["settings"]["by"] == "corpus"
    rows = []
    for key, p in sorted(results["points"].items(), key=lambda kv: (
            kv[0] != BASE, kv[1]["corpus_tokens"] if by_corpus else 0, kv[1]["series"], kv[1]["step"])):
        values = [p["seeds"][str(s)][metric] for s in seeds if str(s) in p["seeds"]]
        if values:
            rows.append(dict(key=key, series=p["series"], step=p["step"], tokens=p["tokens"],
                             corpus_tokens=p["corpus_tokens"], n=len(values), mean=statistics.fmean(values),
                             std=statistics.stdev(values) if len(values) > 1 else 0.0, values=values))
    return rows


def markdown(rows: list[dict], metric: str) -> str:
    lines = [f"| point | steps | tokens seen | corpus tokens | {metric} mean ± std | seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        tokens = "-" if r["tokens"] is None else f"{r['tokens'] / 1e6:.2f}M"
        corpus = f"{r['corpus_tokens'] / 1e6:.2f}M" if r["corpus_tokens"] else "-"
        seeds = ", ".join(f"{v:.3f}" for v in r["values"])
        lines.append(f"| {r['key']} | {r['step']} | {tokens} | {corpus} | {r['mean']:.3f} ± {r['std']:.3f} | {seeds} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], by: str, metric: str, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["key"] == BASE)
    series = sorted({r["series"] for r in rows if r["key"] != BASE})
    axes_x = [("step", "pretraining steps"), ("tokens", "tokens seen (millions)")] if by == "steps" else [
        ("corpus_tokens", "pretraining corpus (million tokens)")]
    fig, axes = plt.subplots(1, len(axes_x), figsize=(5.2 * len(axes_x), 3.8), squeeze=False)
    for ax, (x, label) in zip(axes[0], axes_x):
        scale = 1e6 if x != "step" else 1
        ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="0.85", zorder=0)
        ax.axhline(base["mean"], color="0.4", ls="--", lw=1, label=f"general-domain start ({base['mean']:.3f})")
        for name in series:
            pts = sorted((r for r in rows if r["series"] == name and r[x] is not None), key=lambda r: r[x])
            if by == "steps":
                pts = [base, *pts]
            ax.errorbar([r[x] / scale for r in pts], [r["mean"] for r in pts], yerr=[r["std"] for r in pts],
                        marker="o", capsize=3, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(cfg: CurveConfig) -> dict:
    base, points = plan(cfg)
    results = evaluate(cfg, base, points)
    metric = SCORES[cfg.task][-1]
    wanted = {p["key"] for p in points}
    rows = [r for r in table(results, cfg.seeds, metric) if r["key"] in wanted]
    out = Path(cfg.output_dir)
    atomic_write(out / "curve.md", markdown(rows, metric))
    title = f"{cfg.task} on {Path(cfg.data).name}, {len(cfg.seeds)} seeds"
    png = plot(rows, cfg.by, metric, out / "curve.png", title)
    print(markdown(rows, metric))
    return dict(rows=rows, png=str(png), table=str(out / "curve.md"), results=str(out / "curve.json"), base=base)


def cli(argv: list[str] | None = None) -> int:
    cfg, finetune = parse_suite(CurveConfig, CONFIGS.values(), argv, prog="biobert curve", description=__doc__)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main(dataclasses.replace(cfg, finetune=finetune))
    return 0


if __name__ == "__main__":
    sys.exit(errors.run(cli))
