"""Property-based fuzzing of the two parsers that read what strangers send: the safetensors header and
the shard index. Whatever the bytes, they either load consistently or raise MergeError, nothing else;
a header that loads never points past the end of its file.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import io_utils
from conftest import save_safetensors

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
dtype_codes = st.sampled_from([*io_utils.SAFETENSORS_DTYPES, "F128", "f32", "", "I4"]) | json_values
sizes = st.integers(min_value=-2, max_value=40) | st.sampled_from([2**31, 2**63, 2**64 + 1])
entries = st.fixed_dictionaries({}, optional={
    "dtype": dtype_codes,
    "shape": st.lists(st.integers(min_value=-1, max_value=6), max_size=3) | json_values,
    "data_offsets": st.lists(sizes, min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__", "model.w"]) | st.text(max_size=6),
                          entries | json_values, max_size=4)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def assert_loads_consistently_or_refuses(path, content: bytes) -> None:
    """MergeError, or every tensor lies inside the file and reads back at its declared size."""
    path.write_bytes(content)
    try:
        parsed = io_utils.SafetensorsFile(str(path))
    except io_utils.MergeError:
        return
    size = len(content)
    try:
        for name, info in parsed.infos.items():
            begin, end = parsed.offsets[name]
            assert 8 <= begin <= end <= size
            assert end - begin == info.nbytes
            assert parsed.read(name).numel() == info.numel
    finally:
        parsed.close()


@FUZZ
@given(content=st.binary(max_size=300))
def test_arbitrary_bytes_load_or_raise_merge_error(scratch, content):
    assert_loads_consistently_or_refuses(scratch / "raw.safetensors", content)


@FUZZ
@given(header=headers, data=st.binary(max_size=64), length_error=st.sampled_from([0, 0, 0, -1, 1, 2**40]),
       padding=st.sampled_from([b"", b"   ", b"\n"]))
def test_arbitrary_headers_load_or_raise_merge_error(scratch, header, data, length_error, padding):
    raw = json.dumps(header).encode() + padding
    length = max(len(raw) + length_error, 0)
    assert_loads_consistently_or_refuses(scratch / "header.safetensors", struct.pack("<Q", length) + raw + data)


SHARD = "model-00001-of-00001.safetensors"


@FUZZ
@given(index=json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.sampled_from(["w", "v", "x.y"]) | st.text(max_size=4),
    st.sampled_from([SHARD, "missing.safetensors", "../m.safetensors", "", ".", "model.safetensors.index.json"])
    | json_values, max_size=3)}))
def test_arbitrary_index_json_loads_or_raises_merge_error(scratch, index):
    folder = scratch / "sharded"
    save_safetensors(folder / SHARD, {"w": torch.ones(2), "x.y": torch.zeros(3)})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        model = io_utils.open_model(str(folder), "fuzzed", lambda kind, message: None)
    except io_utils.MergeError:
        return
    try:
        assert set(model.index) == set(index["weight_map"]) <= {"w", "x.y"}
        for name in model.index:
            assert model.read(name).numel() == model.infos[name].numel
    finally:
        model.close()


@FUZZ
@given(content=st.binary(max_size=200))
def test_arbitrary_index_bytes_load_or_raise_merge_error(scratch, content):
    folder = scratch / "raw_index"
    save_safetensors(folder / SHARD, {"w": torch.ones(2)})
    (folder / "model.safetensors.index.json").write_bytes(content)
    try:
        io_utils.open_model(str(folder), "fuzzed", lambda kind, message: None).close()
    except io_utils.MergeError:
        pass
