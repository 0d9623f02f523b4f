"""What a non-editable install ships: every package folder is found by setup.py's find_packages (a folder without
an __init__.py is silently left out of the wheel; CI's wheel install in a fresh venv checks the rest); and the
top-level kernels/ folder never shadows the registry's `kernels` package (see the comment in setup.py)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_folder_is_a_package():
    found = set(find_packages(str(ROOT), include=["instructrl_fast", "instructrl_fast.*"]))
    folders = {p.parent for p in (ROOT / "instructrl_fast").rglob("*.py") if "__pycache__" not in p.parts}
    expected = {".".join(f.relative_to(ROOT).parts) for f in folders}
    assert "instructrl_fast.train" in expected
    assert expected <= found, f"folders find_packages leaves out of a wheel: {sorted(expected - found)}"


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _is_ours(module_file) -> bool:
    return module_file is None or Path(module_file).resolve().is_relative_to(ROOT / "kernels")


def test_kernels_folder_is_not_a_regular_package():
    # The folder may never become a regular top-level package again: it would shadow the registry's `kernels`.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    import instructrl_fast.kernels.gae as gae

    assert Path(gae.__file__).resolve() == (ROOT / "kernels" / "gae.py").resolve()


@pytest.mark.skipif(not _installed("kernels"), reason="the registry's `kernels` package is not installed")
def test_registry_kernels_wins_under_pytest():
    # pytest put the repository root on sys.path (tests/ is a package); the installed package must still win.
    assert str(ROOT) in [str(Path(p).resolve()) for p in sys.path if p]
    import kernels

    assert not _is_ours(kernels.__file__), kernels.__file__


@pytest.mark.skipif(not _installed("transformers"), reason="transformers is not installed")
def test_transformers_imports_from_the_repository_root():
    # A plain `python` started in the root has the root (its cwd) first on sys.path.
    code = (
        "import importlib.metadata as md, pathlib, sys\n"
        "import transformers.modeling_utils\n"
        "try:\n"
        "    md.distribution('kernels')\n"
        "except md.PackageNotFoundError:\n"
        "    sys.exit(0)\n"
        "import kernels\n"
        "print(pathlib.Path(kernels.__file__).resolve())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.strip():
        assert not _is_ours(out.stdout.strip()), out.stdout
