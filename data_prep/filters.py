"""Per-document decisions: keep or drop (filters), skip (bad input), and train or val (split).

Each dropped document is counted under the first filter that rejects it, each skipped one under
its problem, so the manifest can say exactly where the corpus went. The split is a pure function
of the document (its id, else its text) and a salt: it does not move when the workers, the file
order or the file boundaries change.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from data_prep.config import Filters, SplitRule
from data_prep.sources import DocBatch

FILTER_ORDER = ("min_chars", "language", "int_score")  # the order the filters run in


def needs(filters: Filters) -> frozenset[str]:
    """The document fields the filters read beyond the text."""
    out = set()
    if filters.min_int_score is not None:
        out.add("int_score")
    if filters.languages is not None:
        out.add("language")
    return frozenset(out)


def is_val(key: str, rule: SplitRule) -> bool:
    data = f"{rule.salt}\x00{key}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big") < rule.val_fraction * 2.0**64


def select(batch: DocBatch, filters: Filters, rule: SplitRule, dropped: Counter,
           skipped: Counter) -> tuple[list[str], list[bool]]:
    """The texts of ``batch`` that pass, in order, and whether each goes to ``val``."""
    texts, val = [], []
    langs = set(filters.languages) if filters.languages is not None else None
    for i, text in enumerate(batch.texts):
        if text is None:  # counted by the reader
            continue
        if not text or text.isspace():
            skipped["empty"] += 1
            continue
        if len(text) < filters.min_chars:
            dropped["min_chars"] += 1
            continue
        if langs is not None and batch.languages[i] not in langs:
            dropped["language"] += 1
            continue
        if filters.min_int_score is not None:
            score = batch.int_scores[i]
            if score is None or score < filters.min_int_score:
                dropped["int_score"] += 1
                continue
        key = text
        if rule.key == "id" and batch.ids is not None and batch.ids[i] not in (None, ""):
            key = str(batch.ids[i])
        texts.append(text)
        val.append(is_val(key, rule) if rule.val_fraction > 0 else False)
    return texts, val
