"""Errors shared by every layer; the CLI prints each on one line (exit 2: bad input; exit 1: a peer rank
failed; exit 74, sysexits' EX_IOERR: a result could not be written; exit 143: preempted by a signal,
resumable)."""


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


class Preempted(RuntimeError):
    """SIGTERM or SIGUSR1 reached a rank during a render: every rank finished the same step, wrote a
    step checkpoint there and stopped (engine/io/stop.py). Not a failure: the CLI exits with 143
    (128 + SIGTERM), which batch drivers and Slurm's requeue read as "preempted, resumable", and the
    same command resumes from the checkpoint."""

    def __init__(self, step: int, steps: int, folder: str):
        super().__init__(step, steps, folder)  # as args, so the error pickles (Ray carries it)
        self.step, self.steps, self.folder = step, steps, folder

    def __str__(self) -> str:
        return (f"preempted at step {self.step} of {self.steps}; checkpoint in {self.folder}; "
                f"run the same command to resume")


class BatchPreempted(Preempted):
    """SIGTERM or SIGUSR1 reached a batch's driver (Ray): no job started after it, and every job
    that was running stopped at a step checkpoint. The CLI exits with 143; the same command resumes."""

    def __init__(self, jobs: list[str]):
        RuntimeError.__init__(self, jobs)
        self.jobs = list(jobs)

    def __str__(self) -> str:
        held = (f"{len(self.jobs)} running jobs stopped at a step checkpoint ({', '.join(self.jobs)})"
                if self.jobs else "no job was running")
        return f"batch preempted: {held}; run the same command to resume"
