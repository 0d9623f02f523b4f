"""The ``instructrl-fast`` command line (filled in by the trainer)."""


def main(argv=None) -> int:
    raise SystemExit("instructrl-fast: the trainer CLI is not built yet")
