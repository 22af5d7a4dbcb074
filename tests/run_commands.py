"""Run `freevlm` commands one after another in this process (what `accelerate launch` starts, for
test_eval_scale.py): argv lists from a JSON file. Prints, last, per command, how many records each process decoded
and how many VisDial rounds' options it scored, gathered from every process."""

import json
import sys
from pathlib import Path

from freevlm.cli import main
from freevlm.eval import evaluate, generate
from freevlm.eval.processes import Processes

decoded, scored = [], []
decode_batch, score_options = generate._decode_batch, evaluate.option_log_likelihoods_many


def counting(processor, early, full, *args, **kwargs):
    rows = decode_batch(processor, early, full, *args, **kwargs)
    decoded.append(len(rows))
    return rows


def counting_rounds(*args, **kwargs):
    scored.append(1)
    return score_options(*args, **kwargs)


generate._decode_batch, evaluate.option_log_likelihoods_many = counting, counting_rounds
counts = []
for argv in json.loads(Path(sys.argv[1]).read_text()):
    if main(argv) != 0:
        sys.exit(1)
    processes = Processes.current()
    gathered = processes.gather([(processes.rank, len(decoded), sum(decoded), len(scored))])
    counts.append({str(rank): {"decoded": n, "scored": s} for rank, _, n, s in gathered})
    decoded.clear(), scored.clear()
if Processes.current().is_main:
    print(json.dumps(counts))
