"""RecBole atomic files: declared field types checked and mapped onto text and attributes."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from fedmeta.data.loaders import load_recbole
from fedmeta.model.features import item_tokens
from tests.data.test_loaders import FIX, item, raises_at, rows, write

TYPED = FIX / "recbole" / "typed"
HEAD = "item_id:token\tmovie_title:token_seq\tgenre:token_seq\tprice:float\temb:float_seq\n"


def _ml100k_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("recbole")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    return path if (path / "ml-100k.inter").is_file() else None


def _inter(tmp_path: Path) -> None:
    write(tmp_path / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\tm1\t1\n")


def test_typed_fields_become_text_and_attributes(caplog):
    with caplog.at_level(logging.INFO):
        data = load_recbole(TYPED)
    assert rows(data) == [("u1", "m1", 100.0, "rating", 4.0), ("u1", "m2", 110.0, "rating", 3.5),
                          ("u2", "m1", 120.0, "rating", 5.0), ("u2", "m3", 130.0, "rating", 2.0)]
    m1 = item(data, "m1")
    assert m1["text"] == "The Long Road"  # token_seq words joined back with single spaces
    assert m1["genre"] == "Drama|War|Western"  # every genre kept
    assert m1["release_year"] == "1994" and item(data, "m2")["release_year"] == "2001"
    assert m1["price"] == "9.5" and m1["studio"] == "North Films"
    assert "emb" not in data.items.columns
    assert "float_seq fields ['emb'] left out" in caplog.text
    assert "fields ['review'] are not used" in caplog.text
    m4 = item(data, "m4")  # catalogue-only item with empty optional fields
    assert (m4["text"], m4["genre"], m4["price"], m4["studio"]) == ("Never Seen", "", "", "South")


def test_multi_valued_genres_reach_the_featuriser_as_separate_tokens():
    data = load_recbole(TYPED)
    m1 = item(data, "m1")
    tokens = item_tokens(m1, data.attribute_columns)
    for genre in ("drama", "war", "western"):
        assert f"genre={genre}" in tokens
    assert {"the", "long", "road"} <= set(tokens)


@pytest.mark.parametrize("row, line, column, text", [
    ("m1\tA\tDrama\t12\t0.1 0.2\nm2\tB\tWar\tcheap\t0.3 0.4\n", 3, "price",
     "declared float, but 'cheap' is not a number"),
    ("m1\tA\tDrama\t12\t0.1 x2\n", 2, "emb", "declared float_seq, but 'x2' in '0.1 x2'"),
    ("m1\tA\tDrama\tinf\t0.1\n", 2, "price", "'inf' is not a number"),
])
def test_value_not_matching_its_type_is_located(tmp_path, row, line, column, text):
    _inter(tmp_path)
    write(tmp_path / "d.item", HEAD + row)
    raises_at(load_recbole, tmp_path, file="d.item", line=line, column=column, also=[text])


def test_inter_and_user_fields_are_type_checked_too(tmp_path):
    write(tmp_path / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\tw:float\n"
                                "u\tm1\t1\t0.5\nu\tm2\t2\theavy\n")
    raises_at(load_recbole, tmp_path, file="d.inter", line=3, column="w", also=["'heavy'"])
    _inter(tmp_path)
    write(tmp_path / "d.user", "user_id:token\tage:float\nu\tthirty\n")
    raises_at(load_recbole, tmp_path, file="d.user", line=2, column="age", also=["'thirty'"])


def test_header_mistakes(tmp_path):
    _inter(tmp_path)
    write(tmp_path / "d.item", "item_id:token\tgenre:tokens\nm1\tA\n")
    raises_at(load_recbole, tmp_path, file="d.item", line=1, column="genre:tokens",
              also=["'name:type'"])
    write(tmp_path / "d.item", "item_id:token\tgenre:token\tgenre:token_seq\nm1\tA\tB\n")
    raises_at(load_recbole, tmp_path, file="d.item", line=1, column="genre",
              also=["declared twice"])
    write(tmp_path / "d.item", "item_id:token\tgenre:token_seq\nm1\n")
    raises_at(load_recbole, tmp_path, file="d.item", line=2, column=None,
              also=["expected 2 fields, found 1"])


def test_installed_ml100k_atomic_files():
    folder = _ml100k_dir()
    if folder is None:
        pytest.skip("RecBole's ML-100K example files are not installed "
                    "(pip install --no-deps recbole==1.2.1)")
    data = load_recbole(folder, domain="ml")
    assert len(data.interactions) == 100_000 and data.interactions["user"].nunique() == 943
    assert len(data.items) == 1682 and (data.items["text"] != "").all()
    assert data.interactions["timestamp"].nunique() > 1000
    toy = item(data, "1")
    assert toy["text"] == "Toy Story" and toy["class"] == "Animation|Children's|Comedy"
    assert toy["release_year"] == "1995"
    # every genre of every film survives: count tokens in the raw file against the loaded ones
    raw = (folder / "ml-100k.item").read_text(encoding="utf-8").splitlines()[1:]
    n_raw = sum(len(line.split("\t")[3].split()) for line in raw)
    n_loaded = data.items["class"].str.split("|").str.len().sum()
    assert n_loaded == n_raw and n_raw > 1682
