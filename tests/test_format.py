"""Tests of the .tinyrt container (tinyrt.format): round trips, layout, atomic writes, and a
corpus of malformed files derived from one valid file."""

import functools
import json
import mmap
import os
import stat
import struct
import tracemalloc
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyrt.format
from tinyrt.errors import FormatError
from tinyrt.format import (
    ALIGNMENT,
    DTYPES,
    FORMAT_VERSION,
    MAGIC,
    ModelFile,
    Tensor,
    read_model_file,
    serialize,
    write_model_file,
)
from tinyrt.packing import ConvRows, RowBlocks, pack_bits, pack_group_blocks, unpack_bits

# The header as docs/format.md specifies it, written out independently of tinyrt.format.
HEADER = struct.Struct("<8sHHIQQQQIIII")
HEADER_NAMES = (
    "magic major minor header_size metadata_offset metadata_nbytes data_offset data_nbytes "
    "metadata_crc data_crc flags header_crc"
).split()
PACKED_BITS = {"int4": 4, "int2": 2}
GRAPH = {"ops": [{"op": "linear", "tensors": {"weight": 0, "bias": 2}}], "values": []}
PROVENANCE = {"converter": "tinyrt 0.1.0", "source": "tests"}


def _header(blob: bytes) -> dict:
    return dict(zip(HEADER_NAMES, HEADER.unpack(blob[:64]), strict=True))


def _with_header(blob: bytes, **changes: int) -> bytes:
    """Change header fields; recompute the header crc unless ``header_crc`` is given."""
    fields = {**_header(blob), **changes}
    head = HEADER.pack(*(fields[name] for name in HEADER_NAMES))[:60]
    crc = changes.get("header_crc", zlib.crc32(head))
    return head + struct.pack("<I", crc) + blob[64:]


def _with_metadata(blob: bytes, raw: bytes) -> bytes:
    """Replace the metadata bytes, move the data section behind them and fix every checksum."""
    data = blob[_header(blob)["data_offset"] :]
    data_offset = -(-(64 + len(raw)) // 64) * 64
    body = blob[:64] + raw + bytes(data_offset - 64 - len(raw)) + data
    return _with_header(
        body, metadata_nbytes=len(raw), data_offset=data_offset, metadata_crc=zlib.crc32(raw)
    )


def _metadata(blob: bytes) -> dict:
    return json.loads(blob[64 : 64 + _header(blob)["metadata_nbytes"]])


def _quant(scheme: str, bits: int, scale: int, zero_point: int | None = None, **extra) -> dict:
    record = {"scheme": scheme, "axis": 0, "group_size": None, "bits": bits}
    record.update(symmetric=zero_point is None, scale=scale, zero_point=zero_point)
    return {**record, **extra}


@functools.cache
def _model() -> tuple[list[Tensor], dict[str, np.ndarray]]:
    """Tensors of every dtype and quant scheme, and the unpacked values of the packed ones."""
    rng = np.random.default_rng(0)
    w4 = rng.integers(-8, 8, size=(3, 10), dtype=np.int8)
    w2 = rng.integers(-2, 2, size=(5,), dtype=np.int8)
    w3 = rng.integers(-4, 4, size=(2, 3), dtype=np.int8)
    tensors = [
        Tensor(
            "fc.weight",
            "int8",
            (4, 3),
            rng.integers(-127, 128, size=(4, 3), dtype=np.int8),
            _quant("per_channel", 8, scale=1),
        ),
        Tensor("fc.weight_scale", "float32", (4,), rng.random(4, dtype=np.float32)),
        Tensor("fc.bias", "int32", (4,), rng.integers(-(2**31), 2**31, size=4, dtype=np.int32)),
        Tensor("lstm.table", "int16", (2, 3), rng.integers(-(2**15), 2**15, (2, 3), np.int16)),
        Tensor("input.raw", "uint8", (7,), rng.integers(0, 256, size=7, dtype=np.uint8)),
        Tensor(
            "conv.weight",
            "int4",
            (3, 10),
            pack_bits(w4, 4),
            _quant("per_group", 4, scale=6, zero_point=7, group_size=4),
        ),  # 3 rows of ceil(10 / 4) = 3 groups
        Tensor("conv.weight_scale", "float32", (3, 3), rng.random((3, 3), dtype=np.float32)),
        Tensor("conv.weight_zero_point", "int8", (3, 3), rng.integers(-8, 8, (3, 3), np.int8)),
        Tensor("head.weight", "int2", (5,), pack_bits(w2, 2), _quant("per_tensor", 2, scale=9)),
        Tensor("head.weight_scale", "float32", (), np.array(0.25, dtype=np.float32)),
        Tensor(
            "emb.weight",
            "int4",
            (2, 3),
            pack_bits(w3, 4),
            _quant("per_channel", 3, scale=11, zero_point=12, axis=1),
        ),
        Tensor("emb.weight_scale", "float32", (3,), np.array([1, np.nan, np.inf], np.float32)),
        Tensor("emb.weight_zero_point", "int32", (3,), np.array([0, -1, 2], dtype=np.int32)),
    ]
    return tensors, {"conv.weight": w4, "head.weight": w2, "emb.weight": w3}


@functools.cache
def _valid() -> bytes:
    return serialize(GRAPH, _model()[0], PROVENANCE)


def _values(tensor: Tensor) -> np.ndarray:
    """The logical values of a tensor (packed ones unpacked)."""
    if tensor.dtype in PACKED_BITS:
        count = int(np.prod(tensor.shape))
        bits = PACKED_BITS[tensor.dtype]
        return unpack_bits(tensor.data, bits, count).reshape(tensor.shape)
    return tensor.data


def _assert_same_model(model: ModelFile, tensors: list[Tensor]) -> None:
    assert len(model.tensors) == len(tensors)
    for read, written in zip(model.tensors, tensors, strict=True):
        assert (read.name, read.dtype, read.shape, read.quant) == (
            written.name,
            written.dtype,
            written.shape,
            written.quant,
        )
        assert read.data.dtype == written.data.dtype and read.data.shape == written.data.shape
        np.testing.assert_array_equal(read.data, written.data)
        np.testing.assert_array_equal(read.values(), _values(written))


def _root(array: np.ndarray) -> object:
    """The object (bytes, memory map) that owns the memory ``array`` views."""
    while isinstance(array, np.ndarray):
        array = array.base
    return array


def _root_address(array: np.ndarray) -> int:
    """Address of the buffer (bytes object or memory map) that ``array`` is a view of."""
    base = _root(array)
    assert isinstance(base, bytes | mmap.mmap), f"not a view of the file: {type(base)}"
    return np.frombuffer(base, dtype=np.uint8).ctypes.data


def _assert_zero_copy(model: ModelFile, blob: bytes) -> None:
    data_offset = _header(blob)["data_offset"]
    for tensor in model.tensors:
        assert not tensor.data.flags.writeable
        relative = tensor.data.ctypes.data - _root_address(tensor.data)
        assert relative % ALIGNMENT == 0
        assert relative >= data_offset


# ------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_every_dtype_from_bytes() -> None:
    tensors, unpacked = _model()
    blob = _valid()
    model = read_model_file(blob)
    assert model.version == FORMAT_VERSION
    assert {t.dtype for t in model.tensors} == set(DTYPES)
    assert model.graph == GRAPH and model.provenance == PROVENANCE
    _assert_same_model(model, tensors)
    for tensor in model.tensors:
        if tensor.name in unpacked:
            np.testing.assert_array_equal(_values(tensor), unpacked[tensor.name])
    assert np.isnan(model.tensors[11].data[1]) and np.isinf(model.tensors[11].data[2])
    _assert_zero_copy(model, blob)
    assert all(np.shares_memory(t.data, np.frombuffer(blob, np.uint8)) for t in model.tensors)


def test_round_trip_through_a_path(tmp_path) -> None:
    tensors, _ = _model()
    path = tmp_path / "model.tinyrt"
    write_model_file(path, GRAPH, tensors, PROVENANCE)
    assert path.read_bytes() == _valid()
    for source in (path, str(path)):
        model = read_model_file(source)
        _assert_same_model(model, tensors)
        _assert_zero_copy(model, _valid())
        assert all(isinstance(_root(t.data), mmap.mmap) for t in model.tensors)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_reads_other_bytes_like_sources(kind: type) -> None:
    buffer = kind(bytearray(_valid()))
    model = read_model_file(buffer)
    _assert_same_model(model, _model()[0])
    assert not any(t.data.flags.writeable for t in model.tensors)


def test_empty_model_round_trips() -> None:
    blob = serialize({}, [], {})
    assert len(blob) % ALIGNMENT == 0 and _header(blob)["data_nbytes"] == 0
    model = read_model_file(blob)
    assert (model.graph, model.provenance, model.tensors) == ({}, {}, [])


@st.composite
def _tensor_lists(draw: st.DrawFn) -> list[Tensor]:
    tensors = []
    for index in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
        seed = draw(st.integers(0, 2**32 - 1))
        values = np.random.default_rng(seed).integers(-2, 2, size=shape)
        if dtype in PACKED_BITS:
            data = pack_bits(values, PACKED_BITS[dtype])
        else:
            data = values.astype(dtype)
        tensors.append(Tensor(f"t{index}", dtype, shape, data))
    return tensors


@settings(max_examples=40, deadline=None)
@given(tensors=_tensor_lists())
def test_round_trip_property(tensors: list[Tensor]) -> None:
    blob = serialize({"n": len(tensors)}, tensors, {})
    model = read_model_file(blob)
    _assert_same_model(model, tensors)
    _assert_zero_copy(model, blob)


def test_writer_accepts_numpy_dims_and_non_contiguous_data() -> None:
    matrix = np.arange(12, dtype=np.int16).reshape(3, 4)
    shape = (np.int64(4), np.int64(3))
    model = read_model_file(serialize({}, [Tensor("t", "int16", shape, matrix.T)], {}))
    assert model.tensors[0].shape == (4, 3)
    np.testing.assert_array_equal(model.tensors[0].data, matrix.T)


# ------------------------------------------------------------------------------------------
# Layout and determinism


def test_header_and_sections_follow_the_spec() -> None:
    blob = _valid()
    header = _header(blob)
    assert header["magic"] == MAGIC == b"\x89TINYRT\n"
    assert (header["major"], header["minor"]) == FORMAT_VERSION == (1, 3)
    assert header["header_size"] == header["metadata_offset"] == 64
    assert header["flags"] == 0
    assert header["header_crc"] == zlib.crc32(blob[:60])
    meta_end = 64 + header["metadata_nbytes"]
    assert header["data_offset"] == -(-meta_end // 64) * 64
    assert len(blob) == header["data_offset"] + header["data_nbytes"]
    assert header["metadata_crc"] == zlib.crc32(blob[64:meta_end])
    assert header["data_crc"] == zlib.crc32(blob[header["data_offset"] :])
    meta = _metadata(blob)
    compact = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert blob[64:meta_end] == compact.encode("utf-8")
    assert meta["graph"] == GRAPH and meta["provenance"] == PROVENANCE
    assert meta["tensors"][5] == {
        "name": "conv.weight",
        "dtype": "int4",
        "shape": [3, 10],
        "offset": meta["tensors"][5]["offset"],
        "nbytes": 15,
        "quant": _model()[0][5].quant,
    }
    # Padding after the metadata and between tensors is zero.
    used = np.zeros(len(blob), dtype=bool)
    used[:meta_end] = True
    for entry in meta["tensors"]:
        assert entry["offset"] % 64 == 0
        start = header["data_offset"] + entry["offset"]
        used[start : start + entry["nbytes"]] = True
    assert not np.frombuffer(blob, np.uint8)[~used].any()


def test_serialize_is_deterministic() -> None:
    tensors, _ = _model()
    reordered = dict(reversed(list(GRAPH.items())))
    assert serialize(reordered, tensors, PROVENANCE) == _valid()
    assert serialize(GRAPH, list(tensors), dict(PROVENANCE)) == _valid()


# ------------------------------------------------------------------------------------------
# Writer arguments


def _int8(name: str = "t", **changes) -> Tensor:
    fields = {"name": name, "dtype": "int8", "shape": (2, 3), "data": np.zeros((2, 3), np.int8)}
    return Tensor(**{**fields, **changes})


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([_int8(dtype="int3")], "dtype must be one of"),
        (
            [_int8(data=np.zeros((2, 3), np.int16))],
            "data must have dtype int8 and shape (2, 3), got int16",
        ),
        ([_int8(data=np.zeros((3, 2), np.int8))], "got int8 with shape (3, 2)"),
        ([_int8(data=[[0, 0, 0], [0, 0, 0]])], "data must be a numpy array"),
        ([_int8(shape=(2, -3))], "every dim must be an int in [1, 2**31)"),
        ([_int8(shape=(2.0, 3))], "every dim must be an int"),
        ([_int8(name="")], "name must be a string"),
        ([_int8("a"), _int8("a")], "name already used by tensor 0"),
        ([_int8(dtype="int4", data=np.zeros(6, np.uint8))], "a 1-D uint8 array of 3 bytes"),
        ([_int8(dtype="int2", data=np.zeros((2, 3), np.int8))], "packed bytes"),
        ([_int8(quant=_quant("per_channel", 4, scale=0))], "quant.bits must be 8"),
        ([_int8(quant=_quant("per_tensor", 8, scale=np.int64(1)))], "quant.scale"),
        ([np.zeros(3)], "expected a Tensor"),
    ],
)
def test_writer_rejects_invalid_tensors(tensors: list, message: str) -> None:
    with pytest.raises(ValueError) as info:
        serialize({}, tensors, {})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("graph", "provenance", "message"),
    [
        ([], {}, "graph must be a dict"),
        ({}, None, "provenance must be a dict"),
        ({"x": float("nan")}, {}, "JSON-serializable"),
        ({"x": np.int64(3)}, {}, "JSON-serializable"),
        ({}, {"x": object()}, "JSON-serializable"),
    ],
)
def test_writer_rejects_invalid_metadata(graph: object, provenance: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serialize(graph, [], provenance)


# ------------------------------------------------------------------------------------------
# Atomic writes


def test_write_replaces_an_existing_file_with_normal_permissions(tmp_path) -> None:
    path = tmp_path / "model.tinyrt"
    path.write_bytes(b"old")
    write_model_file(path, GRAPH, _model()[0], PROVENANCE)
    assert path.read_bytes() == _valid()
    assert os.listdir(tmp_path) == ["model.tinyrt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def _fail(*args: object) -> None:
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failing", [None, "fsync", "replace"])
def test_failed_write_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch, failing) -> None:
    path = tmp_path / "model.tinyrt"
    path.write_bytes(b"the previous model")
    tensors = list(_model()[0])
    if failing is None:
        tensors.append(_int8("broken", data=np.zeros(3, np.int8)))  # serialization fails
    else:
        monkeypatch.setattr(os, failing, _fail)
    with pytest.raises((OSError, ValueError)):
        write_model_file(path, GRAPH, tensors, PROVENANCE)
    monkeypatch.undo()
    assert path.read_bytes() == b"the previous model"
    assert os.listdir(tmp_path) == ["model.tinyrt"]


# ------------------------------------------------------------------------------------------
# Reader: accepted variants


def _edit(change: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    """A mutation that edits the parsed metadata and re-serializes it with fixed checksums."""

    def mutate(blob: bytes) -> bytes:
        meta = _metadata(blob)
        change(meta)
        return _with_metadata(blob, json.dumps(meta).encode())

    return mutate


def test_newer_minor_version_is_accepted() -> None:
    model = read_model_file(_with_header(_valid(), minor=7))
    assert model.version == (1, 7)
    _assert_same_model(model, _model()[0])


def test_unknown_keys_are_ignored() -> None:
    def add_keys(meta: dict) -> None:
        meta["future_section"] = {"anything": [1, 2]}
        meta["tensors"][0]["comment"] = "re-exported"
        meta["tensors"][0]["quant"]["method"] = "hqq"

    model = read_model_file(_edit(add_keys)(_valid()))
    assert model.tensors[0].quant["method"] == "hqq"
    np.testing.assert_array_equal(model.tensors[0].data, _model()[0][0].data)


def test_data_crc_is_skipped_without_verify_checksums() -> None:
    blob = bytearray(_valid())
    blob[-1] ^= 0xFF
    with pytest.raises(FormatError, match="data crc32"):
        read_model_file(bytes(blob))
    model = read_model_file(bytes(blob), verify_checksums=False)
    assert model.tensors[-1].data.tobytes()[-1] == _valid()[-1] ^ 0xFF
    # The metadata checksum is verified regardless.
    meta_broken = bytearray(_valid())
    meta_broken[70] ^= 0x01
    with pytest.raises(FormatError, match="metadata crc32"):
        read_model_file(bytes(meta_broken), verify_checksums=False)


# ------------------------------------------------------------------------------------------
# Reader: the malformed-file corpus

DELETE = object()


def _set(container: dict | list, key: object, value: object) -> None:
    if value is DELETE:
        del container[key]
    else:
        container[key] = value


def _entry(index: int, **fields: object) -> Callable[[bytes], bytes]:
    def change(meta: dict) -> None:
        for key, value in fields.items():
            _set(meta["tensors"][index], key, value)

    return _edit(change)


def _quant_field(index: int, **fields: object) -> Callable[[bytes], bytes]:
    def change(meta: dict) -> None:
        for key, value in fields.items():
            _set(meta["tensors"][index]["quant"], key, value)

    return _edit(change)


def _raw_metadata(raw: bytes) -> Callable[[bytes], bytes]:
    return lambda blob: _with_metadata(blob, raw)


def _flip(position: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    def mutate(blob: bytes) -> bytes:
        broken = bytearray(blob)
        broken[position(blob)] ^= 0x01
        return bytes(broken)

    return mutate


def _header_field(**changes: Callable[[dict], int] | int) -> Callable[[bytes], bytes]:
    def mutate(blob: bytes) -> bytes:
        header = _header(blob)
        values = {k: v(header) if callable(v) else v for k, v in changes.items()}
        return _with_header(blob, **values)

    return mutate


def _delete_top(key: str) -> Callable[[bytes], bytes]:
    return _edit(lambda meta: meta.pop(key))


def _set_top(key: str, value: object) -> Callable[[bytes], bytes]:
    return _edit(lambda meta: meta.update({key: value}))


def _copy_name(meta: dict) -> None:
    meta["tensors"][1]["name"] = meta["tensors"][0]["name"]


def _copy_quant_to_float(meta: dict) -> None:
    meta["tensors"][1]["quant"] = meta["tensors"][0]["quant"]


def _same_offset(meta: dict) -> None:
    meta["tensors"][1]["offset"] = meta["tensors"][0]["offset"]


def _nest(depth: int) -> bytes:
    return b'{"tensors":[],"provenance":{},"graph":' + b"[" * depth + b"]" * depth + b"}"


def _top(graph: str) -> bytes:
    return b'{"tensors":[],"provenance":{},"graph":' + graph.encode() + b"}"


CORPUS = {
    # file size and header
    "empty": (lambda b: b"", "empty"),
    "truncated-in-header": (lambda b: b[:40], "shorter than the 64-byte header"),
    "header-only": (lambda b: b[:64], "truncated"),
    "truncated-in-metadata": (lambda b: b[:100], "truncated"),
    "truncated-at-data": (lambda b: b[: _header(b)["data_offset"]], "truncated"),
    "truncated-in-data": (lambda b: b[:-1], "truncated"),
    "trailing-garbage": (lambda b: b + b"\0" * 3, "trailing garbage (3 extra bytes"),
    "wrong-magic": (lambda b: b"PK\x03\x04zip!" + b[8:], "magic"),
    "text-mode-transfer": (lambda b: b.replace(b"\n", b"\r\n", 1), "transfer"),
    "high-bit-stripped": (lambda b: bytes([b[0] & 0x7F]) + b[1:], "transfer"),
    "unknown-major": (_header_field(major=2), "version 2.3 is not supported"),
    "major-zero": (_header_field(major=0), "version 0.3 is not supported"),
    "bad-header-crc": (
        _header_field(data_nbytes=1, header_crc=lambda h: h["header_crc"]),
        "header crc32",
    ),
    "header-size": (_header_field(header_size=128), "header_size"),
    "unknown-flags": (_header_field(flags=8), "bits 0x00000008 name features"),
    "layouts-flag-without-layouts": (_header_field(flags=1), "flag 0x1 must be clear"),
    "metadata-offset": (_header_field(metadata_offset=128), "metadata_offset"),
    "metadata-nbytes-huge": (_header_field(metadata_nbytes=2**62), "metadata_nbytes"),
    "metadata-nbytes-max": (_header_field(metadata_nbytes=2**64 - 1), "metadata_nbytes"),
    "metadata-past-end": (_header_field(metadata_nbytes=64 * 2**20), "metadata_nbytes"),
    "data-offset-misaligned": (
        _header_field(data_offset=lambda h: h["data_offset"] + 8),
        "data_offset",
    ),
    "data-offset-in-metadata": (_header_field(data_offset=64), "data_offset"),
    "data-offset-past-end": (_header_field(data_offset=2**40), "data_offset"),
    "data-nbytes-too-big": (
        _header_field(data_nbytes=lambda h: h["data_nbytes"] + 64),
        "data_nbytes",
    ),
    "data-nbytes-huge": (_header_field(data_nbytes=2**63), "data_nbytes"),
    "data-nbytes-too-small": (
        _header_field(data_nbytes=lambda h: h["data_nbytes"] - 1),
        "data_nbytes",
    ),
    # checksums
    "metadata-crc": (_flip(lambda b: 70), "metadata crc32"),
    "data-crc": (_flip(lambda b: _header(b)["data_offset"] + 3), "data crc32"),
    "data-crc-field": (_header_field(data_crc=lambda h: h["data_crc"] ^ 1), "data crc32"),
    # metadata JSON
    "metadata-empty": (_raw_metadata(b""), "JSON"),
    "metadata-not-utf8": (_raw_metadata(b'{"tensors":[],"provenance":{},"graph":"\xff"}'), "UTF-8"),
    "invalid-json": (_raw_metadata(b'{"tensors": ['), "JSON"),
    "json-nan": (_raw_metadata(_top('{"x": NaN}')), "NaN"),
    "json-infinity": (_raw_metadata(_top("[-Infinity]")), "Infinity"),
    "json-float-overflow": (_raw_metadata(_top("[1e999]")), "finite"),
    "json-huge-int": (_raw_metadata(_top("9" * 5000)), "JSON"),
    "duplicate-keys": (
        _raw_metadata(b'{"tensors":[],"graph":{},"graph":{},"provenance":{}}'),
        "duplicate key 'graph'",
    ),
    "duplicate-nested-keys": (_raw_metadata(_top('{"a":1,"b":2,"a":3}')), "duplicate key 'a'"),
    "deep-nesting": (_raw_metadata(_nest(100_000)), "nested"),
    "metadata-not-object": (_raw_metadata(b"[]"), "metadata must be a JSON object"),
    "missing-tensors": (_delete_top("tensors"), "'tensors'"),
    "missing-graph": (_delete_top("graph"), "'graph'"),
    "graph-not-object": (_set_top("graph", []), "'graph'"),
    "provenance-not-object": (_set_top("provenance", "x"), "'provenance'"),
    "tensors-not-array": (_set_top("tensors", {}), "'tensors'"),
    "too-many-tensors": (_set_top("tensors", [0] * 1_000_001), "limit is 1000000"),
    # tensor table entries
    "entry-not-object": (_set_top("tensors", [5]), "table entry must be an object"),
    "entry-missing-nbytes": (_entry(0, nbytes=DELETE), "'nbytes'"),
    "entry-missing-quant": (_entry(3, quant=DELETE), "'quant'"),
    "name-not-string": (_entry(0, name=7), "name"),
    "name-empty": (_entry(0, name=""), "name"),
    "name-too-long": (_entry(0, name="x" * 257), "name"),
    "duplicate-names": (_edit(_copy_name), "name already used"),
    "unknown-dtype": (_entry(0, dtype="int3"), "dtype"),
    "dtype-not-string": (_entry(0, dtype=["int8"]), "dtype"),
    "shape-not-list": (_entry(1, shape=4), "shape"),
    "too-many-dims": (_entry(1, shape=[1] * 9), "shape"),
    "negative-dim": (_entry(0, shape=[-4, -3]), "shape"),
    "zero-dim": (_entry(0, shape=[0, 3]), "shape"),
    "float-dim": (_entry(0, shape=[4.0, 3]), "shape"),
    "bool-dim": (_entry(0, shape=[True, 12]), "shape"),
    "absurd-shape": (_entry(0, shape=[2**31, 2**31], nbytes=2**62), "shape"),
    "too-many-elements": (_entry(0, shape=[2**30] * 3, nbytes=2**90), "elements"),
    "large-shape-past-data": (
        _entry(0, shape=[2**20, 2**20], nbytes=2**40),
        "runs past the data section",
    ),
    "nbytes-mismatch": (_entry(1, nbytes=17), "nbytes"),
    "nbytes-of-packed-unpacked": (
        _entry(5, nbytes=30),
        "nbytes is 30, but dtype int4 with shape [3, 10] takes 15",
    ),
    "nbytes-not-int": (_entry(1, nbytes="16"), "nbytes"),
    "offset-negative": (_entry(1, offset=-64), "offset"),
    "offset-not-int": (_entry(1, offset=64.0), "offset"),
    "offset-misaligned": (_entry(1, offset=96), "not a multiple of 64"),
    "offset-past-data": (_entry(4, offset=64 * 2**30), "runs past the data section"),
    "offset-huge": (_entry(4, offset=64 * 2**64), "runs past the data section"),
    "overlapping-tensors": (_edit(_same_offset), "overlaps"),
    # quant records
    "quant-not-object": (_entry(0, quant=[1]), "quant"),
    "quant-missing-bits": (_quant_field(0, bits=DELETE), "'bits'"),
    "quant-on-float32": (_edit(_copy_quant_to_float), "quant record"),
    "quant-bits-mismatch": (_quant_field(0, bits=4), "quant.bits must be 8"),
    "quant-bits-3-on-int8": (_quant_field(0, bits=3), "quant.bits"),
    "quant-bits-not-int": (_quant_field(5, bits=4.0), "quant.bits"),
    "quant-unknown-scheme": (_quant_field(0, scheme="per_block"), "quant.scheme"),
    "quant-axis-out-of-range": (_quant_field(0, axis=2), "quant.axis"),
    "quant-axis-negative": (_quant_field(0, axis=-1), "quant.axis"),
    "quant-per-group-axis-not-zero": (_quant_field(5, axis=1), "quant.axis must be 0"),
    "quant-per-tensor-axis-null": (_quant_field(8, axis=None), "quant.axis"),
    "quant-group-size-zero": (_quant_field(5, group_size=0), "quant.group_size"),
    "quant-group-size-on-per-channel": (_quant_field(0, group_size=4), "quant.group_size"),
    "quant-group-size-wrong": (_quant_field(5, group_size=5), "quant.scale"),
    "quant-symmetric-not-bool": (_quant_field(0, symmetric=1), "quant.symmetric"),
    "quant-scale-out-of-range": (_quant_field(0, scale=13), "quant.scale"),
    "quant-scale-negative": (_quant_field(0, scale=-1), "quant.scale"),
    "quant-scale-null": (_quant_field(0, scale=None), "quant.scale"),
    "quant-scale-wrong-dtype": (_quant_field(0, scale=2), "quant.scale refers to tensor 2"),
    "quant-scale-wrong-size": (_quant_field(0, axis=1), "quant.scale"),
    "quant-zero-point-wrong-dtype": (_quant_field(5, zero_point=6), "quant.zero_point"),
    "quant-zero-point-wrong-size": (_quant_field(5, zero_point=12), "quant.zero_point"),
    "quant-zero-point-missing": (_quant_field(5, zero_point=None), "quant.zero_point"),
    "quant-zero-point-self": (_quant_field(10, zero_point=10), "quant.zero_point"),
    "quant-zero-point-on-symmetric": (_quant_field(0, zero_point=7), "quant.zero_point"),
}


@pytest.mark.parametrize(("mutate", "word"), list(CORPUS.values()), ids=list(CORPUS))
def test_malformed_file_is_rejected(mutate: Callable[[bytes], bytes], word: str) -> None:
    blob = mutate(_valid())
    assert blob != _valid()
    with pytest.raises(FormatError) as info:
        read_model_file(blob)
    assert word in str(info.value)


def test_unknown_major_version_names_the_supported_version() -> None:
    with pytest.raises(FormatError) as info:
        read_model_file(_with_header(_valid(), major=2, minor=3))
    message = str(info.value)
    assert "version 2.3 is not supported" in message
    assert "reads version 1.x" in message and "upgrade tinyrt" in message


def test_messages_name_the_tensor_and_expected_values() -> None:
    with pytest.raises(FormatError) as info:
        read_model_file(_entry(4, offset=64 * 2**30)(_valid()))
    data_nbytes = _header(_valid())["data_nbytes"]
    assert str(info.value) == (
        f"tensor 4 ('input.raw'): offset {64 * 2**30} + nbytes 7 runs past the data section "
        f"({data_nbytes} bytes)"
    )


@pytest.mark.parametrize(
    "mutate",
    [
        _header_field(metadata_nbytes=2**62),
        _header_field(data_nbytes=2**62),
        _entry(0, shape=[2**20, 2**20], nbytes=2**40),
    ],
    ids=["metadata_nbytes", "data_nbytes", "tensor-nbytes"],
)
def test_huge_size_fields_fail_fast_without_allocating(mutate: Callable[[bytes], bytes]) -> None:
    blob = mutate(_valid())
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            read_model_file(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


# ------------------------------------------------------------------------------------------
# Kernel layouts (1.2): rows16x4


def _blocked_model(rows: int = 20, k: int = 8) -> tuple[np.ndarray, bytes]:
    """An int8 ``[rows, k]`` weight stored as rows16x4, next to a plain tensor."""
    weight = np.random.default_rng(1).integers(-128, 128, size=(rows, k), dtype=np.int8)
    blocks = RowBlocks.pack(weight).blocks
    tensors = [
        Tensor("bias", "int32", (rows,), np.arange(rows, dtype=np.int32)),
        Tensor("fc.weight", "int8", (rows, k), blocks, None, "rows16x4"),
    ]
    return weight, serialize(GRAPH, tensors, PROVENANCE)


def test_rows16x4_bytes_follow_the_spec() -> None:
    """Byte ``((b * K/4 + j) * 16 + r) * 4 + i`` of the tensor is ``w[16 b + r, 4 j + i]``, rows
    past ``O`` are zero, and the header's flag 0x1 tells readers that some tensor has a layout
    (1.0 and 1.1 readers refuse any flag, rather than misread the bytes)."""
    weight, blob = _blocked_model(rows=20, k=8)
    header, entry = _header(blob), _metadata(blob)["tensors"][1]
    assert header["flags"] == 1
    assert (entry["layout"], entry["shape"], entry["nbytes"]) == ("rows16x4", [20, 8], 2 * 16 * 8)
    start = header["data_offset"] + entry["offset"]
    stored = blob[start : start + entry["nbytes"]]
    for b in range(2):
        for j in range(2):
            for r in range(16):
                for i in range(4):
                    expected = weight[16 * b + r, 4 * j + i] if 16 * b + r < 20 else 0
                    byte = stored[((b * 2 + j) * 16 + r) * 4 + i]
                    assert np.int8(np.uint8(byte)) == expected
    assert "layout" not in _metadata(blob)["tensors"][0]


def test_rows16x4_round_trips_as_its_blocks() -> None:
    weight, blob = _blocked_model(rows=33, k=12)
    model = read_model_file(blob)
    _assert_zero_copy(model, blob)
    tensor = model.tensors[1]
    assert (tensor.layout, tensor.shape, tensor.data.shape) == ("rows16x4", (33, 12), (3, 3, 16, 4))
    np.testing.assert_array_equal(tensor.values(), weight)


def _layout(layout: object, **fields: object) -> Callable[[bytes], bytes]:
    return _entry(1, layout=layout, **fields)


LAYOUT_CORPUS = {
    "unknown-layout": (_layout("rows8x8"), "layout must be null, 'rows16x4' or 'ohwi4'"),
    "layout-not-str": (_layout(1), "layout must be null"),
    "layout-on-int32": (_entry(0, layout="rows16x4"), "holds an int8 tensor [O, K]"),
    "layout-k-not-multiple-of-4": (
        _layout("rows16x4", shape=[20, 6], nbytes=320),
        "K a multiple of 4",
    ),
    "layout-rank-3": (_layout("rows16x4", shape=[2, 10, 8]), "holds an int8 tensor [O, K]"),
    "layout-unpadded-nbytes": (_layout("rows16x4", nbytes=160), "takes 256 bytes"),
    "layout-without-flag": (_header_field(flags=0), "flag 0x1 must be set"),
    "layout-removed-flag-kept": (_layout(DELETE, nbytes=160), "flag 0x1 must be clear"),
}


def test_writer_wants_a_layouts_blocks() -> None:
    weight = np.zeros((20, 8), np.int8)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 16, 4\), got int8 with shape \(20, 8\)"):
        serialize({}, [Tensor("w", "int8", (20, 8), weight, None, "rows16x4")], {})
    weight = np.zeros((4, 3, 3, 3), np.int8)
    with pytest.raises(ValueError, match=r"shape \(4, 28\), got int8 with shape \(4, 3, 3, 3\)"):
        serialize({}, [Tensor("w", "int8", (4, 3, 3, 3), weight, None, "ohwi4")], {})


# ------------------------------------------------------------------------------------------
# Kernel layouts (1.3): ohwi4


def _conv_rows_model(shape: tuple[int, ...] = (5, 3, 2, 3)) -> tuple[np.ndarray, bytes]:
    """An int8 convolution weight of ``shape`` stored as ohwi4, next to a plain tensor."""
    weight = np.random.default_rng(2).integers(-128, 128, size=shape, dtype=np.int8)
    tensors = [
        Tensor("bias", "int32", shape[:1], np.arange(shape[0], dtype=np.int32)),
        Tensor("conv.weight", "int8", shape, ConvRows.pack(weight).rows, None, "ohwi4"),
    ]
    return weight, serialize(GRAPH, tensors, PROVENANCE)


@pytest.mark.parametrize("shape", [(5, 3, 2, 3), (4, 2, 3)], ids=["conv2d", "conv1d"])
def test_ohwi4_bytes_follow_the_spec(shape: tuple[int, ...]) -> None:
    """Byte ``o * 4 ceil(K / 4) + (i KW + j) C + c`` of the tensor is ``w[o, c, i, j]``
    (``[o, c, j]`` in 1-D), the bytes after ``K`` of a row are zero, and the header sets flag
    0x2 (which a 1.2 reader does not know, so it refuses the file) with flag 0x1."""
    weight, blob = _conv_rows_model(shape)
    header, entry = _header(blob), _metadata(blob)["tensors"][1]
    o, c, *taps = shape
    k_len = c * int(np.prod(taps))
    width = -(-k_len // 4) * 4
    assert header["flags"] == 3
    assert (entry["layout"], entry["shape"], entry["nbytes"]) == ("ohwi4", list(shape), o * width)
    start = header["data_offset"] + entry["offset"]
    stored = np.frombuffer(blob[start : start + entry["nbytes"]], np.int8).reshape(o, width)
    kh, kw = ([1] + taps)[-2:]
    for out, channel, i, j in np.ndindex(o, c, kh, kw):
        value = weight[out, channel, i, j] if len(shape) == 4 else weight[out, channel, j]
        assert stored[out, (i * kw + j) * c + channel] == value
    assert not stored[:, k_len:].any()


def test_ohwi4_round_trips_as_its_rows() -> None:
    weight, blob = _conv_rows_model()
    model = read_model_file(blob)
    _assert_zero_copy(model, blob)
    tensor = model.tensors[1]
    assert (tensor.layout, tensor.shape, tensor.data.shape) == ("ohwi4", (5, 3, 2, 3), (5, 20))
    np.testing.assert_array_equal(tensor.values(), weight)


CONV_ROWS_CORPUS = {
    "ohwi4-on-int32": (_entry(0, layout="ohwi4"), "holds an int8 tensor [O, C, KW]"),
    "ohwi4-rank-2": (_layout("ohwi4", shape=[5, 20]), "holds an int8 tensor [O, C, KW]"),
    "ohwi4-unpadded-nbytes": (_layout("ohwi4", nbytes=90), "takes 100 bytes"),
    "ohwi4-without-its-flag": (_header_field(flags=1), "flag 0x2 must be set"),
    "ohwi4-without-any-flag": (_header_field(flags=0), "flag 0x1 must be set"),
    "ohwi4-removed-flag-kept": (_layout(DELETE, nbytes=90), "flag 0x1 must be clear"),
    "ohwi4-as-rows16x4": (_layout("rows16x4"), "holds an int8 tensor [O, K]"),
}


def test_rows16x4_alone_does_not_set_the_ohwi4_flag() -> None:
    """A file whose only layout is rows16x4 sets flag 0x1 alone, so 1.2 readers still read it;
    the reader refuses flag 0x2 there."""
    blob = _blocked_model()[1]
    assert _header(blob)["flags"] == 1
    with pytest.raises(FormatError, match="no tensor has layout ohwi4: flag 0x2 must be clear"):
        read_model_file(_header_field(flags=3)(blob))


# ------------------------------------------------------------------------------------------
# Kernel layouts (1.3): groups16x4


def _group_blocks_model(rows: int = 20, k: int = 16, group_size: int = 8) -> tuple:
    """An int4 ``[rows, k]`` weight in groups of ``group_size`` stored as groups16x4, with its
    row scales and integer group scales."""
    rng = np.random.default_rng(4)
    q = rng.integers(-8, 8, size=(rows, k), dtype=np.int8)
    groups = -(-k // group_size)
    record = _quant("per_group", 4, scale=1, group_size=group_size, group_scale=2)
    blocks = pack_group_blocks(q, group_size, 4)
    tensors = [
        Tensor("fc.weight", "int4", (rows, k), blocks.reshape(-1), record, "groups16x4"),
        Tensor("fc.weight_scale", "float32", (rows,), np.ones(rows, np.float32)),
        Tensor("fc.weight_group_scale", "uint8", (rows, groups), np.ones((rows, groups), "u1")),
    ]
    return q, serialize(GRAPH, tensors, PROVENANCE)


def test_groups16x4_round_trips_as_its_bytes() -> None:
    """The bytes are ``pack_group_blocks``' (test_packing checks them against the spec's
    formula), ``16 * ceil(O / 16) * K * bits / 8`` of them, and flag 0x4 is set with 0x1."""
    q, blob = _group_blocks_model()
    header, entry = _header(blob), _metadata(blob)["tensors"][0]
    assert header["flags"] == 5
    assert (entry["layout"], entry["nbytes"]) == ("groups16x4", 32 * 16 // 2)
    model = read_model_file(blob)
    _assert_zero_copy(model, blob)
    tensor = model.tensors[0]
    assert (tensor.layout, tensor.data.shape) == ("groups16x4", (256,))
    np.testing.assert_array_equal(tensor.values(), q)


GROUP_BLOCKS_CORPUS = {
    "groups16x4-on-int8": (
        _entry(0, dtype="int8", quant=None, nbytes=512),
        "holds an int4 tensor [O, ...] with rows of a multiple of 8",
    ),
    "groups16x4-rows-not-words": (
        _entry(0, shape=[20, 12], nbytes=192),
        "holds an int4 tensor [O, ...] with rows of a multiple of 8",
    ),
    "groups16x4-unpadded-nbytes": (_entry(0, nbytes=160), "takes 256 bytes"),
    "groups16x4-groups-not-words": (_quant_field(0, group_size=12), "groups of a multiple of 8"),
    "groups16x4-without-record": (_entry(0, quant=None), "needs a per_group quant record"),
    "groups16x4-without-its-flag": (_header_field(flags=1), "flag 0x4 must be set"),
}


# each layout's corpus: mutations of a valid model with that layout
MALFORMED_LAYOUTS = {
    case: (model, mutate, word)
    for model, corpus in (
        (_blocked_model, LAYOUT_CORPUS),
        (_conv_rows_model, CONV_ROWS_CORPUS),
        (_group_blocks_model, GROUP_BLOCKS_CORPUS),
    )
    for case, (mutate, word) in corpus.items()
}


@pytest.mark.parametrize(
    ("model", "mutate", "word"), list(MALFORMED_LAYOUTS.values()), ids=list(MALFORMED_LAYOUTS)
)
def test_malformed_layouts_are_rejected(
    model: Callable[[], tuple], mutate: Callable[[bytes], bytes], word: str
) -> None:
    with pytest.raises(FormatError) as info:
        read_model_file(mutate(model()[1]))
    assert word in str(info.value)


# ------------------------------------------------------------------------------------------
# Reader: paths that are not model files


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FormatError, match="does not exist"):
        read_model_file(tmp_path / "nope.tinyrt")


def test_directory(tmp_path) -> None:
    with pytest.raises(FormatError, match="directory"):
        read_model_file(tmp_path)


@pytest.mark.parametrize("size", [0, 1, 63])
def test_short_files_on_disk(tmp_path, size: int) -> None:
    path = tmp_path / "short.tinyrt"
    path.write_bytes(_valid()[:size])
    with pytest.raises(FormatError, match="empty" if size == 0 else "64-byte header"):
        read_model_file(path)


def test_corrupted_file_on_disk(tmp_path) -> None:
    path = tmp_path / "model.tinyrt"
    path.write_bytes(_valid()[:-5])
    with pytest.raises(FormatError, match="truncated"):
        read_model_file(path)


def test_unreadable_file(tmp_path, monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    path = tmp_path / "model.tinyrt"
    path.write_bytes(_valid())
    monkeypatch.setattr(tinyrt.format, "open", refuse, raising=False)
    with pytest.raises(FormatError, match="cannot read model file .*: Permission denied"):
        read_model_file(path)
