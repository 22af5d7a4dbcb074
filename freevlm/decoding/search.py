"""Which search runs a `DecodeConfig`: the mode table, kept beside the searches it names (as Hugging Face keeps it
in `generation/utils.py`), so that the config imports no search and no search imports it back."""

from __future__ import annotations

from .beam import beam_generate
from .config import DecodeConfig
from .generate import greedy_generate
from .speculative import speculative_generate

SEARCH = {"greedy": greedy_generate, "beam": beam_generate, "speculative": speculative_generate}


def search_name(config: DecodeConfig) -> str:
    """The key of `SEARCH` that runs `config`."""
    if config.mode == "speculative":
        return "speculative"
    return "beam" if config.num_beams > 1 else "greedy"
