"""BERT pretraining instances (Google's create_pretraining_data semantics), pure functions of (documents, rng).

Pair creation follows BERT's per-document loop (target length with `short_seq_prob`, random split point,
50% random next sentence from another document, random front/back truncation). Masking is vectorised over a
whole block of instances with numpy: it is the part that runs once per token, so it must cost little next to
the Rust tokenizer. Differences from Google's script, on purpose:
- the random next sentence comes from another document of the same block (thousands of documents), not the
  whole corpus, so memory is bounded by a block;
- [UNK] and other bracketed special tokens are never masked, and the 10% random replacements are real tokens;
- whole-word masking takes words in random order while they fit (words longer than the budget are skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from data_prep.contract import NSP_RANDOM_NEXT

MASK_CHUNK = 1024  # rows masked at a time (part of the definition of the output: it fixes the rng stream)


@dataclass(frozen=True)
class InstanceConfig:
    seq_len: int = 128
    max_predictions: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    random_next_prob: float = 0.5
    whole_word_masking: bool = False
    static_masking: bool = True  # False: dynamic masking, the loader masks each epoch

    def __post_init__(self) -> None:
        if not 8 <= self.seq_len <= 4096:
            raise ValueError(f"seq_len {self.seq_len} out of range [8, 4096]")
        if not 1 <= self.max_predictions <= self.seq_len:
            raise ValueError(f"max_predictions {self.max_predictions} must be in [1, seq_len={self.seq_len}]")
        for name in ("masked_lm_prob", "short_seq_prob", "random_next_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class _Uniforms:
    """Scalar uniforms from `rng`, drawn 4096 at a time: a numpy scalar call costs ~1 us and BERT's loop needs
    several per instance; reading a Python list costs ~50 ns."""

    def __init__(self, rng: np.random.Generator, chunk: int = 4096):
        self.next = chain.from_iterable(iter(lambda: rng.random(chunk).tolist(), None)).__next__

    def __call__(self) -> float:
        return self.next()

    def heads(self, n: int) -> int:
        """How many of n fair coin flips come up heads: bits of a uniform's 52-bit mantissa, 52 at a time."""
        count = 0
        while n > 0:
            k = min(n, 52)
            count += (int(self.next() * (1 << 52)) & ((1 << k) - 1)).bit_count()
            n -= k
        return count

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] inclusive (Python's random.randint convention, as in BERT)."""
        return low + int(self.next() * (high - low + 1))


def create_pairs(documents: list[list[list[int]]], rng: np.random.Generator, cfg: InstanceConfig, cls_id: int, sep_id: int):
    """Sentence pairs from documents (lists of sentences of token ids, none empty).

    Returns (rows, a_lengths, random_next): rows are `[CLS] A [SEP] B [SEP]` id lists, a_lengths the length of
    `[CLS] A [SEP]` (where segment 1 starts), random_next the NSP labels.
    """
    u = _Uniforms(rng)
    uniform, randint = u.next, u.randint
    short_prob, random_prob = cfg.short_seq_prob, cfg.random_next_prob
    max_tokens = cfg.seq_len - 3
    rows: list[list[int]] = []
    a_lengths: list[int] = []
    random_next: list[int] = []
    n_docs = len(documents)
    for doc_index, document in enumerate(documents):
        target = max_tokens
        if uniform() < short_prob:
            target = randint(2, max_tokens)
        chunk: list[list[int]] = []
        length = 0
        i = 0
        n_sent = len(document)
        while i < n_sent:
            sentence = document[i]
            chunk.append(sentence)
            length += len(sentence)
            if length >= target or i == n_sent - 1:
                a_end = randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                tokens_a = list(chain.from_iterable(chunk[:a_end]))
                is_random = len(chunk) == 1 or uniform() < random_prob
                if is_random:
                    target_b = target - len(tokens_a)
                    other = doc_index
                    for _ in range(10):
                        other = randint(0, n_docs - 1)
                        if other != doc_index:
                            break
                    random_doc = documents[other]
                    tokens_b: list[int] = []
                    for j in range(randint(0, len(random_doc) - 1), len(random_doc)):
                        tokens_b.extend(random_doc[j])
                        if len(tokens_b) >= target_b:
                            break
                    i -= len(chunk) - a_end  # the unused segments go back for the next instance
                else:
                    tokens_b = list(chain.from_iterable(chunk[a_end:]))
                a0, a1, b0, b1 = _truncate(len(tokens_a), len(tokens_b), max_tokens, u)
                rows.append([cls_id, *tokens_a[a0:a1], sep_id, *tokens_b[b0:b1], sep_id])
                a_lengths.append(a1 - a0 + 2)
                random_next.append(NSP_RANDOM_NEXT if is_random else 1 - NSP_RANDOM_NEXT)
                chunk, length = [], 0
            i += 1
    return rows, a_lengths, random_next


def _truncate(len_a: int, len_b: int, max_tokens: int, u: _Uniforms) -> tuple[int, int, int, int]:
    """BERT's truncate_seq_pair as index ranges, without its token-by-token loop.

    BERT drops one token at a time from the longer side (from B on a tie), front or back by a coin flip. So the
    longer side first loses the difference, then B and A alternate, B first; each side's front/back split is
    Binomial(removed, 1/2).
    """
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return 0, len_a, 0, len_b
    diff = abs(len_a - len_b)
    first = min(excess, diff)
    rest = excess - first
    cut_a = (first if len_a > len_b else 0) + rest // 2
    cut_b = (first if len_b > len_a else 0) + (rest + 1) // 2
    front_a = u.heads(cut_a) if cut_a else 0
    front_b = u.heads(cut_b) if cut_b else 0
    return front_a, len_a - (cut_a - front_a), front_b, len_b - (cut_b - front_b)


def pad_instances(rows: list[list[int]], a_lengths: list[int], random_next: list[int], seq_len: int) -> dict[str, np.ndarray]:
    """Rows to the NVIDIA arrays: input_ids int32, input_mask/segment_ids int8 [N, seq_len], labels int8 [N]."""
    n = len(rows)
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=n)
    flat = np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    pos = np.arange(seq_len)
    input_mask = pos < lengths[:, None]
    input_ids = np.zeros((n, seq_len), dtype=np.int32)
    input_ids[input_mask] = flat  # boolean assignment fills row-major: row i gets its first lengths[i] slots
    segment_ids = input_mask & (pos >= np.asarray(a_lengths, dtype=np.int64)[:, None])
    return {
        "input_ids": input_ids,
        "input_mask": input_mask.astype(np.int8),
        "segment_ids": segment_ids.astype(np.int8),
        "next_sentence_labels": np.asarray(random_next, dtype=np.int8),
    }


def mask_instances(
    input_ids: np.ndarray,
    input_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    masked_lm_prob: float,
    max_predictions: int,
    is_special: np.ndarray,
    is_continuation: np.ndarray,
    mask_id: int,
    replacement_ids: np.ndarray,
    whole_word_masking: bool = False,
) -> dict[str, np.ndarray]:
    """Static MLM masking of a block, in place on `input_ids`; returns masked_lm_positions/ids [N, P].

    Per row: k = min(P, max(1, round(len * prob))) positions among non-special tokens, sorted ascending, each
    replaced by [MASK] 80%, kept 10%, a random token 10%. Unused slots are position 0 / id 0.
    """
    n, seq_len = input_ids.shape
    pos = np.arange(seq_len)
    lengths = input_mask.sum(axis=1, dtype=np.int64)
    k = np.minimum(max_predictions, np.maximum(1, np.rint(lengths * masked_lm_prob).astype(np.int64)))
    cand = input_mask.astype(bool) & ~is_special[input_ids]
    if whole_word_masking:
        prev_cand = np.zeros_like(cand)
        prev_cand[:, 1:] = cand[:, :-1]
        start = cand & ~(is_continuation[input_ids] & prev_cand)
    else:
        start = cand
    word = np.cumsum(start, axis=1) - 1  # word index of each token (meaningful where cand)
    word = np.maximum(word, 0)
    rows = np.arange(n)[:, None]
    if whole_word_masking:
        size = np.bincount((rows * seq_len + word)[cand], minlength=n * seq_len).reshape(n, seq_len)
        cand &= np.take_along_axis(size, word, axis=1) <= k[:, None]  # a word that can never fit is skipped
    # One random key per word; tokens sort by (word key, position) so a word's pieces stay adjacent.
    word_key = (rng.random((n, seq_len)) * (1 << 40)).astype(np.int64)
    sort_key = np.take_along_axis(word_key, word, axis=1) * 4096 + pos  # seq_len <= 4096: keys stay unique
    sort_key[~cand] = np.iinfo(np.int64).max
    order = np.argsort(sort_key, axis=1)
    cand_sorted = np.take_along_axis(cand, order, axis=1)
    cum = np.cumsum(cand_sorted, axis=1)
    word_sorted = np.take_along_axis(word, order, axis=1)
    is_last = np.ones_like(cand_sorted)
    is_last[:, :-1] = word_sorted[:, :-1] != word_sorted[:, 1:]
    # Count of selected tokens when a token's whole word is in: running minimum from the right of word-end counts.
    big = np.iinfo(np.int64).max
    end_cum = np.minimum.accumulate(np.where(is_last, cum, big)[:, ::-1], axis=1)[:, ::-1]
    chosen_sorted = cand_sorted & (end_cum <= k[:, None])
    chosen = np.zeros_like(cand)
    np.put_along_axis(chosen, order, chosen_sorted, axis=1)

    count = chosen.sum(axis=1)
    slots = np.arange(max_predictions)
    valid = slots < count[:, None]
    # Stable sort of "not chosen" puts the chosen positions first, ascending.
    positions = np.argsort(~chosen, axis=1, kind="stable")[:, :max_predictions]
    positions = np.where(valid, positions, 0).astype(np.int32)
    original = np.take_along_axis(input_ids, positions, axis=1)
    masked_ids = np.where(valid, original, 0).astype(np.int32)

    r = rng.random((n, max_predictions))
    random_tokens = replacement_ids[rng.integers(0, len(replacement_ids), size=(n, max_predictions))]
    new = np.where(r < 0.8, mask_id, np.where(r < 0.9, original, random_tokens)).astype(np.int32)
    ri, si = np.nonzero(valid)
    input_ids[ri, positions[ri, si]] = new[ri, si]
    return {"masked_lm_positions": positions, "masked_lm_ids": masked_ids}


def create_instances(documents: list[list[list[int]]], rng: np.random.Generator, cfg: InstanceConfig, vocab) -> dict[str, np.ndarray]:
    """Instances of one block of documents, in NVIDIA's arrays. `vocab` is a tokenize.WordPiece (ids and token classes)."""
    rows, a_lengths, random_next = create_pairs(documents, rng, cfg, vocab.cls_id, vocab.sep_id)
    arrays = pad_instances(rows, a_lengths, random_next, cfg.seq_len)
    if cfg.static_masking and rows:
        # In row chunks: masking makes ~a dozen int64 [rows, seq_len] temporaries; chunks keep them a few MB.
        parts = [
            mask_instances(
                arrays["input_ids"][lo : lo + MASK_CHUNK],
                arrays["input_mask"][lo : lo + MASK_CHUNK],
                rng,
                masked_lm_prob=cfg.masked_lm_prob,
                max_predictions=cfg.max_predictions,
                is_special=vocab.is_special,
                is_continuation=vocab.is_continuation,
                mask_id=vocab.mask_id,
                replacement_ids=vocab.replacement_ids,
                whole_word_masking=cfg.whole_word_masking,
            )
            for lo in range(0, len(rows), MASK_CHUNK)
        ]
        for name in ("masked_lm_positions", "masked_lm_ids"):
            arrays[name] = np.concatenate([p[name] for p in parts])
    elif cfg.static_masking:
        arrays["masked_lm_positions"] = np.zeros((0, cfg.max_predictions), dtype=np.int32)
        arrays["masked_lm_ids"] = np.zeros((0, cfg.max_predictions), dtype=np.int32)
    return arrays
