"""Durable small files: write to a temporary name, fsync, rename, fsync the directory.

A reader then sees either the old file or the new one, never half of one, even after a
crash or power loss; the privacy ledger and the silo manifests rely on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | Path, value) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(value, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
