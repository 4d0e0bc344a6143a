"""Instruction tuning on Alpaca-format data; prints generations before vs after fine-tuning.

Runs `gpt2lora.tasks.train_run` with the shared `gpt2lora train` flags and prints the result table.
Try `python examples/instruction.py --smoke --data-root ../shared/data` for a seconds-long check on a CPU.
"""

from __future__ import annotations

import sys

from gpt2lora.cli import example_main

TASKS = ("alpaca", "alpaca_2k", "alpaca_gpt4_demo", "llms_from_scratch_instruct")

if __name__ == "__main__":
    sys.exit(example_main(__doc__.splitlines()[0], TASKS, default_task="alpaca_2k"))
