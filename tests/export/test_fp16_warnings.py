"""FP16 conversion: the converter's per-tensor truncation warnings become one summarised log line."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.quantize import QuantizeSettings, convert_onnx_fp16  # noqa: E402


def _graph_with_out_of_range_weights(path: Path) -> Path:
    """x * w1 + w2 + w3, with weights fp16 cannot hold: tiny, huge, and a tiny negative."""
    weights = {
        "w1": np.array([1e-12, 0.5, 2.0], np.float32),
        "w2": np.array([1e6, 1.0, -3.0], np.float32),
        "w3": np.array([-2e-9, 0.25, 1.0], np.float32),
    }
    nodes = [
        helper.make_node("Mul", ["x", "w1"], ["a"]),
        helper.make_node("Add", ["a", "w2"], ["b"]),
        helper.make_node("Add", ["b", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_truncation_warnings_are_one_log_line(tmp_path: Path, caplog) -> None:
    src = _graph_with_out_of_range_weights(tmp_path / "encoder.onnx")
    settings = QuantizeSettings(precision="fp16", quantizer="onnxconverter", keep_float=())
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, "export.quantize"):
        warnings.simplefilter("always")
        assert convert_onnx_fp16(src, tmp_path / "fp16.onnx", settings) == "onnxconverter-common"
    assert [str(w.message) for w in seen if "truncated" in str(w.message)] == []
    lines = [r.getMessage() for r in caplog.records if "fp16" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("fp16 encoder.onnx: weights clamped to the fp16 range in 3 place(s): ")
    assert "2 below fp16's smallest 1e-07 (down to 1e-12)" in lines[0]
    assert "1 above fp16's largest 65504 (up to 1e+06)" in lines[0]
    converted = onnx.load(str(tmp_path / "fp16.onnx"))
    kinds = {i.name: i.data_type for i in converted.graph.initializer}
    assert set(kinds.values()) == {TensorProto.FLOAT16}
