"""The benchmark harness: quick mode writes a complete, parseable BENCHMARKS.md; --only keeps
other sections. No speed assertions: the numbers depend on the machine."""

from __future__ import annotations

import os
import re

import pytest

from bench.common import split_sections, table, write_sections
from bench.run import FIGURES, ORDER, main

NUMERIC = re.compile(r"(^|\b)(ms|s|MB|users/s|x plain|speed-up|value|clients|rounds|users|"
                     r"interactions|meta-params|seeds)\b|s \(median\)$")
MEAN_SD = re.compile(r"^\d+\.\d{4} ± \d+\.\d{4}$")


def tables(section: str) -> list[tuple[list[str], list[list[str]]]]:
    out, cur = [], None
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cur is None:
                cur = (cells, [])
                out.append(cur)
            elif not set(line) <= set("|-"):
                cur[1].append(cells)
        else:
            cur = None
    return out


def test_sections_merge_keeps_others(tmp_path):
    path = tmp_path / "B.md"
    write_sections(path, ORDER, {"P1": "## P1\nold", "P2": "## P2\nkeep"}, "# T")
    write_sections(path, ORDER, {"P1": "## P1\nnew"}, "# T")
    got = split_sections(path.read_text())
    assert got == {"P1": "## P1\nnew", "P2": "## P2\nkeep"}
    assert path.read_text().startswith("# T")


def test_table_formats_numbers():
    text = table(["a", "b"], [[1.23456, "x"], [123456.7, 2]])
    assert text.splitlines()[2] == "| 1.235 | x |"
    assert text.splitlines()[3] == "| 123457 | 2 |"


def test_rejects_unknown_figure(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "P9"])


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path, monkeypatch):
    # P1's Flower run with two CPUs per client: one Ray actor (~0.7 GB) at a time on a 2-core
    # machine, which keeps the suite's peak memory bounded; the harness is what is tested here
    from bench import p1_flower

    plain = p1_flower.overrides
    cpus = min(2, os.cpu_count() or 1)
    monkeypatch.setattr(p1_flower, "overrides", lambda *a: [*plain(*a), f"runtime.num_cpus={cpus}"])
    out = tmp_path / "BENCHMARKS.md"
    assert main(["--quick", "--out", str(out)]) == 0
    sections = split_sections(out.read_text())
    assert set(sections) == set(ORDER)
    for name in FIGURES:
        body = sections[name]
        assert "failed" not in body, body
        found = tables(body)
        assert found, f"{name} has no table"
        for header, rows in found:
            assert rows, f"{name}: empty table {header}"
            for row in rows:
                assert len(row) == len(header)
                for col, cell in zip(header, row):
                    if name == "Q1" and col.startswith("warm") and row[1] != "none":
                        assert cell == "stays on the node", (name, col, cell)   # DP: not released
                    elif name == "Q1" and col.startswith(("cold", "warm")):
                        assert MEAN_SD.match(cell), (name, col, cell)
                    elif NUMERIC.search(col):
                        float(cell)   # raises if a numeric cell does not parse
    assert "**Target**" in sections["P1"] and "**Target**" in sections["P2"]
