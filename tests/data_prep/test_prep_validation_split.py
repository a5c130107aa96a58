"""The held-out validation split: chosen by document, deterministic, disjoint from training, recorded and checked."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from prep_helpers import article, write_pubmed

from data_prep import contract, run
from data_prep.validate import validate
from data_prep.wordpiece import load_wordpiece
from data_prep.work import held_out_score


@pytest.fixture(scope="module")
def abstracts(tmp_path_factory):
    """60 PubMed records in two files, each with a sentence no other record has (its PMID spelled out)."""
    d = tmp_path_factory.mktemp("abstracts")
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]
    for f in range(2):
        records = []
        for i in range(30):
            pmid = 1000 + 30 * f + i
            tag = " ".join(words[int(c)] for c in str(pmid))
            text = (f"Marker sentence {tag} appears once. Patients with disease were treated with drugs in the "
                    f"clinic. The response of tumour cells to therapy was measured twice. Gene expression changed "
                    f"in {i + 3} of the samples studied here.")
            records.append(article(str(pmid), f"Study number {tag}.", f"<AbstractText>{text}</AbstractText>"))
        write_pubmed(d / f"pubmed-{f}.xml.gz", "\n".join(records))
    return d


def _prep(inputs, out, vocab, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("num_shards", 2)
    return run.main(run.PrepConfig(inputs=[str(i) for i in inputs], output_dir=str(out), vocab=str(vocab),
                                   progress=False, group_mb=0.000001, **kw))


def _rows(d, files):
    rows = []
    for f in files:
        with h5py.File(d / f) as h:
            ids, mask = h["input_ids"][()], h["input_mask"][()]
        rows += [r[m.astype(bool)].tolist() for r, m in zip(ids, mask)]
    return rows


def _contains(rows, needle) -> bool:
    n = len(needle)
    return any(row[i:i + n] == needle for row in rows for i in range(len(row) - n + 1))


def test_held_out_documents_are_disjoint_from_training(abstracts, uncased_vocab, tmp_path):
    out = tmp_path / "out"
    s = _prep([abstracts], out, uncased_vocab, validation_fraction=0.2, dynamic_masking=True)
    m = contract.Manifest.load(out)
    held = (out / "validation" / "documents.txt").read_text().split()
    expected = [str(p) for p in range(1000, 1060) if held_out_score(12345, str(p)) < 0.2]
    assert held == expected and 4 <= len(held) <= 25  # by seeded score of the PMID, in file order
    v = m.validation
    assert v.documents == len(held) == s["validation"]["documents"] and s["docs"] == 60
    assert v.masking == "static" and m.masking == "dynamic"  # fixed masks for evaluation whatever training uses
    assert [sh.file for sh in v.shards] == ["validation/shard-00000-of-00001.hdf5"]
    assert v.instances == sum(sh.samples for sh in v.shards) and v.documents_sha256 == contract.sha256_file(
        out / "validation" / "documents.txt")
    wp = load_wordpiece(str(uncased_vocab))
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]
    train_rows = _rows(out, [sh.file for sh in m.shards])
    val_ids = _rows(out, [sh.file for sh in v.shards])
    for pmid in range(1000, 1060):
        marker = wp.encode([f"Marker sentence {' '.join(words[int(c)] for c in str(pmid))} appears once."])[0]
        if str(pmid) in held:
            assert not _contains(train_rows, marker), pmid
        else:
            assert not _contains(val_ids, marker), pmid
    assert any(_contains(val_ids, wp.encode([f"Study number {' '.join(words[int(c)] for c in p)}."])[0])
               for p in held)  # the held-out text is really in the validation shards
    rep = validate(out, uncased_vocab)
    assert rep.ok, rep.errors
    assert rep.validation.samples == v.instances and rep.samples == s["instances"]


def test_split_is_independent_of_workers_and_seeded(abstracts, uncased_vocab, tmp_path):
    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
                and p.name != "manifest.json"}

    _prep([abstracts], tmp_path / "w1", uncased_vocab, validation_fraction=0.2, workers=1)
    _prep([abstracts], tmp_path / "w2", uncased_vocab, validation_fraction=0.2, workers=2)
    one = files(tmp_path / "w1")
    assert one == files(tmp_path / "w2") and "validation/documents.txt" in one
    _prep([abstracts], tmp_path / "s2", uncased_vocab, validation_fraction=0.2, seed=2)
    assert (tmp_path / "s2/validation/documents.txt").read_text() != one["validation/documents.txt"].decode()


def test_at_least_one_document_and_none_when_tiny_or_off(abstracts, uncased_vocab, tmp_path):
    s = _prep([abstracts], tmp_path / "a", uncased_vocab, validation_fraction=0.001)
    assert s["validation"]["documents"] == 1  # 60 x 0.001 rounds to none: the lowest score is held out
    (held,) = (tmp_path / "a/validation/documents.txt").read_text().split()
    assert held == min((str(p) for p in range(1000, 1060)), key=lambda p: held_out_score(12345, p))
    s = _prep([abstracts], tmp_path / "off", uncased_vocab, validation_fraction=0.0)
    assert "validation" not in s and contract.Manifest.load(tmp_path / "off").validation is None
    assert not (tmp_path / "off" / "validation").exists()
    tiny = tmp_path / "tiny.xml"
    write_pubmed(tiny, "\n".join(article(str(i), f"Title {i}.", "<AbstractText>One. Two. Three.</AbstractText>")
                                 for i in range(3)), gz=False)
    s = _prep([tiny], tmp_path / "t", uncased_vocab, num_shards=1)
    assert "validation" not in s  # three documents: none can be spared
    # re-running with the split switched off removes the old split
    _prep([abstracts], tmp_path / "a", uncased_vocab, validation_fraction=0.0)
    assert not (tmp_path / "a" / "validation").exists()


def test_format_1_manifests_still_load(abstracts, uncased_vocab, tmp_path):
    out = tmp_path / "out"
    _prep([abstracts], out, uncased_vocab, validation_fraction=0.0)
    data = json.loads((out / "manifest.json").read_text())
    data["format_version"] = 1
    del data["validation"]
    (out / "manifest.json").write_text(json.dumps(data))
    m = contract.Manifest.load(out)
    assert m.validation is None and m.validation_manifest() is None and validate(out).ok
    data["format_version"] = 3
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version 3"):
        contract.Manifest.load(out)


def test_validate_catches_a_damaged_split(abstracts, uncased_vocab, tmp_path):
    out = tmp_path / "out"
    _prep([abstracts], out, uncased_vocab, validation_fraction=0.2)
    shard = out / "validation" / "shard-00000-of-00001.hdf5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("validation/shard-00000-of-00001.hdf5: sha256" in e for e in validate(out).errors)
    (out / "validation" / "documents.txt").write_text("1000\n")
    assert any("documents.txt: does not match" in e for e in validate(out).errors)
    again = _prep([abstracts], out, uncased_vocab, validation_fraction=0.2)  # a re-run rebuilds what is damaged
    assert not again["up_to_date"] and validate(out).ok
    (out / "validation" / "documents.txt").write_text("1000\n")  # the id list alone
    assert not _prep([abstracts], out, uncased_vocab, validation_fraction=0.2)["up_to_date"] and validate(out).ok


def test_validation_batches_cover_the_subset_equally_on_every_rank(abstracts, uncased_vocab, tmp_path):
    from pretraining.validation_data import rank_batches, validation_batches, validation_shard_paths, validation_split

    out = tmp_path / "out"
    _prep([abstracts], out, uncased_vocab, validation_fraction=0.3)
    base, vm = validation_split(out)
    assert base == out and vm.masking == "static" and vm.vocab_hash == contract.Manifest.load(out).vocab_hash
    assert validation_shard_paths(out) == [out / "validation" / "shard-00000-of-00001.hdf5"]
    total = vm.total_samples
    assert total >= 7
    for world in (1, 2, 3):
        parts = [rank_batches(total - total % world, 4, r, world) for r in range(world)]
        assert len({len(p) for p in parts}) == 1 and all(len(b) > 0 for p in parts for b in p)
        assert sorted(int(i) for p in parts for b in p for i in b) == list(range(total - total % world))
    with h5py.File(out / vm.shards[0].file) as f:
        want = f["masked_lm_ids"][:6]
    got = [b for r in range(2) for b in validation_batches(base, vm, micro_batch_size=2, rank=r, world_size=2,
                                                           max_samples=6)]
    assert all(set(b) == {"input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
                          "next_sentence_labels"} for b in got)
    lm = np.concatenate([b["masked_lm_ids"].numpy() for b in got])
    assert len(got) == 4 and sorted(map(tuple, lm.tolist())) == sorted(map(tuple, want.tolist()))
    with pytest.raises(ValueError, match="training shard directory"):
        validation_split(out, out)
    # the batches are what the model takes: a tiny BERT scores every masked position of the split
    import torch
    from transformers import BertConfig

    from pretraining.model import BertForPreTraining

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64)).eval()
    with torch.no_grad():
        counts = [int(model(**b)["mlm_count"]) for b in got]
    assert sum(counts) == int((want > 0).sum()) > 0


def test_explicit_validation_dir_for_directories_without_a_split(abstracts, uncased_vocab, tmp_path):
    from pretraining.validation_data import validation_batches, validation_split

    train, held = tmp_path / "training", tmp_path / "test"
    _prep([abstracts / "pubmed-0.xml.gz"], train, uncased_vocab, validation_fraction=0.0)
    _prep([abstracts / "pubmed-1.xml.gz"], held, uncased_vocab, validation_fraction=0.0, dynamic_masking=True,
          num_shards=1)
    (held / "manifest.json").unlink()  # NVIDIA-style: plain hdf5 files
    assert validation_split(train) is None
    with pytest.warns(UserWarning, match="synthesised"):
        base, vm = validation_split(train, held)
    assert base == held and vm.masking == "dynamic"
    kw = dict(micro_batch_size=8, rank=0, world_size=1, max_samples=8, vocab_size=30522, mask_token_id=103,
              max_predictions=20, seed=3)
    first = next(validation_batches(base, vm, **kw))
    again = next(validation_batches(base, vm, **kw))
    assert all(np.array_equal(first[k], again[k]) for k in first)  # masked the same way at every evaluation
    assert int((first["masked_lm_positions"] > 0).sum()) > 8
