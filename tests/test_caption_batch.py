"""`freevlm caption` on several images runs them as one continuous batch: each caption and its exit layers are what
the image gets alone, where one `generate` batch would move its rows through the layers together and stop leaving
early as soon as they disagree (two of the demo's images: 12 of 12 layers per token, 9 each alone)."""

import re

import pytest
import torch
from PIL import Image
from training_helpers import full_vocab_tokenizer, make_image_processor

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.cli import main
from freevlm.commands.generate import each_alone
from freevlm.decoding.config import DecodeConfig
from freevlm.loading import load_exits, load_vlm
from freevlm.tiny import tiny_blip2

pytestmark = pytest.mark.usefixtures("one_thread")
THRESHOLD, MAX_TOKENS = 0.1, 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    model = tiny_blip2("opt", seed=5, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3, 4]))
    with torch.no_grad():  # sharper logits (confident exits for some tokens only), and answers that see the image
        ee.backbone.final_norm_modules()[0].mul_(6)
        model.query_tokens.zero_()
        model.language_projection.weight.mul_(10)
    model.save_pretrained(root / "backbone")
    full_vocab_tokenizer().save_pretrained(root / "backbone")
    make_image_processor().save_pretrained(root / "backbone")
    ee.save_exits(root / "exits")
    images = []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (32, 32), color).save(root / f"{i}.png")
        images.append(root / f"{i}.png")
    return {"backbone": root / "backbone", "exits": root / "exits", "images": images}


def caption(files, capsys, images) -> tuple[list[str], str]:
    """The command's lines per image (its caption, then its traced tokens and layers) and its summary line."""
    args = ["caption", "--backbone", str(files["backbone"]), "--exits", str(files["exits"]), "--trace"]
    args += ["--threshold", str(THRESHOLD), "--max-new-tokens", str(MAX_TOKENS), "--image", *map(str, images)]
    assert main(args) == 0
    *lines, summary = capsys.readouterr().out.splitlines()
    per_image = []
    for line in lines:
        if line.startswith(" "):
            per_image[-1].append(line)
        else:
            per_image.append([line])
    return ["\n".join(p) for p in per_image], summary


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_each_alone_gives_what_generate_gives_each_prompt_alone(files, kv):
    bundle = load_vlm(files["backbone"])
    ee = load_exits(bundle.model, files["exits"])
    config = DecodeConfig(threshold=THRESHOLD, max_new_tokens=MAX_TOKENS, kv=kv)
    images = [Image.open(path).convert("RGB") for path in files["images"]]
    requests = [bundle.inputs([image], [""]) for image in images]
    alone = []
    for request in requests:
        out = ee.generate(**request, config=config)
        layers = out.exit_layers[0]
        alone.append((out.sequences[0, -len(layers) :][layers >= 0].tolist(), layers[layers >= 0].tolist()))
    assert len({tuple(layers) for _, layers in alone}) == len(alone), "the rows agree: the test would see nothing"
    assert any(layer < ee.backbone.num_layers for _, layers in alone for layer in layers), "no early exit"
    assert each_alone(ee, requests, config) == alone
    together = ee.generate(**bundle.inputs(images, [""] * 3), config=config).exit_layers
    assert [layers[layers >= 0].tolist() for layers in together] != [layers for _, layers in alone], (
        "one generate batch leaves as each alone does: the scheduler buys nothing here"
    )


def test_caption_of_several_images_equals_each_alone(files, capsys):
    """Captions, traced exit layers and the summary's layers per token: two images in one call are each as alone."""
    alone = [caption(files, capsys, [path]) for path in files["images"][:2]]
    both, summary = caption(files, capsys, files["images"][:2])
    assert both == [lines[0] for lines, _ in alone]
    layers = [int(n) for lines, _ in alone for n in re.findall(r"layer (\d+)", lines[0])]
    assert 0 < min(layers) < max(layers) == 6, layers
    mean = re.search(r"([\d.]+) of 6 layers per token", summary).group(1)
    assert float(mean) == pytest.approx(sum(layers) / len(layers), abs=0.05)
