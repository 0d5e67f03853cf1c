"""The validation split: a deterministic fraction of the curated documents, held out before mixing.

Documents are ranked by a seeded SHA-256 of their content, and the first ⌈fraction · n⌉ (at least one)
form the validation set. The choice depends only on the documents themselves, not on file order or
the machine. Holding out *before* mixing keeps repeated copies of a training document (mixing with
`max_repeats` > 1) out of validation, and lets validation measure the model on all curated text.
When curation leaves a single document, it is cut at a line boundary instead.
"""

from __future__ import annotations

import math

from lmstack.data.extract import Document
from lmstack.data.mix import doc_order_key
from lmstack.errors import InputError


def split_train_val(
    docs: list[Document], fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """(train, val), each in seeded hash order."""
    if not 0 < fraction < 1:
        raise InputError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    if not docs:
        raise InputError("no documents to split — every document was filtered out")
    if len(docs) == 1:
        return split_single_document(docs[0], fraction)
    ranked = sorted(docs, key=lambda d: doc_order_key(d, seed))
    n_val = min(len(docs) - 1, max(1, math.ceil(fraction * len(docs))))
    return ranked[n_val:], ranked[:n_val]


def split_single_document(doc: Document, fraction: float) -> tuple[list[Document], list[Document]]:
    """Cut one document at the line boundary nearest to (1 - fraction) of its length."""
    text = doc.text
    cut = text.rfind("\n", 0, int(len(text) * (1 - fraction)))
    if cut <= 0:
        cut = int(len(text) * (1 - fraction))
    head, tail = text[:cut].strip(), text[cut:].strip()
    if not head or not tail:
        raise InputError(
            "the curated corpus is a single document too short to hold out a validation split "
            "— give more text"
        )
    return [Document(head, doc.source, doc.origin)], [Document(tail, doc.source, doc.origin + "#val")]
