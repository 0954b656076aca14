"""fedmeta-compare: every method runs on the same data and the table reports mean ± std."""

import pandas as pd
import pytest

from fedmeta.tools.compare import main

SMALL = ["data=synthetic_small", "data.synthetic.ecommerce_users=60", "data.synthetic.social_users=60",
         "runtime.rounds=1", "algorithm.local_steps=1", "algorithm.users_per_step=6",
         "data.max_eval_users=6", "privacy=none"]


def test_compare_writes_runs_and_table(tmp_path, capsys):
    rc = main(["--seeds", "0", "1", "--methods", "popularity", "fedavg", "--out", str(tmp_path), *SMALL])
    assert rc == 0
    runs = pd.read_csv(tmp_path / "compare_runs.csv")
    assert sorted(zip(runs["method"], runs["seed"])) == [("fedavg", 0), ("fedavg", 1),
                                                        ("popularity", 0), ("popularity", 1)]
    assert runs["cold/ndcg@10"].between(0, 1).all() and runs["cold/hr@10"].between(0, 1).all()
    # different seeds are different data: popularity differs across seeds
    pop = runs[runs["method"] == "popularity"]["cold/ndcg@10"]
    assert pop.nunique() == 2
    # before adaptation beside after: a baseline has no fine-tuning (the same numbers), a
    # learner's model as trained is scored too
    p = runs[runs["method"] == "popularity"]
    assert (p["before/cold/ndcg@10"] == p["cold/ndcg@10"]).all()
    assert runs["before/cold/ndcg@10"].between(0, 1).all()
    table = (tmp_path / "compare_table.md").read_text()
    assert "| popularity |" in table and "| fedavg |" in table and "±" in table
    assert "cold ndcg@10 before" in table.splitlines()[0]
    assert "cold ndcg@10" in capsys.readouterr().out


def test_unknown_method_and_bad_override_exit_2(tmp_path):
    assert main(["--methods", "magic", "--out", str(tmp_path)]) == 2
    assert main(["--methods", "fedavg", "--out", str(tmp_path), "algorithm.inner_lr=-1"]) == 2


def test_overrides_right_after_methods_are_not_taken_for_method_names(tmp_path):
    rc = main(["--seeds", "0", "--out", str(tmp_path), "--methods", "popularity", *SMALL])
    assert rc == 0
    runs = pd.read_csv(tmp_path / "compare_runs.csv")
    assert runs["method"].tolist() == ["popularity"]


@pytest.mark.slow
def test_baselines_and_centralised_sit_next_to_the_learners(tmp_path):
    methods = ["popularity", "item-knn", "ease", "centralised", "fedavg"]
    rc = main(["--seeds", "0", "--methods", *methods, "--out", str(tmp_path), *SMALL])
    assert rc == 0
    runs = pd.read_csv(tmp_path / "compare_runs.csv").set_index("method")
    assert sorted(runs.index) == sorted(methods)
    cols = ["cold/ndcg@10", "new-client/ndcg@10", "warm/ndcg@10"]
    assert runs[cols].notna().all().all() and (runs[cols] >= 0).all().all()
    # three different scorers on the same users: not three copies of one number
    assert runs.loc[["popularity", "item-knn", "ease"], "warm/ndcg@10"].nunique() == 3
    table = (tmp_path / "compare_table.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == [
        "popularity", "item-knn", "ease", "centralised", "fedavg"]
    assert (tmp_path / "centralised" / "seed0" / "metrics.csv").is_file()


def test_ease_on_a_catalogue_above_its_limit_exits_2(tmp_path, monkeypatch, capsys):
    from functools import partial

    from fedmeta.eval import baselines

    monkeypatch.setitem(baselines.ROWS, "ease", partial(baselines.ease_rows, max_items=100))
    assert main(["--seeds", "0", "--methods", "ease", "--out", str(tmp_path), *SMALL]) == 2
    assert "above the dense EASE limit of 100" in capsys.readouterr().err


def test_parallel_cells_give_the_same_rows_as_serial_ones(tmp_path):
    # --jobs 2 runs each cell in a spawned process of its own; same cells, same numbers
    args = ["--seeds", "0", "1", "--methods", "popularity", *SMALL]
    assert main([*args, "--out", str(tmp_path / "serial")]) == 0
    assert main([*args, "--jobs", "2", "--out", str(tmp_path / "par")]) == 0
    cols = ["method", "seed", "cold/ndcg@10", "warm/ndcg@10"]
    serial = pd.read_csv(tmp_path / "serial" / "compare_runs.csv")[cols]
    par = pd.read_csv(tmp_path / "par" / "compare_runs.csv")[cols]
    pd.testing.assert_frame_equal(serial, par)


def test_a_population_never_measured_is_n_a_not_nan():
    from fedmeta.tools.compare import table_markdown

    frame = pd.DataFrame({"method": ["fedavg", "fedavg"], "seed": [0, 1],
                          "cold/ndcg@10": [0.1, 0.2], "cold/hr@10": [0.2, 0.3],
                          "new-client/ndcg@10": [0.1, 0.1], "new-client/hr@10": [0.2, 0.2],
                          "warm/ndcg@10": [float("nan")] * 2, "warm/hr@10": [float("nan")] * 2})
    row = table_markdown(frame).splitlines()[2].split("|")
    assert row[2].strip() == "0.1500 ± 0.0707"
    assert [c.strip() for c in row[6:8]] == ["n/a", "n/a"]


def test_sigterm_stops_the_workers_too(tmp_path):
    # a kill of fedmeta-compare --jobs 2 must not leave its pool's workers training on
    import signal
    import subprocess
    import sys
    import time

    import psutil

    cmd = [sys.executable, "-m", "fedmeta.tools.compare", "--jobs", "2", "--seeds", "0", "1",
           "--methods", "fedavg", "--out", str(tmp_path), *SMALL, "runtime.rounds=50"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.time() + 120
        while time.time() < deadline:
            workers = [c for c in parent.children(recursive=True)
                       if "spawn_main" in " ".join(c.cmdline())]
            if len(workers) == 2:
                break
            time.sleep(0.2)
        assert len(workers) == 2, "the pool's two workers never started"
        time.sleep(3)                      # inside their cells
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers left running: {[w.pid for w in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
