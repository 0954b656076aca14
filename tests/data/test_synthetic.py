import re

import numpy as np
import pandas as pd
import pytest

from fedmeta.config import ConfigError
from fedmeta.data.schema import validate
from fedmeta.data.synthetic import (ECOMMERCE_EVENTS, SOCIAL_EVENTS, SyntheticConfig, generate,
                                    ground_truth, scaled, user_groups)

CFG = SyntheticConfig()


@pytest.fixture(scope="module")
def data():
    return generate(CFG)


@pytest.fixture(scope="module")
def truth():
    return ground_truth(CFG)


def _indexed(data, truth, dom):
    """(user index, item index) per interaction row of ``dom``, in row order."""
    t = truth.domains[dom]
    x = data.interactions[data.interactions["domain"] == dom]
    users = x["user"].map({u: k for k, u in enumerate(t.users)}).to_numpy()
    items = x["item"].map({i: k for k, i in enumerate(t.items)}).to_numpy()
    return users, items


def _words(texts):
    return {w for text in texts for w in re.findall(r"[a-z0-9]+", text)}


def test_same_config_same_frames_other_seed_differs(data):
    again = generate(SyntheticConfig())
    pd.testing.assert_frame_equal(data.interactions, again.interactions)
    pd.testing.assert_frame_equal(data.items, again.items)
    other = generate(SyntheticConfig(seed=1))
    assert not data.interactions.equals(other.interactions)
    assert not data.items["text"].equals(other.items["text"])


def test_domain_size_does_not_perturb_the_other_domain(data):
    bigger = generate(SyntheticConfig(ecommerce_users=900))
    soc = data.domain("social")
    pd.testing.assert_frame_equal(soc.interactions, bigger.domain("social").interactions)


def test_schema_valid_and_nothing_dropped(data):
    checked = validate(data, "synthetic")
    assert len(checked.interactions) == len(data.interactions)
    assert set(checked.attribute_columns) == {"category", "brand", "price_bucket", "topic",
                                              "author", "media_type"}
    assert (data.interactions["value"] == 1.0).all()


def test_domains_events_and_attributes(data):
    assert data.domains == ["ecommerce", "social"]
    ev = data.interactions.groupby("domain")["event"].agg(set)
    assert ev["ecommerce"] == set(ECOMMERCE_EVENTS)
    assert ev["social"] == set(SOCIAL_EVENTS)
    items = data.items.set_index("domain")
    ecom, soc = items.loc["ecommerce"], items.loc["social"]
    assert len(ecom) == CFG.ecommerce_items and len(soc) == CFG.social_items
    assert ecom["category"].str.count("/").ge(2).all()
    assert (ecom[["brand", "price_bucket", "text"]] != "").all().all()
    assert set(ecom["price_bucket"]) == {"low", "mid", "high", "premium"}
    assert (soc[["topic", "author", "text"]] != "").all().all()
    assert set(soc["media_type"]) == {"image", "video", "text", "link"}
    assert (ecom[["topic", "author", "media_type"]] == "").all().all()


def test_ecommerce_funnel(data):
    x = data.domain("ecommerce").interactions
    share = x["event"].value_counts(normalize=True)
    assert share["view"] > 0.7 and share["view"] > share["cart"] > share["purchase"] > 0
    for later, earlier in (("purchase", "cart"), ("cart", "view")):
        first_earlier = x[x["event"] == earlier].groupby(["user", "item"])["timestamp"].min()
        rows = x[x["event"] == later]
        before = first_earlier.reindex(pd.MultiIndex.from_frame(rows[["user", "item"]])).to_numpy()
        assert (before < rows["timestamp"].to_numpy()).all(), f"{later} without earlier {earlier}"


def test_popularity_is_power_law():
    flat = generate(SyntheticConfig(popularity_exponent=0.0, ecommerce_users=300, social_users=300))
    for dom in ("ecommerce", "social"):
        shares = []
        for d in (generate(CFG), flat):
            counts = d.domain(dom).interactions["item"].value_counts()
            n_top = getattr(CFG, f"{dom}_items") // 10
            shares.append(counts.iloc[:n_top].sum() / counts.sum())
        assert shares[0] > 0.45, shares
        assert shares[1] < 0.3, shares


def test_long_tailed_lengths_with_cold_users(data):
    for dom in ("ecommerce", "social"):
        n = data.domain(dom).interactions.groupby("user").size()
        n_users = getattr(CFG, f"{dom}_users")
        assert len(n) == n_users
        cold = n[n <= 5]
        assert len(cold) == round(CFG.cold_fraction * n_users) and cold.min() >= 1
        assert set(cold) == {1, 2, 3, 4, 5}
        assert n.max() > 6 * n.median()
        assert abs(n.mean() - CFG.mean_length) < 0.15 * CFG.mean_length


def test_timestamps_increase_per_user_and_users_start_apart(data):
    x = data.interactions
    steps = x.groupby("user", sort=False)["timestamp"].diff().dropna()
    assert (steps >= 1).all()
    starts = x.groupby("user")["timestamp"].min()
    assert starts.nunique() > 0.95 * len(starts)
    assert starts.max() - starts.min() > 200 * 86_400


def test_topic_histograms_recover_true_tastes(data, truth):
    for dom in ("ecommerce", "social"):
        t = truth.domains[dom]
        users, items = _indexed(data, truth, dom)
        hist = np.zeros_like(t.theta)
        np.add.at(hist, users, t.item_topics[items])
        warm = np.bincount(users, minlength=len(t.users)) >= 20
        h, th = hist[warm], t.theta[warm]
        cos = (h * th).sum(1) / np.linalg.norm(h, axis=1) / np.linalg.norm(th, axis=1)
        assert warm.sum() > 200 and cos.mean() > 0.7, cos.mean()
        other = np.roll(th, 1, axis=0)          # someone else's taste: much worse
        cos_other = (h * other).sum(1) / np.linalg.norm(h, axis=1) / np.linalg.norm(other, axis=1)
        assert cos.mean() > cos_other.mean() + 0.3


def _sequential_rates(d, truth, dom, rng):
    t = truth.domains[dom]
    users, items = _indexed(d, truth, dom)
    keep = np.r_[True, (items[1:] != items[:-1]) | (users[1:] != users[:-1])]  # drop funnel repeats
    users, items = users[keep], items[keep]
    shuffled = items[np.lexsort((rng.random(len(items)), users))]

    def rates(seq):
        pair = (users[1:] == users[:-1]) & (seq[1:] != seq[:-1])
        same_topic = t.primary_topic[seq[1:]] == t.primary_topic[seq[:-1]]
        related = (t.related[seq[:-1]] == seq[1:, None]).any(1)
        return same_topic[pair].mean(), related[pair].mean()

    return rates(items), rates(shuffled)


def test_sequence_order_carries_signal(data, truth):
    rng = np.random.default_rng(0)
    for dom in ("ecommerce", "social"):
        (topic, rel), (topic_shuf, rel_shuf) = _sequential_rates(data, truth, dom, rng)
        assert topic > topic_shuf + 0.1 and rel > rel_shuf + 0.1
    cfg = SyntheticConfig(sequential_strength=0.0, ecommerce_users=400, social_users=400)
    (topic, rel), (topic_shuf, rel_shuf) = _sequential_rates(generate(cfg), ground_truth(cfg),
                                                             "social", rng)
    assert abs(topic - topic_shuf) < 0.03 and abs(rel - rel_shuf) < 0.03


def test_heterogeneity_separates_groups():
    spread = []
    for h in (0.0, 1.0):
        t = ground_truth(SyntheticConfig(heterogeneity=h)).domains["ecommerce"]
        means = np.stack([t.theta[t.groups == g].mean(0) for g in np.unique(t.groups)])
        spread.append(np.abs(means - t.theta.mean(0)).sum(1).mean())
    assert spread[1] > 3 * spread[0], spread


def test_user_groups_cover_every_user(data, truth):
    groups = user_groups(CFG)
    assert groups.index.is_unique and set(groups.index) == set(data.interactions["user"])
    assert groups.between(0, CFG.n_groups - 1).all() and groups.nunique() > 1
    t = truth.domains["social"]
    assert (groups.loc[list(t.users)].to_numpy() == t.groups).all()


def test_user_namespaces_are_disjoint(data):
    users = data.interactions.groupby("domain")["user"].agg(set)
    assert all(u.startswith("e") for u in users["ecommerce"])
    assert all(u.startswith("s") for u in users["social"])
    assert not users["ecommerce"] & users["social"]


def test_text_vocabulary_is_shared_across_domains(data, truth):
    items = data.items.set_index(["domain", "item"])["text"]
    shared_per_topic = []
    for topic in range(CFG.n_topics):
        words = []
        for dom in ("ecommerce", "social"):
            t = truth.domains[dom]
            ids = t.items[t.primary_topic == topic]
            words.append(_words(items.loc[dom].loc[ids]))
        shared_per_topic.append(words[0] & words[1])
    assert all(shared_per_topic)
    # a topic's words identify it: most shared words belong to one topic only
    owners = {}
    for topic, words in enumerate(shared_per_topic):
        for w in words:
            owners.setdefault(w, set()).add(topic)
    assert np.mean([len(o) == 1 for o in owners.values()]) > 0.5


def test_ground_truth_matches_frames(data, truth):
    for dom, t in truth.domains.items():
        d = data.domain(dom)
        assert list(d.items["item"]) == list(t.items)
        assert np.allclose(t.theta.sum(1), 1) and np.allclose(t.item_topics.sum(1), 1)
        n = d.interactions.groupby("user").size().reindex(t.users).to_numpy()
        assert (n == t.lengths).all()
    assert len(truth.topic_names) == CFG.n_topics == len(set(truth.topic_names))


def test_more_topics_than_themes_use_modifiers():
    cfg = SyntheticConfig(n_topics=45, ecommerce_users=50, social_users=50)
    d, t = generate(cfg), ground_truth(cfg)
    assert len(set(t.topic_names)) == 45
    soc = d.domain("social").items
    assert soc["topic"].str.contains("/").any()
    assert len(set(soc["topic"])) == 45


@pytest.mark.parametrize("target", [20_000, 150_000])
def test_scaled_hits_target(target):
    cfg = scaled(CFG, target)
    assert cfg.ecommerce_users == pytest.approx(cfg.social_users, abs=1)
    n = len(generate(cfg).interactions)
    assert abs(n - target) <= 0.2 * target, n


@pytest.mark.parametrize("key, value", [("n_topics", 1), ("cold_fraction", 1.0),
                                        ("mean_length", 4.0), ("social_items", 3),
                                        ("heterogeneity", 1.5), ("seed", -1),
                                        ("taste_concentration", 0.0), ("n_groups", "8")])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"data\.synthetic\.{key}"):
        SyntheticConfig(**{key: value})
