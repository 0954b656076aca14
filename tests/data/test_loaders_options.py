"""Options every loader accepts (equal-timestamp policy, per-source minimum, user subsample)
and the one summary line each source logs."""

from __future__ import annotations

import importlib.util
import logging
import random

import pytest

from fedmeta.data import packaged
from fedmeta.data.loaders import SHARED_OPTIONS, OptionError, load_csv, load_source
from fedmeta.data.schema import DataError
from tests.data.test_loaders import FIX, raises_at, rows, write

COLS = {"user": "u", "item": "i", "timestamp": "t"}


def _grid(tmp_path, n_users: int = 20, per_user: int = 3, shuffle: int | None = None,
          name: str = "grid.csv"):
    lines = [f"user{u:02d},item{k},{u * 100 + k}" for u in range(n_users)
             for k in range(per_user)]
    if shuffle is not None:
        random.Random(shuffle).shuffle(lines)
    return write(tmp_path / name, "u,i,t\n" + "\n".join(lines) + "\n")


def _summaries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and "-> domain" in r.getMessage()]


# ------------------------------------------------------------------- equal timestamps
def test_all_equal_timestamps_warn_by_default_and_keep_the_data(tmp_path, caplog):
    f = write(tmp_path / "flat.csv", "u,i,t\nx,a,5\nx,b,5\ny,a,5\n")
    with caplog.at_level(logging.WARNING):
        data = load_csv(f, COLS, domain="shop")
    assert [t for *_, t, _, _ in rows(data)] == [5.0, 5.0, 5.0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(f) in m and "domain 'shop'" in m and "all 3 interactions have the same "
               "timestamp 5" in m for m in warned), warned


def test_one_timestamp_per_user_counts_as_a_useless_clock(tmp_path, caplog):
    f = write(tmp_path / "daily.csv", "u,i,t\nx,a,5\nx,b,5\ny,a,9\ny,c,9\nz,a,7\n")
    with caplog.at_level(logging.WARNING):
        load_csv(f, COLS)
    assert "each of the 2 users with several interactions has a single distinct timestamp" \
        in caplog.text


def test_error_policy_raises_naming_file_domain_and_column(tmp_path):
    f = write(tmp_path / "flat.csv", "u,i,t\nx,a,5\nx,b,5\n")
    raises_at(load_csv, f, COLS, domain="shop", on_equal_timestamps="error", file="flat.csv",
              line=None, column="timestamp", also=["domain 'shop'", "on_equal_timestamps=error"])


def test_row_order_policy_replaces_the_clock_and_says_so(tmp_path, caplog):
    f = write(tmp_path / "flat.csv", "u,i,t\ny,a,5\nx,b,5\ny,c,5\n")
    with caplog.at_level(logging.INFO):
        data = load_csv(f, COLS, on_equal_timestamps="row_order")
    assert rows(data) == [("y", "a", 0.0, "view", 1.0), ("x", "b", 1.0, "view", 1.0),
                          ("y", "c", 2.0, "view", 1.0)]
    assert "replacing the clock with file row order" in caplog.text
    assert "clock: file row order (on_equal_timestamps=row_order)" in _summaries(caplog)[0]


def test_a_clock_with_some_ties_is_left_alone(tmp_path, caplog):
    f = write(tmp_path / "ok.csv", "u,i,t\nx,a,5\nx,b,5\ny,a,1\ny,c,2\n")
    with caplog.at_level(logging.WARNING):
        data = load_csv(f, COLS, on_equal_timestamps="error")
    assert [r[2] for r in rows(data)] == [5.0, 5.0, 1.0, 2.0]
    assert "timestamp" not in caplog.text


@pytest.mark.parametrize("kind, name, text, extra", [
    ("movielens", "u.data", "1\t5\t3\t10\n1\t6\t4\t10\n", {}),
    ("recbole", "d.inter", "user_id:token\titem_id:token\ttimestamp:float\na\tx\t3\na\ty\t3\n",
     {}),
    ("orange_tab", "t.tab", "user\tmovie\tscore\twhen\nc\tc\tc\ttime\nrow=1\tcol=1\tclass\t\n"
                            "1\t2\t3\t2020-01-01\n1\t3\t3\t2020-01-01\n", {}),
    ("csv", "c.csv", "u,i,t\nx,a,1\nx,b,1\n", {"columns": COLS}),
])
def test_every_loader_goes_through_the_policy(tmp_path, kind, name, text, extra):
    f = write(tmp_path / name, text)
    with pytest.raises(DataError, match="on_equal_timestamps=error"):
        load_source(kind, path=str(f), on_equal_timestamps="error", **extra)
    data = load_source(kind, path=str(f), on_equal_timestamps="row_order", **extra)
    assert data.interactions["timestamp"].tolist() == [0.0, 1.0]


# ------------------------------------------------------------------- subsample
def test_max_users_keeps_whole_histories_deterministically(tmp_path, caplog):
    f = _grid(tmp_path)
    full = load_csv(f, COLS)
    with caplog.at_level(logging.INFO):
        a = load_csv(f, COLS, max_users=5, subsample_seed=7)
    b = load_csv(f, COLS, max_users=5, subsample_seed=7)
    c = load_csv(f, COLS, max_users=5, subsample_seed=8)
    kept = sorted(a.interactions["user"].unique())
    assert len(kept) == 5 and kept == sorted(b.interactions["user"].unique())
    assert kept != sorted(c.interactions["user"].unique())
    assert (a.interactions.groupby("user").size() == 3).all()  # every kept user is whole
    assert len(a.items) == len(full.items)  # catalogue untouched: unrated items stay candidates
    (line,) = _summaries(caplog)
    assert "kept 5 users" in line and "15 interactions" in line
    assert "15 users (45 interactions) by subsample max_users=5, subsample_seed=7" in line


def test_subsample_depends_on_user_ids_not_file_order(tmp_path):
    a = load_csv(_grid(tmp_path, name="a.csv"), COLS, domain="d", max_users=6)
    b = load_csv(_grid(tmp_path, shuffle=3, name="b.csv"), COLS, domain="d", max_users=6)
    assert sorted(a.interactions["user"].unique()) == sorted(b.interactions["user"].unique())


def test_user_fraction_rounds_up_and_max_users_beyond_the_count_keeps_all(tmp_path):
    f = _grid(tmp_path, n_users=10)
    assert load_csv(f, COLS, user_fraction=0.25).interactions["user"].nunique() == 3
    assert load_csv(f, COLS, user_fraction=1.0).interactions["user"].nunique() == 10
    assert load_csv(f, COLS, max_users=50).interactions["user"].nunique() == 10


def test_min_interactions_drops_short_users_before_the_subsample(tmp_path, caplog):
    lines = [f"long{u},i{k},{u * 10 + k}" for u in range(6) for k in range(3)]
    lines += [f"short{u},i0,{500 + u}" for u in range(30)]
    f = write(tmp_path / "mix.csv", "u,i,t\n" + "\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO):
        data = load_csv(f, COLS, min_interactions=2, max_users=4)
    users = set(data.interactions["user"])
    assert len(users) == 4 and all(u.startswith("long") for u in users)
    (line,) = _summaries(caplog)
    assert "30 short users (30 interactions, min_interactions=2)" in line
    assert "2 users (6 interactions) by subsample max_users=4" in line
    with pytest.raises(DataError, match="no user with at least 9 interactions"):
        load_csv(f, COLS, min_interactions=9)


@pytest.mark.parametrize("options, message", [
    ({"max_users": 0}, "max_users=0: must be an integer >= 1"),
    ({"max_users": 2.5}, "max_users=2.5"),
    ({"max_users": True}, "max_users=True"),
    ({"max_users": "3"}, "max_users='3'"),
    ({"user_fraction": 0}, "user_fraction=0: must be a number in (0, 1]"),
    ({"user_fraction": 1.5}, "user_fraction=1.5"),
    ({"max_users": 3, "user_fraction": 0.5}, "give max_users or user_fraction, not both"),
    ({"subsample_seed": "x"}, "subsample_seed='x': must be an integer"),
    ({"on_equal_timestamps": "maybe"}, "must be one of ['warn', 'error', 'row_order']"),
    ({"min_interactions": 0}, "min_interactions=0"),
])
def test_bad_option_values_are_errors_naming_the_option(tmp_path, options, message):
    f = _grid(tmp_path, n_users=4)
    with pytest.raises(OptionError) as info:
        load_csv(f, COLS, **options)
    assert message in str(info.value)
    # a DataError for callers, a TypeError so the config layer names data.real[i].options
    assert isinstance(info.value, DataError) and isinstance(info.value, TypeError)


def test_unknown_option_is_a_type_error_listing_the_valid_ones(tmp_path):
    f = _grid(tmp_path, n_users=4)
    with pytest.raises(TypeError) as info:
        load_source("csv", path=str(f), columns=COLS, max_user=3)
    msg = str(info.value)
    assert "load_csv() got unknown option(s) ['max_user']" in msg
    for name in SHARED_OPTIONS + ("names", "header"):
        assert f"'{name}'" in msg
    assert not isinstance(info.value, DataError)


def test_options_reach_the_loader_from_the_hydra_config(tmp_path):
    from fedmeta.runtime.federation import load_data
    from fedmeta.runtime.hydra_config import compose

    f = _grid(tmp_path, n_users=12)
    source = (f"{{kind: csv, path: '{f}', domain: shop, options: {{columns: {{user: u, item: i,"
              f" timestamp: t}}, OPT}}}}")
    cfg = compose(["data.source=real",
                   f"data.real=[{source.replace('OPT', 'max_users: 4, subsample_seed: 1')}]"])
    data = load_data(cfg)
    assert data.interactions["user"].nunique() == 4 and data.domains == ["shop"]
    typo = compose(["data.source=real", f"data.real=[{source.replace('OPT', 'max_user: 4')}]"])
    with pytest.raises(DataError, match=r"data.real\[0\].options: .*unknown option"):
        load_data(typo)
    bad = compose(["data.source=real", f"data.real=[{source.replace('OPT', 'max_users: -4')}]"])
    with pytest.raises(DataError, match=r"data.real\[0\].options: option max_users=-4"):
        load_data(bad)


# ------------------------------------------------------------------- summary line
def test_one_summary_line_per_source_with_what_was_dropped(tmp_path, caplog):
    f = write(tmp_path / "d.csv", "u,i,t\nx,a,1\nx,a,1\nx,b,2\ny,a,3\ny,z,4\n")
    items = write(tmp_path / "items.csv", "id,title\na,Apple\nb,Bread\nc,Cheese\n")
    with caplog.at_level(logging.INFO):
        load_csv(f, COLS, domain="shop", items_path=items, item_columns={"item": "id",
                                                                         "text": "title"})
    (line,) = _summaries(caplog)
    assert line.startswith(f"csv {f} -> domain 'shop': kept 2 users, 4 items (3 with "
                           f"interactions), 4 interactions; dropped: 1 duplicate rows, ")
    assert "short users not filtered here" in line
    assert "unknown items: 1 added to the catalogue" in line  # 'z' has no catalogue row
    assert "subsample" not in line


def test_packaged_sources_take_the_same_options(caplog):
    try:
        installed = importlib.util.find_spec("recbole") is not None
    except ImportError:
        installed = False
    if not installed:
        pytest.skip(f"recbole not installed ({packaged.INSTALL_COMMAND})")
    with caplog.at_level(logging.INFO):
        ml = packaged.load_packaged("ml100k", max_users=50, subsample_seed=3, min_interactions=20)
    assert ml.interactions["user"].nunique() == 50
    assert ml.interactions.groupby("user").size().min() >= 20
    assert len(ml.items) == 1682 and "genre" in ml.items.columns
    (line,) = _summaries(caplog)
    assert line.startswith("recbole ") and "ml-100k.inter -> domain 'movielens': kept 50 users" \
        in line
    with pytest.raises(TypeError, match="unknown option"):
        packaged.load_packaged("ml100k", max_user=50)


def test_fixture_loaders_each_log_exactly_one_summary(caplog):
    with caplog.at_level(logging.INFO):
        for kind, sub in (("movielens", "ml_dat"), ("recbole", "recbole/toy"),
                          ("filmtrust", "filmtrust"), ("epinions", "epinions"),
                          ("instacart", "instacart/orders.csv"),
                          ("orange_tab", "orange/plain.tab")):
            load_source(kind, path=str(FIX / sub))
    lines = _summaries(caplog)
    assert [line.split()[0] for line in lines] == ["movielens", "recbole", "filmtrust",
                                                   "epinions", "instacart", "orange_tab"]
