"""The early-exit methods freevlm compares on one backbone: FREE and the baselines of its paper.

A method = the kind of exit it attaches, how those exits are trained, and the rule that decides where a token
leaves. Its sweep "threshold" is that rule's knob (confidence, entropy in nats, patience, cosine similarity);
each method's default grid ends at the value that never leaves early, so every curve reaches the full model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .decoding.baseline_policies import EntropyPolicy, PatiencePolicy, SimilarityPolicy
from .decoding.policies import ConfidencePolicy, ExitPolicy

CONFIDENCE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the paper's grid


@dataclass(frozen=True)
class Method:
    name: str
    exit_kind: str  # ExitConfig.kind
    training: str  # what trains the exits (freevlm.training)
    rule: str  # what the sweep threshold means
    make_policy: Callable[[float], ExitPolicy]
    thresholds: tuple[float, ...]

    def policy(self, threshold: float) -> ExitPolicy:
        return self.make_policy(threshold)


def _patience(value: float) -> ExitPolicy:
    if float(value) != int(value):
        raise ValueError(f"PABEE's threshold is a patience (a whole number of exits), got {value!r}")
    return PatiencePolicy(int(value))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("free", "layer", "GAN + CE/KD (train-exits)", "max probability >=", ConfidencePolicy, CONFIDENCE_GRID),
        Method("deeblip", "linear", "per-exit CE", "max probability >=", ConfidencePolicy, CONFIDENCE_GRID),
        Method("deeblip_entropy", "linear", "per-exit CE", "entropy (nats) <", EntropyPolicy,
               (3.0, 2.0, 1.0, 0.5, 0.25, 0.0)),  # fmt: skip
        Method("pabee", "linear", "layer-weighted CE", "patience (exits agreeing)", _patience,
               (1, 2, 3, 4, 5, 6, 1000)),  # fmt: skip
        Method("leeblip", "linear", "CE + learned-weight KD", "max probability >=", ConfidencePolicy, CONFIDENCE_GRID),
        Method("mue", "head", "none", "cosine similarity >=", SimilarityPolicy, (0.8, 0.9, 0.95, 0.98, 0.99, 1.0)),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}, expected one of {sorted(METHODS)}")
    return METHODS[name]


def trainable_parameters(modules: nn.Module | list[nn.Module]) -> int:
    """Parameters a method trains: those of `modules` that require gradients (shared tensors counted once)."""
    modules = modules if isinstance(modules, list) else [modules]
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                seen[id(p)] = p.numel()
    return sum(seen.values())


def exit_parameters_from_config(text_config, kind: str) -> int:
    """Trainable parameters of ONE exit of `kind` on an LM with `text_config` (a Hugging Face config), counted
    from modules built on the meta device, so a 2.7B-sized LM costs no memory.

    "layer": one decoder layer of the LM's class (FREE); "linear": a vocabulary-sized head, no bias (DeeBLIP,
    PABEE-BLIP, LeeBLIP); "head": nothing (MuE).
    """
    if kind == "head":
        return 0
    if kind == "linear":
        return text_config.hidden_size * text_config.vocab_size
    if kind != "layer":
        raise ValueError(f"unknown exit kind {kind!r}")
    with torch.device("meta"):
        layer = _decoder_layer(text_config)
    return sum(p.numel() for p in layer.parameters())


def _decoder_layer(text_config) -> nn.Module:
    model_type = text_config.model_type
    if model_type == "opt":
        from transformers.models.opt.modeling_opt import OPTDecoderLayer

        return OPTDecoderLayer(text_config, layer_idx=0)
    if model_type == "t5":
        from transformers.models.t5.modeling_t5 import T5Block

        cfg = text_config.__class__(**{**text_config.to_dict(), "is_decoder": True})
        return T5Block(cfg, has_relative_attention_bias=False, layer_idx=0)
    raise ValueError(f"no decoder layer known for model type {model_type!r}")
