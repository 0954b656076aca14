"""Private item tables through the in-process runtime: kept per client, used in evaluation,
never counted as sent, checkpointed with the run so a resume is exact."""

import json

import pandas as pd
import pytest
from safetensors.torch import load_file

from fedmeta.model.recommender import PRIVATE_PREFIX
from fedmeta.runtime import inprocess
from fedmeta.runtime.federation import build_federation, load_data
from fedmeta.runtime.hydra_config import compose

BASE = ["runtime=inprocess", "data=synthetic_small", "data.synthetic.ecommerce_users=60",
        "data.synthetic.social_users=60", "algorithm.local_steps=2", "algorithm.users_per_step=6",
        "runtime.rounds=2", "runtime.eval_every=1", "data.max_eval_users=6", "runtime.plots=false",
        "model.private_item_embeddings=true", "privacy=local", "privacy.local.target_epsilon=null",
        "privacy.local.noise_multiplier=1.0"]


@pytest.fixture(scope="module")
def data():
    return load_data(compose(BASE))


def _rows(directory):
    frame = pd.read_csv(directory / "metrics.csv")
    return frame.sort_values(list(frame.columns[:-1])).reset_index(drop=True)


def test_tables_stay_on_clients_and_a_resume_is_exact(tmp_path, data):
    cfg = compose(BASE)
    fed = build_federation(cfg, data)
    inprocess.run(cfg, tmp_path / "full", fed=fed, echo=lambda s: None)
    tables = load_file(str(tmp_path / "full" / "checkpoint" / "client_private.safetensors"))
    trained = {c.client_id for c in fed.training_clients}
    assert {k.split("::")[0] for k in tables} == trained
    assert all(k.split("::")[1].startswith(PRIVATE_PREFIX) for k in tables)
    assert all(float(t.abs().sum()) > 0 for t in tables.values())
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["client_epsilon"]

    inprocess.run(cfg, tmp_path / "cut", fed=build_federation(cfg, data), stop_after=1,
                  echo=lambda s: None)
    resumed = compose(BASE + ["runtime.resume=true"])
    inprocess.run(resumed, tmp_path / "cut", fed=build_federation(resumed, data),
                  echo=lambda s: None)
    pd.testing.assert_frame_equal(_rows(tmp_path / "full"), _rows(tmp_path / "cut"))
