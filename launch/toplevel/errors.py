"""Errors shared by every layer; the CLI prints each on one line (exit 2: bad input; exit 1: a peer rank
failed; exit 74, sysexits' EX_IOERR: a result could not be written)."""


class UserError(ValueError):
    """Bad input, found before any heavy work. The CLI prints it on one line and exits with 2."""


class PeerFailed(RuntimeError):
    """Another rank failed, and this rank stopped because of it; the message names that rank."""


class WriteFailed(RuntimeError):
    """A result (video, config, latents, manifest line) could not be written completely: the encoder
    failed, the disk is full, a file-size limit was hit, or the file read back short. Nothing was
    left at its path (the temporary is removed). The CLI prints it on one line and exits with 74."""


class RenderFailed(RuntimeError):
    """A render stopped for a reason that the same input brings back on every attempt: a batch
    records the job failed without retrying it. The CLI prints it on one line and exits with 1."""


class NonFiniteLatents(RenderFailed):
    """The latents held NaN or infinity after a denoising step (guidance too large, float16
    overflow, a broken checkpoint). Raised before anything is decoded or written (engine/loop.py
    FiniteCheck). Every rank holds the same latents, so every rank raises it at the same point."""

    def __init__(self, step: int, steps: int, expert: str):
        super().__init__(step, steps, expert)  # as args, so the error pickles (Ray carries it)
        self.step, self.steps, self.expert = step, steps, expert

    def __str__(self) -> str:
        return (f"the latents hold NaN or infinity after step {self.step} (counted from 0, of {self.steps}), "
                f"expert {self.expert}; stopped before decoding, no video written (try a lower guidance, "
                f"or bfloat16/float32 instead of float16)")
