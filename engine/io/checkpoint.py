"""Step checkpoints: a killed render loses at most `output.checkpoint_every` steps.

What is saved, at the boundary after every N-th step (never after the last): everything the loop
needs to continue exactly as if it had not stopped, so the resumed video's final latents are
bit-identical to an uninterrupted render's:
- the latents and the index of the next step;
- the scheduler's internal state: its `__dict__` without the config (UniPC / DPM++ multistep
  history: model_outputs, timestep_list, lower_order_nums, last_sample, this_order, step index…);
- every cache's state per context (First-Block Cache: previous first-block residual, tail
  residual, skips in a row, decision log; Pyramid Attention Broadcast: cached attention outputs
  and call counts) via `Cache.state_dict()`;
- the global RNG states (CPU, and CUDA where there is one), for schedulers that draw noise;
- a fingerprint of everything that changes the numbers: model, sampling, parallel layout (without
  the timeout), cache and Wan 2.2's cache_2 where it differs from cache (without verify), world
  size, torch and diffusers versions. Output paths and progress are not in it.

Who writes what: each rank writes only what it alone holds, in its own file `rank{r}.step{s}.pt`
(torch.save, written and verified by engine/io/writes.py's commit): its caches' state (rank-local:
First-Block Cache's residuals are per sequence shard, a CFG half holds only its branch's context)
and its RNG state. The latents and the scheduler's state are the same on every rank, so rank 0
alone writes them, in its file; on resume rank 0 reads them and broadcasts them to the others
(one broadcast over the engine's ranks), so no rank reads another's file and the folder may be
node-local. Rank 0 also writes `manifest.json` (fingerprint, step, world size; for people and
tools, not read on resume). Bytes per checkpoint: rank 0 latents + scheduler history + its cache
state; every other rank its cache state (benchmarks/checkpoint_cost.py). A rank keeps its last two
checkpoints, so that a kill between two ranks' renames still leaves a step every rank has: on
resume the ranks agree (one all_gather of each rank's steps) on the latest step all of them hold.

Not saved: displaced patch parallelism's stale K/V and PipeFusion's K/V buffers (every render
starts with them empty). So the first step a resumed render computes is a warm-up step, as the
first time a layer runs: displaced patches exchange K/V synchronously, PipeFusion passes the whole
sequence through its stages as one patch; the steps after it are displaced or pipelined again. If
that step is inside `parallel.patch_warmup_steps`, the uninterrupted render warmed up there too and
the resumed one is bit-identical; past the warm-up it has one exact step more, and differs from the
uninterrupted render by that step's worth of staleness (tests/test_checkpoint.py measures it: less
than the uninterrupted render's own difference from an exact one).

Resume (`output.resume`): `auto` continues from a checkpoint whose fingerprint matches and ignores
one that does not with a one-line warning; `require` refuses (UserError, one line) to run without a
matching checkpoint; `never` starts afresh. Checkpoints are looked for only by renders that write
them (`checkpoint_every > 0`, or a render that SIGTERM or SIGUSR1 may stop: engine/io/stop.py writes a
checkpoint at the step where every rank stops, whatever N) or require them. The folder is removed
once the render's results are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from unison.engine.config import RunConfig
from unison.engine.targets import CHECKPOINT_MARKER, CHECKPOINT_NAMES, checkpoint_folder
from unison.engine.io.writes import commit, failure_reason, text_write, torch_write
from unison.engine.errors import UserError, WriteFailed

log = logging.getLogger("unison")

FORMAT = 2
KEEP = 2
"""Checkpoints each rank keeps (the latest and the one before it)."""
_NAME = re.compile(r"rank(\d+)\.step(\d+)\.pt")


def mark_folder(folder: Path) -> None:
    """The marker that makes `folder` known as unison's (engine/targets.py), before the first
    checkpoint. Every rank may create it at once (the folder may be node-local): an exclusive
    create, not a replacing write."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / CHECKPOINT_MARKER, "a") as f:
            if f.tell() == 0:
                f.write("step checkpoints written by unison; removed with them\n")
    except OSError as err:
        raise WriteFailed(f"could not write {folder / CHECKPOINT_MARKER}: {failure_reason(err)}") from err


def fingerprint(config: RunConfig, *, world_size: int) -> str:
    """sha256 of everything that changes the numbers (not output paths, progress or timeouts)."""
    import diffusers

    model = asdict(replace(config.model, offload=False))
    parallel = asdict(replace(config.parallel, timeout_s=0.0))
    cache = asdict(replace(config.cache, verify=False))
    data = {"model": model, "sampling": asdict(config.sampling), "parallel": parallel, "cache": cache,
            "world_size": world_size, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "format": FORMAT}
    if config.lora:  # unset: the same run as before LoRAs existed
        data["lora"] = [asdict(entry) for entry in config.lora]  # each file's SHA-256 among them
    if config.cache_2 is not None and replace(config.cache_2, verify=False) != replace(config.cache, verify=False):
        data["cache_2"] = asdict(replace(config.cache_2, verify=False))  # unset or equal: the same run as before
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`fn` applied to every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def _cpu(obj: Any) -> Any:
    return _map(obj, lambda t: t.detach().to("cpu", copy=True))


def scheduler_state(scheduler) -> dict[str, Any]:
    """The scheduler's instance state without its config (which the pipeline already has)."""
    return _cpu({k: v for k, v in vars(scheduler).items() if k != "_internal_dict"})


def load_scheduler_state(scheduler, state: dict[str, Any], device: torch.device) -> None:
    """Put the saved state back; a tensor goes to the device the fresh scheduler keeps that
    attribute on (UniPC keeps its sigmas on the CPU on purpose), a history tensor to `device`."""
    for key, value in state.items():
        current = getattr(scheduler, key, None)
        target = current.device if isinstance(current, torch.Tensor) else device
        setattr(scheduler, key, _map(value, lambda t: t.to(target)))


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Resumed:
    step: int
    """Index of the first step still to run."""
    latents: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    """What the loop saved beside the latents (the same on every rank; diffusion forcing: the
    window, each frame's scheduler, the noise generators), on the CPU."""


@dataclass
class Checkpoints:
    """One render's checkpoints on this rank (engine/render.py makes it; the loop calls it)."""

    folder: Path
    every: int
    resume: str
    fingerprint: str
    rank: int = 0
    world_size: int = 1
    group: object = None
    """All the engine's ranks (None on one rank): they agree on the step to resume from."""
    written: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, config: RunConfig, *, rank: int, world_size: int, group,
               on_stop: bool = False) -> "Checkpoints | None":
        """None when the render neither writes nor requires checkpoints. `on_stop`: it may write one
        when stopped by a signal (engine/io/stop.py), so it also looks for one to resume from."""
        out = config.output
        if out.checkpoint_every < 0:
            raise UserError(f"output.checkpoint_every must be at least 0 (0: off), got {out.checkpoint_every}")
        if out.checkpoint_every == 0 and out.resume != "require" and not on_stop:
            return None
        return cls(folder=checkpoint_folder(out), every=out.checkpoint_every, resume=out.resume,
                   fingerprint=fingerprint(config, world_size=world_size), rank=rank, world_size=world_size,
                   group=group)

    # -- resume -------------------------------------------------------------------------------
    def _names(self) -> list[str]:
        """The folder's entries (none when it is not there: another rank may just have removed it)."""
        try:
            return os.listdir(self.folder)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _steps(self) -> list[int]:
        """Steps this rank has a checkpoint file for, latest first."""
        names = (_NAME.fullmatch(name) for name in self._names())
        return sorted({int(m.group(2)) for m in names if m and int(m.group(1)) == self.rank}, reverse=True)

    def _path(self, step: int) -> Path:
        return self.folder / f"rank{self.rank}.step{step}.pt"

    def _all(self, value: Any) -> list[Any]:
        if self.group is None:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def restore(self, scheduler, caches: dict, device: torch.device) -> Resumed | None:
        """Load the latest checkpoint every rank has into `scheduler` and `caches` (after the loop
        has set the timesteps and reset the caches). None: start from step 0. Collective."""
        if self.resume == "never":
            return None
        common = set.intersection(*(set(steps) for steps in self._all(self._steps())))
        step = max(common) if common else None
        data, problem = None, None
        if step is None:
            problem = f"no checkpoint in {self.folder}"
        else:
            try:
                data = torch.load(self._path(step), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a file that does not load is not a checkpoint
                problem = f"checkpoint {self._path(step)} does not load ({type(err).__name__})"
            else:
                theirs = data.get("fingerprint") if isinstance(data, dict) else None
                if theirs != self.fingerprint:
                    problem = (f"checkpoint in {self.folder} (step {step}) is from a different run "
                               f"(fingerprint {theirs}, this run {self.fingerprint})")
        problems = [p for p in self._all(problem) if p is not None]
        if problems:
            if self.resume == "require":
                raise UserError(f"output.resume=require: {problems[0]}")
            if step is not None and self.rank == 0:
                log.warning("not resuming: %s; starting from step 0", problems[0])
            return None
        shared = self._from_rank0(data)
        if scheduler is not None:
            load_scheduler_state(scheduler, shared["scheduler"], device)
        for name, cache in caches.items():
            cache.load_state_dict(_map(data["caches"][name], lambda t: t.to(device)))
        load_rng_state(data["rng"])
        self.written = [step]
        if self.rank == 0:
            log.info("resuming from the checkpoint after step %d in %s", step, self.folder)
        return Resumed(step=step, latents=shared["latents"].to(device), extra=shared.get("extra") or {})

    def _from_rank0(self, data: dict[str, Any]) -> dict[str, Any]:
        """The latents and scheduler state rank 0 saved (in its file alone), on every rank."""
        shared = [{"latents": data["latents"], "scheduler": data["scheduler"], "extra": data.get("extra")}
                  if self.rank == 0 else None]
        if self.group is not None:
            dist.broadcast_object_list(shared, group=self.group, group_src=0)
        return shared[0]

    # -- save ---------------------------------------------------------------------------------
    def due(self, index: int, total: int) -> bool:
        """Is the end of step `index` a checkpoint boundary (every N steps, never the last)?"""
        done = index + 1
        return self.every > 0 and done % self.every == 0 and done < total

    def save(self, index: int, latents: torch.Tensor, scheduler, caches: dict, *, extra: dict | None = None) -> None:
        """Write the checkpoint after step `index` (this rank's file; rank 0 also the manifest).
        `extra`: more loop state, the same on every rank (rank 0 writes it; Resumed.extra)."""
        done = index + 1
        payload = {"format": FORMAT, "fingerprint": self.fingerprint, "step": done, "rank": self.rank,
                   "world_size": self.world_size,
                   "caches": {name: _cpu(cache.state_dict()) for name, cache in caches.items()}, "rng": rng_state()}
        if self.rank == 0:  # the same on every rank: written once (restore broadcasts them)
            payload.update(latents=_cpu(latents), scheduler=scheduler_state(scheduler) if scheduler is not None else {})
            if extra:
                payload["extra"] = _cpu(extra)
        mark_folder(self.folder)
        writes = [torch_write(self._path(done), payload)]
        if self.rank == 0:
            manifest = {"fingerprint": self.fingerprint, "step": done, "world_size": self.world_size,
                        "files": [f"rank{r}.step{done}.pt" for r in range(self.world_size)]}
            writes.append(text_write(self.folder / "manifest.json", json.dumps(manifest, indent=1) + "\n"))
        commit(*writes)
        # Files from another run (a fingerprint this render ignored) and all but the last KEEP.
        self.written.append(done)
        for step in self._steps():
            if step not in self.written[-KEEP:]:
                self._path(step).unlink(missing_ok=True)

    def wait_for_all(self) -> None:
        """Every rank has committed its checkpoint (a barrier over the engine's ranks)."""
        if self.group is not None:
            dist.barrier(group=self.group)

    # -- finished windows (diffusion forcing) ---------------------------------------------------------
    def window_path(self, window: int) -> Path:
        """This rank's copy of a finished window's latents (engine/windows.WindowStore)."""
        return self.folder / f"rank{self.rank}.window{window}.pt"

    def remove(self) -> None:
        """The render's results are written: this rank's checkpoints go (and temporaries a killed
        writer left), and the folder once empty."""
        for step in self._steps():
            self._path(step).unlink(missing_ok=True)
        windows = re.compile(rf"rank{self.rank}\.window\d+\.pt")
        for name in self._names():
            if windows.fullmatch(name):
                (self.folder / name).unlink(missing_ok=True)
        if self.rank == 0:
            (self.folder / "manifest.json").unlink(missing_ok=True)
        mine = re.compile(rf"\.rank{self.rank}\.(step|window)\d+\.[a-z0-9_]{{8}}\.part\.pt"
                          r"|\.unison-checkpoints\.[a-z0-9_]{8}\.part\.txt"
                          + (r"|\.manifest\.[a-z0-9_]{8}\.part\.json" if self.rank == 0 else ""))
        for name in self._names():
            if mine.fullmatch(name):
                (self.folder / name).unlink(missing_ok=True)
        # The marker goes with the last rank's files, not before: a rank already at its next
        # render's checks (targets.check_checkpoint_folder) while another is still removing
        # (manifest.json last, say) must still see the folder as unison's. Each rank looks after
        # removing its own files, so the last to finish finds none of unison's but the marker
        # (on a node-local folder, the node's last rank); files of someone else's stay.
        left = [n for n in self._names() if n != CHECKPOINT_MARKER and CHECKPOINT_NAMES.fullmatch(n)]
        if not left:
            (self.folder / CHECKPOINT_MARKER).unlink(missing_ok=True)
            try:
                self.folder.rmdir()  # never with another's files in it
            except OSError:
                pass
