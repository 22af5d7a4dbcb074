"""The exits of FREE: one transformer layer per exit (the generator) and a feature discriminator.

An exit "at layer i" reads the LM's hidden state after its first i layers (Hugging Face's `hidden_states[i]`) and
runs one extra layer of the LM's own class and config with its own KV cache. Its output lives in the space of the
LM's last-layer features, so the frozen final norm + `lm_head` turn it into logits: no vocabulary-sized head per
exit (that is where FREE's ~37% saving in trainable parameters over linear heads comes from).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

EXIT_INITS = ("copy_last", "copy_next", "fresh")
EXIT_KINDS = ("layer", "linear", "head")


@dataclass
class ExitConfig:
    """Where exits go and how their layers start.

    `init`:
      - "copy_last" (default): a copy of the LM's last layer. Its output already lives where the frozen head
        reads, so an untrained exit is "jump to the last layer" - a usable early exit from step 0 - and GAN
        training starts from sensible features instead of noise.
      - "copy_next": a copy of LM layer i (the one the exit replaces first).
      - "fresh": the LM's own random initialisation.
    """

    exit_layers: list[int] = field(default_factory=list)
    init: str = "copy_last"
    kind: str = "layer"  # "layer": FREE's exit layer; "linear": a vocabulary head per exit; "head": none (MuE)

    def validate(self, num_layers: int) -> None:
        layers = list(self.exit_layers)
        if not layers:
            raise ValueError("ExitConfig.exit_layers is empty: give at least one LM layer to attach an exit to")
        for i in layers:
            if not isinstance(i, int) or isinstance(i, bool):
                raise ValueError(f"exit layer {i!r} is not an integer")
            if not 1 <= i <= num_layers - 1:
                raise ValueError(
                    f"exit layer {i} is out of range: this LM has {num_layers} layers, "
                    f"so exits go at 1..{num_layers - 1}"
                )
        if len(set(layers)) != len(layers):
            dupes = sorted({i for i in layers if layers.count(i) > 1})
            raise ValueError(f"exit layers are duplicated: {dupes}")
        if self.init not in EXIT_INITS:
            raise ValueError(f"unknown exit init '{self.init}', expected one of {EXIT_INITS}")
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"unknown exit kind '{self.kind}', expected one of {EXIT_KINDS}")

    def to_dict(self) -> dict:
        return asdict(self)


class Exit(nn.Module):
    """An exit at LM depth `at`. Its logits come from the backbone's frozen head unless a subclass has its own."""

    needs_cache = False  # whether the engine keeps a KV cache for it (an attention layer)

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def logits(self, backbone, features: torch.Tensor) -> torch.Tensor:
        return backbone.head(features)

    def logit_parameters(self, backbone) -> int:
        return backbone.head_parameters()

    def extra_repr(self) -> str:
        return f"at={self.at}"


class ExitLayer(Exit):
    """E_i: one LM-config layer at LM depth `at`; logits come from the backbone's frozen head."""

    needs_cache = True

    def __init__(self, layer: nn.Module, at: int):
        super().__init__(at)
        self.layer = layer


class LinearExit(Exit):
    """A vocabulary-sized linear classifier on the frozen-normed h_i (DeeBERT/PABEE/LeeBERT-style exits).

    Starts as a copy of the LM head (its bias, if any, dropped); H x V trainable parameters per exit.
    """

    def __init__(self, lm_head: nn.Linear, at: int):
        super().__init__(at)
        self.classifier = nn.Linear(lm_head.in_features, lm_head.out_features, bias=False)
        self.classifier.weight.data.copy_(lm_head.weight.data)

    def logits(self, backbone, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(backbone.final_norm(features))

    def logit_parameters(self, backbone) -> int:
        return self.classifier.weight.numel() + sum(p.numel() for p in backbone.final_norm_modules())


class HeadExit(Exit):
    """No trainable part: h_i straight into the frozen final norm + head (MuE)."""


class FeatureDiscriminator(nn.Module):
    """D_i: tells final-layer features (real, label 1) from exit features (fake, label 0). Returns logits."""

    def __init__(self, hidden_size: int, inner_size: int = 3072, negative_slope: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, inner_size),
            nn.LeakyReLU(negative_slope),
            nn.Linear(inner_size, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)
