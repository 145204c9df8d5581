"""Entry points (layer 5): argument parsing and wiring, no logic of their own."""

import os


def other_rank() -> bool:
    """Whether this is a torchrun process other than rank 0, which speaks for the run."""
    return int(os.environ.get("RANK", "0")) > 0
