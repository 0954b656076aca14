"""Checkpoints that make a resumed run equal an uninterrupted one.

Written after every ``checkpoint_every`` rounds into ``checkpoint/``: meta-parameters
(safetensors), the server optimiser's state, the metric rows so far, the clients' last
reported epsilon/delta (for the outputs only: no node ever reads them back -- its
accountant and private tables live on its own disk), the RNG state, the round and the
resolved config.
Files are written to a temporary directory and renamed, so a kill mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedmeta.config import to_dict



def save(directory: Path, server_round: int, params: dict[str, torch.Tensor], optimizer_state: dict,
         client_privacy: dict[str, dict], rows: list[dict], rounds_info: list[dict], cfg) -> None:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()},
              str(tmp / "meta_parameters.safetensors"))
    torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state()},
               tmp / "server_state.pt")
    meta = {"round": server_round, "config": to_dict(cfg), "client_privacy": client_privacy,
            "rounds": rounds_info}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    (tmp / "metrics.json").write_text(json.dumps(rows))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load(directory: Path) -> dict:
    directory = Path(directory)
    if not (directory / "state.json").exists():
        old = directory.with_name(directory.name + ".old")
        if (old / "state.json").exists():
            directory = old
        else:
            raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = json.loads((directory / "state.json").read_text())
    server = torch.load(directory / "server_state.pt", weights_only=True)
    return {"round": meta["round"], "config": meta["config"],
            "client_privacy": meta["client_privacy"], "rounds": meta["rounds"],
            "params": load_file(str(directory / "meta_parameters.safetensors")),
            "optimizer": server["optimizer"], "torch_rng": server["torch_rng"],
            "rows": json.loads((directory / "metrics.json").read_text())}


def exists(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / "state.json").exists() or (
        directory.with_name(directory.name + ".old") / "state.json").exists()
