"""Silos: a node's directory holds its own users only and round-trips exactly."""

import json

import pandas as pd
import pytest

from fedmeta.data.schema import DataError
from fedmeta.data.silo import read_manifest, read_silo, silo_dir, write_silos
from fedmeta.runtime.federation import build_silos
from fedmeta.runtime.hydra_config import compose


@pytest.fixture(scope="module")
def silos():
    return build_silos(compose(["data=synthetic_small"]))


def test_each_silo_holds_exactly_its_partition(silos):
    seen = set()
    for s in silos:
        users = set(s.data.interactions["user"])
        assert users <= set(s.partition.users)
        assert not users & seen                  # no user in two silos
        seen |= users
        assert set(s.data.interactions["domain"]) == {s.partition.domain}


def test_round_trip_is_exact_and_the_manifest_names_no_user(tmp_path, silos):
    write_silos(silos, tmp_path)
    for s in silos:
        back = read_silo(silo_dir(tmp_path, s.client_id))
        assert back.partition == s.partition
        pd.testing.assert_frame_equal(back.data.interactions, s.data.interactions)
        pd.testing.assert_frame_equal(back.data.items, s.data.items)
    clients, catalogues = read_manifest(tmp_path)
    assert [c.client_id for c in clients] == [s.client_id for s in silos]
    text = (tmp_path / "federation.json").read_text()
    assert not any(u in text for s in silos for u in s.partition.users[:5])
    assert set(catalogues) == {"ecommerce", "social"}


def test_a_silo_with_a_foreign_user_or_no_metadata_is_refused(tmp_path, silos):
    write_silos(silos[:2], tmp_path)
    a, b = (silo_dir(tmp_path, s.client_id) for s in silos[:2])
    mixed = pd.concat([pd.read_parquet(a / "interactions.parquet"),
                       pd.read_parquet(b / "interactions.parquet").head(3)])
    mixed.to_parquet(a / "interactions.parquet", index=False)
    with pytest.raises(DataError, match="not in this silo"):
        read_silo(a)
    with pytest.raises(DataError, match="silo.json"):
        read_silo(tmp_path / "nowhere")
    (b / "silo.json").write_text("{ broken")
    with pytest.raises(DataError, match="invalid JSON"):
        read_silo(b)
    meta = json.loads((tmp_path / "federation.json").read_text())
    assert meta["format"] == 1
