"""What run.py measures: one typed config for every suite, with the --quick and full presets."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

SUITES = ("prep", "loader", "train", "finetune")
REPO = Path(__file__).resolve().parents[1]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def data_root() -> Path:
    """The shared data (env BIOBERT_DATA, default ../shared/data), as tests/conftest.py finds it."""
    return Path(os.environ.get("BIOBERT_DATA", REPO.parent / "shared" / "data"))


@dataclass
class SuiteConfig:
    output_dir: str
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    quick: bool = False
    data_root: Path = field(default_factory=data_root)
    use_real_data: bool = True  # False: synthetic everywhere (tests)
    # prep
    prep_workers: list[int] = field(default_factory=lambda: [1, 2])
    prep_files: int | None = None  # first N MEDLINE files (None: all)
    prep_repeats: int = 3
    # loader
    seq_lens: list[int] = field(default_factory=lambda: [128, 512])
    loader_micro_batch: int = 64
    loader_seconds: float = 5.0
    loader_samples_per_shard: int = 32768
    real_loader_maskings: list[str] = field(default_factory=lambda: ["static", "dynamic"])
    # train: the product of these lists (None: the preset's case list)
    models: list[str] | None = None
    micro_batches: list[int] | None = None
    zero_stages: list[int] | None = None
    precisions: list[str] | None = None
    train_steps: int = 5
    train_warmup: int = 2
    threads: int | None = None  # torch threads per process in the train grid (None: torch's default = all cores)
    # scaling: same case at each world size, `scaling_threads` threads per rank so each rank is one "device"
    world_sizes: list[int] = field(default_factory=lambda: [1, 2])
    scaling_threads: int | None = 1
    scaling_micro_batch: int = 8
    scaling_subprocess: bool = False  # also launch world size 1 through the launcher (else in this process)
    # finetune
    finetune_model: str = "minilm"
    finetune_tasks: list[str] = field(default_factory=lambda: ["NCBI-disease"])
    finetune_examples: int = 256
    finetune_epochs: float = 1.0
    finetune_seq_len: int = 128
    finetune_batch: int = 16

    def __post_init__(self) -> None:
        unknown = set(self.suites) - set(SUITES)
        if unknown or not self.suites:
            raise ValueError(f"--suite: unknown {sorted(unknown)} (expected a comma list of {', '.join(SUITES)})")
        self.data_root = Path(self.data_root)
        if any(w < 1 for w in self.world_sizes):
            raise ValueError(f"world sizes must be >= 1, got {self.world_sizes}")
        if self.precisions and set(self.precisions) - {"fp32", "bf16", "fp16"}:
            raise ValueError(f"precisions must be fp32/bf16/fp16, got {self.precisions}")

    @classmethod
    def preset(cls, output_dir: str, quick: bool, **overrides) -> SuiteConfig:
        """--quick: a few minutes on a 2-core CPU; full: the grid the docs report."""
        if quick:
            base = dict(prep_workers=[1, 2], prep_repeats=2, loader_seconds=1.0, loader_samples_per_shard=4096,
                        real_loader_maskings=["static"], train_steps=2, train_warmup=1, finetune_examples=64,
                        threads=1 if not _cuda() else None)  # 1 thread: robust on a small, shared CPU machine
        else:
            base = {}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(output_dir=output_dir, quick=quick, **base)

    @property
    def real(self) -> bool:
        return self.use_real_data and (self.data_root / "corpus" / "pubmed").is_dir()

    def train_cases(self, real_shards: dict) -> list:
        """TrainBenchConfig per case: the product of the flag lists, or the preset's list when no flag is given."""
        from benchmarks.train_bench import TrainBenchConfig

        if any(x is not None for x in (self.models, self.micro_batches, self.zero_stages, self.precisions)):
            combos = itertools.product(self.models or ["minilm"], self.seq_lens, self.micro_batches or [8],
                                       self.zero_stages or [0], self.precisions or ["fp32"])
        elif self.quick:  # micro-batch sweep at 128, one 512 case, one bf16+ZeRO-2 case
            combos = [("minilm", 128, 4, 0, "fp32"), ("minilm", 128, 16, 0, "fp32"), ("minilm", 512, 4, 0, "fp32"),
                      ("minilm", 128, 16, 2, "bf16")]
            combos = [c for c in combos if c[1] in self.seq_lens]
        else:
            combos = [("minilm", s, m, 0, "fp32") for s in self.seq_lens for m in ((4, 8, 16) if s == 128 else (2, 4, 8))]
            combos += [("minilm", 128, 16, z, p) for z in (0, 1, 2, 3) for p in ("fp32", "bf16") if (z, p) != (0, "fp32")]
            combos += [("base", 128, 8, 0, "fp32"), ("base", 512, 2, 0, "fp32")]
        cases = [TrainBenchConfig(model=m, seq_len=s, micro_batch=mb, zero_stage=z, precision=p,
                                  steps=self.train_steps, warmup=self.train_warmup, threads=self.threads,
                                  shards=str(real_shards[(s, "static")]) if (s, "static") in real_shards else None)
                 for m, s, mb, z, p in combos]
        if cases:  # model.compile measured once (CPU inductor compiles take a minute), on the first case
            cases[0].engines = ["ours", "ours_compiled", "hf_baseline"]
        return cases

    def scaling_case(self, real_shards: dict):
        from benchmarks.train_bench import TrainBenchConfig

        s = 128 if 128 in self.seq_lens else self.seq_lens[0]
        return TrainBenchConfig(model=(self.models or ["minilm"])[0], seq_len=s, micro_batch=self.scaling_micro_batch,
                                steps=self.train_steps, warmup=self.train_warmup, threads=self.scaling_threads,
                                shards=str(real_shards[(s, "static")]) if (s, "static") in real_shards else None)
