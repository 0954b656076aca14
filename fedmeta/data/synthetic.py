"""Seeded synthetic cross-domain data: the default dataset, with a known ground truth.

Real data with disjoint user sets but shared semantics across organisations is rare, and it
never comes with the truth. This generator has both, so tests can check that user tastes
are recoverable from interactions, and benchmarks can scale the data at will.

Generative model
----------------
World (shared by every domain)
    ``n_topics`` latent topics. Topic *t* is a theme (running, audio, coffee, ...), with a
    modifier ("kids", "pro", ...) once there are more topics than themes. Each theme owns a
    list of words that appear in item text of *both* domains ("trail running shoes" in
    e-commerce, "marathon running tips" in social). That shared vocabulary is the only thing
    that links the disjoint catalogues, so it is what cross-domain transfer can learn from.
    ``n_groups`` user groups (think regions) each have a topic prior
    ``m_g = (1 - h) * uniform + h * g_g`` with ``g_g ~ Dir(0.5)`` and ``h = heterogeneity``;
    group sizes are ``Dir(2)``. Groups are shared by domains, so a region likes the same
    topics in every organisation, which is what makes group-aware partitions non-IID.
Users (per domain; ids ``e<i>`` / ``s<i>``, disjoint across domains)
    group ``g_u``; topic mixture ``theta_u ~ Dir(taste_concentration * n_topics * m_{g_u})``.
    Exactly ``round(cold_fraction * n)`` users get 1-5 interactions; the others get
    ``6 + LogNormal(sigma=1)`` so that the overall mean is about ``mean_length``.
Items (per domain)
    a primary topic (every topic gets at least one item) and, for 30% of items, a secondary
    one (topic vector 0.7 / 0.3); popularity ``w_i ~ rank^-popularity_exponent`` over a random
    ranking; three *related* items of the same primary topic (popularity-weighted, not itself
    when the topic has other items), which is an item-level sequential signal.
Sequences
    step 1: ``z ~ theta_u``, item ``~ P(i | z)`` which is proportional to ``w_i * v_i[z]``.
    step k: with probability ``sequential_strength`` the user *continues*: half of the time
    they move to a related item of the previous one, otherwise ``z_k = z_{k-1}`` and a new
    item is drawn from ``P(i | z_k)``; else a fresh ``z ~ theta_u``. Fresh topics are drawn
    from ``theta_u`` and persist for a geometric time, so the topic chain's stationary law is
    ``theta_u``: a user's topic histogram estimates ``theta_u``, and the order of the
    sequence carries signal that a bag-of-items model cannot use.
Events
    ``ecommerce``: every step is a ``view``; 12% are followed by a ``cart`` of the same item,
    and a cart by a ``purchase`` with a probability falling with the price bucket.
    ``social``: one of like / comment / share / follow (0.72 / 0.13 / 0.10 / 0.05).
    Rows are cut to exactly the user's length. ``value`` is 1.0 (implicit feedback).
Timestamps
    each user starts at a random second of 2023; views are 1 min (same session, 75%) or about
    a day (new session) apart, cart/purchase follow their view within minutes; integer
    seconds, strictly increasing per user.

Determinism: one ``numpy`` ``SeedSequence(seed)`` is spawned into independent streams (world,
and per domain users / items / attributes / events), so the same config always gives the same
frames, and changing one domain's size leaves the other domain untouched.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedmeta.config import ConfigError
from fedmeta.data.schema import InteractionData

log = logging.getLogger(__name__)

DOMAINS = ("ecommerce", "social")
ECOMMERCE_EVENTS = ("view", "cart", "purchase")
SOCIAL_EVENTS = ("like", "comment", "share", "follow")
_SOCIAL_P = (0.72, 0.13, 0.10, 0.05)
_CART_P = 0.12
_BUY_P = np.array([0.6, 0.5, 0.35, 0.25])          # per price bucket, given a cart
_SECONDARY_P = 0.3
_N_RELATED = 3
_T0 = 1_672_531_200.0                                # 2023-01-01T00:00:00Z
_YEAR = 365 * 86_400.0
_MIN_WARM = 6

# theme|department|product nouns|topic words (used in the text of both domains)
_THEME_TABLE = """
running|sports|shoes socks shorts vest|running trail marathon jogging pace stride
audio|electronics|headphones earbuds speaker soundbar|wireless noise cancelling bass music hifi
coffee|kitchen|grinder kettle mug press|coffee espresso brew barista roast latte
fashion|clothing|dress jacket sneakers handbag|style streetwear outfit denim trendy chic
gaming|electronics|controller keyboard headset mouse|gaming console esports multiplayer retro arcade
gardening|home|planter seeds shears hose|garden plants flowers soil succulent bloom
beauty|beauty|serum lipstick moisturiser palette|skincare makeup glow routine hydrating matte
hiking|outdoors|backpack boots tent poles|hiking mountain camping summit trek wild
books|media|novel paperback boxset bookmark|reading fantasy mystery chapter literature thriller
pets|pets|leash kibble bed toy|dog puppy cat grooming adoption paws
photography|electronics|camera lens tripod filter|photo portrait zoom shutter landscape aperture
fitness|sports|dumbbells kettlebell bench bands|workout strength gym muscle cardio hiit
cooking|kitchen|pan knife skillet cookbook|recipe chef baking spicy homemade dinner
travel|luggage|suitcase pillow adapter organiser|travel trip flight adventure passport wanderlust
baby|kids|stroller onesie bottle blanket|baby newborn parenting toddler nursery lullaby
cycling|sports|helmet gloves jersey lights|cycling bike road gravel pedal saddle
instruments|music|guitar ukulele strings amp|guitar chords acoustic band song melody
yoga|sports|mat blocks leggings strap|yoga mindful stretch meditation calm breath
fishing|outdoors|rod reel lure tackle|fishing lake catch bait angler river
decor|home|lamp rug cushion vase|decor cozy interior minimalist scandi boho
"""
_THEMES = {row[0]: tuple(row[1:]) for row in
           ([c.strip() for c in line.split("|")] for line in _THEME_TABLE.strip().splitlines())}
_MODIFIERS = ("pro", "kids", "eco", "budget", "luxury", "smart", "compact", "classic")
MAX_TOPICS = len(_THEMES) * (1 + len(_MODIFIERS))
_SOCIAL_NOUNS = "tips review tutorial highlights thoughts challenge vlog guide haul story".split()
_MEDIA = ("image", "video", "text", "link")
_PRICE = ("low", "mid", "high", "premium")
_BRAND_A = "zen kal mor vex lum tor bri cas del fen gor hal".split()
_BRAND_B = "tra ico ora ex ium ova ark ent ix ura".split()
_BRANDS_PER_TOPIC = 4


@dataclass
class SyntheticConfig:
    seed: int = 0
    n_topics: int = 16              # shared latent topic space across domains
    ecommerce_users: int = 800
    social_users: int = 800
    ecommerce_items: int = 600
    social_items: int = 600
    mean_length: float = 30.0       # mean interactions per user (cold users included)
    cold_fraction: float = 0.15     # users with only 1-5 interactions
    popularity_exponent: float = 1.1  # Zipf exponent of item popularity
    taste_concentration: float = 0.3  # per-topic Dirichlet concentration (small = focused users)
    heterogeneity: float = 0.5      # 0 = one topic prior for all; 1 = group-specific priors
    n_groups: int = 8               # user groups (regions) partitioners can split on
    sequential_strength: float = 0.5  # probability a step continues the previous one

    def __post_init__(self):
        def need(key, ok, why):
            try:
                good = bool(ok())
            except (TypeError, ValueError):    # e.g. a string where a number belongs
                good = False
            if not good:
                raise ConfigError(
                    f"data.synthetic.{key}: {getattr(self, key)!r} is invalid ({why})")

        need("seed", lambda: int(self.seed) == self.seed >= 0, "must be an integer >= 0")
        need("n_topics", lambda: 2 <= self.n_topics <= MAX_TOPICS, f"must be in [2, {MAX_TOPICS}]")
        for dom in DOMAINS:
            need(f"{dom}_users", lambda: getattr(self, f"{dom}_users") >= 1, "must be >= 1")
            need(f"{dom}_items", lambda: getattr(self, f"{dom}_items") >= self.n_topics,
                 f"must be >= n_topics ({self.n_topics}) so every topic has an item")
        need("cold_fraction", lambda: 0 <= self.cold_fraction < 1, "must be in [0, 1)")
        low = (_MIN_WARM + 1) * (1 - self.cold_fraction) + 3 * self.cold_fraction
        need("mean_length", lambda: self.mean_length >= low,
             f"must be >= {low:.2f} so warm users have more interactions than cold ones (1-5)")
        need("popularity_exponent", lambda: self.popularity_exponent >= 0, "must be >= 0")
        need("taste_concentration", lambda: self.taste_concentration > 0, "must be > 0")
        need("heterogeneity", lambda: 0 <= self.heterogeneity <= 1, "must be in [0, 1]")
        need("n_groups", lambda: self.n_groups >= 1, "must be >= 1")
        need("sequential_strength", lambda: 0 <= self.sequential_strength < 1,
             "must be in [0, 1)")


@dataclass
class DomainTruth:
    """Latent variables of one domain; rows align with ``users`` / ``items``."""

    users: np.ndarray            # (U,) ids
    groups: np.ndarray           # (U,) group index
    theta: np.ndarray            # (U, T) topic mixtures, rows sum to 1
    lengths: np.ndarray          # (U,) number of interactions
    items: np.ndarray            # (I,) ids
    item_topics: np.ndarray      # (I, T) topic vectors, rows sum to 1
    primary_topic: np.ndarray    # (I,)
    secondary_topic: np.ndarray  # (I,), -1 when none
    popularity: np.ndarray       # (I,) normalised weights
    related: np.ndarray          # (I, 3) item indices


@dataclass
class SyntheticTruth:
    topic_names: list[str]
    group_sizes: np.ndarray      # (G,)
    group_priors: np.ndarray     # (G, T)
    domains: dict[str, DomainTruth]


def _streams(seed: int) -> dict[str, np.random.Generator]:
    names = ["world"] + [f"{d}/{p}" for d in DOMAINS for p in ("users", "items", "attrs", "events")]
    names.append("vocabulary")
    kids = np.random.SeedSequence(int(seed)).spawn(len(names))
    return {n: np.random.default_rng(k) for n, k in zip(names, kids)}


def _topics(n_topics: int) -> list[tuple[str, str]]:
    themes = list(_THEMES)
    return [(themes[t % len(themes)], "" if t < len(themes) else _MODIFIERS[t // len(themes) - 1])
            for t in range(n_topics)]


def _sample_rows(weights: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per entry of ``rows`` from ``weights[row]``, all at once.

    Each row's CDF is shifted by its row index, so a single ``searchsorted`` over the
    flattened table serves every row.
    """
    n_rows, n_cols = weights.shape
    cdf = np.cumsum(weights, axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    flat = (cdf + np.arange(n_rows)[:, None]).ravel()
    idx = np.searchsorted(flat, rows + rng.random(len(rows)), side="right") - rows * n_cols
    return np.clip(idx, 0, n_cols - 1)


def _users(cfg: SyntheticConfig, rng, n: int, prefix: str, sizes, priors):
    groups = rng.choice(len(sizes), size=n, p=sizes)
    alpha = cfg.taste_concentration * cfg.n_topics * priors[groups]
    g = rng.standard_gamma(alpha)
    empty = g.sum(1) == 0                      # all shapes tiny: every gamma underflowed
    g[empty, alpha[empty].argmax(1)] = 1.0
    theta = g / g.sum(1, keepdims=True)
    c = cfg.cold_fraction
    warm_mean = (cfg.mean_length - 3 * c) / (1 - c)
    sigma = 1.0
    mu = np.log(warm_mean - _MIN_WARM) - sigma ** 2 / 2
    lengths = _MIN_WARM + np.round(rng.lognormal(mu, sigma, n)).astype(np.int64)
    lengths = np.minimum(lengths, int(25 * warm_mean))
    cold = rng.permutation(n)[: int(round(c * n))]
    lengths[cold] = rng.integers(1, _MIN_WARM, len(cold))
    ids = np.array([f"{prefix}{i}" for i in range(n)], dtype=object)
    return ids, groups, theta, lengths


def _items(cfg: SyntheticConfig, rng, n: int, prefix: str):
    n_topics = cfg.n_topics
    primary = np.concatenate([rng.permutation(n_topics), rng.integers(0, n_topics, n - n_topics)])
    rng.shuffle(primary)
    has_sec = rng.random(n) < _SECONDARY_P
    secondary = np.where(has_sec, (primary + rng.integers(1, n_topics, n)) % n_topics, -1)
    vec = np.zeros((n, n_topics))
    vec[np.arange(n), primary] = 1.0
    vec[has_sec, primary[has_sec]] = 1 - _SECONDARY_P
    vec[has_sec, secondary[has_sec]] = _SECONDARY_P
    pop = (rng.permutation(n) + 1.0) ** -cfg.popularity_exponent
    pop /= pop.sum()
    same = np.zeros((n_topics, n))
    same[primary, np.arange(n)] = pop
    rows = np.repeat(primary, _N_RELATED)
    related = _sample_rows(same, rows, rng)
    owner = np.repeat(np.arange(n), _N_RELATED)
    for _ in range(8):                         # prefer other items: repeats are de-duplicated later
        self_loop = np.flatnonzero(related == owner)
        if not len(self_loop):
            break
        related[self_loop] = _sample_rows(same, rows[self_loop], rng)
    ids = np.array([f"{prefix}{i}" for i in range(n)], dtype=object)
    return ids, vec, primary, secondary, pop, related.reshape(n, _N_RELATED)


def ground_truth(cfg: SyntheticConfig) -> SyntheticTruth:
    """Every latent variable behind :func:`generate` for the same config."""
    rng = _streams(cfg.seed)
    world = rng["world"]
    sizes = world.dirichlet(np.full(cfg.n_groups, 2.0))
    peaks = world.dirichlet(np.full(cfg.n_topics, 0.5), size=cfg.n_groups)
    priors = (1 - cfg.heterogeneity) / cfg.n_topics + cfg.heterogeneity * peaks
    priors = np.maximum(priors, 1e-3)
    priors /= priors.sum(1, keepdims=True)
    domains = {}
    for dom, user_prefix, item_prefix in (("ecommerce", "e", "prod"), ("social", "s", "post")):
        users = _users(cfg, rng[f"{dom}/users"], getattr(cfg, f"{dom}_users"), user_prefix,
                       sizes, priors)
        items = _items(cfg, rng[f"{dom}/items"], getattr(cfg, f"{dom}_items"), item_prefix)
        domains[dom] = DomainTruth(*users, *items)
    names = [f"{mod} {theme}" if mod else theme for theme, mod in _topics(cfg.n_topics)]
    return SyntheticTruth(names, sizes, priors, domains)


def user_groups(cfg: SyntheticConfig) -> pd.Series:
    """Group (region) of every user of every domain, indexed by user id."""
    truth = ground_truth(cfg)
    ids = np.concatenate([d.users for d in truth.domains.values()])
    groups = np.concatenate([d.groups for d in truth.domains.values()])
    return pd.Series(groups, index=pd.Index(ids, name="user"), name="group")


def _steps(cfg: SyntheticConfig, t: DomainTruth, rng) -> tuple[np.ndarray, np.ndarray]:
    """Per-step (user index, item index), users in order, each user's steps in time order."""
    n = int(t.lengths.sum())
    user = np.repeat(np.arange(len(t.users)), t.lengths)
    first = np.zeros(n, dtype=bool)
    first[np.cumsum(t.lengths) - t.lengths] = True
    pos = np.arange(n)
    r = rng.random(n)
    cont = (r < cfg.sequential_strength) & ~first
    jump = cont & (r < cfg.sequential_strength / 2)
    fresh = _sample_rows(t.theta, user, rng)
    topic = fresh[np.maximum.accumulate(np.where(cont, 0, pos))]
    by_topic = (t.item_topics * t.popularity[:, None]).T
    items = _sample_rows(by_topic, topic, rng)
    which = rng.integers(0, _N_RELATED, n)
    at = np.flatnonzero(jump)
    depth = (pos - np.maximum.accumulate(np.where(jump, 0, pos)))[at]
    for d in range(1, int(depth.max(initial=0)) + 1):   # chains of jumps resolve in order
        k = at[depth == d]
        items[k] = t.related[items[k - 1], which[k]]
    return user, items


def _rows(cfg, dom: str, t: DomainTruth, price: np.ndarray | None, rng) -> pd.DataFrame:
    """Steps -> event rows (funnel or social reaction), cut to each user's length, timed."""
    user, items = _steps(cfg, t, rng)
    n = len(user)
    if dom == "ecommerce":
        cart = rng.random(n) < _CART_P
        buy = cart & (rng.random(n) < _BUY_P[price[items]])
        reps = 1 + cart.astype(np.int64) + buy
        step = np.repeat(np.arange(n), reps)
        code = np.arange(len(step)) - np.repeat(np.cumsum(reps) - reps, reps)
        names = np.array(ECOMMERCE_EVENTS, dtype=object)
    else:
        step = np.arange(n)
        code = rng.choice(len(SOCIAL_EVENTS), size=n, p=_SOCIAL_P)
        names = np.array(SOCIAL_EVENTS, dtype=object)
    row_user = user[step]
    counts = np.bincount(row_user, minlength=len(t.users))
    starts = np.cumsum(counts) - counts
    keep = np.arange(len(step)) - starts[row_user] < t.lengths[row_user]
    step, code, row_user = step[keep], code[keep], row_user[keep]
    m = len(step)
    gaps = np.where(rng.random(m) < 0.75, rng.lognormal(np.log(60.0), 1.0, m),
                    rng.lognormal(np.log(86_400.0), 1.2, m))
    if dom == "ecommerce":                     # cart / purchase shortly after their view
        gaps = np.where(code == 1, rng.uniform(5, 180, m), gaps)
        gaps = np.where(code == 2, rng.uniform(20, 900, m), gaps)
    gaps = np.maximum(1.0, np.round(gaps))
    first = np.cumsum(t.lengths) - t.lengths
    gaps[first] = 0.0
    clock = np.cumsum(gaps)
    start = _T0 + np.round(rng.uniform(0, _YEAR, len(t.users)))
    ts = start[row_user] + clock - clock[first][row_user]
    return pd.DataFrame({"user": t.users[row_user], "item": t.items[items[step]], "timestamp": ts,
                         "event": names[code], "value": 1.0, "domain": dom})


def _words(rng, topic: tuple[str, str], k: int) -> list[str]:
    theme, mod = topic
    return ([mod] if mod else []) + list(rng.choice(_THEMES[theme][2].split(), k, replace=False))


def _ecommerce_items(cfg, t: DomainTruth, world, rng) -> tuple[pd.DataFrame, np.ndarray]:
    """Products: category path from the topic, brand, price bucket, title of topic words."""
    topics, n = _topics(cfg.n_topics), len(t.items)
    price = np.clip(world["price_level"][t.primary_topic] + rng.integers(-1, 2, n),
                    0, len(_PRICE) - 1)
    brand = world["brands"][t.primary_topic, rng.integers(0, _BRANDS_PER_TOPIC, n)]
    text, category = [], []
    for p, s in zip(t.primary_topic, t.secondary_topic):
        theme, mod = topics[p]
        noun = rng.choice(_THEMES[theme][1].split())
        words = _words(rng, topics[p], 2) + (_words(rng, (topics[s][0], ""), 1) if s >= 0 else [])
        text.append(" ".join(words + [noun]))
        category.append("/".join([_THEMES[theme][0], theme] + ([mod] if mod else []) + [noun]))
    frame = pd.DataFrame({"item": t.items, "domain": "ecommerce", "text": text,
                          "category": category, "brand": brand,
                          "price_bucket": np.array(_PRICE, dtype=object)[price]})
    return frame, price


def _social_items(cfg, t: DomainTruth, world, rng) -> pd.DataFrame:
    """Posts: topic label, an author who mostly posts on one topic, media type, short text."""
    topics, n_topics, p = _topics(cfg.n_topics), cfg.n_topics, t.primary_topic
    n_authors = max(n_topics, len(t.items) // 10)
    speciality = np.concatenate([np.arange(n_topics),
                                 rng.integers(0, n_topics, n_authors - n_topics)])
    order = np.argsort(speciality, kind="stable")
    per_topic = np.bincount(speciality, minlength=n_topics)
    offset = np.cumsum(per_topic) - per_topic
    specialist = order[offset[p] + (rng.random(len(p)) * per_topic[p]).astype(np.int64)]
    author = np.where(rng.random(len(p)) < 0.85, specialist, rng.integers(0, n_authors, len(p)))
    media = _sample_rows(world["media"], p, rng)
    text, label = [], []
    for p_i, s in zip(p, t.secondary_topic):
        theme, mod = topics[p_i]
        words = _words(rng, topics[p_i], int(rng.integers(2, 4)))
        words += _words(rng, (topics[s][0], ""), 1) if s >= 0 else []
        words.insert(int(rng.integers(1, len(words) + 1)), str(rng.choice(_SOCIAL_NOUNS)))
        text.append(" ".join(words))
        label.append(f"{theme}/{mod}" if mod else theme)
    return pd.DataFrame({"item": t.items, "domain": "social", "text": text, "topic": label,
                         "author": [f"creator{a}" for a in author],
                         "media_type": np.array(_MEDIA, dtype=object)[media]})


def _world_attributes(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Per-topic brands, price level and media mix, shared by the domains' catalogues."""
    rng = _streams(cfg.seed)["vocabulary"]
    n_topics = cfg.n_topics
    combos = np.array([a + b for a in _BRAND_A for b in _BRAND_B], dtype=object)
    need = n_topics * _BRANDS_PER_TOPIC
    pick = rng.permutation(max(need, len(combos)))[:need]
    names = [combos[k % len(combos)] + (str(k // len(combos)) if k >= len(combos) else "")
             for k in pick]
    brands = np.array(names, dtype=object).reshape(n_topics, _BRANDS_PER_TOPIC)
    return {"brands": brands, "price_level": rng.integers(0, len(_PRICE), n_topics),
            "media": rng.dirichlet(np.full(len(_MEDIA), 2.0), size=n_topics)}


def generate(cfg: SyntheticConfig) -> InteractionData:
    """Both domains' interactions and catalogues for ``cfg`` (same config, same frames)."""
    truth = ground_truth(cfg)
    rng = _streams(cfg.seed)
    world = _world_attributes(cfg)
    parts = []
    for dom, t in truth.domains.items():
        if dom == "ecommerce":
            items, price = _ecommerce_items(cfg, t, world, rng[f"{dom}/attrs"])
        else:
            items, price = _social_items(cfg, t, world, rng[f"{dom}/attrs"]), None
        inter = _rows(cfg, dom, t, price, rng[f"{dom}/events"])
        log.info("synthetic %s: %d users, %d items, %d interactions", dom, len(t.users),
                 len(t.items), len(inter))
        parts.append(InteractionData(inter, items))
    return InteractionData.concat(parts)


def scaled(cfg: SyntheticConfig, n_interactions: int) -> SyntheticConfig:
    """``cfg`` with user counts set so both domains together have about ``n_interactions``.

    Each user has ``mean_length`` interactions on average, so only the user counts change
    (keeping the domains' ratio); catalogues and every other knob stay as they are.
    """
    if n_interactions < 2:
        raise ConfigError(f"n_interactions: {n_interactions!r} is invalid (must be >= 2)")
    users = max(2, int(round(n_interactions / cfg.mean_length)))
    share = cfg.ecommerce_users / (cfg.ecommerce_users + cfg.social_users)
    e = min(users - 1, max(1, int(round(users * share))))
    return dataclasses.replace(cfg, ecommerce_users=e, social_users=users - e)
