"""Attack 2: the server asks the node for weaker privacy, inside an ordinary message.

The attack. The old protocol carried the experiment config in every message
(``fedmeta.overrides``, a list of Hydra overrides) and the client composed its config from
it, privacy settings included. A server could send ``privacy=none`` or
``privacy.local.noise_multiplier=0.0`` and get the un-noised update back.

Observed on the old code (bc7380d, ecommerce-0, tiny config at sigma = 1, SGD at rate 1):
with the same overrides plus ``privacy=none`` (or ``privacy.local.enabled=false``) the node
trained without DP: release norm 45.56 (the DP release is noise-dominated, norm 144.8), metrics
``num-examples`` = 36 and ``train_query_loss`` = 11.245; with
``privacy.local.noise_multiplier=0.0`` it clipped but added no noise: release norm 0.451.
Nothing was refused.

Why it fails now. A node's privacy comes only from its own node file. ``wire``
accepts exactly ``arrays`` + ``config`` = {``server-round``, ``fedmeta.run``,
``fedmeta.client-id``}; any other record or key raises (an error reply), and the run config
must equal the node's own (:meth:`Node.check_run`), so a ``privacy`` section inside it is a
mismatch. The check is made before anything is charged or trained: the ledger's bytes are
unchanged and no private item table is written. The same honest message is accepted at the
end, which changes both, so the "nothing happened" checks can see a round when there is one.
"""

from __future__ import annotations

import copy
import json

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmeta.runtime.node import RunMismatch
import wire
from wire import WireError
from tests.adversarial import server_play as sp

CLIENT = "ecommerce-0"
OLD_OVERRIDES = json.dumps(sp.TINY + ["privacy=none"])
FORGED_STATE = json.dumps({"dp": {"accountant": {"mechanism": "rdp", "delta": 0.5,
                                                  "target_epsilon": None, "history": []},
                                  "noise_multiplier": 0.0, "sample_rate": 1.0}})


def _run_with_private_table(fed):
    """The agreed run config, with per-client item tables (a trained round writes one)."""
    run = copy.deepcopy(fed.run)
    run["model"]["private_item_embeddings"] = True
    return run


def _variants(fed, run):
    """(name, content, expected error) for every way of asking for other settings."""
    honest = sp.instruction(fed, 1, CLIENT, run=run)
    extra_config = {
        "privacy.local.enabled": False,
        "fedmeta.overrides": OLD_OVERRIDES,
        "noise_multiplier": 0.0,
        "privacy.local.noise_multiplier": 0.0,
        "delta": 0.5,
        "privacy.local.max_grad_norm": 1e6,
        "fedmeta.state": FORGED_STATE,
        "fedmeta.clipping": "",
        "state-dir": "/tmp/elsewhere",
    }
    out = [(f"config key {k}", sp.with_config(honest, **{k: v}), WireError)
           for k, v in extra_config.items()]
    for name, section in (("privacy", {"local": {"enabled": False}}),
                          ("privacy", {"local": {"noise_multiplier": 0.0}})):
        bad = {**copy.deepcopy(run), name: section}
        out.append((f"run config with {name}={section}", sp.instruction(fed, 1, CLIENT, run=bad),
                    RunMismatch))
    sneaky = copy.deepcopy(run)
    sneaky["algorithm"]["noise_multiplier"] = 0.0
    out.append(("run config algorithm.noise_multiplier", sp.instruction(fed, 1, CLIENT, run=sneaky),
                RunMismatch))
    for name, record in (("privacy", ConfigRecord({"enabled": False})),
                         ("fedmeta.state", ConfigRecord({"state": FORGED_STATE})),
                         ("metrics", MetricRecord({"noise_multiplier": 0.0})),
                         ("noise", ArrayRecord({}))):
        content = RecordDict(dict(honest.items()))
        content[name] = record
        out.append((f"extra record {name!r}", content, WireError))
    no_config = RecordDict({wire.ARRAYS: honest[wire.ARRAYS],
                            "fedmeta.config": ConfigRecord({"fedmeta.overrides": OLD_OVERRIDES})})
    out.append(("config under another name", no_config, WireError))
    return out


def test_smuggled_settings_are_refused_and_nothing_is_trained(fed, tmp_path):
    run = _run_with_private_table(fed)
    node = sp.make_node(fed, tmp_path / "node", CLIENT, run=run)
    before = sp.ledger_bytes(node)
    assert before[0] is not None and before[1] is not None
    variants = _variants(fed, run)
    assert len(variants) >= 15
    for name, content, kind in variants:
        for message_type in ("train", "evaluate"):
            reply = sp.deliver(node, message_type, content)
            assert reply.refused, (name, message_type)
            assert isinstance(reply.error, kind), (name, message_type, reply.error)
            assert sp.ledger_bytes(node) == before, name      # nothing charged
            assert sp.private_files(node) == [], name         # nothing trained

    # the honest message is accepted, and the same checks see that it trained
    reply = sp.train(fed, node, 1, CLIENT, run=run)
    assert not reply.refused, reply.error
    assert reply.update().metrics["epsilon"] > 0
    assert sp.ledger_bytes(node)[0] != before[0]
    assert sp.private_files(node) != []


def test_malformed_round_is_refused(fed, tmp_path):
    """The round is the only number a server sends; it must be an integer >= 1."""
    node = sp.make_node(fed, tmp_path / "node", CLIENT)
    before = sp.ledger_bytes(node)
    for value in ("1", 0, -3, True, 1.0):
        content = sp.with_config(sp.instruction(fed, 1, CLIENT), **{wire.ROUND: value})
        reply = sp.deliver(node, "train", content)
        assert reply.refused and isinstance(reply.error, WireError), (value, reply.error)
        assert sp.ledger_bytes(node) == before
