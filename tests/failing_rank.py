"""Entry point for test_failure.py: `unison generate` with rank FAIL_RANK raising in its second
transformer block call (or, with FAIL_MODE=kill, killing itself with SIGKILL there, leaving no
word). Launched once per rank with RANK/WORLD_SIZE/MASTER_* set, as srun or Ray would launch it
(no torchrun agent to kill the survivors)."""

from __future__ import annotations

import os
import signal
import sys

import torch

calls = 0


def fail_on_second_block(module, args):
    global calls
    if type(module).__name__ == "WanTransformerBlock":
        calls += 1
        if calls == 2 and os.environ.get("FAIL_MODE") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if calls == 2:
            raise RuntimeError("injected failure in a transformer block")


if __name__ == "__main__":
    if os.environ["RANK"] == os.environ["FAIL_RANK"]:
        torch.nn.modules.module.register_module_forward_pre_hook(fail_on_second_block)
    from unison.launch.cli import main

    sys.exit(main(sys.argv[1:]))
