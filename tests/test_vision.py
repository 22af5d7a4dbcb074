"""EfficientNet-Lite0: the package's weights load strictly and classify; the BLIP-2 encoder around it stays frozen."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from freevlm.vision.efficientnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetVisionEncoder,
    SameConv2d,
    efficientnet_lite0,
)

CAT_CLASSES = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def _normalise(image: Image.Image, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.array(image.convert("RGB").resize((size, size), Image.BICUBIC))).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def encoder():
    return EfficientNetVisionEncoder(hidden_size=48)


def test_imagenet_weights_load_strictly_and_see_a_cat():
    from skimage import data

    net = efficientnet_lite0()  # load_state_dict(strict=True) inside: any missing/unexpected key raises
    assert net._fc.weight.shape == (1000, 1280)  # the package ships the classifier head
    with torch.no_grad():
        probs = net(_normalise(Image.fromarray(data.chelsea()), 224)).softmax(-1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert probs.argmax().item() in CAT_CLASSES and len(top5 & CAT_CLASSES) >= 3
    with torch.no_grad():
        coffee = net(_normalise(Image.fromarray(data.coffee()), 224)).argmax().item()
    assert coffee in (967, 968)  # espresso, cup


def test_encoder_output_like_a_hugging_face_vision_model(encoder):
    pixels = torch.randn(2, 3, 128, 128)
    out = encoder(pixels, return_dict=True)
    assert out.last_hidden_state.shape == (2, 64, 48)  # 8x8 map after block 10
    assert out.pooler_output.shape == (2, 48)
    assert torch.equal(encoder(pixels, return_dict=False)[0], out.last_hidden_state)
    small = encoder(torch.randn(1, 3, 96, 96), interpolate_pos_encoding=True).last_hidden_state
    assert small.shape == (1, 36, 48)


def test_backbone_frozen_and_kept_in_eval_mode(encoder):
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {
        "position_embedding",
        "projection.weight",
        "projection.bias",
        "layernorm.weight",
        "layernorm.bias",
        "colour_projection.weight",
        "colour_projection.bias",
        "colour_layernorm.weight",
        "colour_layernorm.bias",
    }
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert encoder.training and not encoder.blocks.training and not encoder.stem.training
    stats = [m.running_mean.clone() for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    encoder(torch.randn(2, 3, 128, 128)).last_hidden_state.sum().backward()
    after = [m.running_mean for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))  # BatchNorm statistics untouched in train mode
    assert encoder.projection.weight.grad is not None
    assert all(p.grad is None for p in encoder.blocks.parameters())
    parent.eval()


def test_different_images_give_different_tokens(encoder):
    a = encoder(torch.zeros(1, 3, 128, 128)).last_hidden_state
    b = encoder(torch.ones(1, 3, 128, 128)).last_hidden_state
    assert (a - b).abs().max() > 1e-2


def test_colour_and_shape_both_reach_the_tokens(encoder):
    """One large object at the centre in every colour x shape: both must move the token over it. Block 10 alone is
    nearly colour-blind (colour ~12% of that token's variance, shape ~80%), and a demo model trained on it named
    every object "orange triangle"; the early, colour-rich map the encoder adds brings colour to ~half."""
    from freevlm.data.shapes import COLOURS, SHAPES, Scene, ShapeObject, render

    objects = [ShapeObject(shape, colour, "large", 32, 32, 13) for colour in COLOURS for shape in SHAPES]
    pixels = torch.cat([_normalise(render(Scene((obj,), 64)), 128) for obj in objects])
    with torch.no_grad():
        token = encoder(pixels).last_hidden_state[:, 4 * 8 + 4]  # 8x8 grid: the token at the object's centre
    token = (token - token.mean(0)).reshape(len(COLOURS), len(SHAPES), -1)
    total = token.pow(2).sum()
    colour_share = token.mean(1).pow(2).sum() * len(SHAPES) / total  # variance explained by colour alone
    shape_share = token.mean(0).pow(2).sum() * len(COLOURS) / total
    assert colour_share > 0.3 and shape_share > 0.3, (colour_share, shape_share)


def test_cached_frozen_features_equal_computed_ones():
    from freevlm.vision.efficientnet import EfficientNetVisionEncoder

    encoder = EfficientNetVisionEncoder(hidden_size=32, image_size=64, pretrained=False)
    pixels = torch.randn(3, 3, 64, 64)
    plain = encoder.frozen_features(pixels)
    encoder.cache_frozen_features()
    first = encoder.frozen_features(pixels)
    again = encoder.frozen_features(pixels[[2, 0]])  # served from the cache, in the asked order
    assert torch.allclose(first, plain, atol=1e-6) and torch.allclose(again, plain[[2, 0]], atol=1e-6)
    assert len(encoder._feature_cache) == 3


@pytest.mark.parametrize("batch, size", [(1, 128), (3, 128), (1, 100), (3, 100)])
def test_folded_batchnorms_compute_what_the_unfolded_layers_do(encoder, batch, size):
    pixels = torch.randn(batch, 3, size, size)
    with torch.no_grad():  # the registered modules, BatchNorms run as such (the fast path folds them)
        unfolded = encoder._frozen(pixels, folded=False)
    torch.testing.assert_close(encoder.frozen_features(pixels), unfolded, rtol=1e-4, atol=1e-4)


def test_folded_layers_follow_loaded_and_converted_weights(encoder):
    """The folded copies are built from the weights at first use: loading (through a parent, as the demo's loader
    does) or `.to(dtype)` must rebuild them, and they stay out of the state dict."""
    pixels = torch.randn(2, 3, 64, 64)
    fresh = EfficientNetVisionEncoder(hidden_size=48, pretrained=False)
    keys = fresh.state_dict().keys()
    fresh.frozen_features(pixels)  # folds the random weights
    assert fresh.state_dict().keys() == keys
    parent = torch.nn.Sequential(fresh)
    parent.load_state_dict({f"0.{key}": value for key, value in encoder.state_dict().items()})
    full = encoder.frozen_features(pixels)
    torch.testing.assert_close(fresh.frozen_features(pixels), full, rtol=1e-4, atol=1e-4)
    parent.to(torch.bfloat16)
    half = fresh.frozen_features(pixels)  # a float32 fold left over would not even run on bfloat16 pixels
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).norm() / full.norm() < 0.1  # bfloat16 rounding: 0.03 measured (random weights: 1.0)


@pytest.mark.parametrize("stride, size, pads", [(1, 8, (2, 2)), (2, 8, (1, 2)), (2, 9, (2, 2))])
def test_same_padding_is_tensorflows(stride, size, pads):
    """TensorFlow's SAME: the extra pixel of an odd total goes bottom/right (asymmetric at stride 2, even size)."""
    conv = SameConv2d(4, 4, 5, stride, groups=4, bias=False)
    x = torch.randn(1, 4, size, size)
    expected = F.conv2d(F.pad(x, pads * 2), conv.weight, stride=stride, groups=4)
    torch.testing.assert_close(conv(x), expected)
