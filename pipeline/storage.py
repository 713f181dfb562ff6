"""Run storage through pyarrow filesystems, so a local path and an s3:// or gs:// URI take one code path."""
import json
import os

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or an object-store URI."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def is_remote(uri: str) -> bool:
    """An object-store URI (s3://, gs://...), not a local path."""
    return "://" in uri


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, recursive: bool = True) -> list[tuple[str, pafs.FileInfo]]:
    """(URI, info) of each file under a folder (or of the file itself), sorted; [] when nothing is there. Each URI
    keeps the scheme of `uri`, so it can go back to any function here."""
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


def write_text(uri: str, text: str) -> None:
    """Write a whole file. On object stores one PUT; locally written beside it and renamed, so readers never see
    half a file."""
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
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
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


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_file(path)


def clear_dir(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)


def local_dir(uri: str) -> str:
    """A local folder with the files of `uri`: the path itself when it is local, else a copy in a new temporary
    folder (a policy saved to an object store, for engines that read local files)."""
    import tempfile

    if not is_remote(uri):
        return uri  # a local folder, or a hub name the model libraries resolve themselves
    fs, path = resolve(uri)
    local = tempfile.mkdtemp(prefix="dpop-model-")
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to `uri` (a no-op copy when both are the same local folder)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def upload_file(local_path: str, uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
