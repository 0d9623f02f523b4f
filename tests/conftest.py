"""Test set-up. Triton kernels run on CPU tensors under the interpreter when no GPU is present.

TRITON_INTERPRET is read when a Triton kernel is defined, so it is set here, before any test imports
instructrl_fast.kernels; it is set for the tests only, never globally in CI.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from instructrl_fast import backend as _backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends_for(*ops, skip=()):
    """pytest params for every backend that the registry holds for each of ``ops``, but those in ``skip``; unbuilt
    ones are reported as skipped with the reason.

    Only a backend that this machine cannot run (cuda without a GPU) is skipped. In CI the cpp backend must exist:
    tests/test_build.py fails when it is missing, so a skip here can never hide a broken build.
    """
    params = []
    for name in _backend.BACKENDS:
        if name in skip or any(name not in _backend.REGISTRY[op] for op in ops):
            continue
        reason = _backend.unavailable_reason(name, DEVICE)
        if reason and name == "cuda" and not torch.cuda.is_available():
            reason = f"no GPU ({reason})"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
