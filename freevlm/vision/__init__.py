"""Pretrained image encoders that stand in for BLIP-2's ViT where no ViT weights can be had.

`VISION_MODELS` registers each by the name a checkpoint's marker file gives it (`freevlm.loading.BACKBONE_MARKER`),
so the loader rebuilds the encoder a checkpoint names without knowing who built the model. Each is constructed as
`cls(hidden_size, image_size, pretrained)`.
"""

from .efficientnet import EfficientNetVisionEncoder

VISION_MODELS = {EfficientNetVisionEncoder.name: EfficientNetVisionEncoder}
