"""Fixed vocabularies: a Choice member reads as its value, and parsing names what is allowed."""

from __future__ import annotations

import json

import pytest

from edge.backends import BackendKind
from edge.bundle import Precision
from scanner_io.cli_common import split_choices
from scanner_io.errors import ThzEdgeError


def test_a_member_is_its_value_in_strings_and_json():
    assert Precision.int8 == "int8" and f"{Precision.int8}" == "int8" and str(BackendKind.ort) == "ort"
    assert json.dumps({"p": Precision.fp16}) == '{"p": "fp16"}'


def test_parse_takes_members_and_strings_and_names_the_choices():
    assert Precision.parse("int8", "precision") is Precision.int8
    assert Precision.parse(Precision.fp16, "precision") is Precision.fp16
    with pytest.raises(ThzEdgeError, match=r"unknown precision 'int4'; use one of fp32, fp16, int8"):
        Precision.parse("int4", "precision")


def test_split_choices_parses_a_comma_list():
    assert split_choices(BackendKind, " ort, TRT ,", "--backend") == [BackendKind.ort, BackendKind.trt]
    with pytest.raises(ThzEdgeError, match=r"unknown --backend value 'cuda'; use one of auto, ort, trt"):
        split_choices(BackendKind, "ort,cuda", "--backend")
    with pytest.raises(ThzEdgeError, match="needs at least one"):
        split_choices(BackendKind, " , ", "--backend")
