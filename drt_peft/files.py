"""File helpers at the bottom of the package: atomic writes and finding a file locally or on the Hub."""

from __future__ import annotations

import glob
import inspect
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from huggingface_hub import hf_hub_download

_TMP_PREFIX = ".tmp-"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX, suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Delete temporary files that an interrupted :func:`atomic_write_bytes` of ``names`` left in ``folder``."""
    for name in names:
        for stale in glob.glob(os.path.join(glob.escape(os.fspath(folder)), f"{_TMP_PREFIX}*{glob.escape(name)}")):
            try:
                os.unlink(stale)
            except FileNotFoundError:  # removed meanwhile by another process
                pass


_HUB_KWARGS = frozenset(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename"}


def check_hub_kwargs(hub_kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments that ``huggingface_hub.hf_hub_download`` does not take (typos included)."""
    unknown = sorted(set(hub_kwargs) - _HUB_KWARGS)
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {unknown}; from_pretrained takes is_trainable and the arguments of "
            f"huggingface_hub.hf_hub_download: {sorted(_HUB_KWARGS)}"
        )


def resolve_file(path_or_repo: str | os.PathLike, filename: str, **hub_kwargs: Any) -> str:
    """``filename`` inside a local folder, or downloaded from the Hub repo ``path_or_repo``."""
    check_hub_kwargs(hub_kwargs)
    if os.path.isdir(path_or_repo):
        file = os.path.join(path_or_repo, filename)
        if not os.path.isfile(file):
            inside = sorted(
                entry.name for entry in os.scandir(path_or_repo) if os.path.isfile(os.path.join(entry, filename))
            )
            hint = (
                f"; it holds adapters in the sub-folders {inside} (the layout of several adapters): "
                f"name one, e.g. {os.path.join(path_or_repo, inside[0])!r}"
                if inside
                else f"; is {path_or_repo} a drt_peft adapter folder?"
            )
            raise FileNotFoundError(f"{file} does not exist{hint}")
        return file
    try:
        return hf_hub_download(str(path_or_repo), filename, **hub_kwargs)
    except Exception as err:
        raise FileNotFoundError(
            f"{path_or_repo!r} is not a local folder and {filename} could not be fetched from the Hub: {err}"
        ) from err
