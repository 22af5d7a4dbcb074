"""What one server serves (`ServedModel`), and that model without its weights for a process that does not decode."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..loading import VLMBundle
from ..model import EarlyExitVLM


@dataclass
class ServedModel:
    """What one server serves: the model, its processor and exits, the name clients ask for, the prompt its
    folder records (None: none recorded) and the threshold certified for its exits (None: none recorded; the demo's
    placement records one). Without exits (`has_exits` False) every token runs the whole stack.
    `ee` is None in the app process of a `SchedulerProcess` (`without_weights`): `num_layers` and `exit_layers`
    still describe it."""

    bundle: VLMBundle
    ee: EarlyExitVLM | None
    name: str
    prompt: str | None = None
    has_exits: bool = True
    threshold: float | None = None
    num_layers: int = 0  # from `ee`
    exit_layers: tuple[int, ...] = ()  # from `ee`

    def __post_init__(self):
        if self.ee is not None:
            self.num_layers, self.exit_layers = self.ee.backbone.num_layers, tuple(self.ee.exit_layers)

    def without_weights(self) -> ServedModel:
        """What an app needs to read requests and write answers (processor, tokenizer, the model's config), for the
        process that does not decode: it holds the model's weights once, in the scheduler's process."""
        return replace(self, bundle=replace(self.bundle, model=Weightless(self.bundle.model.config)), ee=None)


class Weightless:
    """A model's config without its weights, as `VLMBundle.inputs` reads a model: inputs made on the CPU in
    float32, which the scheduler's `submit` moves to the model's device and dtype."""

    device = torch.device("cpu")

    def __init__(self, config):
        self.config = config

    def parameters(self):
        yield torch.empty(0)
