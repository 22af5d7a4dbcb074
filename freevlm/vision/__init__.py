"""Pretrained image encoders that stand in for BLIP-2's ViT where no ViT weights can be had."""
