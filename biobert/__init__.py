"""BioBERT at scale: the `biobert` command and the core every stage shares (config system, ranks, files, errors)."""

__version__ = "0.2.0"
