"""Safetensors files read and written byte for byte, with no deep-learning stack.

Neither torch nor mlx hands bf16 to NumPy, and a conversion must work with either stack
alone, so tensors travel as their raw little-endian bytes (``Tensor``). NumPy only ever sees
bit patterns (bf16 as ``uint16``), which makes transposes and copies exact; the one lossy
operation is an explicit ``cast`` (``--dtype``), which rounds to nearest even like torch.

File layout: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then
the data, offsets relative to its start.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tabpo.common.errors import TabpoError

# safetensors dtype -> NumPy dtype holding the same bits (bf16 and fp8 as unsigned ints)
STORAGE = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
    "F8_E4M3": "u1",
    "F8_E5M2": "u1",
}
FLOATS = ("F64", "F32", "F16", "BF16")
DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16}


@dataclass(frozen=True)
class Tensor:
    """One tensor as stored: safetensors dtype code, shape, raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def array(self) -> np.ndarray:
        """The bits as a NumPy array of the storage dtype (bf16: uint16), no copy."""
        return np.frombuffer(self.data, dtype=STORAGE[self.dtype]).reshape(self.shape)


@dataclass(frozen=True)
class Header:
    """A checked header: tensor entries by name, metadata, where the data starts."""

    path: Path
    entries: dict[str, dict]
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """The header of ``path``, checked against the file size so that a truncated or
    damaged file is named here rather than failing deep inside a loader."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise TabpoError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise TabpoError(f"{path}: not a readable safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    start, end = 8 + n, 8 + n
    for name, entry in header.items():
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            nbytes = math.prod(int(d) for d in shape) * np.dtype(STORAGE.get(dtype, "u1")).itemsize
        except (KeyError, TypeError, ValueError):
            raise TabpoError(f"{path}: tensor {name}: malformed header entry {entry!r}") from None
        if dtype not in STORAGE:
            raise TabpoError(f"{path}: tensor {name} has unsupported dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin) or (
            stop - begin != nbytes
        ):
            raise TabpoError(f"{path}: tensor {name}: data offsets do not match shape {shape}")
        end = max(end, start + stop)
    if end > size:
        raise TabpoError(f"{path}: truncated: the header needs {end} bytes, the file has {size}")
    return Header(path, header, metadata, start)


def shape_of(header: Header, name: str) -> tuple[int, ...]:
    return tuple(header.entries[name]["shape"])


def read_tensors(header: Header, names: list[str] | None = None) -> dict[str, Tensor]:
    """The tensors ``names`` (all by default) of a checked file, in file order."""
    wanted = list(header.entries) if names is None else names
    out = {}
    with open(header.path, "rb") as fh:
        for name in wanted:
            entry = header.entries[name]
            begin, end = entry["data_offsets"]
            fh.seek(header.data_start + begin)
            out[name] = Tensor(entry["dtype"], tuple(entry["shape"]), fh.read(end - begin))
    return out


def write_file(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> int:
    """Write a safetensors file (header padded to 8 bytes as the reference writer does);
    returns the number of data bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        header[name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(t.data)],
        }
        offset += len(t.data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for t in tensors.values():
            fh.write(t.data)
    return offset


def to_float32(t: Tensor) -> np.ndarray:
    """Exact for F32, F16 and BF16 (a bf16 is the upper half of a float32's bits)."""
    if t.dtype == "BF16":
        return (t.array().astype(np.uint32) << 16).view(np.float32)
    if t.dtype not in FLOATS:
        raise TabpoError(f"cannot read a {t.dtype} tensor as floating point")
    return t.array().astype(np.float32)


def from_float32(x: np.ndarray, dtype: str, *, name: str | None = None) -> Tensor:
    """Round float32 values to ``dtype`` (nearest even, as torch does; NaN stays NaN).

    A finite value beyond float16's range (65504) rounds to +-inf, as torch's cast does,
    silently. Given the tensor's ``name`` (a conversion of the user's weights), that is an
    error naming the tensor instead: a model with inf weights is broken."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "BF16":
        bits = x.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        nan = (bits >> 16) | np.uint32(0x40)
        out = np.where(np.isnan(x), nan, rounded).astype("<u2")
    else:
        with np.errstate(over="ignore"):  # the IEEE result, checked just below when named
            out = x.astype(STORAGE[dtype])
        overflow = np.isinf(out) & np.isfinite(x)
        if name is not None and overflow.any():
            raise TabpoError(
                f"{name}: values up to {np.abs(x[overflow]).max():.4g} do not fit {dtype} "
                "(they would become inf); keep a wider --dtype"
            )
    return Tensor(dtype, tuple(x.shape), out.tobytes())


def cast(t: Tensor, dtype: str, *, name: str | None = None) -> Tensor:
    """``t`` in ``dtype`` if it is floating point; unchanged (same bytes) otherwise; with
    ``name``, an overflow to inf is an error (``from_float32``)."""
    if t.dtype not in FLOATS or t.dtype == dtype:
        return t
    if t.dtype == "F64":
        return from_float32(t.array().astype(np.float32), dtype, name=name)
    return from_float32(to_float32(t), dtype, name=name)


def transpose(t: Tensor) -> Tensor:
    """The 2-D transpose, moving bit patterns only (exact in every dtype)."""
    return Tensor(t.dtype, t.shape[::-1], np.ascontiguousarray(t.array().T).tobytes())


def widest(dtypes: list[str]) -> str:
    """The floating dtype with the most bits among ``dtypes`` (F32 if there is none)."""
    floats = [d for d in dtypes if d in _BITS]
    return max(floats, key=lambda d: _BITS[d]) if floats else "F32"
