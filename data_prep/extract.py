"""Documents out of PubMed XML (.xml/.xml.gz), PMC JATS (.nxml) and BERT plain text (.txt), streamed.

Every reader is a generator of `Document`s and holds one record at a time: PubMed baseline files are 30k
records each, so whole-file parsing would make memory scale with the input. Bad input raises `DataError`
naming the file and the line or record, so a user with 1,000 input files knows which one to look at.
"""

from __future__ import annotations

import gzip
import os
import re
import unicodedata
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from biobert.errors import UserError

INPUT_SUFFIXES = (".xml", ".xml.gz", ".nxml", ".nxml.gz", ".txt", ".txt.gz")


class DataError(UserError):
    """Bad input (or a vocab that does not fit the flags); the message names the file and line/record."""


@dataclass
class Document:
    doc_id: str  # PMID, PMC file stem, or "file:line" for plain text
    paragraphs: list[str]  # running text; sentence splitting happens later unless `presplit`
    presplit: bool = False  # plain text in BERT format is already one sentence per line


# What is left of a citation like "[<xref>1</xref>, <xref>2</xref>]" once the xrefs are dropped.
_EMPTY_BRACKETS = re.compile(r"\s*[\[(][\s,;\-\u2013]*[\])]")


def normalize(text: str) -> str:
    """NFC (one code point per accented letter, as in the vocab) and single spaces."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())  # str.split() knows Unicode spaces and is ~10x faster than a regex


def find_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Input files (directories expanded recursively) in sorted order: the order seeds the work split."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(f for f in sorted(p.rglob("*")) if f.is_file() and f.name.endswith(INPUT_SUFFIXES))
        elif p.is_file():
            if not p.name.endswith(INPUT_SUFFIXES):
                raise DataError(f"{p}: unsupported input type (expected one of {', '.join(INPUT_SUFFIXES)})")
            found.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    unique = sorted(set(found), key=lambda f: str(f))
    if not unique:
        raise DataError(f"no input files ({', '.join(INPUT_SUFFIXES)}) found in {', '.join(map(str, paths))}")
    return unique


def iter_documents(path: str | os.PathLike) -> Iterator[Document]:
    """Documents of one input file, dispatched on its suffix (an .xml holding a JATS <article> is read as PMC).

    A file with no text at all is an error; a valid PubMed update file holding only deletions yields nothing.
    """
    path = Path(path)
    name = path.name
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty input (0 bytes)")
    if name.endswith((".txt", ".txt.gz")):
        yield from iter_bert_text(path)
    elif name.endswith((".nxml", ".nxml.gz")) or name.endswith((".xml", ".xml.gz")) and _is_jats(path):
        yield from iter_pmc(path)
    elif name.endswith((".xml", ".xml.gz")):
        yield from iter_pubmed(path)
    else:
        raise DataError(f"{path}: unsupported input type")


def _is_jats(path: Path) -> bool:
    """PMC bulk packages also name JATS articles .xml: look at the first element."""
    try:
        with _open_binary(path) as f:
            head = f.read(8192)
    except (OSError, EOFError, zlib.error):
        return False  # iter_pubmed reports the real error
    m = re.search(rb"<([A-Za-z][\w:.-]*)[\s>/]", re.sub(rb"<[?!][^>]*>", b"", head))
    return m is not None and m.group(1) == b"article"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _text(el: ET.Element, skip: frozenset[str] = frozenset()) -> str:
    """All text under `el` (inline markup such as <i>, <sub> kept as plain text), minus `skip` subtrees."""
    parts: list[str] = []

    def walk(e: ET.Element) -> None:
        if e.text:
            parts.append(e.text)
        for child in e:
            if _local(child.tag) not in skip:
                walk(child)
            if child.tail:
                parts.append(child.tail)

    walk(el)
    return "".join(parts)


def _local(tag) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _xml_error(path: Path, e: Exception, record: str | None) -> DataError:
    where = f" (after record {record})" if record else ""
    if isinstance(e, ET.ParseError):
        line, col = e.position
        return DataError(f"{path}: malformed XML at line {line}, column {col}{where}: {e}")
    if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
        return DataError(f"{path}: truncated or corrupt gzip stream{where}: {e}")
    return DataError(f"{path}: cannot read{where}: {e}")


def iter_pubmed(path: Path) -> Iterator[Document]:
    """MedlineCitation title + abstract; structured abstracts keep their labels; DeleteCitation PMIDs are dropped.

    Records without an abstract still give their title (a one-sentence document: BERT pairs it with a random
    next sentence). Elements are cleared as soon as a record is done, so memory is one record.
    """
    last_pmid: str | None = None
    records = 0
    deleted: set[str] = set()  # update files list deletions at the end; drop citations we have not emitted yet
    try:
        with _open_binary(path) as f:
            # "end" events only (half the Python-level events); a finished record is cleared in place, leaving
            # an empty element (~100 bytes) in the root per record.
            for _, el in ET.iterparse(f, events=("end",)):
                tag = el.tag
                if tag == "PubmedArticle":
                    records += 1
                    citation = el.find("MedlineCitation")
                    doc = _pubmed_record(citation) if citation is not None else None
                    el.clear()
                    if doc is not None:
                        last_pmid = doc.doc_id
                        if doc.doc_id not in deleted:
                            yield doc
                elif tag == "DeleteCitation":
                    records += 1
                    deleted.update(p.text.strip() for p in el.iter("PMID") if p.text)
                    el.clear()
                elif tag == "PubmedBookArticle":
                    el.clear()  # books carry no MedlineCitation abstract we use
    except (ET.ParseError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise _xml_error(path, e, last_pmid) from None
    if records == 0:
        raise DataError(f"{path}: empty input (no PubmedArticle or DeleteCitation records)")


def _pubmed_record(citation: ET.Element) -> Document | None:
    pmid = (citation.findtext("PMID") or "").strip()
    article = citation.find("Article")
    if article is None:
        return None
    paragraphs = []
    title_el = article.find("ArticleTitle")
    if title_el is not None:
        title = normalize(_text(title_el))
        if title:
            paragraphs.append(title)
    for ab in article.iterfind("Abstract/AbstractText"):
        text = normalize(_text(ab))
        if not text:
            continue
        label = ab.get("Label")
        # "BACKGROUND: ..." reads like the original structured abstract; the label is not its own sentence.
        paragraphs.append(f"{label.capitalize()}: {text}" if label and label.upper() != "UNLABELLED" else text)
    if not paragraphs:
        return None
    return Document(doc_id=pmid, paragraphs=paragraphs)


# JATS subtrees that are not running prose: tables, figures, formulas, references. Cross-references (<xref>) are
# handled by type in _jats_text: citations go, figure/table/section numbers stay ("Figure 3B" is part of a sentence).
_PMC_SKIP = frozenset(
    {"table-wrap", "table", "fig", "fig-group", "disp-formula", "inline-formula", "tex-math", "math",
     "ref-list", "supplementary-material", "graphic", "media", "label", "caption", "table-wrap-foot", "fn-group"}
)
# xref types whose text reads as part of the sentence; bibliography (and untyped) xrefs are citations; the rest
# (footnote markers, affiliations) are dropped.
_XREF_KEEP = frozenset({"fig", "table", "sec", "supplementary-material", "disp-formula", "app", "boxed-text", "chem",
                        "scheme", "statement", "list", "plate"})
_XREF_CITE = frozenset({"bibr", ""})
# Each citation's text is wrapped in markers until clean_citations decides its fate: numeric ones ("[12]", "3-5")
# and author-year ones ("Smith et al., 2000") get different opening markers.
_NUM_OPEN, _AY_OPEN, _CLOSE = "\x02", "\x04", "\x03"  # control characters never occur in XML 1.0 text
_ANY = "[\x02\x04][^\x03]*\x03"
_NUM = "\x02[^\x03]*\x03"
_SEP = r"\s*(?:[,;\u2013\u2014-]|and)\s*"
# A run of citations inside brackets of its own: "[1, 2]", "(Smith 2000; Jones 2001)", "(see [3]-[5])".
_BRACKETED_CITES = re.compile(rf"\s*[\[(]\s*(?:(?:see|e\.g\.|cf\.|reviewed in)[,:]?\s*)?{_ANY}(?:{_SEP}{_ANY})*\s*[\])]")
# Numeric citations standing in the sentence with the separators between them: "conclusions [2], [3]."
_NUMERIC_CITES = re.compile(rf"\s*{_NUM}(?:{_SEP}{_NUM})*")
# Citations that open or close a parenthesis holding other content too: "(Smith, 2001; p < 0.01)".
_LEADING_CITES = re.compile(rf"([\[(])\s*{_ANY}(?:{_SEP}{_ANY})*\s*[,;]\s*")
_TRAILING_CITES = re.compile(rf"\s*[,;]\s*{_ANY}(?:{_SEP}{_ANY})*\s*([\])])")
_DANGLING = [(re.compile(r"([\[(])\s*[,;]\s*"), r"\1"), (re.compile(r"\s*[,;]\s*([\])])"), r"\1")]
_NUMERIC_TEXT = re.compile(r"[\s\[\]()0-9,;\u2013\u2014a-z-]*")


def _citation(text: str) -> str:
    """Mark a citation: numeric ones and those carrying their own brackets ("(Smith, 2000)") can go wherever they
    stand; a bare author-year one may be the subject of the sentence."""
    numeric = _NUMERIC_TEXT.fullmatch(text) and re.search(r"\d", text) and not re.search(r"[a-z]{2}", text)
    enclosed = re.fullmatch(r"\s*(\(.*\)|\[.*\])\s*", text, re.S) is not None
    return (_NUM_OPEN if numeric or enclosed else _AY_OPEN) + text.replace(_CLOSE, "") + _CLOSE


def clean_citations(text: str) -> str:
    """Remove marked citations with their own brackets and separators; an author-year citation that is part of the
    sentence stays ("as Smith et al. (2000) showed"). "mutations [12], the L-shaped" -> "mutations, the L-shaped";
    "conclusions [2], [3]." -> "conclusions."; "(Figure 2; [4])" -> "(Figure 2)"."""
    if _CLOSE not in text:
        return text
    text = _BRACKETED_CITES.sub("", text)
    text = _TRAILING_CITES.sub(r"\1", _LEADING_CITES.sub(r"\1", text))
    text = _NUMERIC_CITES.sub("", text)
    text = re.sub("[\x02\x03\x04]", "", text)
    for pattern, repl in _DANGLING:
        text = pattern.sub(repl, text)
    return _EMPTY_BRACKETS.sub("", text)


def _jats_text(el: ET.Element) -> str:
    """Running text of a JATS element: skipped subtrees out, citations marked for clean_citations."""
    parts: list[str] = []

    def walk(e: ET.Element) -> None:
        if e.text:
            parts.append(e.text)
        for child in e:
            tag = _local(child.tag)
            if tag == "xref":
                kind = child.get("ref-type", "")
                if kind in _XREF_KEEP:
                    walk(child)
                elif kind in _XREF_CITE:
                    parts.append(_citation(_text(child, _PMC_SKIP)))
            elif tag not in _PMC_SKIP:
                walk(child)
            if child.tail:
                parts.append(child.tail)

    walk(el)
    return clean_citations("".join(parts))


def iter_pmc(path: Path) -> Iterator[Document]:
    """One document per article: title, abstract paragraphs, then body paragraphs (not in tables/figures)."""
    try:
        with _open_binary(path) as f:
            root = ET.parse(f).getroot()
    except (ET.ParseError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise _xml_error(path, e, None) from None
    if _local(root.tag) != "article":
        raise DataError(f"{path}: not a JATS article (root element <{_local(root.tag)}>)")
    paragraphs: list[str] = []

    def add(el: ET.Element) -> None:
        text = normalize(_jats_text(el))
        if text:
            paragraphs.append(text)

    meta = root.find("front/article-meta")
    if meta is not None:
        title = meta.find("title-group/article-title")
        if title is not None:
            add(title)
        for abstract in meta.iterfind("abstract"):
            for p in _paragraphs(abstract):
                add(p)
    body = root.find("body")
    if body is not None:
        for p in _paragraphs(body):
            add(p)
    if not paragraphs:
        raise DataError(f"{path}: empty input (article without title, abstract or body text)")
    yield Document(doc_id=re.sub(r"\.(n?xml)(\.gz)?$", "", path.name), paragraphs=paragraphs)


def _paragraphs(el: ET.Element) -> Iterator[ET.Element]:
    """<p> elements under `el`, not descending into skipped subtrees (a caption's <p> is not prose)."""
    for child in el:
        tag = _local(child.tag)
        if tag in _PMC_SKIP:
            continue
        if tag == "p":
            yield child
        else:
            yield from _paragraphs(child)


def iter_bert_text(path: Path) -> Iterator[Document]:
    """Google BERT format: one sentence per line, a blank line between documents. Decoded line by line so a
    bad byte is reported with its line number."""
    sentences: list[str] = []
    start = 0  # first line of the current document; stays 0 while the file has shown no text
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
                line = normalize(line)
                if line:
                    if not sentences:
                        start = lineno
                    sentences.append(line)
                elif sentences:
                    yield Document(doc_id=f"{path.name}:{start}", paragraphs=sentences, presplit=True)
                    sentences = []
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: truncated or corrupt gzip stream: {e}") from None
    if sentences:
        yield Document(doc_id=f"{path.name}:{start}", paragraphs=sentences, presplit=True)
    elif start == 0:
        raise DataError(f"{path}: empty input (no text lines)")
