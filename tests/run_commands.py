"""Run `freevlm` commands one after another in this process (what `accelerate launch` starts, for
test_eval_scale.py): argv lists from a JSON file. Prints, last, how many records this process decoded in the first
command, gathered from every process."""

import json
import sys
from pathlib import Path

from freevlm.cli import main
from freevlm.eval import generate
from freevlm.eval.processes import Processes

decoded = []
decode_batch = generate._decode_batch


def counting(processor, early, full, *args, **kwargs):
    rows = decode_batch(processor, early, full, *args, **kwargs)
    decoded.append(len(rows))
    return rows


generate._decode_batch = counting
first = True
for argv in json.loads(Path(sys.argv[1]).read_text()):
    if main(argv) != 0:
        sys.exit(1)
    if first:
        processes = Processes.current()
        counts = processes.gather([(processes.rank, sum(decoded))])
        first = False
if Processes.current().is_main:
    print(json.dumps({str(rank): n for rank, n in counts}))
