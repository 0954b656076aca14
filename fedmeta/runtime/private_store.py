"""A client's own disk copy of its private item table, for restarts.

The table never leaves the client, so no server checkpoint can restore it. A node that
must survive a restart (a SuperNode on its own host, a resumed simulation) keeps it here:
one safetensors file per round, stamped with the round that produced it. A resumed run
asks for the newest table from *before* the round it is about to train, so a table written
by a round the server never checkpointed (killed mid-round) is ignored, and the resumed run
trains from exactly what the uninterrupted run had.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

_NAME = re.compile(r"^private_r(\d+)\.safetensors$")


class PrivateStore:
    """``keep``: newest files kept; a resume goes back at most one checkpoint interval, so
    ``checkpoint_every + 1`` always keeps the table of the round the server checkpointed."""

    def __init__(self, directory: str | Path, client_id: str, keep: int = 2):
        if keep < 2:
            raise ValueError(f"keep must be >= 2, got {keep}")
        self.dir = Path(directory) / client_id.replace("/", "_")
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
