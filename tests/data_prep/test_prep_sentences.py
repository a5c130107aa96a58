"""Sentence splitting on biomedical abbreviations, decimals and the real MEDLINE sample."""

from __future__ import annotations

import pytest

from data_prep.extract import iter_documents
from data_prep.sentences import split_sentences


@pytest.mark.parametrize(
    "text, expected",
    [
        ("As shown by Smith et al. in 2004, p53 binds DNA. It also binds RNA.",
         ["As shown by Smith et al. in 2004, p53 binds DNA.", "It also binds RNA."]),
        ("Results are shown in Fig. 2 and Figs. 3-4. Cells died.", ["Results are shown in Fig. 2 and Figs. 3-4.", "Cells died."]),
        ("Several drugs, e.g. aspirin, i.e. NSAIDs, work. Others fail.", ["Several drugs, e.g. aspirin, i.e. NSAIDs, work.", "Others fail."]),
        ("Treated vs. Untreated mice differed (approx. 2.5-fold). See no. 7 below.",
         ["Treated vs. Untreated mice differed (approx. 2.5-fold).", "See no. 7 below."]),
        ("Dr. Jones measured IL-2. The rest followed.", ["Dr. Jones measured IL-2.", "The rest followed."]),
        ("The effect was significant (p < 0. 001). Growth of E. coli stopped.",
         ["The effect was significant (p < 0. 001).", "Growth of E. coli stopped."]),
        ("Levels rose by 1.52 (0. 53) units. BRCA1 was mutated.", ["Levels rose by 1.52 (0. 53) units.", "BRCA1 was mutated."]),
        ("We cite Smith et al. The next study disagreed.", ["We cite Smith et al.", "The next study disagreed."]),
    ],
)
def test_biomedical_abbreviations(text, expected):
    assert split_sentences(text) == expected


def test_real_medline_sample_splits(shared_data):
    docs = list(iter_documents(shared_data / "corpus/pubmed/pubmed-sample-0002.xml.gz"))
    sents = [s for d in docs for p in d.paragraphs for s in split_sentences(p)]
    assert 15000 < len(sents) < 25000  # ~76k sentences over 4 files
    ends = [s.rsplit(" ", 1)[-1] for s in sents]
    for abbrev in ("Fig.", "Figs.", "e.g.", "i.e.", "vs.", "Dr.", "approx.", "cf."):
        assert abbrev not in ends, abbrev
    # blingfire alone splits the space-separated decimals of this corpus ("p < 0. 001") into fragments
    assert not any(s[0].isdigit() and prev.endswith(("0.", "1.", "2.", "3.")) for prev, s in zip(sents, sents[1:]))
    assert sum(s.count(". ") > 6 for s in sents) < len(sents) * 0.01  # and it does not glue sentences together
