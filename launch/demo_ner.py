"""A small generated NER corpus (disease mentions, IOB2) so the pipeline demo needs nothing outside the project.

Sentences come from templates filled with disease names (the entities) and gene names (distractors, tagged O), drawn by an
explicit seeded rng; some diseases appear only in dev/test so the score measures more than memorisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biobert.files import atomic_write

DISEASES = [
    "breast cancer", "type 2 diabetes", "cystic fibrosis", "Huntington disease", "colorectal carcinoma", "hypertension",
    "asthma", "Alzheimer disease", "myocardial infarction", "rheumatoid arthritis", "Parkinson disease",
    "sickle cell anemia", "multiple sclerosis", "lung adenocarcinoma", "hepatitis B", "chronic kidney disease",
    "Crohn disease", "psoriasis", "glioblastoma", "ovarian cancer", "Duchenne muscular dystrophy", "osteoporosis",
    "hemophilia A", "tuberculosis", "prostate cancer", "atrial fibrillation", "schizophrenia", "melanoma",
]
HELD_OUT = {"melanoma", "schizophrenia", "atrial fibrillation", "prostate cancer"}  # never in train
GENES = ["BRCA1", "TP53", "CFTR", "HTT", "APOE", "IL6", "TNF", "EGFR", "KRAS", "LRRK2", "HBB", "DMD", "F8", "PTEN"]
TEMPLATES = [
    "Patients with {D} showed elevated levels of {G} .",
    "{G} mutations are associated with {D} in this cohort .",
    "No association between {G} and {D} was observed .",
    "The prevalence of {D} increased among older adults .",
    "We studied 120 patients with {D} and 80 healthy controls .",
    "Expression of {G} was reduced in tissue from {D} patients .",
    "These findings suggest that {G} contributes to {D} and {D2} .",
    "Treatment outcomes in {D} did not depend on {G} status .",
    "Risk of {D} was higher in carriers of the {G} variant .",
]


def _sentence(rng: np.random.Generator, diseases: list[str]) -> list[tuple[str, str]]:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    d1, d2 = rng.choice(diseases, size=2, replace=False)
    out = []
    for word in template.split():
        if word in ("{D}", "{D2}"):
            parts = (d1 if word == "{D}" else d2).split()
            out += [(p, ("B-" if i == 0 else "I-") + "Disease") for i, p in enumerate(parts)]
        elif word == "{G}":
            out.append((GENES[rng.integers(len(GENES))], "O"))
        else:
            out.append((word, "O"))
    return out


def write_demo_ner(out_dir: str | Path, seed: int = 0, sizes=(("train", 240), ("devel", 60), ("test", 80))) -> Path:
    """Writes OUT/{train,devel,test}.tsv (token TAB label, blank line between sentences); returns OUT."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seen = [d for d in DISEASES if d not in HELD_OUT]
    for split, n in sizes:
        pool = seen if split == "train" else DISEASES
        lines = []
        for _ in range(n):
            lines += [f"{tok}\t{tag}" for tok, tag in _sentence(rng, pool)] + [""]
        atomic_write(out / f"{split}.tsv", "\n".join(lines))
    return out
