"""fedmeta-partition and fedmeta-node: what a node operator is handed and can do."""

import json

from fedmeta.data.silo import read_manifest, read_silo
from fedmeta.runtime.node import NodeConfig
from fedmeta.tools.nodes import node_main, partition_main

SMALL = ["data=synthetic_small", "data.synthetic.ecommerce_users=60",
         "data.synthetic.social_users=60", "privacy=local", "runtime.rounds=2",
         "algorithm.local_steps=2"]


def test_partition_writes_one_silo_and_one_node_file_per_client(tmp_path, capsys):
    assert partition_main(["--out", str(tmp_path), *SMALL]) == 0
    clients, _ = read_manifest(tmp_path / "silos")
    files = sorted((tmp_path / "nodes").glob("node-*.json"))
    assert len(files) == len(clients) == 6
    for f in files:
        nc = NodeConfig.load(f)
        silo = read_silo(nc.silo_dir)
        assert silo.client_id == nc.client_id
        assert nc.privacy.enabled and nc.state_dir.endswith(nc.client_id)
        assert "silo_dir" not in json.dumps(nc.run)        # the run config names no path
    # no budget until the operator creates one
    assert not list((tmp_path / "state").rglob("privacy_ledger.json"))


def test_node_init_show_and_an_explicit_reset(tmp_path, capsys, caplog):
    partition_main(["--out", str(tmp_path), *SMALL])
    node = str(tmp_path / "nodes" / "node-0.json")
    assert node_main(["show", node]) == 2                     # no ledger yet: refused
    assert "fedmeta-node init" in capsys.readouterr().err
    assert node_main(["init", node]) == 0
    assert node_main(["init", node]) == 2                     # never silently recreated
    assert "already exists" in capsys.readouterr().err
    assert node_main(["show", node]) == 0
    assert "epsilon=0.0000" in capsys.readouterr().out
    assert node_main(["reset-budget", node]) == 2             # needs --yes
    assert node_main(["reset-budget", node, "--yes"]) == 0
    assert "RESET" in caplog.text


def test_bad_node_file_and_bad_override_exit_2(tmp_path, capsys):
    (tmp_path / "n.json").write_text('{"client_id": "x"}')
    assert node_main(["init", str(tmp_path / "n.json")]) == 2
    assert partition_main(["--out", str(tmp_path), "runtime.rounds=0"]) == 2
    assert "runtime.rounds" in capsys.readouterr().err
