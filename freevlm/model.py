"""EarlyExitVLM: a frozen Hugging Face BLIP-2 plus FREE exits, with generation and save/load of the exits."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .backbones import Backbone, Blip2Backbone, load_backbone
from .decoding.config import DecodeConfig
from .decoding.generate import Call, GenerateOutput
from .decoding.policies import ConfidencePolicy, Copies, ExitPolicy
from .decoding.search import SEARCH, search_name
from .decoding.static import EnginePool
from .errors import MissingFileError
from .exits import Exit, ExitConfig, ExitLayer, HeadExit, LinearExit
from .files import atomic_path, write_text_atomic
from .inputs import InputWarning, validate_generate_inputs

WEIGHTS_NAME = "exits.safetensors"
CONFIG_NAME = "exits_config.json"
IGNORE_INDEX = -100  # a `targets` entry that is not text (image, prompt, pad): Hugging Face's label convention


@dataclass
class ExitOutputs:
    """`EarlyExitVLM.forward` at the text positions of a batch, each `[n_text, ...]` (rows flattened in order).

    Logits are computed on first use, under the autocast and grad mode of that moment: the discriminators read
    features only, and a CE anchor never needs the final layer's logits."""

    features: dict[str, torch.Tensor]  # per exit: E_i(h_i), or h_i itself for exits without a layer (linear, head)
    final_features: torch.Tensor  # h_N
    targets: torch.Tensor
    model: EarlyExitVLM = field(repr=False)

    @cached_property
    def logits(self) -> dict[str, torch.Tensor]:
        """Per exit, through its own `.logits` (the frozen head for FREE, a classifier for linear exits)."""
        return {k: self.model.exits[k].logits(self.model.backbone, f) for k, f in self.features.items()}

    @cached_property
    def final_logits(self) -> torch.Tensor:
        return self.model.backbone.head(self.final_features)


class CheckpointMismatchError(ValueError):
    """Exits trained for another backbone (or another exit layout) than the one they are loaded onto."""


class EarlyExitVLM(nn.Module):
    """Exits attached to a BLIP-2. Only the exits are submodules: `.parameters()` are the trainable ones.

    The backbone stays the user's object (`self.model`); move it yourself. Exits are created on the backbone's
    device and dtype, and `generate` brings them back to both if the backbone was cast or moved since
    (`follow_backbone`).
    """

    def __init__(self, model: nn.Module, exit_config: ExitConfig | None = None):
        super().__init__()
        backbone = load_backbone(model)
        if exit_config is None:  # no exits: the backbone alone, as stage 1 trains it
            exit_config = ExitConfig()
        else:
            exit_config.validate(backbone.num_layers)
        object.__setattr__(self, "model", model)  # not a submodule: the backbone is frozen and not ours to save
        self.backbone: Backbone = backbone
        self.exit_config = exit_config
        self.exits = nn.ModuleDict({str(i): self._new_exit(i) for i in sorted(exit_config.exit_layers)})
        self.engines = EnginePool()  # static engines with captured CUDA graphs, kept for later requests
        self.eval()  # like Hugging Face's from_pretrained: inference mode until a trainer calls .train()

    def _new_exit(self, at: int) -> nn.Module:
        if self.exit_config.kind == "linear":
            head = self.backbone.lm_head
            return LinearExit(head, at).to(device=head.weight.device, dtype=head.weight.dtype)
        if self.exit_config.kind == "head":
            return HeadExit(at)
        return ExitLayer(self._new_exit_layer(at), at)

    def _new_exit_layer(self, at: int) -> nn.Module:
        backbone, init = self.backbone, self.exit_config.init
        if init == "copy_last":
            layer = copy.deepcopy(backbone.layers[-1])
        elif init == "copy_next":
            layer = copy.deepcopy(backbone.layers[at])
        else:
            layer = backbone.new_layer()
            layer.apply(backbone.lm._init_weights)
        layer = layer.to(device=backbone.device, dtype=backbone.dtype)
        layer.requires_grad_(True)
        return layer

    @classmethod
    def from_backbone(cls, model: nn.Module, exit_config: ExitConfig) -> EarlyExitVLM:
        return cls(model, exit_config)

    @property
    def exit_layers(self) -> list[int]:
        return sorted(int(k) for k in self.exits)

    def exit_dict(self) -> dict[int, Exit]:
        return {int(k): v for k, v in self.exits.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> ExitOutputs:
        """Teacher forcing, in the spirit of nanoGPT's `model(X, Y)`: the backbone runs once over the whole sequence
        (h_0..h_N), each exit over its h_i, and what training and ranking read is kept at the text positions
        (`batch["targets"]` other than `IGNORE_INDEX`). A frozen backbone records no graph (no parameter of it
        requires one), so only the exits, or the parts stage 1 trains, get gradients."""
        backbone = self.backbone
        states, ctx, mask = backbone.features(
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("decoder_input_ids"),
            **{name: batch[name] for name in backbone.input_names if batch.get(name) is not None},
        )
        text = batch["targets"] != IGNORE_INDEX
        features = {
            k: (
                backbone.run_layer(e.layer, states[e.at], ctx, None, mask, None)
                if isinstance(e, ExitLayer)
                else states[e.at]
            )[text]
            for k, e in self.exits.items()
        }
        return ExitOutputs(features, states[-1][text], batch["targets"][text], self)

    # --- save / load -------------------------------------------------------------------------------------------
    def save_exits(self, path: str | os.PathLike) -> None:
        """Write `exits.safetensors` + `exits_config.json` into folder `path`, each atomically (temp + rename)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.exits.state_dict().items()}
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp))
        meta = {
            "exit_config": self.exit_config.to_dict(),
            "backbone": self.backbone.fingerprint(),
            "weights_digest": exits_weights_digest(state),
        }
        write_text_atomic(path / CONFIG_NAME, json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike) -> EarlyExitVLM:
        """Attach exits saved by `save_exits` to `model`; a clear error if they were trained on another backbone."""
        path = Path(path)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise MissingFileError(f"no exits checkpoint at {path}: {f.name} is missing")
        try:
            meta = json.loads(config_file.read_text())
            exit_config = ExitConfig(**meta["exit_config"])
            saved = meta["backbone"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointMismatchError(f"{config_file} is not a freevlm exits config: {err}") from err
        ee = cls(model, exit_config)
        check_fingerprint(saved, ee.backbone.fingerprint(), path)
        state = load_file(str(weights_file), device=str(ee.backbone.device))
        if "weights_digest" in meta:  # folders saved before the digest existed load unchecked
            check_exits_weights(meta["weights_digest"], state, weights_file)
        missing, unexpected = ee.exits.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{weights_file} does not match exits {ee.exit_layers}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return ee

    # --- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        config: DecodeConfig | None = None,
        **kwargs,
    ) -> GenerateOutput:
        """Greedy decoding (or sampling) where each token leaves at the first exit its policy accepts.

        How to decode is a `DecodeConfig` (freevlm.decoding.config: every option and its default); keywords that
        name its fields override them on a copy of `config`, as Hugging Face's `generate` treats its
        `generation_config`: `mode="full"` runs every layer (exits ignored); `mode="early_exit"` uses `policy` or,
        by default, the confidence policy at `threshold`; `mode="speculative"` lets confident exits draft up to
        `max_draft` tokens that the final layer verifies (greedy output identical to the full model's).
        `num_beams > 1` runs beam search (`length_penalty`, `early_stopping` as in Hugging Face) with every beam
        leaving at its own exit. `do_sample=True` samples (`temperature`, `top_k`, `top_p`, `repetition_penalty`,
        `seed` as in Hugging Face's `generate`; without `seed`, torch's global generator): an exit still decides on
        its raw logits (the threshold means the same confidence as when greedy), and the token is drawn from the
        processed logits of the layer its row left at; at threshold 1.0 a seeded sample is Hugging Face's.
        In a batch each row leaves at its own exit; `batch_policy` says what the step does with rows that left
        while others go on: `"per_row"` takes them out, `"ride_along"` keeps them in the layers a deeper row
        needs, `"slowest"` makes every row wait for the slowest, `"auto"` picks by batch size (`"per_row"` in
        speculative mode). `static` switches the engine's static-shape path (None: the engine
        decides from the device). `return_engine=True` keeps the engine (every layer's KV cache) on the output, for
        inspection (`return_decoder`: its old, deprecated name).

        Every other keyword is a model input the family's own `generate` reads (`backbone.input_names`:
        InstructBLIP's `qformer_input_ids` and its mask, Gemma 3's `token_type_ids`), so `generate(**processor
        output)` works as with Hugging Face; they travel with the request into `backbone.start`. Any other keyword
        is a `TypeError` naming it. Returns sequences like Hugging Face's `generate`, the layer each token left at,
        and stats (layers run, analytic and ideal speedup, wall-clock).
        """
        if kwargs.get("return_decoder") is not None:  # stacklevel 3: the caller, past no_grad's wrapper
            warnings.warn("return_decoder is deprecated: use return_engine", DeprecationWarning, stacklevel=3)
            kwargs["return_engine"] = kwargs["return_decoder"]
        kwargs.pop("return_decoder", None)
        config = replace(config) if config is not None else DecodeConfig()  # a copy: the caller's stays as it is
        inputs = self._model_inputs(config.update(**kwargs))
        config.validate()
        validate_generate_inputs(self.backbone, pixel_values, input_ids, attention_mask, config.max_new_tokens, inputs)
        self.follow_backbone()
        warn_if_training(self.model, self.exits)
        if input_ids is None:
            input_ids = self.default_prompt(pixel_values.shape[0], pixel_values.device)
        if isinstance(config.policy, Copies) and (config.mode != "early_exit" or config.num_beams > 1):
            raise ValueError(
                f"policy=Copies(...) decodes each copy greedily with its exits: it needs mode='early_exit' and "
                f"num_beams=1, got mode={config.mode!r}, num_beams={config.num_beams}"
            )
        if config.mode == "full":
            policy = ExitPolicy()
        elif config.policy is None:
            policy = ConfidencePolicy(config.threshold)
        else:
            policy = config.policy
        policy.validate(self.exit_layers, self.backbone.num_layers)
        eos, pad = self.special_tokens(config.eos_token_id, config.pad_token_id)
        config = replace(config, eos_token_id=eos, pad_token_id=pad)
        exits, search = self.exit_dict(), SEARCH[search_name(config)]
        return search(
            Call(self.backbone, exits, policy, config, pixel_values, input_ids, attention_mask, inputs, self.engines)
        )

    def follow_backbone(self) -> None:
        """Move and cast the exits to the backbone's device and dtype, as modules registered on it would have
        followed `model.to(...)`: the backbone is the user's object, cast or moved after `from_backbone` as often as
        not (`model.to(torch.bfloat16)`, `model.cuda()`). `generate` calls it; a trainer that keeps fp32 exits under
        autocast calls `forward`, which leaves them as they are."""
        device, dtype = self.backbone.device, self.backbone.dtype
        if any(p.device != device or p.dtype != dtype for p in self.exits.parameters()):
            self.exits.to(device=device, dtype=dtype)

    def _model_inputs(self, inputs: dict) -> dict:
        """The inputs beyond image and prompt that this family's `generate` takes (None ones dropped, as a
        processor's absent outputs); a `TypeError` naming any other keyword."""
        names = self.backbone.input_names
        unknown = [name for name in inputs if name not in names]
        if unknown:
            takes = f"its model inputs are {', '.join(names)}" if names else "it takes no other model inputs"
            raise TypeError(
                f"generate() got an unexpected keyword argument {unknown[0]!r}: it is neither a decoding option "
                f"nor an input of {type(self.model).__name__} ({takes})"
            )
        return {name: value for name, value in inputs.items() if value is not None}

    def default_prompt(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """Hugging Face's default for BLIP-2 and InstructBLIP: the image tokens, then BOS where the LM has one (T5
        has none). LLaVA's `generate` has no default prompt: the image tokens alone."""
        cfg = self.backbone.config
        ids = [cfg.image_token_index if cfg.image_token_index is not None else 0] * cfg.num_query_tokens
        bos = getattr(cfg.text_config, "bos_token_id", None)
        if isinstance(self.backbone, Blip2Backbone) and bos is not None:
            ids.append(bos)
        return torch.tensor([ids] * batch, dtype=torch.long, device=device)

    def special_tokens(self, eos_token_id, pad_token_id) -> tuple[list[int], int]:
        """The EOS ids and the pad id a request decodes with: its own where given, else the LM's generation config
        (no EOS: an empty list; no pad: the first EOS, else 0)."""
        gen_cfg = self.backbone.lm.generation_config
        eos = eos_token_id if eos_token_id is not None else gen_cfg.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = pad_token_id if pad_token_id is not None else gen_cfg.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        return eos, pad


def warn_if_training(model: nn.Module, exits: nn.Module) -> None:
    """An `InputWarning` when the backbone or the exits are in training mode: dropout is then on and the tokens
    vary from call to call (Hugging Face's `generate` does not switch modes either)."""
    training = [name for name, module in (("the backbone", model), ("the exits", exits)) if _in_training(module)]
    if training:
        warnings.warn(
            f"generate: {' and '.join(training)} are in training mode, so dropout changes the tokens from call to "
            "call: call .eval() on the EarlyExitVLM and its backbone model first",
            InputWarning,
            stacklevel=4,
        )


def _in_training(module: nn.Module) -> bool:
    """Whether any module that runs is in training mode (a container's own flag changes nothing: a ModuleDict
    built around exits in eval mode starts in training mode)."""
    return any(m.training for m in module.modules() if not isinstance(m, (nn.ModuleDict, nn.ModuleList)))


def check_fingerprint(saved: dict, current: dict, path) -> None:
    """Exact match on architecture; the weight digest may differ only by casting noise."""
    for key in ("family", "num_layers", "hidden_size", "vocab_size", "architecture_hash"):
        if saved.get(key) != current.get(key):
            raise CheckpointMismatchError(
                f"exits at {path} were trained for another backbone: {key} is {saved.get(key)!r} there, "
                f"{current.get(key)!r} here"
            )
    a, b = saved.get("weight_digest", []), current.get("weight_digest", [])
    if len(a) != len(b) or any(not math.isclose(x, y, rel_tol=1e-2, abs_tol=1e-6) for x, y in zip(a, b)):
        raise CheckpointMismatchError(
            f"exits at {path} were trained for another backbone: same architecture, different weights"
        )


def exits_weights_digest(state: dict) -> dict[str, float]:
    """Mean |w| of every exit tensor: written beside the weights (exits_config.json), it ties the config to the
    weights file it was saved with. Survives dtype casts and device moves, not a different file."""
    return {k: float(v.detach().double().abs().mean()) if v.numel() else 0.0 for k, v in sorted(state.items())}


def check_exits_weights(saved: dict, state: dict, weights_file) -> None:
    """A `CheckpointMismatchError` if the loaded exit weights are not those the config was saved with."""
    now = exits_weights_digest(state)
    bad = [k for k in now if k not in saved or not math.isclose(saved[k], now[k], rel_tol=1e-2, abs_tol=1e-6)]
    if bad or set(saved) != set(now):
        raise CheckpointMismatchError(
            f"{weights_file} is not the weights file saved with its exits_config.json (tensor {(bad or ['names'])[0]} "
            "differs): the weights come from another run or backbone; copy the exits folder whole"
        )
