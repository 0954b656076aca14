"""Generic delimited files: headerless layouts named in the config, row-order clocks, field
counts checked on every row."""

from __future__ import annotations

import logging

import pytest

from fedmeta.data.loaders import load_csv, load_movielens, load_source
from fedmeta.data.schema import DataError
from tests.data.test_loaders import FIX, item, raises_at, rows, write

U_DATA = ["user", "item", "rating", "time"]
MAPPING = {"user": "user", "item": "item", "rating": "rating", "timestamp": "time"}


def test_headerless_tsv_maps_the_given_names():
    data = load_csv(FIX / "headerless" / "ratings.tsv", columns=MAPPING, header=False,
                    names=U_DATA, sep="\t")
    assert rows(data) == [("10", "100", 881250949.0, "rating", 4.0),
                          ("10", "101", 881250950.0, "rating", 3.0),
                          ("11", "100", 881250960.0, "rating", 5.0),
                          ("11", "102", 881250970.0, "rating", 2.0),
                          ("12", "101", 881250980.0, "rating", 1.0)]
    assert data.domains == ["ratings"]


def test_headerless_item_table_and_kind_dispatch():
    data = load_source("csv", path=str(FIX / "headerless" / "ratings.tsv"), columns=MAPPING,
                       header=False, names=U_DATA, sep="\t", domain="films",
                       items_path=str(FIX / "headerless" / "items.tsv"), items_header=False,
                       items_names=["id", "title", "genres"],
                       item_columns={"item": "id", "text": "title", "genre": "genres"})
    assert data.domains == ["films"]
    assert item(data, "100")["text"] == "Toy Story (1995)"
    assert item(data, "100")["genre"] == "Animation|Comedy"
    assert item(data, "101")["genre"] == "Action/Crime"


def test_headerless_names_differ_from_the_mapping_keys(tmp_path):
    f = write(tmp_path / "log.csv", "a,x,7\nb,y,8\n")
    data = load_csv(f, {"user": "who", "item": "what", "timestamp": "when"}, header=False,
                    names=["who", "what", "when"])
    assert rows(data) == [("a", "x", 7.0, "view", 1.0), ("b", "y", 8.0, "view", 1.0)]


@pytest.mark.parametrize("line3, found", [("11\t100\t5\n", 3), ("11\t100\t5\t881250960\t9\n", 5)])
def test_headerless_row_with_wrong_field_count_names_file_and_line(tmp_path, line3, found):
    f = write(tmp_path / "bad.tsv", "10\t100\t4\t1\n10\t101\t3\t2\n" + line3 + "12\t101\t1\t4\n")
    raises_at(load_csv, f, MAPPING, header=False, names=U_DATA, sep="\t", file="bad.tsv", line=3,
              column=None, also=[f"expected 4 fields, found {found}", "user"])


def test_short_rows_are_errors_with_a_header_too(tmp_path):
    # pandas pads a short row with empty strings; that must not become a silent default
    f = write(tmp_path / "h.csv", "u,i,t,r\nx,a,1,3\n\nx,b,2\n")
    raises_at(load_csv, f, {"user": "u", "item": "i", "timestamp": "t", "rating": "r"},
              file="h.csv", line=4, column=None, also=["expected 4 fields, found 3",
                                                      "as in the header"])
    g = write(tmp_path / "u.data", "1\t5\t3\t10\n1\t6\t4\n")
    raises_at(load_movielens, g, file="u.data", line=2, column=None,
              also=["expected 4 fields, found 3"])


def test_quoted_separators_are_not_counted_but_short_quoted_rows_are(tmp_path):
    f = write(tmp_path / "q.csv", 'u,i,t\n"smith, j",a,1\nlee,"b\nc",2\nkim,z\n')
    raises_at(load_csv, f, {"user": "u", "item": "i", "timestamp": "t"}, file="q.csv", line=5,
              column=None, also=["expected 3 fields, found 2"])
    write(f, 'u,i,t\n"smith, j",a,1\nkim,z,3\n')
    data = load_csv(f, {"user": "u", "item": "i", "timestamp": "t"})
    assert rows(data)[0] == ("smith, j", "a", 1.0, "view", 1.0)


def test_headerless_option_mistakes_are_explained(tmp_path):
    f = FIX / "headerless" / "ratings.tsv"
    with pytest.raises(DataError, match="header: false needs names"):
        load_csv(f, MAPPING, header=False, sep="\t")
    with pytest.raises(DataError, match="names is for headerless files"):
        load_csv(f, MAPPING, names=U_DATA, sep="\t")
    raises_at(load_csv, f, {**MAPPING, "timestamp": "ts"}, header=False, names=U_DATA, sep="\t",
              file="ratings.tsv", line=None, column="ts", also=["not among names"])
    with pytest.raises(DataError, match=r"repeats \['item'\]"):
        load_csv(f, MAPPING, header=False, names=["user", "item", "item", "time"], sep="\t")
    with pytest.raises(DataError, match="list of non-empty strings"):
        load_csv(f, MAPPING, header=False, names="user item rating time", sep="\t")
    with pytest.raises(DataError, match="without items_path"):
        load_csv(f, MAPPING, header=False, names=U_DATA, sep="\t", item_columns={"item": "x"})


def test_no_timestamp_column_uses_row_order_and_warns_naming_the_file(tmp_path, caplog):
    f = write(tmp_path / "plain.csv", "u,i,r\nx,a,3\ny,b,4\nx,c,5\n")
    with caplog.at_level(logging.WARNING):
        data = load_csv(f, {"user": "u", "item": "i", "rating": "r"})
    assert rows(data) == [("x", "a", 0.0, "rating", 3.0), ("y", "b", 1.0, "rating", 4.0),
                          ("x", "c", 2.0, "rating", 5.0)]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(f) in m and "row order" in m for m in warned), warned
    with pytest.raises(DataError, match="timestamp_format given but no 'timestamp'"):
        load_csv(f, {"user": "u", "item": "i"}, timestamp_format="%Y")


def test_timestamp_column_present_means_no_row_order_warning(caplog):
    with caplog.at_level(logging.WARNING):
        load_csv(FIX / "headerless" / "ratings.tsv", MAPPING, header=False, names=U_DATA,
                 sep="\t")
    assert "row order" not in caplog.text
