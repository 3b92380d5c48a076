"""Hugging Face safetensors checkpoints, read lazily and written as a stream.

Reading uses the ``safetensors`` library: ``safe_open`` maps each file and ``get_tensor`` returns
a tensor over the mapping, so a tensor's pages are read when something touches them and the
kernel may drop them again (they are file-backed, not anonymous memory).

Writing is by hand, because ``safetensors.torch.save_file`` needs every tensor of a file in
memory at once: :class:`ShardedWriter` knows every tensor's name, dtype and shape beforehand
(the export plans them on the meta device), writes each file's header first and then the tensor
bytes as they arrive, one tensor at a time. The format is the documented one (8-byte
little-endian header length, a JSON header with ``dtype``/``shape``/``data_offsets``, padded
with spaces to 8 bytes, then the data), and ``safetensors`` reads the result (tested).
Sharded output follows transformers' naming: ``model-00001-of-00003.safetensors`` and
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsReader:
    """Every tensor of a checkpoint folder (``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``, or any ``*.safetensors`` in it), opened lazily."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors files (nor {INDEX})")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {name}, which is missing")
            handle = safe_open(str(path), framework="pt")
            self._handles[name] = handle
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in self._where:
                    raise ValueError(f"{folder}: tensor {key} is in {self._where[key]} and {name}")
                self._where[key] = name
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise ValueError(f"{index} lists tensors no shard holds: {missing[:5]}")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """The tensor, backed by the file mapping (no copy until it is written to)."""
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except KeyError:
            raise KeyError(f"{self.folder} has no tensor {name}") from None

    def shape(self, name: str) -> list[int]:
        return self._handles[self._where[name]].get_slice(name).get_shape()


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _header(plans: list[TensorPlan], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for p in plans:
        header[p.name] = {
            "dtype": _DTYPES[p.dtype],
            "shape": list(p.shape),
            "data_offsets": [offset, offset + p.nbytes],
        }
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes planned tensors, in plan order, into files of at most ``max_shard_bytes`` (a
    tensor larger than that gets a file of its own), then the index."""

    def __init__(self, folder: str | Path, plans: list[TensorPlan], max_shard_bytes: int):
        self.folder = Path(folder)
        names = [p.name for p in plans]
        if len(set(names)) != len(names):
            raise ValueError("a tensor name is planned twice")
        unknown = [p.name for p in plans if p.dtype not in _DTYPES]
        if unknown:
            raise ValueError(f"no safetensors dtype for {unknown[:3]}")
        shards: list[list[TensorPlan]] = [[]]
        size = 0
        for p in plans:
            if shards[-1] and size + p.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        count = len(shards)
        self._files = (
            [SINGLE]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self._shards = shards
        self._order: Iterator[tuple[int, TensorPlan]] = (
            (i, p) for i, shard in enumerate(shards) for p in shard
        )
        self._current = -1
        self._handle = None
        self.total_bytes = sum(p.nbytes for p in plans)
        self.weight_map = {p.name: self._files[i] for i, s in enumerate(shards) for p in s}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next planned tensor (name, dtype and shape must be the plan's)."""
        try:
            shard, plan = next(self._order)
        except StopIteration:
            raise ValueError(f"{name}: every planned tensor is written already") from None
        if plan.name != name:
            raise ValueError(f"expected tensor {plan.name} next, got {name}")
        if tensor.dtype != plan.dtype or tuple(tensor.shape) != plan.shape:
            raise ValueError(
                f"{name}: {tensor.dtype} {tuple(tensor.shape)} but planned {plan.dtype} "
                f"{plan.shape}"
            )
        if shard != self._current:
            self._open(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._handle.write(data.view(torch.uint8).numpy().data)

    def _open(self, shard: int) -> None:
        self._close_file()
        self._current = shard
        # open across write() calls: one file receives many tensors, closed in _close_file
        self._handle = open(self.folder / self._files[shard], "wb")  # noqa: SIM115
        self._handle.write(_header(self._shards[shard], {"format": "pt"}))

    def _close_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> list[str]:
        """Finish the last file and write the index; returns the file names."""
        left = sum(1 for _ in self._order)
        self._close_file()
        if left:
            raise ValueError(f"{left} planned tensors were never written")
        if len(self._files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return list(self._files)
