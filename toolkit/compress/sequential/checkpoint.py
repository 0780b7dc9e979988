"""Safetensors shards read one tensor at a time and written shard by shard: the disk side of sequential compression.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page a read touches then
counts in this process's resident set (RssFile) until the map is closed, so a pass over a 13.5 GB
checkpoint would report 13.5 GB of "peak RSS" that the kernel could drop at any time. Here a tensor is
read with one positioned read (`os.pread`) of its byte range into a buffer of its own: the resident
cost of a read is the tensor, nothing else (the page cache holds the file, outside the RSS).

Writing: `ShardWriter` lays out each output shard's header from the names, dtypes and shapes known
before any data (the source's tensors, renamed and filtered), writes the header, then puts each
tensor's bytes at its offset (`os.pwrite`) as the pass produces them, in any order. A shard whose
tensors all pass unchanged under their own names is hard-linked from the source (copied where
linking fails), never rewritten. Every file is built under a temporary name and renamed when
complete; the caller's folder is itself built atomically (`toolkit.core.atomic.building_folder`).

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes
of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}` (offsets relative
to the end of the header, padded with spaces to a multiple of 8), then the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.core.errors import BedsideError
from toolkit.model.checkpoint import read_safetensors_header

# safetensors dtype names <-> torch dtypes (the float and integer types a checkpoint stores)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
COPY_CHUNK = 64 << 20  # bytes per read/write when a tensor passes unchanged


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: file, absolute byte range, dtype name, shape."""

    file: Path
    begin: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of one safetensors file (absolute offsets) and its metadata; BedsideError if malformed."""
    header, start = read_safetensors_header(path)
    size = path.stat().st_size
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, StoredTensor] = {}
    try:
        for name, entry in header.items():
            begin, end = (int(v) for v in entry["data_offsets"])
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']!r}, which Bedside does not read")
            if not 0 <= begin <= end or start + end > size:
                raise ValueError(f"tensor {name!r} lies outside the file")
            tensors[str(name)] = StoredTensor(
                path, start + begin, start + end, str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            )
    except (ValueError, KeyError, TypeError) as error:
        raise BedsideError(f"{path} is not a valid safetensors file ({error}): save the weights again") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


class ShardedCheckpoint:
    """Every tensor of a checkpoint folder's `*.safetensors`, readable one at a time (positioned reads)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise BedsideError(f"checkpoint folder '{self.folder}' has no *.safetensors weights")
        self.tensors: dict[str, StoredTensor] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for path in self.files:
            tensors, metadata = read_header(path)
            self.tensors.update(tensors)
            self.metadata[path.name] = metadata

    def resolve(self, name: str) -> str | None:
        """The stored name of module tensor `name` (transformers also loads a base model saved without `model.`)."""
        if name in self.tensors:
            return name
        short = name.removeprefix("model.")
        return short if short in self.tensors else None

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype, in a buffer of its own (no map stays open)."""
        stored = self.resolve(name)
        if stored is None:
            raise BedsideError(f"the checkpoint in '{self.folder}' has no tensor {name!r}")
        entry = self.tensors[stored]
        buffer = bytearray(entry.nbytes)
        _read_into(entry.file, entry.begin, memoryview(buffer))
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)


    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor `name` into `out` (same shape, any float dtype), COPY_CHUNK bytes at a time: the
        resident cost is `out` plus one chunk, not `out` plus the stored tensor."""
        stored = self.resolve(name)
        if stored is None:
            raise BedsideError(f"the checkpoint in '{self.folder}' has no tensor {name!r}")
        entry = self.tensors[stored]
        if tuple(out.shape) != entry.shape:
            raise BedsideError(f"tensor {name!r} is {entry.shape} in '{self.folder}', the model expects {tuple(out.shape)}")
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        flat = out.reshape(-1)
        if flat.data_ptr() != out.data_ptr() or not out.is_contiguous():
            raise AssertionError("read_into needs a contiguous tensor")
        item = torch.empty(0, dtype=dtype).element_size()
        step = max(1, COPY_CHUNK // item)
        for first in range(0, flat.numel(), step):
            count = min(step, flat.numel() - first)
            buffer = bytearray(count * item)
            _read_into(entry.file, entry.begin + first * item, memoryview(buffer))
            flat[first : first + count].copy_(torch.frombuffer(buffer, dtype=dtype))
        return out


def _read_into(path: Path, offset: int, view: memoryview) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            count = os.preadv(descriptor, [view[done : done + COPY_CHUNK]], offset + done)
            if count <= 0:
                raise BedsideError(f"{path} ended before its tensors did: save the weights again")
            done += count
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(descriptor, data[done : done + COPY_CHUNK], offset + done)


@dataclass
class _Shard:
    name: str
    entries: dict[str, tuple[int, int, str, tuple[int, ...]]]  # output name -> (begin, end, dtype, shape)
    sources: dict[str, str]  # output name -> source name
    data_start: int = 0
    descriptor: int = -1
    temporary: Path | None = None
    linked: bool = False


class ShardWriter:
    """Write a checkpoint's shards from a source checkpoint: renamed, dropped and replaced tensors.

    `rename(source_name) -> output name or None (dropped)`; `changed`: output names whose data the
    caller supplies with `put` (in the source's dtype and shape); every other kept tensor is copied
    byte for byte by `finish`. Output shards keep the source's file names; a shard left empty is not
    written; a shard with nothing renamed, dropped or changed is hard-linked.
    """

    def __init__(
        self,
        source: ShardedCheckpoint,
        folder: Path,
        rename: Callable[[str], str | None],
        changed: set[str],
    ) -> None:
        self.source = source
        self.folder = Path(folder)
        self.changed = set(changed)
        self.written: set[str] = set()
        self.shards: dict[str, _Shard] = {}
        self.where: dict[str, _Shard] = {}
        by_file: dict[Path, list[tuple[str, StoredTensor]]] = {}
        for name, entry in source.tensors.items():
            by_file.setdefault(entry.file, []).append((name, entry))
        for path, entries in sorted(by_file.items()):
            entries.sort(key=lambda item: item[1].begin)
            shard = _Shard(path.name, {}, {})
            offset = 0
            for name, entry in entries:
                out_name = rename(name)
                if out_name is None:
                    continue
                shard.entries[out_name] = (offset, offset + entry.nbytes, entry.dtype, entry.shape)
                shard.sources[out_name] = name
                offset += entry.nbytes
            if not shard.entries:
                continue
            shard.linked = len(shard.entries) == len(entries) and all(
                out == src and out not in self.changed for out, src in shard.sources.items()
            )
            self.shards[shard.name] = shard
            for out_name in shard.entries:
                self.where[out_name] = shard
        missing = self.changed - set(self.where)
        if missing:
            raise AssertionError(f"changed tensors not in the output: {sorted(missing)[:3]}")
        for shard in self.shards.values():
            if not shard.linked:
                self._open(shard)

    def _open(self, shard: _Shard) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for out_name, (begin, end, dtype, shape) in shard.entries.items():
            header[out_name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        shard.temporary = self.folder / f".tmp-{shard.name}-{os.getpid()}"
        shard.descriptor = os.open(shard.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_all(shard.descriptor, memoryview(struct.pack("<Q", len(text)) + text), 0)
        shard.data_start = 8 + len(text)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Write the new value of changed tensor `name`, cast to the source's dtype (shape must match)."""
        if name not in self.changed:
            raise AssertionError(f"{name!r} was not declared changed")
        shard = self.where[name]
        begin, end, dtype, shape = shard.entries[name]
        if tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: shape {tuple(tensor.shape)} where the checkpoint has {shape}")
        data = tensor.detach().to(SAFETENSORS_DTYPES[dtype]).contiguous().reshape(-1)
        raw = memoryview(data.view(torch.uint8).numpy())
        if len(raw) != end - begin:
            raise AssertionError(f"{name}: {len(raw)} bytes for a slot of {end - begin}")
        _write_all(shard.descriptor, raw, shard.data_start + begin)
        self.written.add(name)

    def finish(self) -> list[str]:
        """Copy the unchanged tensors, link the untouched shards, rename the rest into place; the file names."""
        unwritten = self.changed - self.written
        if unwritten:
            raise AssertionError(f"changed tensors never written: {sorted(unwritten)[:3]}")
        for shard in self.shards.values():
            final = self.folder / shard.name
            if shard.linked:
                source = self.source.folder / shard.name
                try:
                    os.link(source, final)
                except OSError:
                    import shutil

                    shutil.copy2(source, final)
                continue
            for out_name, (begin, end, _dtype, _shape) in shard.entries.items():
                if out_name in self.changed:
                    continue
                entry = self.source.tensors[shard.sources[out_name]]
                for start in range(0, end - begin, COPY_CHUNK):
                    size = min(COPY_CHUNK, end - begin - start)
                    buffer = bytearray(size)
                    _read_into(entry.file, entry.begin + start, memoryview(buffer))
                    _write_all(shard.descriptor, memoryview(buffer), shard.data_start + begin + start)
            os.fsync(shard.descriptor)
            os.close(shard.descriptor)
            shard.descriptor = -1
            assert shard.temporary is not None
            os.replace(shard.temporary, final)
        if len(self.shards) > 1 or (self.source.folder / INDEX_NAME).is_file():
            self._write_index()
        return sorted(self.shards)

    def abort(self) -> None:
        """Close and remove the temporary files (the building folder goes too, but descriptors must close)."""
        for shard in self.shards.values():
            if shard.descriptor >= 0:
                os.close(shard.descriptor)
                shard.descriptor = -1
            if shard.temporary is not None:
                shard.temporary.unlink(missing_ok=True)

    def _write_index(self) -> None:
        from toolkit.core.atomic import write_json_atomic

        total = sum(end - begin for shard in self.shards.values() for begin, end, _d, _s in shard.entries.values())
        weight_map = {name: shard.name for shard in self.shards.values() for name in shard.entries}
        write_json_atomic(
            self.folder / INDEX_NAME,
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )


def write_shards(
    folder: Path,
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    make: Callable[[str], torch.Tensor],
    max_shard_bytes: int,
) -> list[str]:
    """Write tensors `specs` (name -> shape, dtype) as HF-named shards of at most `max_shard_bytes` (+ an index).

    `make(name)` produces each tensor when its turn comes, so one tensor is resident at a time (for
    building test and benchmark checkpoints shard by shard).
    """
    from toolkit.core.atomic import write_json_atomic

    def nbytes(name: str) -> int:
        shape, dtype = specs[name]
        count = 1
        for dim in shape:
            count *= dim
        return count * torch.empty(0, dtype=dtype).element_size()

    groups: list[list[str]] = [[]]
    size = 0
    for name in specs:
        if groups[-1] and size + nbytes(name) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes(name)
    count = len(groups)
    names = ["model.safetensors"] if count == 1 else [
        f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
    ]
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, group in zip(names, groups, strict=True):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offsets: dict[str, int] = {}
        offset = 0
        for name in group:
            shape, dtype = specs[name]
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes(name)]}
            offsets[name] = offset
            offset += nbytes(name)
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        temporary = folder / f".tmp-{file_name}-{os.getpid()}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(descriptor, memoryview(struct.pack("<Q", len(text)) + text), 0)
            for name in group:
                shape, dtype = specs[name]
                data = make(name).to(dtype).contiguous().reshape(-1)
                if data.numel() * data.element_size() != nbytes(name):
                    raise AssertionError(f"{name}: made {tuple(data.shape)}, declared {shape}")
                _write_all(descriptor, memoryview(data.view(torch.uint8).numpy()), 8 + len(text) + offsets[name])
                weight_map[name] = file_name
                total += nbytes(name)
                del data
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, folder / file_name)
    if count > 1:
        write_json_atomic(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names
