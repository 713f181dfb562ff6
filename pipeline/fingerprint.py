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
  `hf:NAME` sources are resolved in the local Hugging Face cache to their snapshot: its files enter as a data
  folder's do, with the snapshot's revision (commit).
"""
import hashlib
import os

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.config import Config

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
    """The content of a data source: [relative name, digest] per file (for `hf:NAME`, of its cached snapshot, with
    the revision, subset and split)."""
    if path.startswith("hf:"):
        folder, revision = hub_folder(path[3:], "dataset")
        return [path, revision, subset, split, source_identity(folder)]
    return [[relative, _file_digest(uri, info.size, info.mtime_ns)] for relative, uri, info in _files(path)]


class ModelNotFound(ValueError):
    """A model, tokenizer or `hf:` dataset that is neither a local folder nor in the local Hugging Face cache."""


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_folder(name: str, repo_type: str = "model") -> tuple[str, str]:
    """The cached snapshot folder of a hub repository and its revision (the commit it was downloaded at). Offline:
    only the local Hugging Face cache is read; nothing is downloaded."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name, repo_type=repo_type, local_files_only=True)
    except Exception:  # not a repo name, or not in the cache (offline): the message says which
        download = f"hf download {name}" + (" --repo-type dataset" if repo_type == "dataset" else "")
        raise ModelNotFound(
            f"{name!r} is {'' if repo_type == 'dataset' else 'not a local folder, and '}not in the local Hugging "
            f"Face cache ({hub_cache()}; HF_HUB_CACHE or HF_HOME move it): on a machine with access, run "
            f"`{download}` with the same cache, or copy its folder {repo_type}s--{name.replace('/', '--')} there"
            f"{'' if repo_type == 'dataset' else ', or give a local folder'}") from None
    return folder, os.path.basename(folder.rstrip("/"))


def looks_local(name_or_path: str) -> bool:
    """A path the user meant as a folder on this machine, not a hub name: absolute, starting with . or ~, more than
    one '/', or under a folder that exists here (`models/x` when ./models exists)."""
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        return True
    parent = os.path.dirname(name_or_path)
    return bool(parent) and os.path.isdir(parent)


def model_folder(name_or_path: str) -> tuple[str, str | None]:
    """The local folder of a model and, for a hub name, the cached snapshot's revision (commit)."""
    if os.path.isdir(name_or_path) or storage.is_remote(name_or_path):
        return name_or_path, None
    if looks_local(name_or_path):
        raise ModelNotFound(f"{name_or_path!r} is no folder ({os.path.abspath(os.path.expanduser(name_or_path))}; "
                            f"a relative path is relative to the current directory, {os.getcwd()})")
    return hub_folder(name_or_path)


def pin_models(cfg: Config) -> Config:
    """The config the stages run with: a hub model or tokenizer name replaced by the cached snapshot folder its
    fingerprint was taken from, so every loader, worker and actor reads that revision and never resolves the name
    again (a newer revision in a cache, or on the hub, would otherwise be loaded under the old fingerprint). A
    newer snapshot in the driver's cache changes the fingerprint instead: the stages that read the model go stale."""
    changes = {}
    for key in ("name_or_path", "tokenizer"):
        value = getattr(cfg.model, key)
        if value and not os.path.isdir(value) and not storage.is_remote(value):
            changes[f"model.{key}"] = model_folder(value)[0]
    return cfg.copy_with(changes) if changes else cfg


def hub_revisions(cfg, reads: tuple[str, ...]) -> dict:
    """The hub revisions behind what a stage reads (models and `hf:` datasets given by name), for its manifest."""
    revisions = {}
    if "tokenizer" in reads or "model" in reads:
        names = [cfg.model.name_or_path] if "model" in reads else []
        names += [cfg.model.tokenizer or cfg.model.name_or_path] if "tokenizer" in reads else []
        for name in dict.fromkeys(names):
            revision = model_folder(name)[1]
            if revision:
                revisions[name] = revision
    sources = (cfg.data.sources if "sources" in reads else []) + (cfg.eval.sources if "eval_sources" in reads else [])
    for source in sources:
        if source.path.startswith("hf:"):
            revisions[source.path] = hub_folder(source.path[3:], "dataset")[1]
    return revisions


def model_identity(name_or_path: str, weights: bool = True) -> dict:
    """Digest of a model folder's files (weight files by size and time), with the hub revision when there is one.
    `weights=False` leaves the weight files out: what a tokenizer and chat template decide."""
    folder, revision = model_folder(name_or_path)
    files = {}
    for relative, uri, info in _files(folder):
        if relative.startswith(".") or "/." in relative:  # .cache/, .git/: not what the model loads
            continue
        if relative.lower().endswith(storage.WEIGHT_SUFFIXES):
            if weights:
                files[relative] = [info.size, info.mtime_ns]
        else:
            files[relative] = _file_digest(uri, info.size, info.mtime_ns)
    return {"revision": revision, "files": files}
