"""The demo: a small BLIP-2 trained on the shapes world, then made faster with FREE exits."""
