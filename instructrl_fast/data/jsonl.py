"""JSONL loaders for user data, one record per line (blank lines are skipped):

    SFT:          {"prompt": str, "response": str}
    comparisons:  {"prompt": str, "responses": [K str, K >= 2], "ranking": [K ints, a permutation, best first]}
    prompts:      {"prompt": str, "kind": str (optional), "answer": str | null (optional)}

A malformed line raises ValueError("<file>:<line>: field '<name>' ...") so the user can go straight to it.
``save_jsonl`` writes any of these (e.g. the embedded task's data, for inspection or editing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from instructrl_fast.data.task import Prompt


def _records(path) -> Iterator[tuple[str, int, dict]]:
    """(where, line number, object) for every non-blank line; ``where`` is "<file>:<line>" for error messages."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line.rstrip("\r\n"))  # with the newline, an error at the end of the line
                # is reported at column 1 of the line after it
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, lineno, obj


def _field(where: str, obj: dict, name: str, kind: type | tuple[type, ...], *, required: bool = True):
    if name not in obj:
        if required:
            raise ValueError(f"{where}: missing field '{name}'")
        return None
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field '{name}' must be {want}, got {type(value).__name__}")
    return value


def _load(path, parse) -> list:
    out = [parse(where, obj) for where, _, obj in _records(path)]
    if not out:
        raise ValueError(f"{os.fspath(path)}: no records (the file is empty)")
    return out


def _parse_sft(where: str, obj: dict) -> dict:
    prompt = _field(where, obj, "prompt", str)
    response = _field(where, obj, "response", str)
    if not response:
        raise ValueError(f"{where}: field 'response' must not be empty")
    return {"prompt": prompt, "response": response}


def _parse_comparison(where: str, obj: dict) -> dict:
    prompt = _field(where, obj, "prompt", str)
    responses = _field(where, obj, "responses", list)
    if len(responses) < 2:
        raise ValueError(f"{where}: field 'responses' must hold at least 2 responses, got {len(responses)}")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise ValueError(f"{where}: field 'responses' item {i} must be str, got {type(r).__name__}")
    ranking = _field(where, obj, "ranking", list)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ranking) or \
            sorted(ranking) != list(range(len(responses))):
        raise ValueError(f"{where}: field 'ranking' must be a permutation of 0..{len(responses) - 1} "
                         f"(indices into 'responses', best first), got {ranking}")
    return {"prompt": prompt, "responses": responses, "ranking": ranking}


def _parse_prompt(where: str, obj: dict) -> Prompt:
    text = _field(where, obj, "prompt", str)
    if not text:
        raise ValueError(f"{where}: field 'prompt' must not be empty")
    kind = _field(where, obj, "kind", str, required=False) or "user"
    answer = _field(where, obj, "answer", (str, type(None)), required=False)
    return Prompt(text=text, kind=kind, answer=answer)


def load_sft_jsonl(path: str | os.PathLike) -> list[dict]:
    """Demonstrations ``{"prompt", "response"}`` from a JSONL file."""
    return _load(path, _parse_sft)


def load_comparisons_jsonl(path: str | os.PathLike) -> list[dict]:
    """Ranked comparison sets ``{"prompt", "responses", "ranking"}`` from a JSONL file."""
    return _load(path, _parse_comparison)


def load_prompts_jsonl(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from a JSONL file, as ``Prompt(text, kind or "user", answer or None)``."""
    return _load(path, _parse_prompt)


def save_jsonl(path: str | os.PathLike, records: Iterable[dict | Prompt]) -> int:
    """Write ``records`` one JSON object a line (a Prompt becomes ``{"prompt", "kind", "answer"}``); returns the
    number written. The file is written whole to ``<path>.tmp`` and renamed, so a crash never leaves half a file."""
    path = os.fspath(path)
    n = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for rec in records:
            if isinstance(rec, Prompt):
                rec = {"prompt": rec.text, "kind": rec.kind, "answer": rec.answer}
            if not isinstance(rec, dict):
                raise TypeError(f"records must hold dicts or Prompts, got {type(rec).__name__}")
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(path + ".tmp", path)
    return n
