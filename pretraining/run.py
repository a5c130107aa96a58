"""Pretraining: `biobert pretrain --config RECIPE [key=value ...]`.

    biobert pretrain --config tiny_cpu data.shard_dir=shards/                    # one process (CPU or one GPU)
    deepspeed --num_gpus 8 pretraining/run.py --config biobert_continued_seq512 \\
        data.shard_dir=/data/pubmed_seq512 model.init=/models/bert-base-cased    # 8 GPUs, the DeepSpeed launcher
    srun / mpirun / torchrun ... biobert pretrain ...                             # ranks from their environment

RECIPE is a packaged run config by name (biobert_continued_seq512, bert_base_phase1_seq128, bert_large_seq512,
demo_minilm_cpu, tiny_cpu) or a YAML/JSON path; its DeepSpeed JSON likewise (``--deepspeed-config``, or the recipe's).
``--print-config`` shows the resolved run config and the DeepSpeed dict generated from it. On CPU set
DS_ACCELERATOR=cpu. Resuming is automatic (newest complete checkpoint in <output_dir>/checkpoints).
Exit codes: 0 finished; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue the job to continue);
2 a mistake in the config, shards or vocab (one line naming it, before step 1); other: a failure. A signal that
arrives while torch/DeepSpeed are still being imported is remembered and honoured at step 1.
"""

from __future__ import annotations

import sys

from pretraining import preemption

if __name__ == "__main__":
    # Before torch/DeepSpeed are imported (seconds): a SIGTERM/SIGUSR1 during setup becomes a clean stop at the first
    # step boundary instead of killing the rank (the default action) and hanging the others.
    preemption.install()


def parse_args(argv: list[str] | None = None):
    """-> (RunConfig, print_config). ``--config`` names the recipe; flags and key=value override it."""
    import argparse

    from biobert.config import make_parser, parse_overrides
    from biobert.config import parse_args as parse_known
    from pretraining.config import RunConfig, load_config

    parser, flags = make_parser(RunConfig, "biobert pretrain", __doc__,
                                config_help="run config: a packaged recipe name or a YAML/JSON path [required]")
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # a DeepSpeed habit, ignored
    ns = parse_known(parser, flags, argv)
    if not ns.config_file:
        from pretraining.config import packaged_run_configs

        names = ", ".join(sorted(p.stem for p in packaged_run_configs().glob("*.yaml")))
        raise ValueError(f"--config is required: a packaged recipe ({names}) or a YAML/JSON path")
    pairs = _flag_pairs(vars(ns)) + parse_overrides(ns.key_values or [])
    return load_config(ns.config_file, None, pairs), ns.print_config


def _flag_pairs(values: dict) -> list[tuple[str, object]]:
    """The section flags the user gave (--optimizer.lr 1e-4) as (key, value) overrides."""
    import argparse

    skip = {"config_file", "print_config", "local_rank", "key_values", "deepspeed"}
    return [(k, v) for k, v in values.items() if k not in skip and v is not argparse.SUPPRESS]


def print_config(cfg) -> None:
    from biobert import dist
    from biobert.config import dump_yaml

    world = dist.discover().world_size
    try:
        ds = cfg.deepspeed_dict(world)
    except ValueError as e:  # e.g. 'auto' bucket sizes need the model: resolved at start
        ds = {"note": str(e)}
    print(dump_yaml({**cfg.to_dict(), f"deepspeed (generated for world size {world})": ds}), end="")


def cli(argv: list[str] | None = None) -> int:
    import logging

    cfg, show = parse_args(argv)
    if show:
        print_config(cfg)
        return 0
    from pretraining.trainer import main as train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(cfg, command=command_line(sys.argv[1:] if argv is None else argv))["exit_code"]


def command_line(argv: list[str]) -> list[str]:
    """The command as a user would type it for one process (the launcher's --local_rank left out)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return ["biobert", "pretrain", *out]


if __name__ == "__main__":
    from biobert.errors import run

    sys.exit(run(cli))
