"""`thzedge infer` and `thzedge eval` through the real CLI, a real ONNX Runtime bundle and files."""

from __future__ import annotations

import numpy as np
import pytest

from edge.cli import main
from edge.infer import array_to_inputs, load_inputs
from scanner_io.errors import EXIT_DATA, DataError


def _run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("thzedge: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------
# input files (no model needed)


def test_uint8_and_float_arrays_become_model_inputs():
    u8 = np.arange(2 * 64 * 64, dtype=np.int64).reshape(2, 64, 64) % 256
    x = array_to_inputs(u8.astype(np.uint8), "a.npy")
    assert x.shape == (2, 1, 64, 64) and x.dtype == np.float32
    assert np.array_equal(x[:, 0] * 255, u8.astype(np.float32))
    f = np.linspace(0, 1, 64 * 64).reshape(1, 1, 64, 64)
    assert np.array_equal(array_to_inputs(f, "b.npy"), f.astype(np.float32))


def test_npy_rows_are_named_by_file_and_index(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 64, 64), np.uint8))
    np.save(tmp_path / "b.npy", np.ones((1, 1, 64, 64), np.float32))
    batch = load_inputs([tmp_path / "b.npy", tmp_path / "a.npy"])
    assert batch.names == ["b.npy[0]", "a.npy[0]", "a.npy[1]", "a.npy[2]"]
    assert batch.x.shape == (4, 1, 64, 64)
    assert batch.x[0].min() == 1.0 and batch.x[1:].max() == 0.0
    # a directory stands for its files in name order
    assert load_inputs([tmp_path]).names == ["a.npy[0]", "a.npy[1]", "a.npy[2]", "b.npy[0]"]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 32, 32), np.uint8), "not [N,64,64] or [N,1,64,64]"),
        (np.zeros((2, 3, 64, 64), np.uint8), "not [N,64,64] or [N,1,64,64]"),
        (np.zeros((64, 64), np.uint8), "not [N,64,64] or [N,1,64,64]"),
        (np.zeros((1, 64, 64), np.uint16), "dtype uint16 is not supported"),
        (np.zeros((1, 64, 64), np.int32), "dtype int32 is not supported"),
        (np.full((1, 64, 64), 1.5, np.float32), "outside [0,1]"),
        (np.full((1, 64, 64), -0.1, np.float64), "outside [0,1]"),
        (np.full((1, 64, 64), np.nan, np.float32), "NaN or inf"),
    ],
)
def test_bad_npy_is_one_line_naming_the_file(tmp_path, capsys, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    code, out, err = _run_cli(
        capsys, "infer", "--model", tmp_path / "nobundle", path, "--out", tmp_path / "r.npz"
    )
    assert code == EXIT_DATA
    line = _one_line_error(err)
    assert "bad.npy" in line and message in line
    assert not (tmp_path / "r.npz").exists()


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy: not a readable .npy array"):
        load_inputs([path])


def test_missing_and_unsupported_inputs_are_named(tmp_path, capsys):
    code, _, err = _run_cli(
        capsys, "infer", "--model", tmp_path, tmp_path / "nope.png", "--out", tmp_path / "r.npz"
    )
    assert code == EXIT_DATA
    assert "nope.png: no such input file" in _one_line_error(err)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8")
    code, _, err = _run_cli(
        capsys, "infer", "--model", tmp_path, tmp_path / "x.jpg", "--out", tmp_path / "r.npz"
    )
    assert code == EXIT_DATA
    assert "x.jpg: unsupported input type .jpg" in _one_line_error(err)
