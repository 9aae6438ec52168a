#!/usr/bin/env python
"""Score a continual-learning run (AP, F.Ra, FWT, BWT): the command line of `sapt.score`.

    python score.py RUN [SINGLE_RUN] [--root logs_and_outputs] [--metric auto|rougeL|exact_match]
                    [--results_dir results] [--compare RUN ...]
    python score.py --aggregate 'RUN_seed*' [--single SINGLE_RUN]
    python score.py --compare 'sapt_seed*' 'seq_lora_seed*' [--single SINGLE_RUN]

The same as `python -m sapt score ...`, which generated pipelines call; see `sapt/experiments/score.py` for the
files it writes.
"""

import sys

from sapt.experiments.score import main

if __name__ == "__main__":
    sys.exit(main())
