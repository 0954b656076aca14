"""Item featurisation is stable, shared across processes, and distinguishes items."""

import pandas as pd
import torch

from fedmeta.model.features import BOS_TOKEN, HashFeaturizer, featurize_items, item_tokens


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
