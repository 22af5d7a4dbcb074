"""The frozen image encoder's CPU cost per image: its fast path (`EfficientNetVisionEncoder.frozen_features`,
BatchNorms folded into the convs) beside the same registered layers run as loaded (each BatchNorm its own pass),
at each batch size, side by side in one process.

    cd bench && PYTHONPATH=.. python bench_vision.py [--batch 1 16] [--size 128] [--repeats 9]

The encoder is the demo's (EfficientNet-Lite0 with the package's ImageNet weights, frozen), on random pixels; one
torch thread. Prints the minimum CPU milliseconds per image over `--repeats` turns (the two paths alternating) and
the ratio. Both paths share the padding and ReLU6 of `SameConv2d` and `MBConv`, so the ratio is the folding's alone.
"""

from __future__ import annotations

import argparse
import time

import torch

from freevlm.vision.efficientnet import EfficientNetVisionEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder = EfficientNetVisionEncoder(hidden_size=256, image_size=args.size)
    paths = {"folded": encoder.frozen_features, "as loaded": lambda pixels: encoder._frozen(pixels, folded=False)}
    print(f"frozen EfficientNet-Lite0 at {args.size} px, 1 thread: min CPU ms per image over {args.repeats} turns")
    with torch.no_grad():
        for batch in args.batch:
            pixels = torch.randn(batch, 3, args.size, args.size)
            torch.testing.assert_close(paths["folded"](pixels), paths["as loaded"](pixels), rtol=1e-4, atol=1e-4)
            best = dict.fromkeys(paths, float("inf"))
            for _ in range(args.repeats):
                for name, path in paths.items():
                    start = time.process_time()
                    path(pixels)
                    best[name] = min(best[name], (time.process_time() - start) / batch * 1000)
            print(
                f"  batch {batch:3d}: folded {best['folded']:5.2f} ms, as loaded {best['as loaded']:5.2f} ms, "
                f"as loaded / folded {best['as loaded'] / best['folded']:.2f}x"
            )


if __name__ == "__main__":
    main()
