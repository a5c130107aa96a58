"""A data-prep array job in parts: split the input files across tasks, then join the parts into one shard directory.

    python -m launch.shard_parts slice --task I --tasks N INPUT...   # task I's input files, one per line
    python -m launch.shard_parts merge OUT_DIR [--parts N]           # OUT_DIR/part-* -> OUT_DIR/manifest.json

Files are dealt largest first, round robin, so the parts are balanced by bytes; every file lands in exactly one part.
Each array task writes a complete data_prep output (shards + manifest.json) to OUT_DIR/part-00000, part-00001, ...
This writes OUT_DIR/manifest.json listing every part's shards by relative path (part-00003/shard-...hdf5), with
their recorded sha256, so `biobert validate OUT_DIR` and the pretraining loader see one dataset.
Nothing is copied. The parts must agree on everything the loader depends on (seq_len, masking, vocab, ...).

With --parts N it merges only when part-00000 .. part-(N-1) all have their manifest (data_prep writes it last), and
exits 3 otherwise: every array task calls it when it finishes and the last one to finish does the merge (under a
file lock; merging twice gives the same manifest).
"""

from __future__ import annotations

import fcntl
import sys
from dataclasses import dataclass
from pathlib import Path

from biobert.config import option, parse_command
from biobert.errors import run
from data_prep import contract
from data_prep.extract import find_inputs

NOT_READY = 3
_MUST_AGREE = ("seq_len", "max_predictions", "masking", "lower_case", "vocab_hash", "vocab_size", "tool_version",
               "format_version")


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def slice_inputs(inputs: list[str], task: int, tasks: int) -> list[Path]:
    """Task `task`'s share of the input files (directories expanded as data_prep expands them)."""
    if not 0 <= task < tasks:
        raise ValueError(f"task {task} is outside 0..{tasks - 1}")
    files = sorted(find_inputs(inputs), key=lambda f: (-f.stat().st_size, str(f)))
    if len(files) < tasks:
        raise ValueError(f"{tasks} array tasks but only {len(files)} input files: use --array=0-{len(files) - 1}")
    return sorted(files[task::tasks], key=str)


def merge(out_dir: str | Path, parts: int | None = None) -> contract.Manifest | None:
    """The merged manifest (written to out_dir), or None when some of the `parts` expected parts are not done."""
    out = Path(out_dir)
    dirs = [out / part_name(i) for i in range(parts)] if parts else sorted(out.glob("part-[0-9]*"))
    if not dirs:
        raise FileNotFoundError(f"{out}: no part-NNNNN directories to merge")
    manifests = []
    for d in dirs:
        try:
            manifests.append(contract.Manifest.load(d))
        except FileNotFoundError:
            if parts:
                return None  # that task has not finished (or failed: its own log says why)
            raise
    first = manifests[0]
    for d, m in zip(dirs[1:], manifests[1:]):
        for key in _MUST_AGREE:
            if getattr(m, key) != getattr(first, key):
                raise ValueError(f"{d / contract.MANIFEST_NAME}: {key} {getattr(m, key)!r} differs from "
                                 f"{dirs[0].name}'s {getattr(first, key)!r}: parts of one dataset must share settings")
    shards = [contract.ShardInfo(**{**vars(s), "file": f"{d.name}/{s.file}"})
              for d, m in zip(dirs, manifests) for s in m.shards]
    totals: dict[str, int] = {}
    for m in manifests:
        for k, v in m.settings.get("summary", {}).items():
            if isinstance(v, (int, float)):
                totals[k] = totals.get(k, 0) + v
    validation = merge_validation(out, dirs, manifests)
    if validation is not None:
        totals["validation"] = {k: v for k, v in vars(validation).items() if k != "shards"} | {
            "shards": len(validation.shards)}
    merged = contract.Manifest(
        **{k: getattr(first, k) for k in _MUST_AGREE}, seed=first.seed,
        settings=dict(first.settings, merged_from=[d.name for d in dirs], part_seeds=[m.seed for m in manifests],
                      inputs=[i for m in manifests for i in m.settings.get("inputs", [])], summary=totals,
                      fingerprint=None),
        shards=shards, validation=validation)
    merged.save(out)
    return merged


def merge_validation(out: Path, dirs: list[Path], manifests: list[contract.Manifest]):
    """The parts' validation splits as one (shards by relative path, counts summed, the document lists joined into
    OUT/validation/documents.txt); None when no part has one."""
    splits = [(d, m.validation) for d, m in zip(dirs, manifests) if m.validation is not None]
    if not splits:
        return None
    from biobert.files import atomic_write

    names = "".join((d / contract.VALIDATION_DIR / contract.VALIDATION_DOCS).read_text(encoding="utf-8")
                    for d, v in splits if v.documents_sha256 is not None)
    docs = out / contract.VALIDATION_DIR / contract.VALIDATION_DOCS
    atomic_write(docs, names)
    return contract.ValidationSplit(
        fraction=splits[0][1].fraction, masking=splits[0][1].masking,
        **{k: sum(getattr(v, k) for _, v in splits) for k in ("documents", "sentences", "tokens", "instances")},
        documents_sha256=contract.sha256_file(docs),
        shards=[contract.ShardInfo(**{**vars(s), "file": f"{d.name}/{s.file}"}) for d, v in splits for s in v.shards])


@dataclass(kw_only=True)
class SliceConfig:
    """Print array task TASK's share of the input files, one per line."""

    task: int = option(help="this array task's index, 0-based (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
    tasks: int = option(help="number of array tasks (SLURM_ARRAY_TASK_COUNT)")
    inputs: list[str] = option(help="input files or directories (directories expanded as data_prep expands them)",
                               positional=True)

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {self.tasks}")
        if not 0 <= self.task < self.tasks:
            raise ValueError(f"task {self.task} is outside 0..{self.tasks - 1}")
        if not self.inputs:
            raise ValueError("no inputs given")


@dataclass(kw_only=True)
class MergeConfig:
    """Write OUT_DIR/manifest.json over the parts OUT_DIR/part-NNNNN."""

    out_dir: str = option(help="the dataset directory that holds part-00000, part-00001, ...", positional=True)
    parts: int | None = option(None, "expected number of parts (the array size): merge only once all of them are "
                                     "done, else exit 3 (default: merge the part-* directories there are)")

    def __post_init__(self) -> None:
        if self.parts is not None and self.parts < 1:
            raise ValueError(f"parts must be >= 1, got {self.parts}")


COMMANDS = {"slice": SliceConfig, "merge": MergeConfig}


def main(cfg: SliceConfig | MergeConfig) -> list[Path] | contract.Manifest | None:
    """slice: this task's input files. merge: the merged manifest, or None while some expected part is not done."""
    if isinstance(cfg, SliceConfig):
        return slice_inputs(cfg.inputs, cfg.task, cfg.tasks)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two tasks finishing together: one merges, the other rewrites the same
        return merge(out, cfg.parts)


def cli(argv: list[str] | None = None) -> int:
    """Exit 0 done, 3 merge: not all parts done yet, 2 a mistake (one line, via biobert.errors.run)."""
    cfg = parse_command(COMMANDS, argv, prog="python -m launch.shard_parts", description=__doc__)
    result = main(cfg)
    if isinstance(cfg, SliceConfig):
        print("\n".join(map(str, result)))
        return 0
    if result is None:
        print(f"shard_parts: {cfg.out_dir}: not all {cfg.parts} parts are done yet; the last task to finish merges")
        return NOT_READY
    print(f"shard_parts: {cfg.out_dir}/manifest.json: {len(result.shards)} shards, {result.total_samples} samples "
          f"from {len(result.settings['merged_from'])} parts")
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
