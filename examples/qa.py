"""SQuAD as answer generation: context + question -> answer; greedy decoding scored by EM / F1.

Runs `gpt2lora.tasks.train_run` with the shared `gpt2lora train` flags and prints the result table.
Try `python examples/qa.py --smoke --data-root ../shared/data` for a seconds-long check on a CPU.
"""

from __future__ import annotations

import sys

from gpt2lora.cli import example_main

TASKS = ("squad", "squad_v1")

if __name__ == "__main__":
    sys.exit(example_main(__doc__.splitlines()[0], TASKS, default_task="squad"))
