"""Streaming ``.safetensors`` I/O: one tensor in RAM at a time.

``safetensors.torch.save_file`` needs every tensor in memory, and reading through a memory map
leaves every touched page resident; a 28 GB merge would need twice its size. This module reads
each tensor with a plain positioned read and writes the output file incrementally, so a merge
holds little more than the largest tensor.

The format (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian unsigned
header size ``N``; ``N`` bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {str: str}}`` (offsets relative to the byte after the header, tensors
packed in offset order, header padded with spaces to a multiple of 8); then the raw little-endian
bytes of each tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

from wanlora.io_utils import atomic_path

__all__ = ["SAFETENSORS_DTYPES", "SafetensorsReader", "SafetensorsStreamWriter"]

#: safetensors dtype code <-> torch dtype.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsReader:
    """Read tensors of one ``.safetensors`` file one at a time, without a memory map.

    ``reader.keys()`` in file order, ``reader.info(key) -> (torch dtype, shape)``,
    ``reader.get(key) -> Tensor`` (a fresh CPU tensor), ``reader.metadata``.

    Raises:
        ValueError: a truncated file, a bad header, or an unknown dtype (message names the file).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            size = self.path.stat().st_size
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(self._f.read(n))
        except Exception as e:
            self._f.close()
            raise ValueError(f"{self.path}: not a readable safetensors file ({e})") from None
        self._data_start = 8 + n
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        for k, e in self._entries.items():
            if e["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{self.path}: tensor {k!r} has unsupported dtype {e['dtype']}")
            if self._data_start + e["data_offsets"][1] > size:
                raise ValueError(f"{self.path}: truncated (tensor {k!r} runs past the end); download it again")

    def keys(self) -> list[str]:
        """Tensor names in file (data offset) order."""
        return list(self._entries)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of ``key`` from the header, reading no data. Raises KeyError."""
        e = self._entries[key]
        return SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"])

    def get(self, key: str) -> torch.Tensor:
        """Read ``key`` into a fresh CPU tensor of its stored dtype and shape (a copy, no mmap).

        Raises:
            KeyError: no such tensor. ValueError: the file ends before the tensor does.
        """
        e = self._entries[key]
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        self._f.seek(self._data_start + begin)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = self._f.readinto(view[got:])
            if not n:
                raise ValueError(f"{self.path}: truncated while reading {key!r}")
            got += n
        dtype = SAFETENSORS_DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(e["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsStreamWriter:
    """Write a ``.safetensors`` file tensor by tensor, atomically (``wanlora.io_utils.atomic_path``).

    The header is fixed up front from ``specs`` (``{name: (torch dtype, shape)}``, in write order);
    then :meth:`write` must be called once per name, in that order, with a tensor of that dtype
    and shape. Used as a context manager; an exception removes the partial file.

    Raises:
        ValueError: a tensor out of order, of another dtype/shape, or missing at close.
    """

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs.items())
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, (dtype, shape) in self._specs:
            if dtype not in _CODES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._header = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._ctx = None
        self._f = None

    def __enter__(self):
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._f = open(tmp, "wb")
        self._f.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (moved to CPU) as ``name``, the next entry of ``specs``.

        Raises:
            ValueError: ``name`` is not next, or its dtype/shape differ from the header's.
        """
        if self._next >= len(self._specs) or self._specs[self._next][0] != name:
            expected = self._specs[self._next][0] if self._next < len(self._specs) else "nothing"
            raise ValueError(f"{self.path}: wrote {name!r} but {expected!r} is next")
        dtype, shape = self._specs[self._next][1]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"the header says {dtype} {tuple(shape)}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def __exit__(self, exc_type, exc, tb):
        self._f.close()
        if exc_type is None and self._next != len(self._specs):
            missing = [n for n, _ in self._specs[self._next:]][:3]
            err = ValueError(f"{self.path}: tensors never written: {missing}")
            self._ctx.__exit__(ValueError, err, None)  # removes the partial file
            raise err
        self._ctx.__exit__(exc_type, exc, tb)
        return False
