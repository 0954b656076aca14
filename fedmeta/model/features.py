"""Item featurisation: attributes and text -> a fixed-width row of token ids.

Catalogues of different domains (and clients) are disjoint, so an item can only be
represented through what it *is* (category, brand, topic, words of its title), never by a
global ID. Both featurisers map an item to at most ``width`` token ids; id 0 is padding and
``BOS_TOKEN`` marks the start-of-sequence pseudo item, so a user with a single interaction
still yields one training target (predict the first item from nothing).

Hashing uses ``zlib.crc32`` (stable across processes and machines, unlike ``hash()``), so
every client featurises the same attribute to the same id without sharing a vocabulary.
"""

from __future__ import annotations

import re
import zlib

import pandas as pd
import torch

PAD_TOKEN = 0
BOS_TOKEN = 1
_RESERVED = 2
_WORD = re.compile(r"[a-z0-9]+")


def item_tokens(row: pd.Series, attribute_columns: list[str]) -> list[str]:
    """Symbolic tokens of one item: its identity, ``key=value`` per attribute (path prefixes,
    multi-values), then the words of its text.

    The identity token comes first so truncation never drops it: items without attributes or
    text (Instacart products, FilmTrust films) would otherwise all look the same.
    """
    out: list[str] = [f"id={row.get('domain', '')}:{row.get('item', '')}"]
    for col in attribute_columns:
        val = row.get(col)
        if val is None or (isinstance(val, float) and pd.isna(val)) or str(val) == "":
            continue
        for part in str(val).split("|"):
            pieces = part.strip().split("/")
            for depth in range(1, len(pieces) + 1):
                out.append(f"{col}={'/'.join(pieces[:depth]).lower()}")
    out.extend(_WORD.findall(str(row.get("text", "")).lower()))
    return out


class HashFeaturizer:
    """Hashes symbolic tokens into ``vocab_size`` buckets (ids >= 2)."""

    def __init__(self, vocab_size: int, width: int):
        if vocab_size <= _RESERVED:
            raise ValueError(f"vocab_size must be > {_RESERVED}, got {vocab_size}")
        self.vocab_size, self.width = vocab_size, width

    def ids(self, tokens: list[str]) -> list[int]:
        span = self.vocab_size - _RESERVED
        return [_RESERVED + zlib.crc32(t.encode()) % span for t in tokens[: self.width]]


class TokenizerFeaturizer:
    """Uses a Hugging Face tokenizer's vocabulary, so a pretrained text encoder's embeddings apply.

    Attribute tokens are rendered as words ("category electronics audio") because the
    pretrained vocabulary knows words, not our ``key=value`` symbols.
    """

    def __init__(self, tokenizer, width: int):
        self.tok, self.width = tokenizer, width
        self.vocab_size = tokenizer.vocab_size

    def ids(self, tokens: list[str]) -> list[int]:
        text = " ".join(t.replace("=", " ").replace("/", " ") for t in tokens)
        ids = self.tok(text, add_special_tokens=False, truncation=True,
                       max_length=self.width)["input_ids"]
        # shift the tokenizer's own pad/special ids out of our reserved range
        return [i if i >= _RESERVED else _RESERVED for i in ids]


def featurize_items(items: pd.DataFrame, featurizer, attribute_columns: list[str]) -> torch.Tensor:
    """Token-id matrix ``(len(items) + 2, width)``: rows follow ``items``; the last two rows are
    the padding item (all zeros) and the BOS pseudo item."""
    width = featurizer.width
    rows = torch.zeros(len(items) + 2, width, dtype=torch.long)
    for i, (_, row) in enumerate(items.iterrows()):
        ids = featurizer.ids(item_tokens(row, attribute_columns)) or [_RESERVED]
        rows[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    rows[len(items) + 1, 0] = BOS_TOKEN
    return rows


def with_item_ids(feats: torch.Tensor) -> torch.Tensor:
    """Append the client-local item-ID column read by the private item table.

    Row r (items, then PAD, then BOS) gets id r + 1; the PAD row gets 0, so padding never
    touches the table. Ids are positions in the domain's catalogue, which every client of the
    domain shares, but each client trains its own table.
    """
    n_rows = feats.shape[0]
    ids = torch.arange(1, n_rows + 1, dtype=feats.dtype)
    ids[n_rows - 2] = 0
    return torch.cat([feats, ids.unsqueeze(1)], dim=1)
