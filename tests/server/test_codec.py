"""Wire format: tensors, updates and metric rows survive the trip through Flower records."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedmeta.algorithms.base import ClientUpdate
from server.codec import (CodecError, array_record_nbytes, content_to_update, from_array_record,
                          records_to_rows, rows_to_records, to_array_record, update_to_content)


def _params():
    g = torch.Generator().manual_seed(0)
    return {"enc.layer.0.w": torch.randn(4, 3, generator=g),
            "b": torch.randn(5, generator=g, dtype=torch.float64),
            "count": torch.arange(6, dtype=torch.int64).reshape(2, 3)}


def test_tensor_dict_round_trip_is_exact_and_keeps_order_dtype_shape():
    params = _params()
    back = from_array_record(to_array_record(params))
    assert list(back) == list(params)
    for k, v in params.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v)


def test_nbytes_counts_every_payload_buffer():
    params = _params()
    raw = sum(t.numel() * t.element_size() for t in params.values())
    n = array_record_nbytes(to_array_record(params))
    assert raw < n < raw + 200 * len(params)      # the buffers plus small .npy headers


def test_update_round_trip_recovers_delta_tasks_metrics_and_state():
    g = torch.Generator().manual_seed(1)
    glob = {"w": torch.randn(3, 4, generator=g), "v": torch.randn(7, generator=g)}
    delta = {"w": 0.1 * torch.randn(3, 4, generator=g), "v": 0.1 * torch.randn(7, generator=g)}
    state = {"dp": {"history": [[1.1, 0.25, 4]], "noise_multiplier": 1.1}, "epsilon": 0.7}
    content = update_to_content(ClientUpdate(delta, 17, {"train_query_loss": 2.5, "epsilon": 0.7}),
                                glob, "social-1", state)
    assert torch.allclose(from_array_record(content["arrays"])["w"], glob["w"] - delta["w"])
    cid, update, back_state = content_to_update(content, glob)
    assert cid == "social-1" and update.num_tasks == 17 and back_state == state
    assert update.metrics == {"train_query_loss": 2.5, "epsilon": 0.7}
    for k in glob:
        assert torch.allclose(update.delta[k], delta[k], atol=1e-6, rtol=0)


def test_mis_shaped_reply_is_passed_on_for_the_server_check_not_silently_fixed():
    glob = {"w": torch.zeros(3, 4)}
    content = update_to_content(ClientUpdate({"w": torch.zeros(2)}, 1), {"w": torch.zeros(2)},
                                "c", None)
    _, update, _ = content_to_update(content, glob)
    assert update.delta["w"].shape == (2,)


def test_reply_without_meta_or_weight_is_rejected_by_name():
    glob = {"w": torch.zeros(2)}
    content = update_to_content(ClientUpdate({"w": torch.ones(2)}, 1), glob, "c", None)
    no_meta = RecordDict({k: v for k, v in content.items() if k != "meta"})
    with pytest.raises(CodecError, match="'meta'"):
        content_to_update(no_meta, glob)
    content["metrics"] = type(content["metrics"])({"loss": 1.0})
    with pytest.raises(CodecError, match="num-examples"):
        content_to_update(content, glob)


def test_non_numeric_metric_is_refused():
    with pytest.raises(CodecError, match="flag"):
        update_to_content(ClientUpdate({"w": torch.ones(1)}, 1, {"flag": True}),
                          {"w": torch.ones(1)}, "c", None)


def test_metric_rows_round_trip_including_nan_and_empty():
    rows = [{"round": 3, "population": "warm", "stage": "after", "domain": "social",
             "client": "social-0", "metric": "ndcg@10", "value": 0.123456789012345},
            {"round": 3, "population": "cold", "stage": "before", "domain": "social",
             "client": "social-0", "metric": "mrr", "value": float("nan")}]
    back = records_to_rows(rows_to_records(rows))
    assert back[0] == rows[0]
    assert math.isnan(back[1]["value"]) and {**back[1], "value": 0} == {**rows[1], "value": 0}
    assert records_to_rows(rows_to_records([])) == []


def test_rows_with_ragged_columns_are_rejected():
    content = rows_to_records([{"round": 1, "population": "warm", "stage": "after", "domain": "d",
                                "client": "c", "metric": "m", "value": 1.0}])
    content["rows-text"] = ConfigRecord({**content["rows-text"], "metric": ["m", "extra"]})
    with pytest.raises(CodecError, match="lengths"):
        records_to_rows(content)
