"""Training a tiny LLaVA: stage 1 (its projector) and stage 2 (FREE exits), the BLIP-2 recipes unchanged, prompts
laid out by its `LlavaProcessor`."""

import pytest
import torch
from training_helpers import assert_kd_training_lowers_held_out_kl, make_image_processor, make_tokenizer, write_shapes
from transformers import LlavaProcessor

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.tiny import tiny_llava
from freevlm.training import (
    CaptionDataset,
    FinetuneConfig,
    caption_loss_and_accuracy,
    finetune,
    load_coco_captions,
    split_records,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(records, layout) -> CaptionDataset:
    """Records laid out by a LLaVA processor over the training helpers' tokenizer (the shapes' words) and images."""
    processor = LlavaProcessor(
        make_image_processor(layout.vision_config.image_size),
        make_tokenizer("opt", layout.image_token_index),
        patch_size=layout.vision_config.patch_size,
        vision_feature_select_strategy=layout.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return CaptionDataset(records, processor.tokenizer, processor.image_processor, layout, processor=processor)


def test_kd_exit_training_lowers_heldout_kl_on_llava(tmp_path):
    """GAN + KD from fresh exits on a Llama LLaVA (its final norm sharpened, so the final layer has a distribution
    worth matching): held-out KL(exit || final) falls, the backbone is untouched, and the exits decode."""
    records = load_coco_captions(write_shapes(tmp_path / "data", 48))
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_llava("llama", seed=0, image_size=16)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(6)
    layout = EarlyExitVLM(model, ExitConfig([1])).backbone.config  # BLIP-2's prompt-layout names on LLaVA's config
    train_set, dev_set = dataset(train, layout), dataset(dev, layout)
    ee = assert_kd_training_lowers_held_out_kl(model, train_set, dev_set, tmp_path / "kd")
    pixel_values = train_set[0]["pixel_values"]
    image = torch.full((1, layout.num_query_tokens), layout.image_token_index)
    out = ee.generate(pixel_values, torch.cat([torch.tensor([[2]]), image], dim=1), max_new_tokens=5, threshold=0.0)
    assert (out.exit_layers[out.exit_layers >= 0] == 1).all()


def test_stage1_trains_the_projector_alone_and_lowers_loss(tmp_path):
    """The default stage-1 flags (Q-Former + projection) on LLaVA, which has no Q-Former: the projector is trained
    (the adapter names it; no BLIP-2 parameter names), everything else is bit-identical, and the caption loss falls."""
    records = load_coco_captions(write_shapes(tmp_path / "data", 32))
    model = tiny_llava("llama", seed=2, image_size=16)
    with torch.no_grad():  # a random LM's logits are too flat for any soft prompt to make them peaked
        model.lm_head.weight.mul_(20)
    layout = EarlyExitVLM(model).backbone.config
    data = dataset(records, layout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = caption_loss_and_accuracy(model, data)
    config = FinetuneConfig(
        output_dir=str(tmp_path / "ft"),
        max_steps=30,
        batch_size=8,
        lr=2e-2,
        warmup_steps=3,
        progress=False,
        checkpoint_every=10_000,
        log_every=5,
    )
    finetune(model, data, config)
    end = caption_loss_and_accuracy(model, data)
    assert end["loss"] < start["loss"] - 0.3, (start, end)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith("model.multi_modal_projector.")}
    with pytest.raises(ValueError, match="has no qformer"):
        finetune(model, data, FinetuneConfig(output_dir=str(tmp_path / "q"), train_projection=False, progress=False))
