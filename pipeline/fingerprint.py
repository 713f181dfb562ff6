"""What decides a stage's output, by content: the model's and tokenizer's files and the data files.

A path alone is not enough: re-exporting a model into the same folder, or editing only its chat template, must make
the stages that read it stale, or training would run against another model's reference log-probs.

- Model folder: every file's SHA-256, except weight files (safetensors, bin, pt, gguf, ...), which enter by size
  and modification time: hashing gigabytes of weights on every `dpop status` would cost minutes, and any rewrite
  of a weight file changes its time. A hub name is resolved in the local Hugging Face cache to its snapshot, whose
  folder name is the commit it was downloaded at.
- Tokenizer: the same, without the weight files, so new weights leave the `pairs` stage current.
- Data: each file's SHA-256, streamed. Files above FULL_DIGEST_BYTES enter by size, modification time and the
  digest of their first and last DIGEST_EDGE_BYTES (an edit in their middle that keeps size and time is missed).
  `hf:` sources enter by name, subset and split.
"""
import hashlib
import os

import pyarrow.fs as pafs

from pipeline import storage

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
FULL_DIGEST_BYTES = 256 * 2**20
DIGEST_EDGE_BYTES = 8 * 2**20
CHUNK_BYTES = 4 * 2**20


def digest(value) -> str:
    """A short hash of any JSON-like value (the form every fingerprint part takes)."""
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(uri: str, size: int, mtime_ns: int) -> str:
    """Read and hashed on every call: no cache keyed by size and time, which an in-place edit that keeps both would
    fool. The runner computes a command's fingerprints once, so each file is read once per `dpop` command."""
    fs, path = storage.resolve(uri)
    sha = hashlib.sha256()
    with fs.open_input_file(path) as f:
        if size <= FULL_DIGEST_BYTES:
            while chunk := f.read(CHUNK_BYTES):
                sha.update(chunk)
        else:
            sha.update(f"{size}:{mtime_ns}".encode())
            sha.update(f.read_at(DIGEST_EDGE_BYTES, 0))
            sha.update(f.read_at(DIGEST_EDGE_BYTES, size - DIGEST_EDGE_BYTES))
    return sha.hexdigest()[:16]


def _files(uri: str) -> list[tuple[str, str, pafs.FileInfo]]:
    """(name relative to `uri`, the file's own URI, info) of every file at or under `uri`, sorted."""
    files = storage.list_files(uri)
    if len(files) == 1 and files[0][0] == uri:
        return [(files[0][1].base_name, uri, files[0][1])]
    return [(file_uri[len(uri.rstrip("/")) + 1:], file_uri, info) for file_uri, info in files]


def source_identity(path: str, subset: str | None = None, split: str | None = None) -> list:
    """The content of a data source: [relative name, digest] per file, or the `hf:` name, subset and split."""
    if path.startswith("hf:"):
        return [path, subset, split]
    return [[relative, _file_digest(uri, info.size, info.mtime_ns)] for relative, uri, info in _files(path)]


class ModelNotFound(ValueError):
    """The model is neither a local folder nor a hub name in the local Hugging Face cache."""


def model_folder(name_or_path: str) -> tuple[str, str | None]:
    """The local folder of a model and, for a hub name, the cached snapshot's revision (commit)."""
    if os.path.isdir(name_or_path):
        return name_or_path, None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name_or_path, local_files_only=True)
    except Exception as e:  # not a repo name, or not in the cache (offline): the message says which
        raise ModelNotFound(
            f"{name_or_path!r} is not a local folder, and not in the local Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}): "
            f"download it there first (huggingface-cli download {name_or_path}) or give a folder "
            f"[{type(e).__name__}]") from None
    return folder, os.path.basename(folder.rstrip("/"))


def model_identity(name_or_path: str, weights: bool = True) -> dict:
    """Digest of a model folder's files (weight files by size and time), with the hub revision when there is one.
    `weights=False` leaves the weight files out: what a tokenizer and chat template decide."""
    folder, revision = model_folder(name_or_path)
    files = {}
    for relative, uri, info in _files(folder):
        if relative.startswith(".") or "/." in relative:  # .cache/, .git/: not what the model loads
            continue
        if relative.lower().endswith(WEIGHT_SUFFIXES):
            if weights:
                files[relative] = [info.size, info.mtime_ns]
        else:
            files[relative] = _file_digest(uri, info.size, info.mtime_ns)
    return {"revision": revision, "files": files}
