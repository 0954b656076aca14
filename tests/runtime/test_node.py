"""A node: its own config file, its own silo, its own budget; it refuses what contradicts them."""

import copy

import pytest
import torch

from fedmeta.config import ConfigError, run_config
from fedmeta.data.silo import catalogue_sizes
from fedmeta.runtime.federation import build_silos, initial_parameters, prepare_nodes
from fedmeta.runtime.hydra_config import compose
from fedmeta.runtime.node import DP_REPLY_METRICS, Node, NodeConfig, RunMismatch
from fedmeta.privacy.ledger import LedgerError

TINY = ["runtime=inprocess", "privacy=local", "privacy.local.target_epsilon=2.0",
        "data=synthetic_small", "data.synthetic.ecommerce_users=60", "data.synthetic.social_users=60",
        "runtime.rounds=2", "algorithm.local_steps=2", "algorithm.users_per_step=6",
        "data.max_eval_users=4"]


@pytest.fixture()
def setup(tmp_path):
    cfg = compose(TINY)
    silos = build_silos(cfg)
    configs = prepare_nodes(cfg, silos, tmp_path / "silos", tmp_path / "state", fresh=True)
    return cfg, silos, configs


def test_node_config_file_round_trips_and_bad_keys_name_the_file(tmp_path, setup):
    cfg, silos, configs = setup
    path = configs[0].save(tmp_path / "node.json")
    assert NodeConfig.load(path) == configs[0]
    raw = path.read_text().replace('"client_id"', '"client_idd"')
    (tmp_path / "bad.json").write_text(raw)
    with pytest.raises(ConfigError, match=r"bad\.json.*client_idd"):
        NodeConfig.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"broken\.json:1"):
        NodeConfig.load(tmp_path / "broken.json")


def test_a_node_reads_only_its_own_silo_directory(setup):
    cfg, silos, configs = setup
    node = Node(configs[0])                     # from disk: silo_dir only
    assert node.client_id == silos[0].client_id
    assert set(node.tasks.train.users) <= set(silos[0].partition.train_users)
    wrong = copy.deepcopy(configs[0])
    wrong.silo_dir = configs[1].silo_dir
    with pytest.raises(ConfigError, match="holds client"):
        Node(wrong)


def test_exhausted_budget_stops_training_but_not_evaluation(setup):
    cfg, silos, configs = setup
    node = Node(configs[0], silos[0])
    params, run = initial_parameters(cfg, catalogues=catalogue_sizes(silos)), configs[0].run
    eps = []
    for rnd in (1, 2):                          # the planned run fits the budget exactly
        update = node.train(params, rnd, run)
        assert update.num_tasks == 1 and update.metrics["budget_exhausted"] == 0.0
        assert set(update.metrics) <= DP_REPLY_METRICS     # no raw loss leaves a DP node
        eps.append(update.metrics["epsilon"])
    assert 0 < eps[0] < eps[1] <= 2.0
    update = node.train(params, 3, run)         # one round more than planned
    assert update.num_tasks == 0 and update.metrics["budget_exhausted"] == 1.0
    assert all(torch.count_nonzero(v) == 0 for v in update.delta.values())
    assert node.ledger().epsilon() == eps[1]    # nothing was spent
    rows = node.evaluate(params, 3, run)
    assert any(r["metric"] == "ndcg@10" for r in rows)
    assert {r["population"] for r in rows} == {"cold"}   # training users' metrics stay home


def test_a_contradicting_run_config_is_refused_before_any_spend(setup):
    cfg, silos, configs = setup
    node = Node(configs[0], silos[0])
    params, run = initial_parameters(cfg, catalogues=catalogue_sizes(silos)), configs[0].run
    before = node.ledger().steps_charged
    for key, value in (("model", {**run["model"], "size": "small"}),
                       ("algorithm", {**run["algorithm"], "local_steps": 50}),
                       ("rounds", 99), ("privacy", {"enabled": False})):
        bad = {**run, key: value}
        with pytest.raises(RunMismatch, match=key):
            node.train(params, 1, bad)
    assert node.ledger().steps_charged == before


def test_a_dp_node_without_a_created_budget_refuses(tmp_path):
    cfg = compose(TINY)
    silos = build_silos(cfg)
    configs = prepare_nodes(cfg, silos, tmp_path / "silos", tmp_path / "state", fresh=False)
    node = Node(configs[0], silos[0])
    with pytest.raises(LedgerError, match="fedmeta-node init"):
        node.train(initial_parameters(cfg, catalogues=catalogue_sizes(silos)), 1, configs[0].run)


def test_the_shared_item_table_follows_the_federation_catalogues(setup):
    cfg, silos, configs = setup
    node = Node(configs[0], silos[0])
    sizes = catalogue_sizes(silos)
    rows = node.model.items.ids.weight.shape[0]
    assert rows == 1 + sum(sizes.values())        # one row per item of every domain, plus none
    assert node.tasks.catalog.feats[:, -1].max() < rows
    wrong = copy.deepcopy(configs[0])
    wrong.run["catalogues"] = {**sizes, silos[0].partition.domain: sizes[silos[0].partition.domain] + 1}
    with pytest.raises(ConfigError, match="run.catalogues"):
        Node(wrong, silos[0])
    other = {**configs[0].run, "catalogues": {**sizes, "zzz": 5}}
    with pytest.raises(RunMismatch, match="catalogues"):
        node.train(initial_parameters(cfg, catalogues=sizes), 1, other)
