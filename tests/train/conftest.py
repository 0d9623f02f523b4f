"""Shared pieces of the trainer tests: a micro GPT, the byte tokenizer and the embedded task's data."""

import pytest
import torch

from instructrl_fast.data import ByteTokenizer, DemoTask, GoldLabeler
from instructrl_fast.model import GPT, GPTConfig
from instructrl_fast.parallel import ParallelState

ONE = ParallelState.single()  # one process on the CPU: what every single-process trainer test runs on


def micro_gpt(head: str = "lm", *, seed: int = 0, dropout: float = 0.0) -> GPT:
    cfg = GPTConfig(vocab_size=ByteTokenizer.vocab_size, n_layer=1, n_head=2, d_model=32, block_size=64,
                    dropout=dropout)
    model = GPT(cfg, head=head)
    model.init_weights(seed)
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


@pytest.fixture(autouse=True)
def _one_thread():
    """The trainer tests use micro models: one intra-op thread avoids OpenMP spin-waits on a shared 2-core CI box
    (and makes float reductions independent of the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tok():
    return ByteTokenizer()


@pytest.fixture
def task():
    return DemoTask(0)


@pytest.fixture
def labeler():
    return GoldLabeler(0)
