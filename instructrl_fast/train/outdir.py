"""Output folders: one run per folder.

A command records what it runs in ``<out>/run.json`` (the command and the options that decide its result). Run
again into a folder that holds a run's files, it continues that run with ``resume``, replaces the files with
``overwrite``, or stops with an error naming the folder and these choices: a run never reads another run's
candidates, checkpoints or metrics. ``resume`` of a folder whose ``run.json`` records another command or other
options is refused the same way. Only the files and folders a command writes are ever looked at or removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

MANIFEST = "run.json"
# What the commands write into an output folder besides run.json (a stage's files, or `run`'s stage folders
# holding them).
_FILES = ("metrics.csv", "tb", "ckpt", "candidates", "model.safetensors", "last.safetensors", "result.json",
          "results.json", "figure1.txt", "figure1.png", "overoptimization.png", "learning_curves.png",
          "selection.json", "val_comparisons.json")
_STAGE_FOLDERS = ("base-", "sft-", "ppo-init-", "ppo-", "ppo-ptx-", "rm")


class OutputFolderError(ValueError):
    """The output folder holds another run's files, or a run that ``resume`` may not continue."""


def run_files(out: str | os.PathLike) -> list[Path]:
    """The entries of ``out`` that a command wrote, ``run.json`` aside (stage folders count when they hold such
    files). A folder holding only ``run.json`` holds no result: the command that wrote it stopped before training."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for entry in sorted(out.iterdir()):
        stage = entry.is_dir() and entry.name.startswith(_STAGE_FOLDERS) and any((entry / f).exists() for f in _FILES)
        if entry.name in _FILES or stage:
            found.append(entry)
    return found


def _differences(recorded: dict, identity: dict) -> list[str]:
    keys = sorted(set(recorded.get("options", {})) | set(identity["options"]))
    diff = [f"{k}: {recorded.get('options', {}).get(k)!r} then, {identity['options'].get(k)!r} now" for k in keys
            if recorded.get("options", {}).get(k) != identity["options"].get(k)]
    if recorded.get("command") != identity["command"]:
        diff.insert(0, f"command: {recorded.get('command')!r} then, {identity['command']!r} now")
    return diff


def prepare(out: str | os.PathLike, identity: dict, *, resume: bool, overwrite: bool) -> None:
    """Check ``out`` before a command writes into it, then record ``identity`` ({"command": str, "options": dict of
    JSON values}) in its ``run.json``; with ``overwrite``, first remove the files an earlier run wrote there.

    Every rank checks; the first one removes and writes, between barriers (a collective under torch.distributed).
    Raises OutputFolderError naming the folder and the choices.
    """
    out = Path(out)
    if resume and overwrite:
        raise OutputFolderError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    found = run_files(out)
    manifest = out / MANIFEST
    choices = "continue it with --resume, delete its files with --overwrite, or choose another --out"
    if found and not (resume or overwrite):
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise OutputFolderError(f"--out {out} already holds a run ({names}): {choices}")
    if resume and found and manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if diff := _differences(recorded, identity):
            raise OutputFolderError(f"--out {out} holds another run than this command's ({'; '.join(diff[:4])}): "
                                    f"--resume continues only the same run; repeat its options, delete its files "
                                    f"with --overwrite, or choose another --out")
    _barrier()  # every rank has looked before the first one changes anything
    if _rank() == 0:
        if overwrite:
            for entry in found:  # run.json is replaced below
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(identity, indent=1) + "\n")
        os.replace(tmp, manifest)
    _barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
