"""What one request joining a running batch costs, with ragged layer calls and without, side by side in one run.

    cd bench && FREEVLM_CACHE=<the demo's cache> PYTHONPATH=.. python bench_join.py [--rows 4 8] [--joins 30]

`--rows` requests (the demo's test images and caption prompt, full model, EOS off) decode in a `Scheduler`; then
one request at a time is submitted (two new tokens), and the scheduler iteration it joins in (image, prompt, the
decode step) and the next one are timed in CPU milliseconds (one torch thread). Its prompt rides in the decode
step's layer calls with ragged calls (`Scheduler(ragged=True)`), or is encoded in a window of its own before it
(`ragged=False`); both make the same tokens, two per joining request (one in each timed iteration: ragged, the first
from the step its prompt rode in). Prints the medians over `--joins` of the two iterations together and the plain
step between joins, per turn, the two settings taking turns. The model is the demo's when its cache is there, else a
random one of its size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_serving import model_and_requests

from freevlm.serving import Scheduler


def join_costs(ee, requests, rows: int, joins: int, ragged: bool) -> tuple[float, float]:
    """Median CPU ms of (the iteration a request joins in + the next one, a plain step) over `joins` joins."""
    steps = 3 * joins + 1  # the first rows decode through all of them
    scheduler = Scheduler(ee, max_batch=rows + 2, max_len=64 + steps, ragged=ragged)
    options = dict(threshold=1.0, mode="full", eos_token_id=[])
    for _, pv, ids, _ in requests[:rows]:
        scheduler.submit(pv, ids, max_new_tokens=steps + 1, **options)
    scheduler.step()
    joined, plain = [], []
    for i in range(joins):
        _, pv, ids, _ = requests[rows + i % (len(requests) - rows)]
        scheduler.submit(pv, ids, max_new_tokens=2, **options)
        start = time.process_time()
        scheduler.step()
        scheduler.step()
        joined.append(time.process_time() - start)
        start = time.process_time()
        scheduler.step()
        plain.append(time.process_time() - start)
    return statistics.median(joined) * 1000, statistics.median(plain) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 8], help="requests decoding when one joins")
    parser.add_argument("--joins", type=int, default=30)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ee, name, requests, _ = model_and_requests(max(args.rows) + 8, (24, 24), 7)
    print(f"{name}: CPU ms, medians of {args.joins} joins (a join's two iterations, and a plain step)")
    for rows in args.rows:
        for turn in range(args.turns):
            ragged, plain_ragged = join_costs(ee, requests, rows, args.joins, True)
            old, plain_old = join_costs(ee, requests, rows, args.joins, False)
            print(
                f"  {rows:2d} rows, turn {turn + 1}: ragged {ragged:5.1f} (step {plain_ragged:4.1f})  old calls "
                f"{old:5.1f} (step {plain_old:4.1f})  saved per join {old - ragged:4.1f} ms"
            )


if __name__ == "__main__":
    main()
