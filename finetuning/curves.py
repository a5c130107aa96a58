"""Fine-tuning's curves: per-step loss and learning rate to the ``--report-to`` backends, and a PNG in the output dir.

The loop (finetuning.trainer.fit) logs ``train/loss``, ``train/lr`` and ``train/epoch`` every optimizer step and the
dev scores after every epoch (``dev/<score>``), on rank 0 (its own loss: ranks do not average it). At the end
``training_curves.png`` (written atomically) shows the training loss (metrics.json's curve: the mean over the steps
since the previous point) with the learning rate, and the dev score that picks the epoch.
"""

from __future__ import annotations

from pathlib import Path

from biobert import tracking
from biobert.errors import UserError
from biobert.files import atomic_output

PNG = "training_curves.png"


def start_tracker(cfg, rt, out_dir: str | Path, desc: str):
    """Rank 0's tracker (None when report_to is none, and off rank 0). A backend that cannot start stops every rank
    with rank 0's message, before the first step."""
    from finetuning.config import to_dict

    backends = tracking.resolve(cfg.report_to, key="--report-to")
    tracking.check_installed(backends, "--report-to")  # every rank: all of them stop
    tracker, problem = None, None
    if rt.is_main and backends:
        try:
            tracker = tracking.Tracker(backends, out_dir, config=to_dict(cfg), project=cfg.project,
                                       run_name=cfg.run_name or f"{desc}:{Path(out_dir).resolve().name}",
                                       tracking_uri=cfg.tracking_uri)
        except UserError as e:
            problem = str(e)
    if rt.world_size > 1:
        from biobert import dist

        problem = dist.broadcast_object(problem)
    if problem:
        raise UserError(problem)
    return tracker


def plot(path: str | Path, curve: list[dict], history: list[dict], select: str | None, title: str) -> Path:
    """The training loss and lr by step, and the dev ``select`` score by epoch (when there is one), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dev = [(h["step"], h[select]) for h in history if select and isinstance(h.get(select), (int, float))]
    fig, axes = plt.subplots(1, 2 if dev else 1, figsize=(11 if dev else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["train_loss"] for c in curve], color="tab:blue", label="train loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"{title}: training loss")
    lr = ax.twinx()
    lr.plot(steps, [c["lr"] for c in curve], color="tab:gray", alpha=0.6, label="learning rate")
    lr.set_ylabel("learning rate")
    ax.legend(handles=ax.get_lines() + lr.get_lines(), loc="upper right", fontsize=8)
    if dev:
        ax2 = axes[0][1]
        ax2.plot([s for s, _ in dev], [v for _, v in dev], "o-", color="tab:orange")
        ax2.set(xlabel="optimizer step (end of epoch)", ylabel=f"dev {select}", title=f"dev {select} by epoch")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
