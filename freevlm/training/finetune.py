"""Stage 1: supervised fine-tuning of the backbone with cross-entropy on captions or answers.

LAVIS recipe by default: the language model stays frozen; the Q-Former (with its query tokens) and the language
projection are trained, the vision encoder optionally (LLaVA, which has no Q-Former: its projector, as LLaVA's own
stage 1). The backbone adapter says which modules each part is (`Backbone.stage1_parts`), so no family's parameter
names live here. Frozen parts are kept in eval mode (no dropout), as LAVIS does, so their outputs are those
inference will see. The loss is read from `EarlyExitVLM.forward`, as the exits' losses are, so both stages share
one definition of "text positions".
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..backbones import Backbone
from ..model import CheckpointMismatchError, EarlyExitVLM, ExitOutputs
from .common import LoopConfig, Runtime, autocast, make_scheduler
from .data import CaptionDataset
from .loop import Objective, token_means, train

TRAINABLE_PARTS = {  # config flag -> part of `Backbone.stage1_parts`
    "train_vision": "vision",
    "train_qformer": "qformer",
    "train_projection": "projection",
    "train_lm": "lm",
}


@dataclass
class FinetuneConfig(LoopConfig):
    """Stage-1 settings (the paper: lr 1e-5, batch 16, 10 epochs). A flag for a part the model lacks is ignored
    (LLaVA's default: the projector alone)."""

    output_dir: str = "runs/finetune"
    epochs: int = 10
    weight_decay: float = 0.05
    train_vision: bool = False
    train_qformer: bool = True
    train_projection: bool = True
    train_lm: bool = False

    def validate(self) -> None:
        super().validate()
        if not any(getattr(self, flag) for flag in TRAINABLE_PARTS):
            raise ValueError(f"nothing to train: set at least one of {', '.join(TRAINABLE_PARTS)}")


def trainable_parts(backbone: Backbone, config: FinetuneConfig) -> list[nn.Module | nn.Parameter]:
    """The modules and bare parameters `config` trains on `backbone`; an error if the model has none of them."""
    parts = backbone.stage1_parts()
    chosen = [part for flag, part in TRAINABLE_PARTS.items() if getattr(config, flag)]
    found = [x for part in chosen for x in parts.get(part, [])]
    if not found:
        raise ValueError(
            f"nothing to train: this {type(backbone.model).__name__} has no {' or '.join(chosen)} "
            f"(its parts: {', '.join(parts)})"
        )
    return found


def caption_loss(out: ExitOutputs) -> torch.Tensor:
    """Cross-entropy of the final layer, mean per text token: what stage 1 minimises."""
    return F.cross_entropy(out.final_logits.float(), out.targets)


def caption_loss_and_accuracy(
    model: nn.Module, dataset: Dataset, batch_size: int = 16, runtime: Runtime | None = None
) -> dict[str, float]:
    """Held-out per-token `loss` and `token_acc` of the final layer of `model` (a BLIP-2, or an `EarlyExitVLM`)."""
    ee = model if isinstance(model, EarlyExitVLM) else EarlyExitVLM(model)

    def sums(out: ExitOutputs) -> dict[str, float]:
        correct = (out.final_logits.float().argmax(-1) == out.targets).sum().item()
        return {"loss": caption_loss(out).item() * len(out.targets), "token_acc": correct}

    return token_means(ee, dataset, ["loss", "token_acc"], sums, batch_size, runtime)


class Finetune(Objective):
    """Cross-entropy of the final layer on the parts of the backbone `config` trains."""

    PARTS = (*Objective.PARTS, "optimizer", "scheduler")

    def __init__(self, model: nn.Module, config: FinetuneConfig, runtime: Runtime, data: Dataset, save_with: tuple):
        super().__init__(config, runtime, data)
        self.model, self.save_with = model.to(runtime.device), save_with
        self.ee = EarlyExitVLM(model)
        self.parts = trainable_parts(self.ee.backbone, config)
        model.requires_grad_(False)
        for part in self.parts:
            part.requires_grad_(True)
        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        runtime.broadcast_(self.params)
        bare = {id(p) for p in self.parts if isinstance(p, nn.Parameter)}  # learned embeddings (query tokens)
        decay = [p for p in self.params if p.dim() >= 2 and id(p) not in bare]
        no_decay = [p for p in self.params if p.dim() < 2 or id(p) in bare]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
        )
        self.scheduler = make_scheduler(self.optimizer, config, self.total)

    def state_dict(self) -> dict:
        trainable = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        return {"trainable": trainable, **super().state_dict()}

    def load_state_dict(self, state: dict, path: Path) -> None:
        if sorted(state["trainable"]) != sorted(self.names):
            raise CheckpointMismatchError(
                f"checkpoint {path} trained other parameters than this run would ({len(state['trainable'])} vs "
                f"{len(self.names)} tensors): use the same train_* settings to resume"
            )
        self.model.load_state_dict(state["trainable"], strict=False)
        super().load_state_dict(state, path)

    def begin(self, step: int) -> None:
        """Train mode for the trained parts, eval mode (no dropout) for the frozen ones."""
        self.model.eval()
        for part in self.parts:
            if isinstance(part, nn.Module):
                part.train()

    def step(self, batch: dict, step: int) -> tuple[dict[str, float] | None, dict[str, torch.Tensor]]:
        with autocast(self.config, self.runtime.device):
            loss = caption_loss(self.ee(batch))
        ok = self.guard.ok({"caption loss": loss}, step, self.runtime)
        if ok:
            self.optimizer_step(loss, self.optimizer, self.params)
            self.scaler.update()
            self.scheduler.step()
        return ({"loss": loss.item()} if ok else None), {"train/loss": loss}

    def scalars(self, means: dict[str, float]) -> dict[str, float]:
        return {"train/lr": self.scheduler.get_last_lr()[0]}

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        return caption_loss_and_accuracy(self.ee, dataset, self.config.batch_size, self.runtime)

    def finish(self, out_dir: Path) -> nn.Module:
        self.model.eval()
        if self.runtime.is_main:  # assembled beside, then renamed: a crash never leaves half a model folder
            final, tmp = out_dir / "model", out_dir / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp)
            for obj in self.save_with:
                obj.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        return self.model


def finetune(
    model: nn.Module,
    train_set: CaptionDataset,
    config: FinetuneConfig,
    dev_set: CaptionDataset | None = None,
    save_with: tuple = (),
) -> nn.Module:
    """Fine-tune `model` in place; returns it. The result goes to `<output_dir>/model` with `save_pretrained`,
    together with every object in `save_with` (`VLMBundle.preprocessing`: the tokenizer and image processor, or
    the processor) so the folder loads with `load_vlm`."""
    return train(lambda runtime: Finetune(model, config, runtime, train_set, save_with), config, dev_set)
