"""The ``.tinyrt`` file container, format v1: writer and validating, zero-copy reader.

docs/format.md is the specification; this module implements it with NumPy only. A file is a
64-byte header, a JSON metadata section (tensor table, graph, provenance) and a data section in
which every tensor starts on a 64-byte boundary. :func:`read_model_file` checks every header
field, checksum, table entry and quantization record against the real file size and fixed
limits before it maps or allocates anything derived from them, and raises
:class:`~tinyrt.errors.FormatError` naming the field. The writer runs the same table checks, so
it cannot produce a file the reader rejects.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import operator
import os
import secrets
import stat
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from tinyrt.errors import FormatError
from tinyrt.packing import (
    CONV_ROWS_LAYOUT,
    GROUP_BLOCKS_LAYOUT,
    ROW_BLOCKS_LAYOUT,
    ROWS_PER_BLOCK,
    ConvRows,
    RowBlocks,
    conv_rows_shape,
    group_blocks_fit,
    packed_nbytes,
    row_blocks_shape,
    unpack_bits,
    unpack_group_blocks,
)

MAGIC = b"\x89TINYRT\n"
FORMAT_VERSION = (1, 3)
# Header flag bits: features a reader must understand to read the file right. A 1.x reader
# refuses a file with a bit set that it does not know (1.0 and 1.1 readers know none).
FLAG_LAYOUTS = 1  # 1.2: some tensor is stored in a kernel layout (its entry has "layout")
FLAG_CONV_ROWS = 2  # 1.3: some tensor is stored in layout ohwi4 (which a 1.2 reader lacks)
FLAG_GROUP_BLOCKS = 4  # 1.3: some tensor is stored in layout groups16x4 (likewise)
KNOWN_FLAGS = FLAG_LAYOUTS | FLAG_CONV_ROWS | FLAG_GROUP_BLOCKS
# The flags a file sets for a tensor in each kernel layout (docs/format.md).
LAYOUT_FLAGS = {
    ROW_BLOCKS_LAYOUT: FLAG_LAYOUTS,
    CONV_ROWS_LAYOUT: FLAG_LAYOUTS | FLAG_CONV_ROWS,
    GROUP_BLOCKS_LAYOUT: FLAG_LAYOUTS | FLAG_GROUP_BLOCKS,
}
ALIGNMENT = 64
DTYPES = ("int8", "uint8", "int16", "int32", "float32", "int4", "int2")

HEADER_SIZE = 64
MAX_METADATA_NBYTES = 64 * 2**20
MAX_TENSORS = 1_000_000
MAX_NAME_LENGTH = 256
MAX_NDIM = 8
MAX_DIM = 2**31  # exclusive
MAX_NUMEL = 2**40

# Header bytes 0..59; bytes 60..63 hold the crc32 of these 60 bytes.
_HEADER_FIELDS = struct.Struct("<8sHHIQQQQIII")
_CRC = struct.Struct("<I")
_NUMPY_DTYPES = {
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float32": np.dtype("<f4"),
}
_PACKED_BITS = {"int4": 4, "int2": 2}
_QUANT_BITS = {"int8": (8,), "int4": (3, 4), "int2": (2,)}
_QUANT_SCHEMES = ("per_tensor", "per_channel", "per_group")
_QUANT_KEYS = ("scheme", "axis", "group_size", "bits", "symmetric", "scale", "zero_point")
_ENTRY_KEYS = ("name", "dtype", "shape", "offset", "nbytes", "quant")
_ZERO_POINT_DTYPES = ("int8", "int16", "int32")
_JSON_OPTIONS = {"sort_keys": True, "separators": (",", ":"), "allow_nan": False}


@dataclass(frozen=True)
class Tensor:
    """One tensor of a model file.

    ``data`` is an array of ``dtype`` with ``shape`` for the numeric dtypes; for ``int4`` and
    ``int2`` it is the 1-D uint8 array of packed bytes (:mod:`tinyrt.packing`),
    ``ceil(numel * bits / 8)`` long. Read from a file, ``data`` is a read-only view into the
    file's buffer. ``quant`` is the quantization record of a weight (docs/format.md) or None.
    ``layout`` None is C order; ``"rows16x4"`` (``shape`` ``[O, K]``, int8, ``K`` a multiple
    of 4) is :class:`tinyrt.packing.RowBlocks`, and ``data`` its ``blocks``; ``"ohwi4"``
    (``shape`` ``[O, C, KW]`` or ``[O, C, KH, KW]``, int8) is
    :class:`tinyrt.packing.ConvRows`, and ``data`` its ``rows``; ``"groups16x4"`` (int4 or
    int2 ``[O, ...]`` with a per_group record) is :func:`tinyrt.packing.pack_group_blocks`,
    and ``data`` its bytes, 1-D.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray
    quant: dict | None = None
    layout: str | None = None

    def values(self) -> np.ndarray:
        """The values with the logical ``shape``: ``data`` itself, or a copy of it unblocked
        (a layout) or unpacked (int4, int2)."""
        if self.layout == ROW_BLOCKS_LAYOUT:
            return RowBlocks(self.data, self.shape).rows()
        if self.layout == CONV_ROWS_LAYOUT:
            return ConvRows(self.data, self.shape).values()
        if self.layout == GROUP_BLOCKS_LAYOUT:  # the file checked the record
            rows, bits = self.shape[0], _PACKED_BITS[self.dtype]
            k_len = math.prod(self.shape) // rows
            group_size = self.quant["group_size"]
            return unpack_group_blocks(self.data, rows, k_len, group_size, bits).reshape(self.shape)
        if self.dtype in _PACKED_BITS:
            count = math.prod(self.shape)
            return unpack_bits(self.data, _PACKED_BITS[self.dtype], count).reshape(self.shape)
        return self.data


@dataclass(frozen=True)
class ModelFile:
    """The contents of a model file: format version, graph, provenance and tensor table."""

    version: tuple[int, int]
    graph: dict
    provenance: dict
    tensors: list[Tensor]


class _Entry(NamedTuple):
    """A checked tensor table entry (shape as a tuple of Python ints)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    quant: dict | None
    layout: str | None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _show(value: object) -> str:
    """A repr short enough for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number" if isinstance(value, int | float) else "unknown")


def _check_declaration(
    index: int, name: object, dtype: object, shape: object, layout: object
) -> tuple[str, int]:
    """Check a tensor's name, dtype, shape and layout; return the message prefix and its exact
    nbytes."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise FormatError(
            f"tensor {index}: name must be a string of 1 to {MAX_NAME_LENGTH} characters, "
            f"found {_show(name)}"
        )
    where = f"tensor {index} ({name!r})"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(
            f"{where}: dtype must be one of {', '.join(DTYPES)}, found {_show(dtype)}"
        )
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise FormatError(
            f"{where}: shape must be a list of at most {MAX_NDIM} dims, found {_show(shape)}"
        )
    for dim in shape:
        if not _is_int(dim) or not 1 <= dim < MAX_DIM:
            raise FormatError(
                f"{where}: shape {_show(shape)}: every dim must be an int in [1, 2**31), "
                f"found {_show(dim)}"
            )
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise FormatError(
            f"{where}: shape {shape} has {numel} elements, more than the limit of 2**40"
        )
    if layout is not None:
        return where, _layout_nbytes(where, dtype, shape, layout)
    if dtype in _PACKED_BITS:
        return where, packed_nbytes(numel, _PACKED_BITS[dtype])
    return where, numel * _NUMPY_DTYPES[dtype].itemsize


def _layout_nbytes(where: str, dtype: str, shape: list[int], layout: object) -> int:
    """The bytes of a tensor stored in ``layout``: ``rows16x4``, int8 ``[O, K]`` with ``K`` a
    multiple of 4 in blocks of 16 rows, the last one padded; ``ohwi4``, int8 ``[O, C, KW]``
    or ``[O, C, KH, KW]`` in rows padded to multiples of 4; ``groups16x4``, int4 or int2
    ``[O, ...]`` with rows of whole 4-byte words (``K`` a multiple of 32 / bits) in blocks of
    16 rows, the last one padded (its groups are checked with its record)."""
    if layout not in LAYOUT_FLAGS:
        names = " or ".join(repr(name) for name in LAYOUT_FLAGS)
        raise FormatError(f"{where}: layout must be null, {names}, found {_show(layout)}")
    if layout == ROW_BLOCKS_LAYOUT and (dtype != "int8" or len(shape) != 2 or shape[1] % 4):
        raise FormatError(
            f"{where}: layout {layout} holds an int8 tensor [O, K] with K a multiple of 4, "
            f"found {dtype} with shape {shape}"
        )
    if layout == CONV_ROWS_LAYOUT and (dtype != "int8" or len(shape) not in (3, 4)):
        raise FormatError(
            f"{where}: layout {layout} holds an int8 tensor [O, C, KW] or [O, C, KH, KW], "
            f"found {dtype} with shape {shape}"
        )
    if layout == GROUP_BLOCKS_LAYOUT and (
        dtype not in _PACKED_BITS
        or len(shape) < 2
        or math.prod(shape[1:]) % (32 // _PACKED_BITS[dtype])
    ):
        raise FormatError(
            f"{where}: layout {layout} holds an int4 tensor [O, ...] with rows of a multiple "
            f"of 8 values, or an int2 one with rows of a multiple of 16, found {dtype} with "
            f"shape {shape}"
        )
    return math.prod(_layout_shape(layout, dtype, tuple(shape)))


def _layout_shape(layout: str, dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the array a tensor of ``dtype`` and ``shape`` takes in ``layout``."""
    if layout == ROW_BLOCKS_LAYOUT:
        return row_blocks_shape(*shape)
    if layout == CONV_ROWS_LAYOUT:
        return conv_rows_shape(shape)
    row_bytes = math.prod(shape[1:]) * _PACKED_BITS[dtype] // 8
    return (-(-shape[0] // ROWS_PER_BLOCK) * ROWS_PER_BLOCK * row_bytes,)


def _storage_shape(entry: _Entry) -> tuple[int, ...]:
    """The shape of a numeric tensor's ``data``: its shape, or its layout's array."""
    if entry.layout is None:
        return entry.shape
    return _layout_shape(entry.layout, entry.dtype, entry.shape)


def _layout_flags(entries: list[_Entry]) -> int:
    """The header flags that the entries' layouts need (:data:`LAYOUT_FLAGS`)."""
    return functools.reduce(operator.or_, (LAYOUT_FLAGS.get(e.layout, 0) for e in entries), 0)


def _check_reference(
    index: int, field: str, entries: list[_Entry], dtypes: tuple[str, ...], count: int
) -> None:
    """Check that ``quant[field]`` of tensor ``index`` is another tensor, of ``dtypes``, with
    ``count`` elements."""
    entry = entries[index]
    where = f"tensor {index} ({entry.name!r})"
    ref = entry.quant[field]
    if not _is_int(ref) or not 0 <= ref < len(entries) or ref == index:
        raise FormatError(
            f"{where}: quant.{field} must be the index of another tensor, in [0, {len(entries)}), "
            f"found {_show(ref)}"
        )
    target = entries[ref]
    if target.dtype not in dtypes:
        raise FormatError(
            f"{where}: quant.{field} refers to tensor {ref} ({target.name!r}) of dtype "
            f"{target.dtype}, expected {' or '.join(dtypes)}"
        )
    numel = math.prod(target.shape)
    if numel != count:
        raise FormatError(
            f"{where}: quant.{field} refers to tensor {ref} ({target.name!r}) with {numel} "
            f"elements, expected {count}"
        )


def _check_quant(index: int, entries: list[_Entry]) -> None:
    """Check the quantization record of tensor ``index`` against the tensor and the table."""
    entry = entries[index]
    quant, shape = entry.quant, entry.shape
    where = f"tensor {index} ({entry.name!r})"
    if not isinstance(quant, dict):
        raise FormatError(f"{where}: quant must be null or an object, found {_json_kind(quant)}")
    for key in _QUANT_KEYS:
        if key not in quant:
            raise FormatError(f"{where}: quant has no {key!r} field")
    allowed_bits = _QUANT_BITS.get(entry.dtype)
    if allowed_bits is None:
        raise FormatError(
            f"{where}: only int8, int4 and int2 tensors carry a quant record, "
            f"this one is {entry.dtype}"
        )
    bits = quant["bits"]
    if not _is_int(bits) or bits not in allowed_bits:
        raise FormatError(
            f"{where}: quant.bits must be {' or '.join(map(str, allowed_bits))} for dtype "
            f"{entry.dtype}, found {_show(bits)}"
        )
    scheme, axis, group_size = quant["scheme"], quant["axis"], quant["group_size"]
    if not isinstance(scheme, str) or scheme not in _QUANT_SCHEMES:
        raise FormatError(
            f"{where}: quant.scheme must be one of {', '.join(_QUANT_SCHEMES)}, "
            f"found {_show(scheme)}"
        )
    if scheme != "per_tensor" and not shape:
        raise FormatError(f"{where}: quant.scheme {scheme} needs a tensor with at least one dim")
    if scheme == "per_channel":
        if not _is_int(axis) or not 0 <= axis < len(shape):
            raise FormatError(
                f"{where}: quant.axis must be an int in [0, {len(shape)}) for per_channel, "
                f"found {_show(axis)}"
            )
    elif not _is_int(axis) or axis != 0:
        raise FormatError(f"{where}: quant.axis must be 0 for {scheme}, found {_show(axis)}")
    if scheme == "per_group":
        if not _is_int(group_size) or group_size < 1:
            raise FormatError(
                f"{where}: quant.group_size must be a positive int for per_group, "
                f"found {_show(group_size)}"
            )
        row_length = math.prod(shape) // shape[0]
        count = shape[0] * -(-row_length // group_size)
    elif group_size is not None:
        raise FormatError(
            f"{where}: quant.group_size must be null for {scheme}, found {_show(group_size)}"
        )
    else:
        count = shape[axis] if scheme == "per_channel" else 1
    symmetric, zero_point = quant["symmetric"], quant["zero_point"]
    if not isinstance(symmetric, bool):
        raise FormatError(
            f"{where}: quant.symmetric must be true or false, found {_show(symmetric)}"
        )
    group_scale = quant.get("group_scale")
    scale_count = count
    if group_scale is not None:  # 1.1: integer group scales on float row scales
        if scheme != "per_group":
            raise FormatError(f"{where}: quant.group_scale is only for per_group, not {scheme}")
        _check_reference(index, "group_scale", entries, ("uint8",), count)
        scale_count = shape[0]
    _check_reference(index, "scale", entries, ("float32",), scale_count)
    if not symmetric:
        _check_reference(index, "zero_point", entries, _ZERO_POINT_DTYPES, count)
    elif zero_point is not None:
        raise FormatError(
            f"{where}: quant.zero_point must be null for a symmetric record, "
            f"found {_show(zero_point)}"
        )


def _check_table(entries: list[_Entry]) -> None:
    """Check what involves several entries: unique names, no overlaps, quant references."""
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        if entry.name in seen:
            raise FormatError(
                f"tensor {index} ({entry.name!r}): name already used by tensor {seen[entry.name]}"
            )
        seen[entry.name] = index
    order = sorted(range(len(entries)), key=lambda i: entries[i].offset)
    for before, after in itertools.pairwise(order):
        a, b = entries[before], entries[after]
        if b.offset < a.offset + a.nbytes:
            raise FormatError(
                f"tensor {after} ({b.name!r}) at offset {b.offset} overlaps tensor {before} "
                f"({a.name!r}) at offset {a.offset} with nbytes {a.nbytes}"
            )
    for index, entry in enumerate(entries):
        if entry.quant is not None:
            _check_quant(index, entries)
        if entry.layout == GROUP_BLOCKS_LAYOUT:
            _check_group_blocks(index, entry)


def _check_group_blocks(index: int, entry: _Entry) -> None:
    """A ``groups16x4`` tensor's groups (its checked per_group record) are whole words, so
    its bytes are exactly those :func:`_layout_nbytes` counts."""
    quant = entry.quant
    where = f"tensor {index} ({entry.name!r})"
    if quant is None or quant["scheme"] != "per_group":
        raise FormatError(f"{where}: layout {entry.layout} needs a per_group quant record")
    bits, k_len = _PACKED_BITS[entry.dtype], math.prod(entry.shape[1:])
    if not group_blocks_fit(k_len, quant["group_size"], bits):
        raise FormatError(
            f"{where}: layout {entry.layout} needs groups of a multiple of {32 // bits} "
            f"values, found group_size {quant['group_size']} for rows of {k_len}"
        )


# --------------------------------------------------------------------------------------------
# Writing


def _tensor_bytes(where: str, tensor: Tensor, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
    """Check ``tensor.data`` against the declared dtype and storage shape (:func:`_storage_shape`);
    return its bytes in C order."""
    data = tensor.data
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{where}: data must be a numpy array, got {type(data).__name__}")
    if tensor.dtype in _PACKED_BITS:
        if data.dtype != np.uint8 or data.shape != (nbytes,):
            raise ValueError(
                f"{where}: {tensor.dtype} data must be the packed bytes, a 1-D uint8 array of "
                f"{nbytes} bytes (tinyrt.packing.pack_bits), got {data.dtype} with shape "
                f"{data.shape}"
            )
    elif data.dtype != _NUMPY_DTYPES[tensor.dtype] or data.shape != shape:
        raise ValueError(
            f"{where}: data must have dtype {tensor.dtype} and shape {shape}, "
            f"got {data.dtype} with shape {data.shape}"
        )
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _table_entry(entry: _Entry) -> dict:
    """An entry as the file's JSON holds it (keys sorted on output); ``layout`` only where a
    tensor has one, so a file without layouts is the same as a 1.1 writer's."""
    fields = {**entry._asdict(), "shape": list(entry.shape)}
    if entry.layout is None:
        del fields["layout"]
    return fields


def serialize(graph: dict, tensors: Sequence[Tensor], provenance: dict) -> bytes:
    """Return the bytes of a model file holding ``graph``, ``tensors`` and ``provenance``.

    The output is deterministic: the same arguments give the same bytes. Invalid arguments
    raise ValueError (FormatError for a table entry or quant record the reader would reject).
    """
    for field, value in (("graph", graph), ("provenance", provenance)):
        if not isinstance(value, dict):
            raise ValueError(f"{field} must be a dict, got {type(value).__name__}")
    entries: list[_Entry] = []
    arrays: list[np.ndarray] = []
    offset = 0
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"tensor {index}: expected a Tensor, got {type(tensor).__name__}")
        dims = [int(d) if isinstance(d, np.integer) else d for d in tensor.shape]
        where, nbytes = _check_declaration(index, tensor.name, tensor.dtype, dims, tensor.layout)
        quant, layout = tensor.quant, tensor.layout
        entry = _Entry(tensor.name, tensor.dtype, tuple(dims), offset, nbytes, quant, layout)
        arrays.append(_tensor_bytes(where, tensor, _storage_shape(entry), nbytes))
        entries.append(entry)
        offset = _align(offset + nbytes)
    _check_table(entries)
    table = [_table_entry(entry) for entry in entries]
    flags = _layout_flags(entries)
    try:
        metadata = json.dumps(
            {"tensors": table, "graph": graph, "provenance": provenance}, **_JSON_OPTIONS
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "graph, provenance or a quant record is not JSON-serializable: they may hold only "
            f"dicts with str keys, lists, str, int, finite float, bool and None ({exc})"
        ) from exc
    if len(metadata) > MAX_METADATA_NBYTES:
        raise ValueError(
            f"metadata is {len(metadata)} bytes, more than the {MAX_METADATA_NBYTES} a reader "
            "accepts"
        )
    data_offset = _align(HEADER_SIZE + len(metadata))
    data_nbytes = entries[-1].offset + entries[-1].nbytes if entries else 0
    out = np.zeros(data_offset + data_nbytes, dtype=np.uint8)
    out[HEADER_SIZE : HEADER_SIZE + len(metadata)] = np.frombuffer(metadata, dtype=np.uint8)
    for entry, array in zip(entries, arrays, strict=True):
        start = data_offset + entry.offset
        out[start : start + entry.nbytes] = array
    fields = _HEADER_FIELDS.pack(
        MAGIC,
        *FORMAT_VERSION,
        HEADER_SIZE,
        HEADER_SIZE,
        len(metadata),
        data_offset,
        data_nbytes,
        zlib.crc32(metadata),
        zlib.crc32(out[data_offset:]),
        flags,
    )
    header = fields + _CRC.pack(zlib.crc32(fields))
    out[:HEADER_SIZE] = np.frombuffer(header, dtype=np.uint8)
    return out.tobytes()


def write_model_file(
    path: str | os.PathLike, graph: dict, tensors: Sequence[Tensor], provenance: dict
) -> None:
    """Write a model file to ``path`` atomically.

    The bytes go to a temporary file in the same directory, which is flushed, fsynced and
    renamed onto ``path`` with :func:`os.replace`. On any failure the temporary file is removed
    and an existing file at ``path`` is left untouched.
    """
    blob = serialize(graph, tensors, provenance)
    directory, base = os.path.split(os.path.abspath(os.fspath(path)))
    temp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    # os.open (not mkstemp) so that the file gets the usual permissions, 0o666 minus the umask.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(temp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    # Make the rename itself durable; directories cannot be opened or fsynced everywhere.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# Reading


def _check_file_size(size: int) -> None:
    if size == 0:
        raise FormatError("file is empty (0 bytes); a .tinyrt file starts with a 64-byte header")
    if size < HEADER_SIZE:
        raise FormatError(
            f"file is {size} bytes, shorter than the {HEADER_SIZE}-byte header: it is truncated "
            "or not a .tinyrt file"
        )


def _open(source: str | os.PathLike | bytes | bytearray | memoryview) -> np.ndarray:
    """Return the file's bytes as a read-only uint8 array: a memory map or a buffer view."""
    if isinstance(source, bytes | bytearray | memoryview):
        buf = np.frombuffer(source, dtype=np.uint8)
        buf.flags.writeable = False
        _check_file_size(buf.size)
        return buf
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise FormatError(f"model file {path!r} is not a regular file")
            _check_file_size(info.st_size)
            return np.memmap(f, dtype=np.uint8, mode="r", shape=(info.st_size,)).view(np.ndarray)
    except FileNotFoundError:
        raise FormatError(f"model file {path!r} does not exist") from None
    except IsADirectoryError:
        raise FormatError(f"model file {path!r} is a directory, expected a .tinyrt file") from None
    except OSError as exc:
        raise FormatError(f"cannot read model file {path!r}: {exc.strerror or exc}") from exc


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows to infinity (numbers must be finite)")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {duplicate!r} in an object")
    return result


def _parse_metadata(raw: bytes) -> dict:
    """Decode and parse the metadata section; check its top-level structure."""
    try:
        meta = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise FormatError("metadata: JSON is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise FormatError(f"metadata is not valid UTF-8: {exc}") from None
    except ValueError as exc:
        raise FormatError(f"metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise FormatError(f"metadata must be a JSON object, found {_json_kind(meta)}")
    for key, kind in (("tensors", list), ("graph", dict), ("provenance", dict)):
        if key not in meta:
            raise FormatError(f"metadata has no {key!r} field")
        if not isinstance(meta[key], kind):
            expected = "an array" if kind is list else "an object"
            raise FormatError(
                f"metadata field {key!r} must be {expected}, found {_json_kind(meta[key])}"
            )
    return meta


def _check_entry(index: int, entry: object, data_nbytes: int) -> _Entry:
    """Check one tensor table entry read from a file against the data section."""
    if not isinstance(entry, dict):
        raise FormatError(
            f"tensor {index}: table entry must be an object, found {_json_kind(entry)}"
        )
    for key in _ENTRY_KEYS:
        if key not in entry:
            raise FormatError(f"tensor {index}: table entry has no {key!r} field")
    name, dtype, shape, layout = entry["name"], entry["dtype"], entry["shape"], entry.get("layout")
    where, expected = _check_declaration(index, name, dtype, shape, layout)
    offset, nbytes, quant = entry["offset"], entry["nbytes"], entry["quant"]
    if not _is_int(nbytes) or nbytes != expected:
        raise FormatError(
            f"{where}: nbytes is {_show(nbytes)}, but dtype {dtype} with shape {shape} takes "
            f"{expected} bytes"
        )
    if not _is_int(offset) or offset < 0:
        raise FormatError(f"{where}: offset must be an int >= 0, found {_show(offset)}")
    if offset % ALIGNMENT:
        raise FormatError(f"{where}: offset {offset} is not a multiple of {ALIGNMENT}")
    if offset + nbytes > data_nbytes:
        raise FormatError(
            f"{where}: offset {offset} + nbytes {nbytes} runs past the data section "
            f"({data_nbytes} bytes)"
        )
    return _Entry(name, dtype, tuple(shape), offset, nbytes, quant, layout)


def _checked_crc(field: str, section: np.ndarray, stored: int) -> None:
    computed = zlib.crc32(section)
    if computed != stored:
        raise FormatError(
            f"{field} mismatch: the header stores 0x{stored:08x}, the bytes give "
            f"0x{computed:08x}; the file is corrupted"
        )


def read_model_file(
    source: str | os.PathLike | bytes | bytearray | memoryview, *, verify_checksums: bool = True
) -> ModelFile:
    """Read and validate a model file from a path (memory-mapped) or from its bytes.

    ``source`` is a path (str or path-like) or the file's contents (bytes, bytearray,
    memoryview; never a path). Tensors are read-only, zero-copy views into the map or buffer;
    keep the buffer unchanged while they are in use. ``verify_checksums=False`` skips only the
    crc32 of the data section (which reads every byte of it); the header and metadata checksums
    are always verified. Any problem raises FormatError.
    """
    buf = _open(source)
    size = buf.size
    fields = _HEADER_FIELDS.unpack(buf[:60].tobytes())
    magic, major, minor, header_size, meta_offset, meta_nbytes = fields[:6]
    data_offset, data_nbytes, meta_crc, data_crc, flags = fields[6:]
    if magic != MAGIC:
        if magic[1:7] == MAGIC[1:7]:
            raise FormatError(
                f"magic bytes are {magic!r}, expected {MAGIC!r}: the file was damaged in "
                "transfer (text mode or 7-bit); copy it in binary mode"
            )
        raise FormatError(f"not a .tinyrt file: magic bytes are {magic!r}, expected {MAGIC!r}")
    # The magic and version (bytes 0..11) are the same in every major version; the rest of the
    # header, its checksum included, is laid out by the major version, so check it first.
    if major != FORMAT_VERSION[0]:
        advice = "upgrade tinyrt" if major > FORMAT_VERSION[0] else "convert the model again"
        raise FormatError(
            f"file format version {major}.{minor} is not supported; this tinyrt reads version "
            f"{FORMAT_VERSION[0]}.x; {advice}"
        )
    (header_crc,) = _CRC.unpack(buf[60:HEADER_SIZE].tobytes())
    _checked_crc("header crc32 (bytes 0..59)", buf[:60], header_crc)
    if header_size != HEADER_SIZE:
        raise FormatError(f"header_size is {header_size}, expected {HEADER_SIZE}")
    if flags & ~KNOWN_FLAGS:
        raise FormatError(
            f"flags are 0x{flags:08x}: bits 0x{flags & ~KNOWN_FLAGS:08x} name features this "
            f"tinyrt does not know (it reads format {FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}, "
            f"flags 0x{KNOWN_FLAGS:08x}); upgrade tinyrt"
        )
    if meta_offset != HEADER_SIZE:
        raise FormatError(f"metadata_offset is {meta_offset}, expected {HEADER_SIZE}")
    if meta_nbytes > MAX_METADATA_NBYTES:
        raise FormatError(
            f"metadata_nbytes {meta_nbytes} exceeds the limit of {MAX_METADATA_NBYTES} bytes"
        )
    meta_end = meta_offset + meta_nbytes
    if meta_end > size:
        raise FormatError(
            f"metadata_offset {meta_offset} + metadata_nbytes {meta_nbytes} runs past the end "
            f"of the file ({size} bytes): the file is truncated"
        )
    if data_offset % ALIGNMENT:
        raise FormatError(f"data_offset {data_offset} is not a multiple of {ALIGNMENT}")
    if data_offset < meta_end:
        raise FormatError(
            f"data_offset {data_offset} lies inside the metadata section, which ends at {meta_end}"
        )
    data_end = data_offset + data_nbytes
    if data_end != size:
        problem = (
            "the file is truncated"
            if data_end > size
            else f"trailing garbage ({size - data_end} extra bytes at the end)"
        )
        raise FormatError(
            f"file size is {size} bytes, but data_offset {data_offset} + data_nbytes "
            f"{data_nbytes} = {data_end}: {problem}"
        )
    _checked_crc("metadata crc32", buf[meta_offset:meta_end], meta_crc)
    data = buf[data_offset:data_end]
    if verify_checksums:
        _checked_crc("data crc32", data, data_crc)
    meta = _parse_metadata(buf[meta_offset:meta_end].tobytes())
    table = meta["tensors"]
    if len(table) > MAX_TENSORS:
        raise FormatError(
            f"tensors: the table has {len(table)} entries, the limit is {MAX_TENSORS}"
        )
    entries = [_check_entry(index, entry, data_nbytes) for index, entry in enumerate(table)]
    _check_table(entries)
    needed = _layout_flags(entries)
    for flag in (FLAG_LAYOUTS, FLAG_CONV_ROWS, FLAG_GROUP_BLOCKS):
        if (flags ^ needed) & flag:
            found = "some tensors have" if needed & flag else "no tensor has"
            names = {FLAG_CONV_ROWS: CONV_ROWS_LAYOUT, FLAG_GROUP_BLOCKS: GROUP_BLOCKS_LAYOUT}
            layouts = f"layout {names[flag]}" if flag in names else "a layout"
            expected = "set" if needed & flag else "clear"
            raise FormatError(
                f"flags are 0x{flags:08x}, but {found} {layouts}: flag 0x{flag:x} must be "
                f"{expected}"
            )
    tensors = []
    for entry in entries:
        raw = data[entry.offset : entry.offset + entry.nbytes]
        if entry.dtype not in _PACKED_BITS:
            raw = raw.view(_NUMPY_DTYPES[entry.dtype]).reshape(_storage_shape(entry))
        tensors.append(Tensor(entry.name, entry.dtype, entry.shape, raw, entry.quant, entry.layout))
    return ModelFile((major, minor), meta["graph"], meta["provenance"], tensors)
