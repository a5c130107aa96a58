"""Where metrics go besides a run's own files: TensorBoard, MLflow, Weights & Biases (``report_to``), for every stage.

One :class:`Tracker` fans ``log(metrics, step)`` out to the backends asked for; only the process that writes files
(rank 0) makes one. MLflow and W&B are optional dependencies: asking for one that is not installed stops the run before
step 1 with the pip command (:func:`check_installed`, called on every rank so that all of them stop).

  tensorboard  events in OUT/tensorboard; a resumed run purges the steps after its resume point (a redone step shows once)
  mlflow       MlflowClient on ``tracking_uri``, else $MLFLOW_TRACKING_URI, else a file store in OUT/mlruns (MLflow 3
               keeps file stores behind MLFLOW_ALLOW_FILE_STORE, set here only for the store we chose); values sent
               in batches; the config's leaves are the run's params; the summary is the artifact summary.json
  wandb        wandb.init(project, name, id, resume="allow", dir=OUT); WANDB_MODE=offline keeps the run on disk
               (``wandb sync OUT/wandb/offline-run-*`` uploads it later)

A resumed run continues the same MLflow / W&B run (ids kept in OUT/tracking.json). Steps redone after a hard kill are
logged again: MLflow keeps both values, W&B drops the repeats (its steps must grow). A backend that fails mid-run is
switched off with a warning rather than stopping training: metrics.jsonl / metrics.json keep every value anyway.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
import uuid
from pathlib import Path

from biobert.errors import UserError
from biobert.files import atomic_write_json

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "mlflow", "wandb", "none")
# backend -> (module to import, what to pip install)
OPTIONAL = {"mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}
IDS_FILE = "tracking.json"
_MLFLOW_BATCH = 100  # values per log_batch call (a remote server answers each call)
_PARAM_CHARS = 500  # MLflow's param value limit in its older releases
_MLFLOW_KEY = re.compile(r"[^\w\-. /]")  # what MLflow accepts in a metric name


def resolve(report_to: list[str] | tuple[str, ...], tensorboard: bool | None = None, key: str = "report_to") -> list[str]:
    """The backends to use, in order. ``tensorboard`` is the older boolean key: False drops it, True adds it."""
    names = [str(n).strip().lower() for n in report_to]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"{key}: {', '.join(map(repr, unknown))} unknown; choose from {', '.join(BACKENDS)}")
    if "none" in names and len(set(names)) > 1:
        raise ValueError(f"{key} {names}: 'none' cannot be combined with a backend")
    out = list(dict.fromkeys(n for n in names if n != "none"))
    if tensorboard is False and "tensorboard" in out:
        out.remove("tensorboard")
    elif tensorboard is True and "tensorboard" not in out:
        out.insert(0, "tensorboard")
    return out


def check_installed(backends: list[str], key: str = "report_to") -> None:
    """UserError naming the pip command when an optional backend's package is missing (no import: cheap)."""
    for name in backends:
        if name in OPTIONAL and not _installed(OPTIONAL[name][0]):
            raise UserError(f"{key} includes {name} but it is not installed: pip install "
                            f"'biobert-at-scale[{name}]' (or pip install {OPTIONAL[name][1]}), or drop {name} from "
                            f"{key}")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def scalars(metrics: dict) -> dict[str, float]:
    """The finite numbers of a flat metrics dict (booleans as 0/1); everything else left out."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


class _TensorBoard:
    def __init__(self, out: Path, start_step: int, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self, summary: dict | None, finished: bool) -> None:
        if summary:
            self.writer.add_text("summary", "\n".join(f"    {k}: {v}" for k, v in summary.items()))
        self.writer.close()


class _MLflow:
    def __init__(self, out: Path, start_step: int, *, ids: dict, resume: bool, config: dict, project: str,
                 run_name: str, tracking_uri: str | None):
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (out / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # our choice of store: allow it
        self.client, self.buffer = MlflowClient(uri), []
        run_id = ids.get("mlflow_run_id") if resume and ids.get("mlflow_tracking_uri") == uri else None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
            run_id = self.client.create_run(exp_id, run_name=run_name, tags={"output_dir": str(out.resolve())}).info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.run_id = run_id
        ids.update(mlflow_run_id=run_id, mlflow_tracking_uri=uri)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(_MLFLOW_KEY.sub("_", k), v, now, step) for k, v in values.items()]
        if len(self.buffer) >= _MLFLOW_BATCH:
            self.flush()

    def flush(self) -> None:
        while self.buffer:
            self.client.log_batch(self.run_id, metrics=self.buffer[:1000])
            self.buffer = self.buffer[1000:]

    def close(self, summary: dict | None, finished: bool) -> None:
        self.flush()
        if summary:
            self.client.log_dict(self.run_id, json.loads(json.dumps(summary, default=str)), "summary.json")
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class _WandB:
    def __init__(self, out: Path, start_step: int, *, ids: dict, resume: bool, config: dict, project: str,
                 run_name: str, tracking_uri: str | None):
        import wandb

        run_id = ids.get("wandb_run_id") if resume else None
        run_id = run_id or uuid.uuid4().hex[:12]  # ours: recorded in tracking.json for a resume
        ids["wandb_run_id"] = run_id
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(out), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, summary: dict | None, finished: bool) -> None:
        if summary:
            self.run.summary.update(json.loads(json.dumps(summary, default=str)))
        self.run.finish(exit_code=0 if finished else 1)


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class Tracker:
    """The backends of one run. ``resume``: continue the MLflow / W&B run recorded in OUT/tracking.json."""

    def __init__(self, backends: list[str], out_dir: str | Path, *, config: dict | None = None,
                 project: str = "biobert", run_name: str | None = None, tracking_uri: str | None = None,
                 start_step: int = 0, resume: bool = False):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        check_installed(backends)
        self.ids_path = out / IDS_FILE
        ids = self._read_ids() if resume else {}
        self.backends: dict[str, object] = {}
        kw = dict(ids=ids, resume=resume, config=config or {}, project=project,
                  run_name=run_name or out.resolve().name, tracking_uri=tracking_uri)
        try:
            for name in backends:
                try:
                    self.backends[name] = (_CLASSES[name](out, start_step) if name == "tensorboard"
                                           else _CLASSES[name](out, start_step, **kw))
                except (ImportError, UserError):
                    raise
                except Exception as e:  # noqa: BLE001 - a server refusing us, a login missing: the user's to fix
                    raise UserError(f"report_to {name}: could not start a run ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:300]})") from e
        except BaseException:
            self.close(None, finished=False)
            raise
        if any(k in ids for k in ("mlflow_run_id", "wandb_run_id")):
            atomic_write_json(self.ids_path, ids)

    def _read_ids(self) -> dict:
        try:
            return json.loads(self.ids_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def log(self, metrics: dict, step: int) -> None:
        values = scalars(metrics)
        if not values:
            return
        for name, backend in list(self.backends.items()):
            try:
                backend.log(values, step)
            except Exception as e:  # noqa: BLE001 - tracking must not stop a training run
                log.warning("report_to %s failed at step %d (%s: %s): switched off for the rest of the run; "
                            "the run's own metrics file has every value", name, step, type(e).__name__, e)
                del self.backends[name]

    def close(self, summary: dict | None = None, finished: bool = True) -> None:
        for name, backend in list(self.backends.items()):
            try:
                backend.close(summary, finished)
            except Exception as e:  # noqa: BLE001
                log.warning("report_to %s: closing failed (%s: %s)", name, type(e).__name__, e)
        self.backends = {}
