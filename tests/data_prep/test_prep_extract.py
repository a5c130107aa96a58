"""Parsers on the real samples in ../shared/data/corpus and on the bad inputs users hit."""

from __future__ import annotations

import gzip

import pytest
from prep_helpers import article, write_pubmed

from data_prep.extract import DataError, find_inputs, iter_documents


def test_pubmed_sample_gz_streams_all_records(shared_data):
    docs = list(iter_documents(shared_data / "corpus/pubmed/pubmed-sample-0001.xml.gz"))
    assert len(docs) == 2114
    assert docs[0].doc_id == "90000001"
    assert docs[0].paragraphs[0] == "Immunostaining and confocal analysis"
    # entities decoded, whitespace normalised
    assert "(detected at 505 nm < lambdaEGFP < 530 nm)" in docs[0].paragraphs[1]
    assert all(p == " ".join(p.split()) and p for d in docs for p in d.paragraphs)


def test_pubmed_structured_abstract_entities_and_inline_markup(shared_data):
    (doc,) = iter_documents(shared_data / "corpus/pubmed/pubmed-29768149.xml")
    assert doc.doc_id == "29768149"
    title, *sections = doc.paragraphs
    assert title == "Inhaled Combined Budesonide-Formoterol as Needed in Mild Asthma."
    assert [s.split(":")[0] for s in sections] == ["Background", "Methods", "Results", "Conclusions"]
    assert "fast-acting \u03b2 2-agonist" in sections[0]  # &#946; and <sub>2</sub> kept as text
    assert "200 \u03bcg of budesonide" in sections[1]
    assert not any("Author" in p or "MeSH" in p for p in doc.paragraphs)  # metadata is not text


def test_pubmed_delete_citation_and_record_without_abstract(tmp_path):
    records = "\n".join([
        article("1", "Only a title here.", None),
        article("2", "Title <i>with</i> markup", '<AbstractText Label="AIMS">A &amp; B were &#x3b1;-tested.</AbstractText>'),
        "<DeleteCitation><PMID>3</PMID><PMID>4</PMID></DeleteCitation>",
        article("3", "Deleted in this very file.", "<AbstractText>Gone.</AbstractText>"),
    ])
    docs = list(iter_documents(write_pubmed(tmp_path / "pubmed25n0001.xml.gz", records)))
    assert [d.doc_id for d in docs] == ["1", "2"]
    assert docs[0].paragraphs == ["Only a title here."]
    assert docs[1].paragraphs == ["Title with markup", "Aims: A & B were \u03b1-tested."]


def test_pmc_title_abstract_body_without_tables_figures_refs(shared_data):
    (doc,) = iter_documents(shared_data / "corpus/pmc_oa/1471-2180-11-174.nxml")
    text = "\n".join(doc.paragraphs)
    assert doc.paragraphs[0] == "Factors influencing lysis time stochasticity in bacteriophage \u03bb"
    assert doc.paragraphs[1].startswith("Despite identical genotypes and seemingly uniform environments")
    assert len(doc.paragraphs) > 30 and len(text) > 30000
    assert "Schematic presentation of two models of holin hole formation" not in text  # figure caption
    assert "Effects of holin allelic sequences on the stochasticity" not in text  # table caption
    assert "Microbial cell individuality and the underlying sources" not in text  # a reference title
    assert "[]" not in text and "[,]" not in text  # citation markers removed cleanly


def test_pmc_all_samples_parse(shared_data):
    files = find_inputs([shared_data / "corpus/pmc_oa"])
    assert len(files) == 6
    for f in files:
        (doc,) = iter_documents(f)
        assert len(doc.paragraphs) >= 10 and sum(map(len, doc.paragraphs)) > 10000, f


def test_bert_text_documents(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("First sentence.\nSecond  sentence.\n\n\nOther doc.\n", encoding="utf-8")
    docs = list(iter_documents(p))
    assert [d.paragraphs for d in docs] == [["First sentence.", "Second sentence."], ["Other doc."]]
    assert all(d.presplit for d in docs) and docs[1].doc_id == "corpus.txt:5"


def test_truncated_gz_names_file_and_last_record(shared_data, tmp_path):
    data = (shared_data / "corpus/pubmed/pubmed-sample-0001.xml.gz").read_bytes()
    bad = tmp_path / "pubmed-truncated.xml.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"pubmed-truncated\.xml\.gz: truncated or corrupt gzip stream \(after record 9000\d+\)"):
        list(iter_documents(bad))


def test_malformed_xml_names_line(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text('<?xml version="1.0"?>\n<PubmedArticleSet>\n' + article("7", "ok", None) + "\n<PubmedArticle><Oops>\n"
                   "</PubmedArticle>\n</PubmedArticleSet>\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.xml: malformed XML at line 5, column \d+ \(after record 7\)"):
        list(iter_documents(bad))


def test_malformed_nxml(tmp_path):
    bad = tmp_path / "art.nxml"
    bad.write_text("<article><front><article-meta><title-group>\n<article-title>x</title-group>", encoding="utf-8")
    with pytest.raises(DataError, match=r"art\.nxml: malformed XML at line 2"):
        list(iter_documents(bad))


def test_non_utf8_text_names_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Fine line.\n\nCaf\u00e9 au lait.\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: line 3: not valid UTF-8"):
        list(iter_documents(bad))


def test_gz_text_and_empty_or_missing_inputs(tmp_path):
    p = tmp_path / "c.txt.gz"
    p.write_bytes(gzip.compress(b"One.\nTwo.\n"))
    assert [d.paragraphs for d in iter_documents(p)] == [["One.", "Two."]]
    empty = tmp_path / "empty.xml"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.xml"):
        list(iter_documents(empty))
    with pytest.raises(DataError, match="no such file"):
        find_inputs([tmp_path / "nope"])
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no input files"):
        find_inputs([tmp_path / "sub"])


def test_deletion_only_update_file_is_not_an_error(tmp_path):
    p = write_pubmed(tmp_path / "pubmed25n1300.xml.gz", "<DeleteCitation><PMID>1</PMID></DeleteCitation>")
    assert list(iter_documents(p)) == []
    empty_set = write_pubmed(tmp_path / "none.xml", "", gz=False)
    with pytest.raises(DataError, match=r"none\.xml: empty input \(no PubmedArticle"):
        list(iter_documents(empty_set))


def test_jats_article_named_xml_is_read_as_pmc(shared_data, tmp_path):
    src = shared_data / "corpus/pmc_oa/pone.0000217.nxml"
    (tmp_path / "PMC1790863.xml.gz").write_bytes(gzip.compress(src.read_bytes()))
    (doc,) = iter_documents(tmp_path / "PMC1790863.xml.gz")
    (ref,) = iter_documents(src)
    assert doc.paragraphs == ref.paragraphs and doc.doc_id == "PMC1790863"
    assert "Quantifying Organismal Complexity" in doc.paragraphs[0]


def test_jats_formulas_tables_and_citations_inside_paragraphs(tmp_path):
    p = tmp_path / "a.nxml"
    p.write_text(
        '<article xmlns:mml="http://www.w3.org/1998/Math/MathML"><front><article-meta><title-group>'
        "<article-title>A <italic>title</italic></article-title></title-group><abstract><p>Short abstract.</p>"
        "</abstract></article-meta></front><body><sec><title>Intro</title><p>Growth rose [<xref ref-type=\"bibr\">1</xref>,"
        '<xref ref-type="bibr">2</xref>] as <inline-formula><mml:math><mml:mi>x</mml:mi></mml:math></inline-formula> grew:'
        "<disp-formula><mml:math><mml:mi>SECRETFORMULA</mml:mi></mml:math></disp-formula> which holds.</p>"
        "<table-wrap><caption><p>Caption text.</p></caption><table><tr><td>cell</td></tr></table></table-wrap>"
        '<fig id="f1"><caption><p>Figure text.</p></caption></fig></sec></body>'
        "<back><ref-list><ref><mixed-citation>Ref title.</mixed-citation></ref></ref-list></back></article>",
        encoding="utf-8",
    )
    (doc,) = iter_documents(p)
    assert doc.paragraphs == ["A title", "Short abstract.", "Growth rose as grew: which holds."]


def _jats_paragraph(tmp_path, body: str) -> str:
    p = tmp_path / "c.nxml"
    p.write_text(f"<article><front><article-meta/></front><body><p>{body}</p></body></article>", encoding="utf-8")
    (doc,) = iter_documents(p)
    return doc.paragraphs[0]


@pytest.mark.parametrize("body, expected", [
    # PLoS: brackets inside each xref, separators outside (what used to leave "conclusions , .")
    ('lead to conflicting conclusions <xref ref-type="bibr">[2]</xref>, <xref ref-type="bibr">[3]</xref>. Here',
     "lead to conflicting conclusions. Here"),
    ('followed by others <xref ref-type="bibr">[19]</xref>\u2013<xref ref-type="bibr">[22]</xref>.',
     "followed by others."),
    # a comma after the citation belongs to the sentence
    ('beneficial mutations <xref ref-type="bibr">[12]</xref>, the L-shaped distribution',
     "beneficial mutations, the L-shaped distribution"),
    # BMC: brackets outside, xrefs inside
    ('stochasticity [<xref ref-type="bibr">51</xref>,<xref ref-type="bibr">52</xref>].', "stochasticity."),
    # author-year in parentheses goes; figure numbers stay; a citation beside other content leaves the content
    ('similar age (<xref ref-type="bibr">American Cancer Society, 2007</xref>). Next',
     "similar age. Next"),
    ('gland (<xref ref-type="fig">Figure 2</xref>; <italic>p</italic> = 0.0043).', "gland (Figure 2; p = 0.0043)."),
    ('As shown in Figure <xref ref-type="fig">3B</xref>, our data', "As shown in Figure 3B, our data"),
    ('rates (<xref ref-type="bibr">Smith, 2001</xref>; p &lt; 0.01)', "rates (p < 0.01)"),
    ('rates (n = 4; <xref ref-type="bibr">Li 2003</xref>, <xref ref-type="bibr">Wu 2004</xref>)', "rates (n = 4)"),
    # an author-year citation that is the sentence's subject stays; footnote markers go
    ('as <xref ref-type="bibr">Fisher (1930)</xref> showed<xref ref-type="table-fn">a</xref>.',
     "as Fisher (1930) showed."),
    ('superscripts<sup><xref ref-type="bibr">4</xref>,<xref ref-type="bibr">5</xref></sup> too', "superscripts too"),
])
def test_jats_citation_removal_keeps_sentences_whole(tmp_path, body, expected):
    assert _jats_paragraph(tmp_path, body) == expected


def test_real_plos_article_has_no_citation_debris(shared_data):
    """pone.0000217 (PLoS ONE) extracted "conflicting conclusions , ." before citations were removed as runs."""
    import re

    for f in find_inputs([shared_data / "corpus/pmc_oa"]):
        (doc,) = iter_documents(f)
        text = " ".join(doc.paragraphs)
        debris = re.findall(r".{30}(?: [,;]| \.(?!\.)|\( |\[ ?\]|\([,;]).{10}", text)
        assert not debris, (f.name, debris[:3])
    (doc,) = iter_documents(shared_data / "corpus/pmc_oa/pone.0000217.nxml")
    text = " ".join(doc.paragraphs)
    assert "quickly lead to conflicting conclusions. Here we propose" in text
    assert "small-sized beneficial mutations, the L-shaped distribution" in text
    (doc,) = iter_documents(shared_data / "corpus/pmc_oa/1471-2180-11-174.nxml")
    assert "As shown in Figure 3B, our data showed" in " ".join(doc.paragraphs)


def test_gzipped_nxml_reads_like_the_plain_file(shared_data, tmp_path):
    src = shared_data / "corpus/pmc_oa/pone.0000217.nxml"
    (tmp_path / "pone.0000217.nxml.gz").write_bytes(gzip.compress(src.read_bytes()))
    assert find_inputs([tmp_path]) == [tmp_path / "pone.0000217.nxml.gz"]
    (doc,) = iter_documents(tmp_path / "pone.0000217.nxml.gz")
    (ref,) = iter_documents(src)
    assert doc.paragraphs == ref.paragraphs and doc.doc_id == "pone.0000217"
