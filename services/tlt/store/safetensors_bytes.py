"""Safetensors files as bytes: the header check at publish (nothing else is accepted as weights) and
zero-copy tensors over a verified buffer at load."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING

from tlt.store.errors import StoreError
from tlt.store.streams import Source

if TYPE_CHECKING:
    import torch

_MAX_SAFETENSORS_HEADER = 100 << 20
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
           "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def check_safetensors_header(label: str, name: str, src: Source) -> None:
    """Refuse a ``.safetensors`` file whose header is not a safetensors header (e.g. a renamed pickle)."""
    if isinstance(src, memoryview):
        head = bytes(src[:8])
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        body = bytes(src[8:8 + length]) if 0 < length <= _MAX_SAFETENSORS_HEADER else b""
    else:
        head = src.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        body = src.read(length) if 0 < length <= _MAX_SAFETENSORS_HEADER else b""
        src.seek(0)
    try:
        ok = len(body) == length and isinstance(json.loads(body), dict)
    except ValueError:
        ok = False
    if not ok:
        raise StoreError(f"publish {label}: {name!r} is not a valid safetensors file (bad header); save weights "
                         "with safetensors.torch.save_file (safetensors only, no pickle)")


def tensors_from_buffer(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in the uint8 tensor ``flat``, as views into it (no copy).

    Validates like safetensors itself: known dtypes, sizes matching shapes, data contiguous and covering
    the buffer exactly. Raises ``ValueError`` on any malformation.
    """
    import torch

    total = flat.numel()
    raw = flat.numpy()
    n = int.from_bytes(bytes(raw[:8]), "little") if total >= 8 else -1
    if not 0 < n <= min(_MAX_SAFETENSORS_HEADER, total - 8):
        raise ValueError(f"header length {n} does not fit the file's {total} bytes")
    try:
        header = json.loads(bytes(raw[8:8 + n]))
    except ValueError as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    base, size = 8 + n, total - 8 - n
    tensors, spans = {}, []
    for key, info in header.items():
        try:
            dtype = getattr(torch, _DTYPES[info["dtype"]])
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"tensor {key!r} has a malformed or unsupported entry {info!r}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= size or \
                end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {key!r}: offsets {begin}..{end} do not fit its shape {shape} "
                             f"{info['dtype']} or the {size} data bytes")
        spans.append((begin, end))
        if begin == end:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        part = flat[base + begin:base + end]
        if (base + begin) % dtype.itemsize:
            part = part.clone()  # unaligned (unusual writer): copy this tensor
        tensors[key] = part.view(dtype).view(shape)
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise ValueError(f"tensor data overlaps or leaves a gap at byte {pos}")
        pos = end
    if pos != size:
        raise ValueError(f"{size - pos} bytes after the last tensor")
    if sys.byteorder == "big":  # pragma: no cover - safetensors is little-endian
        tensors = {k: torch.from_numpy(t.numpy().byteswap()) for k, t in tensors.items()}
    return tensors
