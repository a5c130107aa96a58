"""Read back what the report_to backends wrote, with each tool's own reader (tests only)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def mlflow_history(out_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of the run recorded in OUT/tracking.json, through MLflow's client."""
    from mlflow.tracking import MlflowClient

    ids = json.loads((out_dir / "tracking.json").read_text())
    client = MlflowClient(ids["mlflow_tracking_uri"])
    return [(m.step, m.value) for m in client.get_metric_history(ids["mlflow_run_id"], key)]


def mlflow_run(out_dir: Path):
    from mlflow.tracking import MlflowClient

    ids = json.loads((out_dir / "tracking.json").read_text())
    return MlflowClient(ids["mlflow_tracking_uri"]).get_run(ids["mlflow_run_id"])


def wandb_history(out_dir: Path) -> list[dict]:
    """The history rows of every offline W&B run file under OUT/wandb: the run file is a LevelDB-style log (7-byte
    W&B header; 32 KiB blocks of records with a crc32/length/type header) of wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(Path(out_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, part, block = path.read_bytes(), 7, b"", 32768
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            pos += 7
            if n == 0 and kind == 0:
                break
            part += data[pos:pos + n]
            pos += n
            if kind in (1, 4):  # FULL or LAST
                record = pb.Record()
                record.ParseFromString(part)
                part = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


def tensorboard_scalars(out_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]
