"""Entry point for test_signals.py: `unison generate` whose rank SIGNAL_RANK (default 0) sends
itself SIGNAL (TERM or USR1) from inside its SIGNAL_AT-th transformer call, so the signal lands
mid-step, mid-run, at a known step. Launched once per rank, as srun would launch it."""

from __future__ import annotations

import os
import signal
import sys

import torch

calls = 0


def signal_on_call(module, args):
    global calls
    if type(module).__name__ == "WanTransformer3DModel":
        calls += 1
        if calls == int(os.environ["SIGNAL_AT"]):
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ["SIGNAL"]))


if __name__ == "__main__":
    if os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK", "0"):
        torch.nn.modules.module.register_module_forward_pre_hook(signal_on_call)
    from unison.launch.cli import entry

    sys.argv[0] = "unison"
    entry()  # as the `unison` command does
