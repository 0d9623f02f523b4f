"""Loaded by every process of the mesh tests (PYTHONPATH): records which rank writes which file under AUDIT_OUT.

Python-level writes (``open`` / ``io.open`` in a write mode, ``os.replace`` / ``os.rename`` onto a path) go through
these hooks, and ``torch.save``: every file the trainer writes is either opened for writing (CSV, JSON, TensorBoard,
PNG, DCP shards), saved by ``torch.save``, or moved into place by ``os.replace`` (a file safetensors wrote under a
temporary name, or a checkpoint folder).
"""

import builtins
import io
import os

_OUT = os.environ.get("AUDIT_OUT")
_LOG = os.environ.get("AUDIT_LOG")


def _record(path) -> None:
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return
    if path.startswith(_OUT + os.sep):
        with _open(f"{_LOG}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(path + "\n")


if _OUT and _LOG:
    _open, _replace, _rename = builtins.open, os.replace, os.rename

    def _audited_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            _record(file)
        return _open(file, mode, *args, **kwargs)

    def _audited_replace(src, dst, *args, **kwargs):
        _record(dst)
        return _replace(src, dst, *args, **kwargs)

    def _audited_rename(src, dst, *args, **kwargs):
        _record(dst)
        return _rename(src, dst, *args, **kwargs)

    builtins.open = io.open = _audited_open  # pathlib calls io.open
    os.replace, os.rename = _audited_replace, _audited_rename

    import torch  # torch.save writes through its own C++ file writer

    _save = torch.save

    def _audited_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, bytes, os.PathLike)):
            _record(f)
        return _save(obj, f, *args, **kwargs)

    torch.save = _audited_save
