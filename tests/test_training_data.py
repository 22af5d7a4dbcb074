"""Training data layout (shifting and masking), COCO readers, bad input, and stage-1 fine-tuning."""

import json

import pytest
import torch
from training_helpers import make_image_processor, make_tokenizer, write_shapes

from freevlm import EarlyExitVLM
from freevlm.data.images import ImageError
from freevlm.model import IGNORE_INDEX
from freevlm.tiny import tiny_blip2
from freevlm.training import (
    CaptionCollator,
    CaptionDataset,
    ExitTrainConfig,
    FinetuneConfig,
    Record,
    caption_loss_and_accuracy,
    finetune,
    load_coco_captions,
    train_exits,
    write_coco_captions,
)
from freevlm.training.finetune import caption_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes_json(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), 32)


def dataset(family, records, model=None, **kw):
    model = model or tiny_blip2(family, seed=0)
    return CaptionDataset(records, make_tokenizer(family), make_image_processor(), model.config, **kw)


def test_opt_layout_only_target_positions_count(shapes_json):
    model = tiny_blip2("opt")
    records = [
        Record(r.image, p, r.target)
        for r, p in zip(load_coco_captions(shapes_json)[:3], ["a photo of", "", "what color"])
    ]
    data = dataset("opt", records, model)
    batch = CaptionCollator.for_model(model.config)([data[i] for i in range(3)])
    q = model.config.num_query_tokens
    for b, r in enumerate(records):
        ids, targets, mask = batch["input_ids"][b], batch["targets"][b], batch["attention_mask"][b]
        prompt = make_tokenizer("opt")(r.prompt)["input_ids"]  # <s> + prompt words
        target = make_tokenizer("opt")(r.target, add_special_tokens=False)["input_ids"] + [3]  # + </s>
        n = q + len(prompt) + len(target)
        assert (ids[:q] == model.config.image_token_index).all()
        assert ids[q : q + len(prompt)].tolist() == prompt and ids[q + len(prompt) : n].tolist() == target
        assert mask[:n].all() and not mask[n:].any()
        # position t predicts token t+1: exactly the target tokens, nothing from image, prompt or padding
        counted = (targets != IGNORE_INDEX).nonzero().flatten().tolist()
        assert counted == list(range(q + len(prompt) - 1, n - 1))
        assert targets[counted].tolist() == ids[q + len(prompt) : n].tolist()


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_caption_loss_equals_hugging_face_loss(family, shapes_json):
    """Our loss (forward -> final logits at text positions) equals BLIP-2's own forward with HF-style labels."""
    model = tiny_blip2(family, seed=3)
    data = dataset(family, load_coco_captions(shapes_json)[:4], model)
    batch = CaptionCollator.for_model(model.config)([data[i] for i in range(4)])
    ours = caption_loss(EarlyExitVLM(model)(batch))
    with torch.no_grad():
        if family == "opt":
            labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
            labels[:, 1:] = batch["targets"][:, :-1]
            ref = model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=labels,
            ).loss
        else:
            ref = model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["targets"],
            ).loss
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_t5_decoder_input_is_target_shifted_right(shapes_json):
    model = tiny_blip2("t5")
    data = dataset("t5", load_coco_captions(shapes_json)[:2], model)
    batch = CaptionCollator.for_model(model.config)([data[0], data[1]])
    for b in range(2):
        target = data.target_ids[b]
        assert target[-1] == 1  # </s>
        assert batch["decoder_input_ids"][b, : len(target)].tolist() == [0] + target[:-1]
        assert batch["targets"][b, : len(target)].tolist() == target
        assert (batch["targets"][b, len(target) :] == IGNORE_INDEX).all()


def test_coco_readers_official_and_karpathy(tmp_path, shapes_json):
    records = load_coco_captions(shapes_json, prompt="a photo of")
    assert len(records) == 32 and records[0].prompt == "a photo of" and records[0].target.startswith("a ")
    karpathy = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "x.jpg",
                "cocoid": 7,
                "split": "test",
                "sentences": [{"raw": "A dog. "}, {"raw": "a cat"}],
            },
            {
                "filepath": "train2014",
                "filename": "y.jpg",
                "cocoid": 8,
                "split": "train",
                "sentences": [{"raw": "a bird"}],
            },
        ]
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    test = load_coco_captions(path, image_root="/coco", split="test")
    assert [(r.image, r.target, r.image_id) for r in test] == [
        ("/coco/val2014/x.jpg", "A dog.", 7),
        ("/coco/val2014/x.jpg", "a cat", 7),
    ]
    out = tmp_path / "out.json"
    write_coco_captions(out, [{"image": "/a.png", "caption": "x", "score": 0.5}, {"image": "/a.png", "caption": "y"}])
    again = load_coco_captions(out, image_root="/")
    assert [(r.image, r.target) for r in again] == [("/a.png", "x"), ("/a.png", "y")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        load_coco_captions(bad)


def test_bad_input_errors_name_the_problem(tmp_path, shapes_json):
    model = tiny_blip2("opt")
    with pytest.raises(ValueError, match="train.json is empty"):
        dataset("opt", [], model, source="train.json")
    with pytest.raises(ImageError, match="not found.*nope.png"):
        dataset("opt", [Record(str(tmp_path / "nope.png"), "", "a red circle")], model)
    image = load_coco_captions(shapes_json)[0].image
    long_caption = " ".join(["red"] * 600)
    with pytest.raises(ValueError, match="labels too long.*at most 512"):
        dataset("opt", [Record(image, "a photo of", long_caption)], model)
    with pytest.raises(ValueError, match="more than max_target_tokens=8"):
        dataset("t5", [Record(image, "", "a red circle on the left a red circle")], max_target_tokens=8)
    with pytest.raises(ValueError, match="fewer than one step needs"):
        train_exits(
            model,
            dataset("opt", load_coco_captions(shapes_json)[:3], model),
            ExitTrainConfig(output_dir=str(tmp_path / "x"), exit_layers=(1,), batch_size=4, progress=False),
        )

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    records = load_coco_captions(shapes_json)[:3] + [Record(str(broken), "", "a red circle")]
    data = dataset("opt", records, model)
    config = ExitTrainConfig(
        output_dir=str(tmp_path / "run"), exit_layers=(1,), batch_size=4, max_steps=1, progress=False, tensorboard=False
    )
    with pytest.raises(ImageError, match="cannot read image .*broken.png"):
        train_exits(model, data, config)


def test_finetune_lavis_default_trains_qformer_and_projection_only(tmp_path, shapes_json):
    model = tiny_blip2("opt", seed=2)
    with torch.no_grad():  # a random LM's logits are too flat for any soft prompt to make them peaked
        model.language_model.get_output_embeddings().weight.mul_(20)
    records = load_coco_captions(shapes_json)
    data = dataset("opt", records, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = caption_loss_and_accuracy(model, data)
    config = FinetuneConfig(
        output_dir=str(tmp_path),
        max_steps=30,
        batch_size=8,
        lr=2e-2,
        warmup_steps=3,
        progress=False,
        checkpoint_every=15,
        log_every=5,
    )
    finetune(model, data, config, save_with=(make_tokenizer("opt"), make_image_processor()))
    end = caption_loss_and_accuracy(model, data)
    assert end["loss"] < start["loss"] - 0.3, (start, end)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("qformer.", "query_tokens", "language_projection.")) for k in changed)
    assert any(k.startswith("language_projection.") for k in changed) and "query_tokens" in changed
    from freevlm.loading import load_vlm

    bundle = load_vlm(tmp_path / "model")
    for k, v in bundle.model.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k])
    assert (tmp_path / "checkpoints/latest").read_text() == "step-00000030"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000015", "step-00000030"]


def test_finetune_resume_equals_uninterrupted(tmp_path, shapes_json):
    records = load_coco_captions(shapes_json)

    def run(out, max_steps, resume=False, model=None):
        model = model or tiny_blip2("opt", seed=4)
        config = FinetuneConfig(
            output_dir=str(out),
            max_steps=max_steps,
            batch_size=4,
            lr=1e-3,
            schedule="constant",
            train_vision=True,
            progress=False,
            checkpoint_every=4,
            resume=resume,
        )
        return finetune(model, dataset("opt", records, model), config)

    full = run(tmp_path / "full", 8)
    part = run(tmp_path / "part", 4)  # constant schedule: stopping at 4 is the same as being killed there
    resumed = run(tmp_path / "part", 8, resume=True, model=tiny_blip2("opt", seed=4))
    assert not torch.equal(part.query_tokens, full.query_tokens)
    for k, v in resumed.state_dict().items():
        torch.testing.assert_close(v, full.state_dict()[k], rtol=1e-5, atol=1e-6)
