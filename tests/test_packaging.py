"""What a non-editable install ships: every package folder is found by setup.py's find_packages (a folder without
an __init__.py is silently left out of the wheel; CI's wheel install in a fresh venv checks the rest)."""

from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_folder_is_a_package():
    found = set(find_packages(str(ROOT), include=["instructrl_fast", "instructrl_fast.*"]))
    folders = {p.parent for p in (ROOT / "instructrl_fast").rglob("*.py") if "__pycache__" not in p.parts}
    expected = {".".join(f.relative_to(ROOT).parts) for f in folders}
    assert "instructrl_fast.train" in expected
    assert expected <= found, f"folders find_packages leaves out of a wheel: {sorted(expected - found)}"
