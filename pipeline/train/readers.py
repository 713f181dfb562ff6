"""DCP storage readers for files on an object store, read in place: each rank fetches the byte ranges of its own
slices with ranged GETs and nothing else, as DCP's file-system readers read a local or shared disk.

- `ObjectStoreReader`: a DCP checkpoint (the trainer's resume).
- `SafetensorsObjectStoreReader`: a Hugging Face model folder (the starting policy, e.g. the last online round's).
"""
import json
import math
from contextlib import contextmanager

import torch
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)

from pipeline import storage


class ObjectStoreReader(FileSystemReader):
    """DCP's FileSystemReader reading a checkpoint in place on any pyarrow filesystem (an object store): each read
    item is a ranged read of its own bytes, so a rank fetches its own slices and nothing else. `bytes_read` counts
    them per file."""

    def __init__(self, source, path: str):
        super().__init__(path)
        self.fs = _ArrowFiles(source)
        self.path = path
        self.bytes_read: dict[str, int] = {}

    def read_data(self, plan, planner):
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            self.bytes_read[info.relative_path] = self.bytes_read.get(info.relative_path, 0) + info.length
        return super().read_data(plan, planner)


class _ArrowFiles(FileSystem):
    """The file operations FileSystemReader needs, on a pyarrow filesystem: a seekable random-access file, whose
    reads of a slice are ranged GETs on an object store."""

    def __init__(self, source):
        self.source = source

    @contextmanager
    def create_stream(self, path, mode: str):
        with self.source.open_input_file(str(path)) as stream:
            yield stream

    def concat_path(self, path, suffix: str) -> str:
        return f"{path}/{suffix}"

    def init_path(self, path) -> str:
        return str(path)


def read_bytes(source, path: str) -> bytes | None:
    """A small file's bytes from a pyarrow filesystem; None when it is not there."""
    try:
        with source.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


# safetensors' dtype names (its format specification)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsObjectStoreReader(HuggingFaceStorageReader):
    """DCP's Hugging Face reader for a model folder on an object store (`s3://...`), read in place.

    A safetensors file is an 8-byte length, a JSON header (each tensor's dtype, shape and byte range) and the
    tensors' bytes, row-major. So the metadata is two small ranged reads a file, and a rank's slice of a tensor
    sharded on its first dimension (FSDP's `Shard(0)`) is one contiguous byte range: one ranged read of its rows,
    never the file. A 70B policy on 32 ranks is 1/32 of the bytes per rank, where a copy of the folder would be all
    of them on every host. `bytes_read` counts the bytes read per file, headers included."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.uri = uri
        self.source, self.path = storage.resolve(uri)
        self.bytes_read: dict[str, int] = {}
        self._metadata: Metadata | None = None  # the headers, read once: the trainer asks for them before dcp.load

    def _count(self, name: str, nbytes: int) -> None:
        self.bytes_read[name] = self.bytes_read.get(name, 0) + nbytes

    def read_metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = self._read_headers()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def _read_headers(self) -> Metadata:
        state_dict_metadata, storage_data = {}, {}
        files = [uri for uri, _ in storage.list_files(self.uri, recursive=False) if uri.endswith(".safetensors")]
        for uri in files:
            name = uri.rsplit("/", 1)[-1]
            with self.source.open_input_file(f"{self.path}/{name}") as f:
                header_bytes = int.from_bytes(f.read_at(8, 0), "little")
                header = json.loads(f.read_at(header_bytes, 8))
            self._count(name, 8 + header_bytes)
            if "_dcp_sharding_info" in json.dumps(header.pop("__metadata__", {})):  # torch's sharded HF writer
                raise ValueError(f"{uri} holds one shard of each tensor (DCP's unconsolidated Hugging Face format); "
                                 f"consolidate the folder, or give its local path")
            for key, info in header.items():
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{uri}: tensor {key!r} has dtype {info['dtype']}, which the trainer cannot load")
                dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], torch.Size(info["shape"])
                state_dict_metadata[key] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=dtype), size=shape,
                    chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=shape)])
                begin = info["data_offsets"][0]
                storage_data[MetadataIndex(fqn=key, offset=[0] * len(shape))] = (name, 8 + header_bytes + begin,
                                                                                 dtype, shape)
        return Metadata(state_dict_metadata=state_dict_metadata, storage_data=storage_data, storage_meta=StorageMeta())

    def read_data(self, plan, planner) -> torch.futures.Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index][0], []).append(item)
        for name, items in per_file.items():
            with self.source.open_input_file(f"{self.path}/{name}") as f:
                for item in items:
                    _, start, dtype, shape = self.storage_data[item.storage_index]
                    target = planner.resolve_tensor(item).detach()
                    if target.numel():  # (an uneven shard can leave a rank no rows)
                        first, rows = (item.storage_offsets[0], item.lengths[0]) if shape else (0, 1)
                        row_bytes = math.prod(shape[1:]) * dtype.itemsize
                        data = f.read_at(rows * row_bytes, start + first * row_bytes)
                        self._count(name, len(data))
                        tensor = torch.frombuffer(bytearray(data), dtype=dtype).view(rows, *shape[1:])
                        slices = tuple(slice(offset, offset + length) for offset, length
                                       in zip(item.storage_offsets[1:], item.lengths[1:]))
                        target.copy_(tensor[(slice(None), *slices)].reshape(target.shape))
                    planner.commit_tensor(item, target)
        done = torch.futures.Future()
        done.set_result(None)
        return done
