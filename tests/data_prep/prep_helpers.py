"""Helpers shared by the data_prep tests (imported as a top-level module: tests/ has no __init__.py)."""

from __future__ import annotations

import gzip
from pathlib import Path


def write_pubmed(path: Path, records: str, gz: bool = True) -> Path:
    """A PubMed XML file around the given <PubmedArticle>/<DeleteCitation> elements."""
    xml = f'<?xml version="1.0" encoding="utf-8"?>\n<PubmedArticleSet>\n{records}\n</PubmedArticleSet>\n'
    data = xml.encode("utf-8")
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def article(pmid: str, title: str, abstract: str | None) -> str:
    ab = f"<Abstract>{abstract}</Abstract>" if abstract is not None else ""
    return (f"<PubmedArticle><MedlineCitation><PMID>{pmid}</PMID><Article><ArticleTitle>{title}</ArticleTitle>{ab}"
            f"</Article></MedlineCitation></PubmedArticle>")
