"""Stage 1: supervised fine-tuning of the BLIP-2 backbone with cross-entropy on captions or answers.

LAVIS recipe by default: the language model stays frozen; the Q-Former (with its query tokens) and the language
projection are trained, the vision encoder optionally. Frozen parts are kept in eval mode (no dropout), as LAVIS
does, so their outputs are those inference will see. The loss is computed through the same backbone adapter the
exits use, so both stages share one definition of "text positions".
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import load_backbone
from ..model import CheckpointMismatchError
from .checkpoint import resume_or_start, save_checkpoint
from .common import (
    DivergenceGuard,
    LoopConfig,
    Progress,
    Runtime,
    autocast,
    batch_stream,
    grad_scaler,
    logger,
    make_scheduler,
    optimizer_step,
    total_steps,
)
from .data import IGNORE, CaptionCollator, CaptionDataset

PARTS = {  # config flag -> parameter-name prefixes of Blip2ForConditionalGeneration
    "train_vision": ("vision_model.",),
    "train_qformer": ("qformer.", "query_tokens"),
    "train_projection": ("language_projection.",),
    "train_lm": ("language_model.",),
}


@dataclass
class FinetuneConfig(LoopConfig):
    """Stage-1 settings (the paper: lr 1e-5, batch 16, 10 epochs)."""

    output_dir: str = "runs/finetune"
    epochs: int = 10
    weight_decay: float = 0.05
    train_vision: bool = False
    train_qformer: bool = True
    train_projection: bool = True
    train_lm: bool = False

    def validate(self) -> None:
        super().validate()
        if not any(getattr(self, flag) for flag in PARTS):
            raise ValueError(f"nothing to train: set at least one of {', '.join(PARTS)}")


def select_trainable(model: nn.Module, config: FinetuneConfig) -> list[str]:
    """Freeze `model` except the parts `config` names; returns the trainable parameter names."""
    prefixes = tuple(p for flag, ps in PARTS.items() if getattr(config, flag) for p in ps)
    model.requires_grad_(False)
    names = []
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(True)
            names.append(name)
    return names


def caption_loss(backbone, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the final layer on text positions (mean per token), and the number of correct tokens."""
    states, _, _ = backbone.features(
        batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch.get("decoder_input_ids")
    )
    text = batch["targets"] != IGNORE
    logits = backbone.head(states[-1][text]).float()
    targets = batch["targets"][text]
    return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).sum()


@torch.no_grad()
def evaluate_captions(
    model: nn.Module, dataset: CaptionDataset, batch_size: int = 16, runtime: Runtime | None = None
) -> dict[str, float]:
    """Held-out per-token `loss` and `token_acc` of the final layer."""
    rank, world = (runtime.rank, runtime.world) if runtime is not None else (0, 1)
    backbone = load_backbone(model)
    collate = CaptionCollator.for_model(model.config)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss * tokens, correct, tokens
    indices = list(range(rank, len(dataset), world))
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start : start + batch_size]])
        batch = {k: v.to(backbone.device) for k, v in batch.items()}
        n = int((batch["targets"] != IGNORE).sum())
        loss, correct = caption_loss(backbone, batch)
        sums += torch.tensor([loss.item() * n, correct.item(), n], dtype=torch.float64)
    if runtime is not None:
        sums = runtime.sum(sums).cpu()
    model.train(was_training)
    n = max(sums[2].item(), 1.0)
    return {"loss": sums[0].item() / n, "token_acc": sums[1].item() / n}


def _set_modes(model: nn.Module, config: FinetuneConfig) -> None:
    """Train mode for the trained parts, eval mode (no dropout) for the frozen ones."""
    model.eval()
    for flag, prefixes in PARTS.items():
        if getattr(config, flag):
            for prefix in prefixes:
                module_name = prefix.rstrip(".")
                if module_name != "query_tokens":
                    model.get_submodule(module_name).train()


def finetune(model: nn.Module, train_set: CaptionDataset, config: FinetuneConfig,
             dev_set: CaptionDataset | None = None, save_with: tuple = ()) -> nn.Module:  # fmt: skip
    """Fine-tune `model` in place; returns it. The result goes to `<output_dir>/model` with `save_pretrained`,
    together with every object in `save_with` (tokenizer, image processor) so the folder loads with `load_blip2`."""
    config.validate()
    runtime = Runtime(cpu=config.cpu)
    out_dir, ckpt_dir = Path(config.output_dir), Path(config.output_dir) / "checkpoints"
    model.to(runtime.device)
    backbone = load_backbone(model)
    names = select_trainable(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    runtime.broadcast_(params)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and n != "query_tokens"]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or n == "query_tokens")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    total = total_steps(config, len(train_set), runtime.world)
    scheduler = make_scheduler(optimizer, config, total)
    scaler = grad_scaler(config, runtime.device)
    guard = DivergenceGuard(config.max_nonfinite_steps)

    step = 0
    resumed = resume_or_start(ckpt_dir, runtime, config.resume, config.seed)
    if resumed is not None:
        path, state = resumed
        if sorted(state["trainable"]) != sorted(names):
            raise CheckpointMismatchError(
                f"checkpoint {path} trained other parameters than this run would ({len(state['trainable'])} vs "
                f"{len(names)} tensors): use the same train_* settings to resume"
            )
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, guard.skipped = state["step"], state["nonfinite_skipped"]
        logger.info("resumed from %s at step %d", path, step)

    _set_modes(model, config)
    stream = batch_stream(train_set, CaptionCollator.for_model(model.config), config, runtime, step)
    progress = Progress(config, runtime, total, step, str(out_dir / "tensorboard"))
    while step < total:
        batch = next(stream)
        with autocast(config, runtime.device):
            loss, _ = caption_loss(backbone, batch)
        ok = guard.ok({"caption loss": loss}, step, runtime)
        if ok:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            optimizer_step(optimizer, params, scaler, runtime, config.grad_clip)
            scaler.update()
            scheduler.step()
        step += 1  # a skipped step still consumes its batch

        progress.step({"loss": loss.item()} if ok else None)
        if step % config.log_every == 0 or step == total:
            mean = (runtime.sum(loss.detach().float().reshape(1)) / runtime.world).item()
            progress.scalars({"train/loss": mean, "train/lr": scheduler.get_last_lr()[0],
                              "train/nonfinite_skipped": guard.skipped}, step)  # fmt: skip
        if dev_set is not None and ((config.eval_every and step % config.eval_every == 0) or step == total):
            metrics = evaluate_captions(model, dev_set, config.batch_size, runtime)
            _set_modes(model, config)
            progress.scalars({f"dev/{k}": v for k, v in metrics.items()}, step)
            if runtime.is_main and step == total:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "dev_metrics.json").write_text(json.dumps(metrics, indent=2))
        if step % config.checkpoint_every == 0 or step == total:
            trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            state = {"step": step, "config": asdict(config), "trainable": trainable, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "nonfinite_skipped": guard.skipped}  # fmt: skip
            save_checkpoint(ckpt_dir, step, state, runtime, config.keep_checkpoints)

    progress.close()
    model.eval()
    if runtime.is_main:  # assembled beside, then renamed: a crash never leaves half a model folder
        final, tmp = out_dir / "model", out_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        for obj in save_with:
            obj.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    runtime.barrier()
    return model
