"""Item featurisation: attributes and text -> a fixed-width row of token ids, plus ID columns.

Catalogues of different domains (and clients) are disjoint, so what transfers between them is
what an item *is* (category, brand, topic, words of its title). Both featurisers map an item
to at most ``width`` token ids; id 0 is padding and ``BOS_TOKEN`` marks the start-of-sequence
pseudo item, so a user with a single interaction still yields one training target (predict
the first item from nothing).

Within a domain, attributes rarely tell items apart (on implicit-feedback sets most items
share every feature with another one), so two optional ID columns follow the tokens, in
this order: the row of the *shared* item-ID table (:class:`SharedItemIds`, one row per item of
every domain's catalogue, a meta-parameter) and the row of the client's *private* table
(:func:`with_item_ids`, never sent).

Hashing uses ``zlib.crc32`` (stable across processes and machines, unlike ``hash()``), so
every client featurises the same attribute to the same id without sharing a vocabulary.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Mapping

import pandas as pd
import torch

PAD_TOKEN = 0
BOS_TOKEN = 1
_RESERVED = 2
_WORD = re.compile(r"[a-z0-9]+")


def _present(val) -> bool:
    return not (val is None or (isinstance(val, float) and pd.isna(val)) or str(val) == "")


def item_tokens(row: pd.Series, attribute_columns: list[str]) -> list[str]:
    """Symbolic tokens of one item: its identity, the words of its title/text, then
    ``key=value`` per attribute (path prefixes, multi-values).

    The order only matters when a row is cut to the featuriser's width (the encoder pools
    tokens, it does not read their order): the identity comes first so items without
    attributes or text (Instacart products, FilmTrust films) never all look the same, and
    the words come before the attributes because words are what both domains' items share.
    """
    out: list[str] = [f"id={row.get('domain', '')}:{row.get('item', '')}"]
    out.extend(_WORD.findall(str(row.get("text", "") or "").lower()))
    for col in attribute_columns:
        val = row.get(col)
        if not _present(val):
            continue
        for part in str(val).split("|"):
            pieces = part.strip().split("/")
            for depth in range(1, len(pieces) + 1):
                out.append(f"{col}={'/'.join(pieces[:depth]).lower()}")
    return out


def item_text(row: pd.Series, attribute_columns: list[str]) -> str:
    """Plain-language rendering for a pretrained tokenizer: the title/text first, then each
    attribute as words ("genre animation", the deepest level of a path only), then the item
    id, which only fills space the rest leaves (it means nothing to a pretrained vocabulary
    but keeps attribute-less items apart)."""
    parts = [str(row.get("text", "") or "").strip()]
    for col in attribute_columns:
        val = row.get(col)
        if not _present(val):
            continue
        values = [v.strip().replace("/", " ") for v in str(val).split("|") if v.strip()]
        parts.append(f"{col.replace('_', ' ')} {' '.join(values)}")
    parts.append(str(row.get("item", "")))
    return " ".join(p for p in parts if p)


class HashFeaturizer:
    """Hashes symbolic tokens into ``vocab_size`` buckets (ids >= 2)."""

    def __init__(self, vocab_size: int, width: int):
        if vocab_size <= _RESERVED:
            raise ValueError(f"vocab_size must be > {_RESERVED}, got {vocab_size}")
        self.vocab_size, self.width = vocab_size, width

    def ids(self, tokens: list[str]) -> list[int]:
        span = self.vocab_size - _RESERVED
        return [_RESERVED + zlib.crc32(t.encode()) % span for t in tokens[: self.width]]

    def encode(self, row: pd.Series, attribute_columns: list[str]) -> list[int]:
        return self.ids(item_tokens(row, attribute_columns))


class TokenizerFeaturizer:
    """Uses a Hugging Face tokenizer's vocabulary, so a pretrained text encoder's embeddings apply.

    The tokenizer reads :func:`item_text`, words rather than our ``key=value`` symbols, with
    the title first: rendered symbols would spend the width on word pieces of ids and keys
    and cut the title off.
    """

    def __init__(self, tokenizer, width: int):
        self.tok, self.width = tokenizer, width
        self.vocab_size = tokenizer.vocab_size

    def ids(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False, truncation=True,
                       max_length=self.width)["input_ids"]
        # shift the tokenizer's own pad/special ids out of our reserved range
        return [i if i >= _RESERVED else _RESERVED for i in ids]

    def encode(self, row: pd.Series, attribute_columns: list[str]) -> list[int]:
        return self.ids(item_text(row, attribute_columns))


def featurize_items(items: pd.DataFrame, featurizer, attribute_columns: list[str]) -> torch.Tensor:
    """Token-id matrix ``(len(items) + 2, width)``: rows follow ``items``; the last two rows are
    the padding item (all zeros) and the BOS pseudo item."""
    width = featurizer.width
    rows = torch.zeros(len(items) + 2, width, dtype=torch.long)
    for i, (_, row) in enumerate(items.iterrows()):
        ids = featurizer.encode(row, attribute_columns) or [_RESERVED]
        rows[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    rows[len(items) + 1, 0] = BOS_TOKEN
    return rows


@dataclass(frozen=True)
class SharedItemIds:
    """Where each domain's items sit in the shared item-ID table.

    Row 0 means "no item" (padding, BOS) and never moves; domains follow in sorted name
    order, each taking one row per catalogue item, so every process that knows the
    catalogue sizes (public: the federation manifest lists them) derives the same layout,
    and the table is ``rows`` long: ``build_model(..., item_rows=layout.rows)``.
    """

    offsets: Mapping[str, int]
    sizes: Mapping[str, int]

    @classmethod
    def for_catalogues(cls, sizes: Mapping[str, int]) -> "SharedItemIds":
        offsets, start = {}, 1
        for domain in sorted(sizes):
            if int(sizes[domain]) < 0:
                raise ValueError(f"catalogue size of {domain!r} must be >= 0, got {sizes[domain]}")
            offsets[domain], start = start, start + int(sizes[domain])
        return cls(offsets, {d: int(n) for d, n in sizes.items()})

    @property
    def rows(self) -> int:
        return 1 + sum(self.sizes.values())

    def with_ids(self, feats: torch.Tensor, domain: str) -> torch.Tensor:
        """Append the shared-ID column to ``featurize_items`` output (before any private column):
        item r of ``domain`` gets ``offset + r``, PAD and BOS get 0."""
        if domain not in self.offsets:
            raise ValueError(f"domain {domain!r} is not in the shared item-ID layout "
                             f"(domains: {sorted(self.offsets)})")
        n_items = feats.shape[0] - 2
        if n_items != self.sizes[domain]:
            raise ValueError(f"domain {domain!r}: {n_items} catalogue rows, but the shared "
                             f"item-ID layout was sized for {self.sizes[domain]}")
        ids = torch.zeros(feats.shape[0], 1, dtype=feats.dtype)
        ids[:n_items, 0] = torch.arange(self.offsets[domain], self.offsets[domain] + n_items)
        return torch.cat([feats, ids], dim=1)


def with_item_ids(feats: torch.Tensor) -> torch.Tensor:
    """Append the client-local item-ID column read by the private item table (always last).

    Row r (items, then PAD, then BOS) gets id r + 1; the PAD row gets 0, so padding never
    touches the table. Ids are positions in the domain's catalogue, which every client of the
    domain shares, but each client trains its own table.
    """
    n_rows = feats.shape[0]
    ids = torch.arange(1, n_rows + 1, dtype=feats.dtype)
    ids[n_rows - 2] = 0
    return torch.cat([feats, ids.unsqueeze(1)], dim=1)
