"""``fedmeta-bench --device cuda`` on a machine without a GPU: a one-line refusal, no run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.run import main

EXE = Path(sys.executable).with_name("fedmeta-bench")


def test_cuda_refused_before_any_figure_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "BENCHMARKS.md"
    assert main(["--device", "cuda", "--only", "P1", "--out", str(out)]) == 2
    err = capsys.readouterr()
    assert err.err.strip().splitlines() == ["fedmeta-bench: --device cuda but no CUDA device "
                                            "is visible"]
    assert "P1" not in err.out and not out.exists()


@pytest.mark.slow   # a fresh interpreter importing the bench stack; the check above is the same code
def test_cuda_refusal_from_the_command_line_is_one_line_without_traceback(tmp_path):
    res = subprocess.run([str(EXE), "--device", "cuda", "--out", str(tmp_path / "B.md")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "cuda" in lines[0] and not (tmp_path / "B.md").exists()
