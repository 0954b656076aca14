"""``fedmeta-partition`` and ``fedmeta-node``: the operator's side of a federation.

``fedmeta-partition --out DIR [hydra overrides...]`` loads the experiment's sources once,
cuts them into one directory per silo (only that silo's users; see
:mod:`fedmeta.data.silo`), writes ``federation.json`` and one node file per client
(``nodes/node-<i>.json``: the silo directory, a state directory, the node's privacy
settings and the agreed run-level config). Each node file and silo directory is what one
SuperNode's operator is handed; nothing in it names another silo's users.

``fedmeta-node init NODE_FILE`` creates the node's privacy budget (its ledger) on its own
disk, ``fedmeta-node reset-budget NODE_FILE --yes`` restarts it (logged as a restart:
earlier releases stop counting), ``fedmeta-node show NODE_FILE`` prints epsilon and delta.
A DP node without a ledger refuses to train, so a budget never starts by accident.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedmeta.config import ConfigError
from fedmeta.data.schema import DataError
from fedmeta.privacy.ledger import LedgerError

log = logging.getLogger(__name__)


def partition_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmeta-partition", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", required=True, help="directory for silos, manifest and node files")
    p.add_argument("--init-budgets", action="store_true",
                   help="also create every DP node's privacy budget (else: fedmeta-node init)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment config")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fedmeta.runtime.federation import build_silos, prepare_nodes
    from fedmeta.runtime.hydra_config import compose

    try:
        cfg = compose(args.overrides)
        out = Path(args.out).resolve()
        silos = build_silos(cfg)
        configs = prepare_nodes(cfg, silos, out / "silos", out / "state", fresh=False)
        for i, nc in enumerate(configs):
            nc.save(out / "nodes" / f"node-{i}.json")
        if args.init_budgets:
            from fedmeta.runtime.node import init_budget

            for nc, silo in zip(configs, silos):
                init_budget(nc, silo)
    except (ConfigError, DataError, LedgerError) as err:
        print(f"fedmeta-partition: {err}", file=sys.stderr)
        return 2
    print(f"{len(configs)} silos in {out / 'silos'}; node files in {out / 'nodes'}")
    return 0


def node_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmeta-node", description="Administer one fedmeta node.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("init", "create the node's privacy budget"),
                           ("reset-budget", "restart the node's privacy budget (logged)"),
                           ("show", "print the node's epsilon, delta and steps")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("node_file")
        if name == "reset-budget":
            s.add_argument("--yes", action="store_true", help="confirm: earlier releases stop counting")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fedmeta.runtime.node import Node, NodeConfig, init_budget

    try:
        nc = NodeConfig.load(args.node_file)
        if args.cmd == "init":
            ledger = init_budget(nc)
            print("no budget needed (DP off or no training users)" if ledger is None else
                  f"budget created: sigma={ledger.plan.noise_multiplier:.4f} "
                  f"delta={ledger.plan.delta:.3g} target={ledger.plan.target_epsilon}")
        elif args.cmd == "reset-budget":
            if not args.yes:
                print("fedmeta-node: reset-budget restarts the privacy budget; add --yes",
                      file=sys.stderr)
                return 2
            init_budget(nc, reset=True)
            print("budget RESET: earlier releases are no longer counted")
        else:
            node = Node(nc)
            state = node.state.summary()
            print(f"{nc.client_id}: state {state.directory}; private table rounds "
                  f"{list(state.private_rounds) or 'none'}")
            if node.dp:
                ledger = node.ledger()
                print(f"{nc.client_id}: epsilon={ledger.epsilon():.4f} "
                      f"delta={ledger.plan.delta:.3g} steps={ledger.steps_charged} "
                      f"releases={ledger.seq} resets={ledger.resets}")
            else:
                print(f"{nc.client_id}: local DP off: no privacy budget")
    except (ConfigError, DataError, LedgerError) as err:
        print(f"fedmeta-node: {err}", file=sys.stderr)
        return 2
    return 0


def _partition() -> None:
    sys.exit(partition_main())


def _node() -> None:
    sys.exit(node_main())
