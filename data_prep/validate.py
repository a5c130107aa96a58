"""Check a shard directory against the contract and its manifest, and print statistics.

    biobert validate DIR [--vocab VOCAB]

Exit 0 only when the manifest and every shard check out: checksums, datasets, dtypes, shapes, ids within the
vocab, padding, segment ids, prediction slots (positions inside the sequence, sorted, unique, unused = 0).
The validation split (format 2) is checked the same way, plus its document list against the recorded hash.
Reads shards in chunks, so memory stays small for any shard size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from biobert.config import option, parse
from biobert.errors import run
from data_prep import contract

CHUNK = 1 << 15


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    predictions: int = 0
    random_next: int = 0
    shards: int = 0
    validation: Report | None = None  # the held-out split's own figures

    @property
    def ok(self) -> bool:
        return not self.errors

    def stats(self) -> dict:
        return dict(shards=self.shards, samples=self.samples, tokens=self.tokens,
                    mask_rate=self.predictions / self.tokens if self.tokens else 0.0,
                    nsp_random_fraction=self.random_next / self.samples if self.samples else 0.0,
                    mean_fill=self.tokens / self.samples if self.samples else 0.0)


def validate(shard_dir: str | Path, vocab: str | Path | None = None) -> Report:
    """All problems found in `shard_dir` (each naming its file), plus statistics."""
    d = Path(shard_dir)
    rep = Report()
    try:
        m = contract.Manifest.load(d)
    except (FileNotFoundError, ValueError) as e:
        rep.errors.append(str(e))
        return rep
    if vocab is not None:
        h = contract.vocab_hash(contract.read_vocab_tokens(vocab))
        if h != m.vocab_hash:
            rep.errors.append(f"{vocab}: vocab hash {h[:12]} differs from the manifest's {m.vocab_hash[:12]}")
    if not m.shards:
        rep.errors.append(f"{d / contract.MANIFEST_NAME}: lists no shards")
    for info in m.shards:
        _check_shard(d / info.file, info, m, rep)
        rep.shards += 1
    vm = m.validation_manifest()
    if vm is not None:
        rep.validation = Report()
        for info in vm.shards:
            _check_shard(d / info.file, info, vm, rep.validation)
            rep.validation.shards += 1
        rep.errors += rep.validation.errors
        _check_split(d, m, rep)
    return rep


def _check_split(d: Path, m: contract.Manifest, rep: Report) -> None:
    """The held-out split against its own record: totals, document list, and no file shared with training."""
    v = m.validation
    where = d / contract.MANIFEST_NAME
    if sum(s.samples for s in v.shards) != v.instances:
        rep.errors.append(f"{where}: validation shards hold {sum(s.samples for s in v.shards)} samples, the split "
                          f"records {v.instances} instances")
    if {s.file for s in v.shards} & {s.file for s in m.shards}:
        rep.errors.append(f"{where}: a validation shard is also listed as a training shard")
    docs = d / contract.VALIDATION_DIR / contract.VALIDATION_DOCS
    if v.documents_sha256 is not None:
        if not docs.is_file():
            rep.errors.append(f"{docs}: missing (the held-out document ids)")
        else:
            names = docs.read_text(encoding="utf-8").splitlines()
            if contract.sha256_file(docs) != v.documents_sha256 or len(names) != v.documents:
                rep.errors.append(f"{docs}: does not match the manifest's validation split ({v.documents} documents)")


def _check_shard(path: Path, info: contract.ShardInfo, m: contract.Manifest, rep: Report) -> None:
    err = rep.errors
    if not path.is_file():
        err.append(f"{path}: listed in the manifest but missing")
        return
    if contract.sha256_file(path) != info.sha256:
        err.append(f"{path}: sha256 differs from the manifest (corrupted or replaced)")
    schema = contract.schema_for(m.masking)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        err.append(f"{path}: not a readable HDF5 file: {e}")
        return
    with f:
        problems: list[str] = []
        n = f["input_ids"].shape[0] if "input_ids" in f else None
        for name, (dtype, rank) in schema.items():
            if name not in f:
                problems.append(f"{path}: dataset {name!r} missing")
                continue
            ds = f[name]
            want = (m.max_predictions if name.startswith("masked_lm") else m.seq_len,) if rank == 2 else ()
            if ds.dtype != dtype:
                problems.append(f"{path}: {name} has dtype {ds.dtype}, expected {dtype}")
            if ds.ndim != rank or ds.shape[1:] != want or ds.shape[0] != n:
                problems.append(f"{path}: {name} has shape {ds.shape}, expected [{n}{''.join(f', {w}' for w in want)}]")
        if problems:  # value checks on the wrong schema would only add noise
            err.extend(problems)
            return
        if n != info.samples:
            err.append(f"{path}: {n} samples, manifest says {info.samples}")
        tokens = 0
        for lo in range(0, n, CHUNK):
            arrays = {name: f[name][lo : lo + CHUNK] for name in schema}
            tokens += _check_chunk(path, lo, arrays, m, rep)
        if tokens != info.tokens:
            err.append(f"{path}: {tokens} tokens, manifest says {info.tokens}")
        rep.samples += n
        rep.tokens += tokens


def _first_bad(mask: np.ndarray, lo: int) -> str:
    return f"sample {lo + int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])}"


def _check_chunk(path: Path, lo: int, a: dict[str, np.ndarray], m: contract.Manifest, rep: Report) -> int:
    err = rep.errors
    ids, mask, seg = (a[k].astype(np.int64) for k in contract.SEQUENCE_DATASETS)
    pos = np.arange(ids.shape[1])
    length = mask.sum(axis=1)
    if (bad := (ids < 0) | (ids >= m.vocab_size)).any():
        err.append(f"{path}: {_first_bad(bad, lo)}: input id out of range [0, {m.vocab_size})")
    if (bad := (mask != (pos < length[:, None]))).any():
        err.append(f"{path}: {_first_bad(bad, lo)}: input_mask is not ones followed by zeros")
    if (bad := (mask == 0) & ((ids != contract.PAD_ID) | (seg != 0))).any():
        err.append(f"{path}: {_first_bad(bad, lo)}: padding is not 0")
    drops = np.zeros_like(seg, dtype=bool)
    drops[:, 1:] = (np.diff(seg, axis=1) < 0) & (mask[:, 1:] == 1)
    if (bad := (seg < 0) | (seg > 1) | drops).any():
        err.append(f"{path}: {_first_bad(bad, lo)}: segment_ids must be 0s then 1s")
    nsp = a["next_sentence_labels"]
    if (bad := (nsp != 0) & (nsp != 1)).any():
        err.append(f"{path}: {_first_bad(bad, lo)}: next_sentence_labels must be 0 or 1")
    rep.random_next += int((nsp == contract.NSP_RANDOM_NEXT).sum())
    if "masked_lm_positions" in a:
        p = a["masked_lm_positions"].astype(np.int64)
        mid = a["masked_lm_ids"].astype(np.int64)
        used = p > 0
        if (bad := (p < 0) | (p >= length[:, None])).any():
            err.append(f"{path}: {_first_bad(bad, lo)}: masked_lm_positions outside the sequence")
        if (bad := (mid < 0) | (mid >= m.vocab_size) | (~used & (mid != 0))).any():
            err.append(f"{path}: {_first_bad(bad, lo)}: masked_lm_ids out of range or set in an unused slot")
        # Used slots come first, strictly increasing; unused slots (0) only after them.
        bad = np.zeros_like(used)
        bad[:, 1:] = used[:, 1:] & (~used[:, :-1] | (np.diff(p, axis=1) <= 0))
        if bad.any():
            err.append(f"{path}: {_first_bad(bad, lo)}: masked_lm_positions not sorted/unique with unused slots last")
        rep.predictions += int(used.sum())
    return int(length.sum())


@dataclass(kw_only=True)
class ValidateConfig:
    """Check a shard directory against the contract and its manifest."""

    shard_dir: str = option(help="a data_prep output directory (or NVIDIA shards with a manifest)", positional=True)
    vocab: str | None = option(None, "also check the vocab hash against this vocab.txt / tokenizer directory")


def main(cfg: ValidateConfig) -> Report:
    if not Path(cfg.shard_dir).is_dir():
        raise FileNotFoundError(f"{cfg.shard_dir}: not a directory (give a data_prep output directory)")
    rep = validate(cfg.shard_dir, cfg.vocab)
    s = rep.stats()
    print(f"{cfg.shard_dir}: {s['shards']} shards, {s['samples']} samples, {s['tokens']} tokens "
          f"(mean {s['mean_fill']:.1f}/sample), mask rate {s['mask_rate']:.4f}, "
          f"NSP random-next {s['nsp_random_fraction']:.3f}")
    if rep.validation is not None:
        v = rep.validation.stats()
        print(f"{cfg.shard_dir}: validation split: {v['shards']} shards, {v['samples']} samples, {v['tokens']} tokens, "
              f"mask rate {v['mask_rate']:.4f}")
    for e in rep.errors:
        print(f"error: {e}", file=sys.stderr)
    print("OK" if rep.ok else f"FAILED: {len(rep.errors)} problem(s)")
    return rep


def cli(argv: list[str] | None = None) -> int:
    """Exit 0 when everything checks out, 1 when a shard or the manifest does not."""
    return 0 if main(parse(ValidateConfig, argv, prog="biobert validate", description=__doc__)).ok else 1


if __name__ == "__main__":
    sys.exit(run(cli))
