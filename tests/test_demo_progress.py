"""The demo shows progress: training loops call the `progress_hook` callback after every step, and evaluation
through the demo's ticking processor reports the images done; both with growing counts up to the total."""

import pytest

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.data import shapes
from freevlm.data.coco import read_coco_captions
from freevlm.decoding.config import DecodeConfig
from freevlm.demo.backbone import build_backbone
from freevlm.demo.progress import Progress
from freevlm.eval.evaluate import CAPTION_PROMPT, evaluate_captioning
from freevlm.training.common import progress_hook
from freevlm.training.data import CaptionDataset, Record
from freevlm.training.exits import ExitTrainConfig, train_exits
from freevlm.training.finetune import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.write_split(root, "train", 8, seed=0)
    records = read_coco_captions(root / "captions_train.json", root)
    bundle = build_backbone("opt", seed=0, num_layers=4, hidden_size=64)
    train = CaptionDataset(
        [Record(str(r.image), CAPTION_PROMPT, r.references[0], r.image_id) for r in records],
        bundle.tokenizer,
        bundle.image_processor,
        bundle.model.config,
    )
    return bundle, train, records


def _calls(run) -> list[tuple[int, int]]:
    seen = []
    with progress_hook(lambda step, total, postfix: seen.append((step, total)), desc="test"):
        run()
    return seen


def test_training_loops_report_every_step(world, tmp_path):
    bundle, train, _ = world
    common = dict(max_steps=3, batch_size=4, progress=False, tensorboard=False, checkpoint_every=3)
    seen = _calls(lambda: finetune(bundle.model, train, FinetuneConfig(output_dir=str(tmp_path / "ft"), **common)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    bundle.model.requires_grad_(False)
    config = ExitTrainConfig(output_dir=str(tmp_path / "ex"), exit_layers=(1, 2), disc_hidden=32, **common)
    assert _calls(lambda: train_exits(bundle.model, train, config)) == [(1, 3), (2, 3), (3, 3)]
    assert _calls(lambda: None) == []  # the hook is gone after its block


def test_evaluation_reports_images_done(world):
    bundle, _, records = world
    ee = EarlyExitVLM(bundle.model, ExitConfig(exit_layers=(1, 2)))
    done = []
    progress = Progress(on_progress=lambda name, step, total: done.append((name, step, total)), show=False)
    with progress.ticking(bundle, "test", 5) as processor:
        evaluate_captioning(
            ee, processor, records[:5], 0.9, batch_size=2, config=DecodeConfig(max_new_tokens=3), compare_full=False
        )
    assert done == [("test", 2, 5), ("test", 4, 5), ("test", 5, 5)]


def test_batched_evaluation_decodes_what_batch_1_does(world):
    """Quality runs must not depend on the batch size: under "auto" a small batch's gate would turn exits off."""
    bundle, _, records = world
    ee = EarlyExitVLM(bundle.model, ExitConfig(exit_layers=(1, 2)))
    runs = [
        evaluate_captioning(
            ee, bundle, records[:6], 0.023, batch_size=size, config=DecodeConfig(max_new_tokens=4), compare_full=False
        )
        for size in (1, 3)
    ]
    assert runs[0].predictions == runs[1].predictions
    assert runs[0].speed.exit_histogram == runs[1].speed.exit_histogram
    assert {1, 4} <= set(runs[0].speed.exit_histogram)  # rows leave early and go on to the final layer
