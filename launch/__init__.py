"""Launchers and the `unison` command line: they produce a distributed environment and drive the
engine's Worker.

- cli: the commands (generate, batch, plan, calibrate, make-tiny, slurm)
- dist: DistEnv for torchrun, Ray and Slurm; failure: the watcher that ends every rank when one fails
- jobs (the batch's JSONL and manifest), batch (one process, torchrun), ray_batch, runs, slurm/
- plan: `unison plan`'s input and table; calibrate, cache_calibration: GPU-suite and cache calibration
- toplevel/: the `unison` package itself (its __init__ and __main__)
"""
