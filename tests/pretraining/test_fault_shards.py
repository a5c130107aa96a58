"""Issue 5, test 5: every shard fault is named by the ENGINE before step 1 (not a step runs, no checkpoint, no
metrics), and a bad shard is skipped only under data.skip_bad_shards, counted, its samples never used."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from shard_factory import flip_byte, rewrite_shard, set_values, truncate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402

BAD = "shard-00002-of-00004.hdf5"  # global sample ids 32..47
FAULTS = {  # fault -> (damage, what the message must say)
    "truncated": (lambda d: truncate(d / BAD, 0.6), "truncated|HDF5"),
    "empty": (lambda d: truncate(d / BAD, 0.0), "empty"),
    "bit_flip": (lambda d: flip_byte(d / BAD), "sha256"),
    "missing_dataset": (lambda d: rewrite_shard(d, BAD, lambda a: {k: v for k, v in a.items() if k != "segment_ids"}),
                        "'segment_ids' is missing"),
    "wrong_dtype": (lambda d: rewrite_shard(d, BAD, lambda a: a | {"input_mask": a["input_mask"].astype(np.int32)}),
                    "'input_mask' has dtype int32"),
    "id_beyond_vocab": (lambda d: rewrite_shard(d, BAD, set_values("input_ids", 100)),
                        "'input_ids' row 0: values outside \\[0, 100\\)"),
    "position_beyond_seq_len": (lambda d: rewrite_shard(d, BAD, set_values("masked_lm_positions", 32)),
                                "'masked_lm_positions' row 0: values outside \\[0, 32\\)"),
    "unequal_lengths": (lambda d: rewrite_shard(d, BAD, lambda a: a | {"next_sentence_labels":
                                                                       a["next_sentence_labels"][:-1]}), "rows"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/pretraining/conftest.py


def _damaged(tmp_path: Path, shards: Path, fault: str) -> Path:
    d = tmp_path / "shards"
    shutil.copytree(shards, d)
    FAULTS[fault][0](d)
    return d


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_shard_fault_named_before_step_1(tmp_path, shards, fault):
    from pretraining.trainer import main

    d = _damaged(tmp_path, shards, fault)
    ran = []
    with pytest.raises(ValueError, match=rf"(?s)shard verification failed.*{BAD}.*({FAULTS[fault][1]})") as e:
        main(ef.synth_cfg(tmp_path / "out", d, 4), on_step=lambda step, engine: ran.append(step))
    assert "nothing was trained" in str(e.value) and ran == []
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("fault", ["bit_flip", "id_beyond_vocab"])  # data faults only the full verification sees
def test_bad_shard_skipped_under_flag_counted_and_unused(tmp_path, shards, fault):
    from pretraining.trainer import main

    d = _damaged(tmp_path, shards, fault)
    ids = ef.SampleLog()
    result = main(ef.synth_cfg(tmp_path / "out", d, 6, ["data.skip_bad_shards=true"]), on_micro=ids)
    assert result["summary"]["bad_shards"] == 1 and result["step"] == 6
    seen = [i for s in ids.steps.values() for i in s]
    assert len(seen) == 48 and not set(seen) & set(range(32, 48))  # 3 good shards = one epoch, none from the bad one
