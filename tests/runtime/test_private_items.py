"""Private item tables through the in-process runtime: on each node's own disk, never sent,
used in evaluation, and resumed exactly after a kill."""

import json

import pandas as pd
import pytest
from safetensors.torch import load_file

from fedmeta.model.recommender import PRIVATE_PREFIX
from fedmeta.runtime import inprocess
from fedmeta.runtime.federation import build_silos, load_data
from fedmeta.runtime.hydra_config import compose

BASE = ["runtime=inprocess", "data=synthetic_small", "data.synthetic.ecommerce_users=60",
        "data.synthetic.social_users=60", "algorithm.local_steps=2", "algorithm.users_per_step=6",
        "runtime.rounds=2", "runtime.eval_every=1", "data.max_eval_users=6", "runtime.plots=false",
        "model.private_item_embeddings=true", "privacy=local", "privacy.local.target_epsilon=null",
        "privacy.local.noise_multiplier=1.0",
        "privacy.local.reproducible_secret=a-test-secret-of-24-chars"]


@pytest.fixture(scope="module")
def data():
    return load_data(compose(BASE))


def _rows(directory):
    frame = pd.read_csv(directory / "metrics.csv")
    return frame.sort_values(list(frame.columns[:-1])).reset_index(drop=True)


def _run(cfg, out, data, **kw):
    nodes = inprocess.build_nodes(cfg, out, build_silos(cfg, data))
    return nodes, inprocess.run(cfg, out, nodes=nodes, echo=lambda s: None, **kw)


def test_tables_stay_on_the_nodes_and_a_resume_is_exact(tmp_path, data):
    cfg = compose(BASE)
    nodes, summary = _run(cfg, tmp_path / "full", data)
    trained = [n for n in nodes if not n.tasks.partition.new_client]
    for n in trained:
        files = sorted((tmp_path / "full" / "nodes" / n.client_id / "private").glob("*.safetensors"))
        assert files, n.client_id
        tables = load_file(str(files[-1]))
        assert all(k.startswith(PRIVATE_PREFIX) for k in tables)
        assert all(float(t.abs().sum()) > 0 for t in tables.values())
    ckpt = tmp_path / "full" / "checkpoint"
    assert not any(PRIVATE_PREFIX in k for k in load_file(str(ckpt / "meta_parameters.safetensors")))
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["client_epsilon"]

    _run(cfg, tmp_path / "cut", data, stop_after=1)
    resumed = compose(BASE + ["runtime.resume=true"])
    _run(resumed, tmp_path / "cut", data)
    pd.testing.assert_frame_equal(_rows(tmp_path / "full"), _rows(tmp_path / "cut"))
