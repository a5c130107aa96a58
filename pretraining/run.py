"""Pretraining entrypoint.

    deepspeed --num_gpus 8 pretraining/run.py --config pretraining/configs/biobert_continued_seq512.yaml \\
        --deepspeed_config ds_configs/bert_base_seq512_lamb_bf16.json [optimizer.lr=2e-4 ds.zero_optimization.stage=2]
    python pretraining/run.py --config RUN.yaml --deepspeed_config ds_configs/tiny_cpu.json   # one process
    srun / mpirun / torchrun ... python pretraining/run.py ...                                  # ranks from their env

On CPU set DS_ACCELERATOR=cpu. Resuming is automatic (newest complete checkpoint in <output_dir>/checkpoints).
Exit codes: 0 finished; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue the job to continue);
other non-zero: failure (bad config/shards/vocab fail before step 1 with a message naming the file). A signal that
arrives while torch/DeepSpeed are still being imported is remembered (the handler is installed first) and honoured at
step 1. The fault matrix and its tests: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pretraining/run.py`: import siblings as pretraining.x, never as top-level names
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pretraining import preemption  # noqa: E402 - stdlib only

if __name__ == "__main__":
    # Before torch/DeepSpeed are imported (seconds): a SIGTERM/SIGUSR1 during setup becomes a clean stop at the first
    # step boundary instead of killing the rank (the default action) and hanging the others.
    preemption.install()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config (YAML or JSON)")
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (default: the run config's "
                                                            "deepspeed_config)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # accepted for DeepSpeed habits
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optimizer.lr=1e-4 max_steps=100 "
                                                "ds.train_micro_batch_size_per_gpu=4")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pretraining.config import load_config
    from pretraining.trainer import main as train

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.deepspeed_config, args.overrides)
    result = train(cfg)
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
