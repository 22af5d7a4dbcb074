"""Stage 2 (FREE exit training) on a tiny LLaVA: the BLIP-2 recipe of test_training_exits.py, unchanged."""

import pytest
import torch
from training_helpers import make_image_processor, make_tokenizer, write_shapes

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.tiny import tiny_llava
from freevlm.training import CaptionDataset, ExitTrainConfig, evaluate_exits, load_coco_captions, split_records, train_exits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kd_exit_training_lowers_heldout_kl_on_llava(tmp_path):
    """GAN + KD from fresh exits on a Llama LLaVA (its final norm sharpened, so the final layer has a distribution
    worth matching): held-out KL(exit || final) falls, the backbone is untouched, and the exits decode."""
    records = load_coco_captions(write_shapes(tmp_path / "data", 48))
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_llava("llama", seed=0, image_size=16)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(6)
    layout = EarlyExitVLM(model, ExitConfig([1])).backbone.config  # BLIP-2's prompt-layout names on LLaVA's config
    tok, proc = make_tokenizer("opt"), make_image_processor(16)
    train_set, dev_set = (CaptionDataset(r, tok, proc, layout) for r in (train, dev))
    before_backbone = {k: v.clone() for k, v in model.state_dict().items()}
    untrained = evaluate_exits(EarlyExitVLM(model, ExitConfig([1, 2], "fresh")), dev_set)
    config = ExitTrainConfig(output_dir=str(tmp_path / "kd"), exit_layers=(1, 2), init="fresh", anchor="kd",
                             max_steps=60, batch_size=8, lr=1e-3, disc_lr=1e-3, adv_weight=0.1, disc_hidden=64,
                             warmup_steps=5, progress=False, checkpoint_every=10_000, log_every=10)  # fmt: skip
    ee = train_exits(model, train_set, config, dev_set=dev_set)
    trained = evaluate_exits(ee, dev_set)
    for i in (1, 2):
        before, after = untrained[f"kl/exit_{i}"], trained[f"kl/exit_{i}"]
        assert after < 0.2 * before, f"exit {i}: held-out KL {before:.4f} -> {after:.4f}"
    assert all(torch.equal(v, before_backbone[k]) for k, v in model.state_dict().items())
    pixel_values = torch.stack([train_set[0]["pixel_values"]])
    image = torch.full((1, layout.num_query_tokens), layout.image_token_index)
    out = ee.generate(pixel_values, torch.cat([image, torch.tensor([[2]])], dim=1), max_new_tokens=5, threshold=0.0)
    assert (out.exit_layers[out.exit_layers >= 0] == 1).all()
