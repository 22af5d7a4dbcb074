"""Does the FREE discriminator learn, and do the exits fool it? Held-out D accuracy (h_N vs E_i(h_i)) over exit
training, measured with the real trainer on the tests' tiny fine-tuned OPT BLIP-2 and shapes captions.

Runs (same seed, data and fresh exits):
  - "D alone": the exits are frozen (adversarial and anchor weights 0), so only D trains: can it learn at all?
  - "GAN+KD w=1.0" / "GAN+KD w=0.1": the full method, D and exits alternate (paper weight 1.0, and 0.1);
  - "KD only": no adversarial term (the paper's ablation), for the KL it reaches.
After each run a *probe* - a fresh D trained on the run's final, frozen exits - says whether those exits really look
like h_N (probe ~50%) or the run's own D is just being outrun each step (run's D <= 50%, probe ~100%).

    python bench/bench_discriminator.py [--steps 150] [--init fresh|copy_last] [--disc-hidden 256] [--disc-r1 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' offline tokenizer and shapes
from training_helpers import make_image_processor, make_tokenizer, write_shapes

from freevlm.tiny import tiny_blip2
from freevlm.training import (
    CaptionDataset,
    ExitTrainConfig,
    FinetuneConfig,
    evaluate_exits,
    finetune,
    load_coco_captions,
    split_records,
    train_exits,
)
from freevlm.training.data import CaptionCollator
from freevlm.training.exits import discriminator_loss, make_discriminators


def shapes_setup(folder: Path):
    """The fixture of tests/test_training_exits.py: a tiny OPT BLIP-2 fine-tuned on 72 shapes captions, 24 held out."""
    records = load_coco_captions(write_shapes(folder / "data", 96))
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_blip2("opt", seed=0)
    tok, proc = make_tokenizer("opt"), make_image_processor()
    train_set, dev_set = (CaptionDataset(r, tok, proc, model.config) for r in (train, dev))
    finetune(
        model,
        train_set,
        FinetuneConfig(
            output_dir=str(folder / "ft"),
            max_steps=40,
            batch_size=8,
            lr=3e-3,
            warmup_steps=5,
            train_lm=True,
            tensorboard=False,
            progress=False,
            checkpoint_every=10_000,
        ),
    )
    return model, train_set, dev_set


def run(model, train_set, dev_set, folder: Path, args, **kw) -> tuple[object, list[tuple[int, dict]]]:
    """Train exits with the real trainer; returns them and the held-out metrics every `--every` steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = ExitTrainConfig(
        output_dir=str(folder),
        exit_layers=(1, 2),
        init=args.init,
        anchor="kd",
        max_steps=args.steps,
        batch_size=8,
        lr=1e-3,
        disc_lr=1e-3,
        disc_hidden=args.disc_hidden,
        warmup_steps=5,
        eval_every=args.every,
        progress=False,
        checkpoint_every=10_000,
        log_every=args.every,
        **kw,
    )
    ee = train_exits(model, train_set, config, dev_set=dev_set)
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("dev/")]
    rows: dict[int, dict] = {}
    for tag in tags:
        for e in events.Scalars(tag):
            rows.setdefault(e.step, {})[tag.removeprefix("dev/")] = e.value
    return ee, sorted(rows.items())


def probe(ee, train_set, dev_set, args) -> dict[str, float]:
    """A fresh D per exit trained `--probe-steps` steps on the frozen exits; its held-out accuracy."""
    torch.manual_seed(1)
    discs = make_discriminators(ee, args.disc_hidden)
    opt = torch.optim.AdamW(discs.parameters(), lr=1e-3, weight_decay=0.0)
    collate = CaptionCollator.for_model(ee.backbone.config)
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.probe_steps):
        batch = collate([train_set[i] for i in torch.randint(len(train_set), (8,), generator=gen).tolist()])
        with torch.no_grad():
            out = ee(batch)
        loss, _ = discriminator_loss(discs, out.final_features, out.features)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    metrics = evaluate_exits(ee, dev_set, discriminators=discs)
    return {k: metrics[f"d_acc/exit_{k}"] for k in ee.exits}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--every", type=int, default=15, help="held-out evaluation every this many steps")
    p.add_argument("--init", default="fresh", help="exit init: fresh (as the test) or copy_last (the default)")
    p.add_argument("--disc-hidden", type=int, default=256, help="D's hidden size (the paper: 3072)")
    p.add_argument("--disc-r1", type=float, default=0.0, help="R1 penalty on D in the GAN runs (0: the paper's GAN)")
    p.add_argument("--probe-steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = {
        "D alone (exits frozen)": dict(adv_weight=0.0, anchor_weight=0.0),
        "GAN+KD w=1.0": dict(adv_weight=1.0, disc_r1=args.disc_r1),
        "GAN+KD w=0.1": dict(adv_weight=0.1, disc_r1=args.disc_r1),
        "KD only": dict(adversarial=False),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model, train_set, dev_set = shapes_setup(Path(tmp))
        print(
            f"init={args.init} disc_hidden={args.disc_hidden} disc_r1={args.disc_r1} steps={args.steps} lr=1e-3, "
            f"held-out: {len(dev_set)} captions"
        )
        summary = []
        for name, kw in runs.items():
            ee, rows = run(model, train_set, dev_set, Path(tmp) / f"run{len(summary)}", args, **kw)
            keys = list(ee.exits)
            print(f"\n== {name}")
            if "d_acc/exit_1" in rows[0][1]:
                print(
                    "step  "
                    + "  ".join(f"D acc e{k}" for k in keys)
                    + "  "
                    + "  ".join(f"D loss e{k}" for k in keys)
                    + "  "
                    + "  ".join(f"KL e{k}" for k in keys)
                )
            for step, m in rows:
                d = "  ".join(f"{m[f'd_acc/exit_{k}']:8.3f}" for k in keys if f"d_acc/exit_{k}" in m)
                dl = "  ".join(f"{m[f'd_loss/exit_{k}']:9.3f}" for k in keys if f"d_loss/exit_{k}" in m)
                kl = "  ".join(f"{m[f'kl/exit_{k}']:6.4f}" for k in keys)
                print(f"{step:4d}  {d}  {dl}  {kl}" if d else f"{step:4d}  KL {kl}")
            probed = probe(ee, train_set, dev_set, args)
            final = rows[-1][1]
            summary.append(
                (
                    name,
                    [final.get(f"d_acc/exit_{k}") for k in keys],
                    [probed[k] for k in keys],
                    [final[f"kl/exit_{k}"] for k in keys],
                )
            )
        print("\nsummary (held-out, exits 1 and 2)")
        print(f"{'run':24s} {'run D acc':>14s} {'probe D acc':>14s} {'KL(p_i||p_N)':>16s}")
        for name, acc, probed, kl in summary:
            acc_s = " ".join("  -  " if a is None else f"{a:5.2f}" for a in acc)
            print(
                f"{name:24s} {acc_s:>14s} {' '.join(f'{a:5.2f}' for a in probed):>14s} "
                f"{' '.join(f'{v:7.4f}' for v in kl):>16s}"
            )


if __name__ == "__main__":
    main()
