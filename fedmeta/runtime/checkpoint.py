"""Checkpoints that make a resumed run equal an uninterrupted one.

Written after every ``checkpoint_every`` rounds into ``checkpoint/``: meta-parameters
(safetensors), the server optimiser's state, every client's persistent state (DP
accountants), the metric rows so far, the RNG state, the round and the resolved config.
The in-process loop, which plays every client, also saves the clients' private item tables
(``client_private.safetensors``); a Flower server never has them, so its checkpoints never do.
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

SEP = "::"   # client id / tensor name in client_private.safetensors


def save(directory: Path, server_round: int, params: dict[str, torch.Tensor], optimizer_state: dict,
         client_states: dict[str, dict], rows: list[dict], rounds_info: list[dict], cfg,
         client_private: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()},
              str(tmp / "meta_parameters.safetensors"))
    if client_private:
        save_file({f"{cid}{SEP}{k}": v.detach().cpu().contiguous()
                   for cid, tensors in client_private.items() for k, v in tensors.items()},
                  str(tmp / "client_private.safetensors"))
    torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state()},
               tmp / "server_state.pt")
    meta = {"round": server_round, "config": to_dict(cfg), "client_states": client_states,
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
    private: dict[str, dict[str, torch.Tensor]] = {}
    if (directory / "client_private.safetensors").exists():
        for key, value in load_file(str(directory / "client_private.safetensors")).items():
            cid, _, name = key.partition(SEP)
            private.setdefault(cid, {})[name] = value
    return {"round": meta["round"], "config": meta["config"],
            "client_states": meta["client_states"], "rounds": meta["rounds"],
            "params": load_file(str(directory / "meta_parameters.safetensors")),
            "optimizer": server["optimizer"], "torch_rng": server["torch_rng"],
            "client_private": private,
            "rows": json.loads((directory / "metrics.json").read_text())}


def exists(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / "state.json").exists() or (
        directory.with_name(directory.name + ".old") / "state.json").exists()
