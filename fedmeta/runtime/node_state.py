"""A node's own disk: one directory, one typed store for everything a node keeps.

What a node keeps between messages and across restarts is private, so it lives on the node
and no server checkpoint can restore or forge it. All of it sits under the node config's
``state_dir``, and only :class:`NodeState` knows the layout:

* ``node_state.json``: the owner (client id). A state directory serves one client; a second
  node file pointing at it is refused, so two silos can never mix their budgets or tables.
* ``privacy_ledger.json`` and ``privacy_ledger.hwm``: the privacy budget
  (:class:`fedmeta.privacy.ledger.PrivacyLedger`; created only by the operator's act).
* ``private/private_r<N>.safetensors``: the private item table after round N
  (:class:`PrivateTable`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedmeta.atomic import write_json
from fedmeta.config import ConfigError
from fedmeta.privacy.ledger import HWM, LEDGER, DPPlan, PrivacyLedger

log = logging.getLogger(__name__)

FORMAT = 1
OWNER = "node_state.json"
_NAME = re.compile(r"^private_r(\d+)\.safetensors$")


class PrivateTable:
    """The private item table, one safetensors file per round, stamped with that round.

    A resumed run asks for the newest table from *before* the round it is about to train,
    so a table written by a round the server never checkpointed (killed mid-round) is
    ignored, and the resumed run trains from exactly what the uninterrupted run had.
    ``keep``: newest files kept; a resume goes back at most one checkpoint interval, so
    ``checkpoint_every + 1`` always keeps the table of the round the server checkpointed."""

    def __init__(self, directory: str | Path, keep: int = 2):
        if keep < 2:
            raise ValueError(f"keep must be >= 2, got {keep}")
        self.dir = Path(directory)
        self.keep = keep

    def rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name)))

    def save(self, server_round: int, tensors: dict[str, torch.Tensor]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"private_r{server_round}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        for old in self.rounds()[:-self.keep]:
            (self.dir / f"private_r{old}.safetensors").unlink(missing_ok=True)

    def load(self, before_round: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest table written by a round < ``before_round``, with that round."""
        usable = [r for r in self.rounds() if r < before_round]
        if not usable:
            return None
        return usable[-1], load_file(str(self.dir / f"private_r{usable[-1]}.safetensors"))


@dataclass(frozen=True)
class StateSummary:
    """What ``fedmeta-node show`` prints: the node's state, without reading any user data."""
    client_id: str
    directory: str
    has_ledger: bool
    private_rounds: tuple[int, ...]


class NodeState:
    """The one entry point to a node's disk. Claims ``state_dir`` for ``client_id`` on first
    use and refuses a directory another client owns, or whose owner file is unreadable."""

    def __init__(self, state_dir: str | Path, client_id: str):
        self.dir = Path(state_dir)
        self.client_id = client_id
        self._claim()

    def _claim(self) -> None:
        path = self.dir / OWNER
        if path.exists():
            try:
                raw = json.loads(path.read_text())
                owner, fmt = str(raw["client_id"]), raw["format"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"state_dir: {path} is not a node state file ({err}); "
                                  "refusing to use this directory") from None
            if fmt != FORMAT:
                raise ConfigError(f"state_dir: {path} has format {fmt!r}, not {FORMAT}")
            if owner != self.client_id:
                raise ConfigError(f"state_dir: {self.dir} belongs to client {owner!r}, not "
                                  f"{self.client_id!r}: each node needs its own state directory")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(path, {"format": FORMAT, "client_id": self.client_id})

    # ---- the privacy budget -----------------------------------------------------------------
    def has_ledger(self) -> bool:
        return (self.dir / LEDGER).exists() or (self.dir / HWM).exists()

    def ledger(self, expected: DPPlan) -> PrivacyLedger:
        """The budget as the node's disk holds it (refuses a missing, stale or changed one)."""
        return PrivacyLedger.open(self.dir, self.client_id, expected)

    def create_ledger(self, plan: DPPlan, reset: bool = False) -> PrivacyLedger:
        return PrivacyLedger.create(self.dir, self.client_id, plan, reset=reset)

    # ---- the private item table -------------------------------------------------------------
    def private_table(self, keep: int = 2) -> PrivateTable:
        return PrivateTable(self.dir / "private", keep)

    def summary(self) -> StateSummary:
        return StateSummary(self.client_id, str(self.dir), self.has_ledger(),
                            tuple(self.private_table().rounds()))


__all__ = ["NodeState", "PrivateTable", "StateSummary"]
