import math

import pytest
import torch

from fedmeta.eval.metrics import (aggregate, full_ranking_metrics, sample_negatives,
                                  sampled_ranking_metrics)

KS = (1, 2, 3)
# One score row reused below (items 0..4):
#   item:   0    1    2    3    4
#   score: 0.9  0.5  0.7  0.1  0.3
ROW = [0.9, 0.5, 0.7, 0.1, 0.3]


def _close(got: torch.Tensor, want: list[float]):
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6), \
        (got, want)


def test_hand_computed_full_ranking():
    scores = torch.tensor([ROW, ROW, ROW])
    targets = torch.tensor([2, 3, 0])
    exclude = torch.zeros(3, 5, dtype=torch.bool)
    m = full_ranking_metrics(scores, targets, exclude, ks=KS)
    # row 0: target 2 (0.7); only item 0 (0.9) is >= -> rank 2.
    #        hr@1=0 hr@2=1 hr@3=1; ndcg@2=ndcg@3=1/log2(3); mrr=1/2;
    #        below: items 1,3,4 -> auc = 3/4.
    # row 1: target 3 (0.1); all 4 others are above -> rank 5: no hits, mrr=1/5, auc=0.
    # row 2: target 0 (0.9); nothing above -> rank 1: all hits, ndcg=1, mrr=1, auc=1.
    _close(m["hr@1"], [0, 0, 1])
    _close(m["hr@2"], [1, 0, 1])
    _close(m["hr@3"], [1, 0, 1])
    _close(m["ndcg@1"], [0, 0, 1])
    _close(m["ndcg@2"], [1 / math.log2(3), 0, 1])
    _close(m["ndcg@3"], [1 / math.log2(3), 0, 1])
    _close(m["mrr"], [0.5, 0.2, 1.0])
    _close(m["auc"], [0.75, 0.0, 1.0])
    assert set(m) == {"hr@1", "hr@2", "hr@3", "ndcg@1", "ndcg@2", "ndcg@3", "mrr", "auc"}
    assert all(v.shape == (3,) for v in m.values())


def test_exclusion_removes_competitors_but_never_the_target():
    scores = torch.tensor([ROW, ROW])
    targets = torch.tensor([3, 3])
    exclude = torch.zeros(2, 5, dtype=torch.bool)
    exclude[:, [0, 2]] = True           # the two best competitors are excluded
    exclude[1, 3] = True                # row 1 also marks the target itself: must be ignored
    m = full_ranking_metrics(scores, targets, exclude, ks=KS)
    # Remaining competitors of target 3 (0.1): item 1 (0.5), item 4 (0.3) -> rank 3.
    # hr@2=0, hr@3=1, ndcg@3 = 1/log2(4) = 0.5, mrr = 1/3, auc = 0/2.
    for row in range(2):
        assert m["hr@2"][row] == 0 and m["hr@3"][row] == 1
        assert m["ndcg@3"][row] == pytest.approx(0.5)
        assert m["mrr"][row] == pytest.approx(1 / 3)
        assert m["auc"][row] == 0


def test_ties_are_pessimistic():
    # Constant scorer: 4 competitors tie with the target -> worst rank 5, auc exactly 0.5.
    const = torch.ones(1, 5)
    m = full_ranking_metrics(const, torch.tensor([2]), torch.zeros(1, 5, dtype=torch.bool), ks=KS)
    _close(m["mrr"], [0.2])
    _close(m["hr@3"], [0.0])
    _close(m["auc"], [0.5])
    # Partial tie: scores [0.5, 0.7, 0.7, 0.1], target 2. Item 1 ties -> counted above -> rank 2.
    # auc = (2 strictly below + 0.5 * 1 tie) / 3 = 5/6.
    m = full_ranking_metrics(torch.tensor([[0.5, 0.7, 0.7, 0.1]]), torch.tensor([2]),
                             torch.zeros(1, 4, dtype=torch.bool), ks=KS)
    _close(m["mrr"], [0.5])
    _close(m["hr@1"], [0.0])
    _close(m["auc"], [5 / 6])


def test_nan_scores_never_win():
    scores = torch.tensor([[0.1, float("nan"), 0.2], [float("nan"), 0.5, 0.2]])
    m = full_ranking_metrics(scores, torch.tensor([1, 2]), torch.zeros(2, 3, dtype=torch.bool),
                             ks=KS)
    # row 0: NaN target -> lowest score -> rank 3; row 1: NaN competitor is below 0.2 -> rank 2.
    _close(m["mrr"], [1 / 3, 0.5])


def test_sampled_hand_computed():
    scores = torch.tensor([ROW, ROW])
    targets = torch.tensor([2, 2])
    negatives = torch.tensor([[1, 3], [0, 4]])
    m = sampled_ranking_metrics(scores, targets, negatives, ks=(1,))
    # row 0: 0.7 vs {0.5, 0.1} -> rank 1, auc 1; row 1: 0.7 vs {0.9, 0.3} -> rank 2, auc 1/2.
    assert set(m) == {"hr@1_s2", "ndcg@1_s2", "mrr_s2", "auc_s2"}
    _close(m["hr@1_s2"], [1, 0])
    _close(m["mrr_s2"], [1, 0.5])
    _close(m["auc_s2"], [1, 0.5])


def test_sampled_equals_full_when_negatives_are_all_other_items():
    gen = torch.Generator().manual_seed(0)
    n, n_items = 6, 12
    scores = (torch.rand(n, n_items, generator=gen) * 4).round() / 4   # many ties on purpose
    targets = torch.randint(0, n_items, (n,), generator=gen)
    negatives = torch.stack([torch.tensor([j for j in range(n_items) if j != int(t)])
                             for t in targets])
    full = full_ranking_metrics(scores, targets, torch.zeros(n, n_items, dtype=torch.bool))
    sampled = sampled_ranking_metrics(scores, targets, negatives)
    suffix = f"_s{n_items - 1}"
    assert set(sampled) == {k + suffix for k in full}
    for key, value in full.items():
        assert torch.equal(value, sampled[key + suffix]), key
    assert full["mrr"].min() < 1          # the case is not trivial


def test_sample_negatives_respects_forbidden_and_is_uniform():
    n_items, m = 10, 3
    forbidden = [{0, 1}, {9}, set()]
    gen = torch.Generator().manual_seed(1)
    neg = sample_negatives(n_items, forbidden, m, gen)
    assert neg.shape == (3, m) and neg.dtype == torch.long
    for row, banned in enumerate(forbidden):
        picked = neg[row].tolist()
        assert len(set(picked)) == m and not set(picked) & banned
    mask = torch.zeros(3, n_items, dtype=torch.bool)
    for row, banned in enumerate(forbidden):
        mask[row, list(banned)] = True
    assert torch.equal(sample_negatives(n_items, mask, m, torch.Generator().manual_seed(1)), neg)
    # Uniformity: 4000 draws of 3 among the 8 allowed items -> 1500 expected hits each.
    many = sample_negatives(n_items, mask[[0]].expand(4000, -1), m, gen)
    counts = torch.bincount(many.flatten(), minlength=n_items)
    assert counts[:2].sum() == 0
    assert (counts[2:] - 1500).abs().max() < 150      # ~ 4 standard deviations


def test_sample_negatives_too_few_allowed():
    with pytest.raises(ValueError, match=r"^m: .*row 1 has only 2"):
        sample_negatives(5, [{0}, {0, 1, 2}], 3, torch.Generator())


def test_aggregate_averages_per_user_first():
    per_target = {"hr@10": torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]),
                  "mrr": torch.tensor([0.5, 0.5, 0.5, 0.5, 0.25])}
    groups = torch.tensor([7, 7, 7, 7, 3])
    out = aggregate(per_target, groups)
    # user 7: hr mean 1/4, user 3: 1 -> (0.25 + 1) / 2 = 0.625 (a flat mean would give 0.4).
    assert out["hr@10"] == pytest.approx(0.625)
    assert out["mrr"] == pytest.approx((0.5 + 0.25) / 2)


@pytest.mark.parametrize("call, name", [
    (lambda: full_ranking_metrics(torch.rand(5), torch.tensor([0]),
                                  torch.zeros(1, 5, dtype=torch.bool)), "scores"),
    (lambda: full_ranking_metrics(torch.rand(2, 5), torch.tensor([0]),
                                  torch.zeros(2, 5, dtype=torch.bool)), "targets"),
    (lambda: full_ranking_metrics(torch.rand(2, 5), torch.tensor([0, 5]),
                                  torch.zeros(2, 5, dtype=torch.bool)), "targets"),
    (lambda: full_ranking_metrics(torch.rand(2, 5), torch.tensor([0, 1]),
                                  torch.zeros(2, 4, dtype=torch.bool)), "exclude"),
    (lambda: full_ranking_metrics(torch.rand(2, 5), torch.tensor([0, 1]),
                                  torch.zeros(2, 5)), "exclude"),
    (lambda: full_ranking_metrics(torch.rand(2, 5), torch.tensor([0, 1]),
                                  torch.zeros(2, 5, dtype=torch.bool), ks=(0,)), "ks"),
    (lambda: sampled_ranking_metrics(torch.rand(2, 5), torch.tensor([0, 1]),
                                     torch.tensor([[1, 2]])), "negatives"),
    (lambda: sampled_ranking_metrics(torch.rand(2, 5), torch.tensor([0, 1]),
                                     torch.tensor([[1, 2], [1, 3]])), "negatives"),
    (lambda: aggregate({"hr@10": torch.ones(3)}, torch.tensor([0, 1])), r"per_target\['hr@10'\]"),
    (lambda: aggregate({"hr@10": torch.ones(2)}, torch.zeros(2, 1)), "groups"),
    (lambda: sample_negatives(5, torch.zeros(2, 4, dtype=torch.bool), 1, torch.Generator()),
     "forbidden"),
])
def test_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call()
