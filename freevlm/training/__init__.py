"""Training: stage 1 backbone fine-tuning, stage 2 FREE exit training (GAN + CE / KD / CapFilt), CapFilt."""

from ..data.records import split_records
from .common import LoopConfig, TrainingDiverged
from .data import CaptionCollator, CaptionDataset, Record, load_coco_captions, write_coco_captions
from .exits import ExitTrainConfig, evaluate_exits, kd_loss, train_exits
from .finetune import FinetuneConfig, caption_loss_and_accuracy, finetune

__all__ = [
    "CaptionCollator",
    "CaptionDataset",
    "ExitTrainConfig",
    "FinetuneConfig",
    "LoopConfig",
    "Record",
    "TrainingDiverged",
    "caption_loss_and_accuracy",
    "evaluate_exits",
    "finetune",
    "kd_loss",
    "load_coco_captions",
    "split_records",
    "train_exits",
    "write_coco_captions",
]
