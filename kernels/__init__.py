"""Triton kernels and their launchers, installed as ``instructrl_fast.kernels``.

Each module holds one op's kernels (``_<op>_fwd_kernel``, ``_<op>_bwd_kernel``) and a launcher that only picks the
grid and blocks and allocates outputs. Argument checks and autograd live in ``instructrl_fast.ops``.
Import these modules lazily: importing Triton costs time, and ``TRITON_INTERPRET`` is read when a kernel is defined.
"""
