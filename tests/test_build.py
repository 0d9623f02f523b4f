"""The build itself: the C++ extension must be present wherever the package was installed by setup.py."""

import os

import pytest
import torch

import instructrl_fast
from instructrl_fast import backend


def test_build_info_reports_cpp():
    info = instructrl_fast.build_info()
    assert info["cpp"], f"the C++ extension did not load: {info['cpp_error']}"
    assert "cpp" in info["backends"] and "torch" in info["backends"]
    assert info["openmp"] == "cpp+openmp"


def test_forced_missing_backend_is_an_error():
    with backend.use_backend("cuda"):
        if not instructrl_fast.build_info()["cuda"]:
            with pytest.raises(backend.BackendError, match="cuda"):
                backend.resolve("gae", torch.device("cpu"))
    with backend.use_backend("cpp"), pytest.raises(backend.BackendError, match="implements only"):
        backend.resolve("kl_penalty", torch.device("cpu"))
    with backend.use_backend("torch"):
        assert backend.resolve("kl_penalty", torch.device("cpu")) == "torch"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"), backend.use_backend("tpu"):
        pass


def test_automatic_choice_on_cpu():
    assert backend.forced_backend() is None or os.environ.get("INSTRUCTRL_FAST_BACKEND")
    if backend.forced_backend() is None:
        assert backend.resolve("gae", torch.device("cpu")) == "cpp"
        assert backend.resolve("kl_penalty", torch.device("cpu")) == "torch"
