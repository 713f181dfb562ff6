"""Run storage through pyarrow filesystems, so a local path and an s3:// or gs:// URI take one code path.

pyarrow is imported by the functions that use it: the trainer's model code imports this module for its uploads, and
must also run where only torch and transformers are installed (jobs/gpu_check.py on a bare GPU machine)."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or an object-store URI."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def is_remote(uri: str) -> bool:
    """An object-store URI (s3://, gs://...), not a local path."""
    return "://" in uri


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, recursive: bool = True) -> list[tuple[str, pafs.FileInfo]]:
    """(URI, info) of each file under a folder (or of the file itself), sorted; [] when nothing is there. Each URI
    keeps the scheme of `uri`, so it can go back to any function here."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(uri, info)]
    if info.type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    return sorted((join(uri, i.path[len(path):].lstrip("/")), i) for i in found if i.type == pafs.FileType.File)


def read_text(uri: str) -> str | None:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None
    except OSError as error:  # on S3 an object can vanish between the open (a HEAD) and the read (a GET)
        if "RESOURCE_NOT_FOUND" in str(error) or "NoSuchKey" in str(error):
            return None
        raise


def write_text(uri: str, text: str) -> None:
    """Write a whole file. On object stores one PUT; locally written beside it and renamed, so readers never see
    half a file."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = path + ".tmp" if local else path
    with fs.open_output_stream(target) as f:
        f.write(text.encode())
    if local:
        fs.move(target, path)


def write_parquet(table, uri: str) -> None:
    """Write a whole Parquet file, atomically as write_text does."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = path + ".tmp" if local else path
    pq.write_table(table, target, filesystem=fs)
    if local:
        fs.move(target, path)


def read_parquet(uri: str, columns: list[str] | None = None):
    """A Parquet file, or a folder of them (its `_` and `.` files ignored), as one pyarrow Table."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def read_json(uri: str) -> dict | None:
    text = read_text(uri)
    return None if text is None else json.loads(text)


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def create_exclusive(uri: str, text: str) -> bool:
    """Write a whole file only if none is there, atomically where it lives; False when one already is. Locally the
    file is written beside it and hard-linked into place (a link fails if the name exists, and readers never see it
    half-written). On S3 a conditional PUT (`If-None-Match: *`) through boto3, since pyarrow has none; the endpoint
    comes from the URI's `endpoint_override` or AWS_ENDPOINT_URL, as pyarrow's does. Other stores have no
    conditional write here: check-then-write, with a warning."""
    import tempfile
    from urllib.parse import parse_qs, urlparse

    if not is_remote(uri):
        path = os.path.abspath(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as f:
            f.write(text)
        try:
            os.link(f.name, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(f.name)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        import boto3
        from botocore.exceptions import ClientError

        options = {k: v[0] for k, v in parse_qs(parsed.query).items()}
        endpoint = options.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name=options.get("region"))
        try:
            client.put_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"), Body=text.encode(), IfNoneMatch="*")
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
    print(f"[dpop] warning: {parsed.scheme}:// has no conditional write here; {uri} is checked, then written",
          flush=True)
    if exists(uri):
        return False
    write_text(uri, text)
    return True


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_file(path)


def clear_dir(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
"""A model folder's weight files (any framework's): what a model fingerprint digests by size and time alone, and what
a copy of the folder's small files leaves out."""


@contextmanager
def local_copy(uri: str, weights: bool = True):
    """A local folder with the files of `uri` for as long as the `with` lasts: the path itself when it is local (or
    a hub name the model libraries resolve themselves), else a copy in a temporary folder, removed on exit (a copy
    per engine actor per model would otherwise fill a node's disk over a sweep). With `weights` False, only the
    folder's own small files (config, tokenizer, index), not its weight files or subfolders: what a reader of the
    weights in place needs beside them."""
    if not is_remote(uri):  # (before pyarrow: the trainer also runs where only torch is, jobs/gpu_check.py)
        yield uri
        return
    import tempfile

    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    with tempfile.TemporaryDirectory(prefix="dpop-model-") as local:
        if weights:
            pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            for file, _ in list_files(uri, recursive=False):
                name = file.rsplit("/", 1)[-1]
                if not name.lower().endswith(WEIGHT_SUFFIXES):
                    pafs.copy_files(f"{path}/{name}", os.path.join(local, name), source_filesystem=fs,
                                    destination_filesystem=pafs.LocalFileSystem())
        yield local


@contextmanager
def staged_dir(uri: str):
    """A local folder whose files are at `uri` once the `with` ends: the folder itself when it is local (a 16 GB
    policy written once, not written to a temporary folder and copied), else a temporary folder uploaded on exit."""
    import tempfile

    if not is_remote(uri):
        os.makedirs(uri, exist_ok=True)
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="dpop-upload-") as local:
        yield local
        upload_dir(local, uri)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to `uri` (a no-op copy when both are the same local folder)."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def upload_file(local_path: str, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
