"""Writing a whole file so that no reader ever sees part of it: an object store's PUT publishes an object
whole; on disks a temp file beside the target is renamed over it. The temp names are the pipeline's own
(`is_own_temp`), so that a cut-off write can be told from anyone else's file."""

from __future__ import annotations

import os
import re
import uuid

from fsspec.implementations.local import LocalFileSystem

TEMP_PREFIX = ".tmp-dinat-"
_TEMP_NAME = re.compile(r"^\.tmp-dinat-[0-9a-f]{32}-.+")


def temp_path(path: str) -> str:
    folder, name = path.rsplit("/", 1)
    return f"{folder}/{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"


def is_own_temp(name: str) -> bool:
    return bool(_TEMP_NAME.match(name))


def put_file(fs, path: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        temp = temp_path(path)
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    else:
        fs.pipe_file(path, data)


def create_local(path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist, in one step (a hard link of a finished temp
    file: never an empty or half-written file under the name); False if it exists."""
    os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    temp = temp_path(path)
    with open(temp, "wb") as f:
        f.write(data)
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temp)
    return True
