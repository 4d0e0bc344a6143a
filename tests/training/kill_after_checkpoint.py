"""Runs ``gpt2lora.app.cli`` under torchrun, and SIGKILLs every worker right after the step checkpoint named by
``GPT2LORA_TEST_KILL_AFTER_STEP`` is on disk: a crash at a known point, however fast the machine is.

Used by ``test_fsdp_cli.py`` in place of ``-m gpt2lora.app.cli``; the arguments are the CLI's own.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

import torch.distributed as dist

from gpt2lora.training.trainer import Trainer

KILL_AFTER_STEP = int(os.environ["GPT2LORA_TEST_KILL_AFTER_STEP"])
_save_step_checkpoint = Trainer._save_step_checkpoint


def _save_then_die(self: Trainer) -> None:
    _save_step_checkpoint(self)
    if self._position.step == KILL_AFTER_STEP:
        if dist.is_initialized():
            dist.barrier()  # rank 0 has written the checkpoint; no rank dies before that
        os.kill(os.getpid(), signal.SIGKILL)


Trainer._save_step_checkpoint = _save_then_die  # type: ignore[method-assign]
sys.argv = ["gpt2lora", *sys.argv[1:]]
runpy.run_module("gpt2lora.app.cli", run_name="__main__", alter_sys=True)
