"""The `unison` command line: generate, calibrate, batch, serve, plan, slurm, make-tiny.

Bad input is reported as one line on stderr with exit code 2, before any weights load. A result
that could not be written (WriteFailed: the encoder failed, a full disk, a file-size limit) is one
line too, with exit code 74 (EX_IOERR in sysexits.h), and nothing is left at its path. SIGTERM or
SIGUSR1 during a render (a scheduler preempting the job; Slurm's `--signal`) is a clean stop: every
rank finishes the same step, writes a step checkpoint there and exits with 143 (128 + SIGTERM,
"preempted, resumable"), printing `unison: preempted at step S of N; checkpoint in DIR; run the
same command to resume`; a batch records the attempt `preempted` and exits 143 too. A second signal
ends the process at once. Ctrl-C exits with 130. `unison serve` is the exception: SIGTERM or Ctrl-C
is how a server is stopped, so it stops cleanly (its running job checkpointed, recorded preempted,
resumed at the next start) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from unison.caching import registry
from unison.engine.config import RunConfig, apply_overrides, config_from_dict, load_yaml
from unison.engine.io.stop import (EXIT_PREEMPTED, exit_143_until_the_end, ignore_signals_while_exiting,
                                signals_exit_143)
from unison.engine.io.writes import failure_reason
from unison.engine.errors import PeerFailed, Preempted, RenderFailed, UserError, WriteFailed

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_WRITE = 74
EXIT_INTERRUPTED = 130

# Flag -> config key, for flags that set one field.
_FLAG_KEYS = {
    "model": "model.path",
    "prompt": "sampling.prompt",
    "negative_prompt": "sampling.negative_prompt",
    "image": "sampling.image",
    "last_image": "sampling.last_image",
    "extend": "sampling.extend",
    "scheduler": "sampling.scheduler",
    "flow_shift": "sampling.flow_shift",
    "height": "sampling.height",
    "width": "sampling.width",
    "frames": "sampling.frames",
    "steps": "sampling.steps",
    "guidance": "sampling.guidance",
    "guidance_2": "sampling.guidance_2",
    "seed": "sampling.seed",
    "output": "output.path",
    "save_latents": "output.save_latents",
    "ulysses": "parallel.ulysses",
    "ring": "parallel.ring",
    "cfg_parallel": "parallel.cfg",
    "cache": "cache.kind",
    "cache_2": "cache_2.kind",
    "patch": "parallel.patch",
    "pipefusion": "parallel.patch_mode",
    "shard_weights": "parallel.shard_weights",
    "attention_backend": "parallel.attention_backend",
    "compile": "model.compile",
    "offload": "model.offload",
}


def configs_dir() -> Path:
    """The recipes: configs/ of the checkout (an editable install) or the installed package's
    own copy (a wheel), found the same way: they are the package `unison.configs`."""
    import unison.configs

    return Path(unison.configs.__file__).resolve().parent


def default_config_path() -> Path:
    return configs_dir() / "tiny-wan.yaml"


def _find_config(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"config file is a folder: {name}")
    bundled = configs_dir() / name
    if bundled.is_file():
        return bundled
    raise UserError(f"config file not found: {name} (nor under {configs_dir()})")


def input_files(args: argparse.Namespace) -> dict[str, str]:
    """Files the command reads that its config does not name (the recipe): no output may replace them."""
    return {"--config": str(_find_config(args.config))} if getattr(args, "config", None) else {}


def build_config(args: argparse.Namespace) -> RunConfig:
    """Defaults <- YAML (--config, else the embedded default unless --model is given) <- flags <- --set."""
    if args.config:
        config = load_yaml(_find_config(args.config))
    elif args.model:
        config = RunConfig()  # a real folder: its family is detected, sampling from its defaults
    else:
        config = load_yaml(default_config_path())
    nested: dict[str, dict] = {}
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            section, field_name = key.split(".")
            nested.setdefault(section, {})[field_name] = value
    if getattr(args, "parallel", None) == "auto":
        nested.setdefault("parallel", {})["auto"] = True
    if getattr(args, "lora", None):
        nested["lora"] = list(args.lora)
    config = config_from_dict(nested, base=config)
    return apply_overrides(config, args.set or [])


def resolve_auto(config: RunConfig, *, world_size: int, rank: int) -> RunConfig:
    """parallel.auto: the recommended layout for `world_size` ranks, named once on rank 0."""
    if not config.parallel.auto:
        return config
    from unison.launch.plan import auto_layout

    config, line = auto_layout(config, world_size=world_size)
    if rank == 0:
        print(f"unison: {line}", file=sys.stderr)
    return config


def _add_run_options(p, *, single: bool) -> None:
    """Flags shared by generate and batch (batch jobs bring their own prompt and output)."""
    p.add_argument("--config", help="YAML run recipe (a path, or a name under configs/)")
    p.add_argument("--model", help="local diffusers-format model folder")
    if single:
        p.add_argument("--prompt")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--image", metavar="PATH", help="image-to-video: the first frame's picture")
    p.add_argument("--last-image", dest="last_image", metavar="PATH",
                   help="first-last-frame: the last frame's picture (with --image)")
    p.add_argument("--extend", metavar="VIDEO",
                   help="diffusion forcing (skyreels-v2-df): continue this video (needs sampling.overlap_frames)")
    p.add_argument("--scheduler", help="sampler: default (the folder's), unipc, dpm++, deis, euler")
    p.add_argument("--flow-shift", dest="flow_shift", type=float, help="the sampler's flow shift (Wan 480p 3.0, 720p 5.0)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="frame count, 4k+1")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float,
                   help="guidance scale (Wan: CFG; HunyuanVideo: embedded guidance)")
    p.add_argument("--guidance-2", dest="guidance_2", type=float,
                   help="Wan 2.2 A14B: guidance of the low-noise expert")
    p.add_argument("--seed", type=int)
    if single:
        p.add_argument("--output", help="output .mp4 path")
        p.add_argument("--save-latents", dest="save_latents", help="torch.save the final latents here")
    p.add_argument("--ulysses", type=int, help="Ulysses (all-to-all) degree")
    p.add_argument("--ring", type=int, help="ring-attention degree")
    p.add_argument("--cfg-parallel", dest="cfg_parallel", action="store_const", const=2,
                   help="run the two guidance branches on two halves of the ranks")
    p.add_argument("--patch", type=int, help="patch-parallel degree (displaced patches; with --pipefusion, stages)")
    p.add_argument("--pipefusion", action="store_const", const="pipefusion",
                   help="patch parallelism as PipeFusion: the blocks split into --patch stages")
    p.add_argument("--shard-weights", dest="shard_weights", action="store_const", const=True,
                   help="shard the transformer blocks' weights over the ranks (FSDP2)")
    p.add_argument("--attention-backend", dest="attention_backend",
                   choices=("auto", "sdpa", "flash-attn", "sage", "xfuser"), help="local attention kernel")
    p.add_argument("--compile", action="store_const", const="blocks",
                   help="torch.compile each transformer block once (regional compilation)")
    p.add_argument("--offload", action="store_const", const=True,
                   help="text encoders to the CPU after encoding; Wan 2.2's idle expert on the CPU")
    p.add_argument("--cache", metavar="KIND",
                   help=f"step cache: {', '.join(registry.names())} (its fields: --set cache.FIELD=…)")
    p.add_argument("--cache-2", dest="cache_2", metavar="KIND",
                   help="Wan 2.2 A14B: the low-noise expert's step cache (default: --cache's; its fields: "
                        "--set cache_2.FIELD=…)")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA (.safetensors) fused into the weights, at SCALE (default 1); repeat to stack them; "
                        "replaces the recipe's lora list (expert per entry: the recipe's lora section)")
    p.add_argument("--parallel", choices=("auto",),
                   help="auto: the layout `unison plan` recommends for the world size (degrees given are kept)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config field")
    p.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster: local (start one on this machine), "
                   "auto (the cluster this node belongs to) or host:port")
    p.add_argument("--ranks-per-engine", dest="ranks_per_engine", type=int,
                   help="with --ray: ranks (GPUs) per engine (default: the product of the parallel degrees)")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="measure a model's MagCache ratios or fit its TeaCache polynomial, "
                       "and write them as a recipe",
                       description="Render once without skipping and write a YAML recipe (then: unison --config "
                       "FILE). --cache magcache: the MagCache ratios measured per step and branch. --cache teacache: "
                       "TeaCache's degree-4 polynomial, fitted to the block stack output's relative change against "
                       "the indicator's, per expert on Wan 2.2 A14B (cache and cache_2).")
    _add_run_options(p, single=True)
    p.add_argument("--out", required=True, help="the recipe to write (YAML)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="render one video", description="Render one video.")
    _add_run_options(p, single=True)
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; load nothing")


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="render a JSONL file of jobs into a folder (resumable)",
                       description="Render every job of a JSONL file (one JSON object per line: prompt, "
                       "optional id, per-job overrides) into DIR/<id>.mp4 and DIR/<id>.yaml, recording each "
                       "attempt in DIR/manifest.jsonl. Running the same command again resumes.")
    p.add_argument("jobs", help="JSONL file of jobs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-retries", dest="max_retries", type=int, default=2,
                   help="attempts after the first before a job is marked failed (default 2)")
    p.add_argument("--engines", type=int, help="with --ray: engines (default: as many as the GPUs hold)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _add_run_options(p, single=False)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve OpenAI's Videos API (/v1/videos) and a status page over the engines",
                       description="Serve OpenAI's Videos API (POST/GET/DELETE /v1/videos, content downloads) and a "
                       "status page at /, rendering with one local engine or Ray engines. Every accepted job is "
                       "on disk (--out) before the response; a restart resumes queued and running jobs.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, printed at start)")
    p.add_argument("--out", required=True, help="the job store: a folder of jobs, videos and the manifest")
    p.add_argument("--token", help="bearer token clients must send (default: $UNISON_SERVE_TOKEN; the environment "
                   "keeps it out of the process list)")
    p.add_argument("--engines", type=int, help="with --ray: engines (default: as many as the GPUs hold)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH[:SCALE]",
                   help="a LoRA requests may pick by NAME (their `lora` field); repeatable")
    p.add_argument("--max-retries", dest="max_retries", type=int, default=2,
                   help="attempts after the first before a job is failed (default 2)")
    p.add_argument("--max-queued-per-client", dest="max_queued_per_client", type=int, default=32,
                   help="unfinished jobs one client address may hold; past it 429 (default 32)")
    p.add_argument("--max-queued", dest="max_queued", type=int, default=1000,
                   help="unfinished jobs the server holds; past it 429 (default 1000)")
    p.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, default=20.0,
                   help="largest request body (a picture upload), MiB; past it 413 (default 20)")
    p.add_argument("--max-picture-side", dest="max_picture_side", type=int, default=4096,
                   help="largest side of an uploaded picture, pixels; past it 413 (default 4096)")
    _add_run_options(p, single=False)


def _add_slurm(sub) -> None:
    p = sub.add_parser("slurm", help="print an sbatch script for this run",
                       description="Print a filled sbatch script: srun torchrun (one engine over every GPU of "
                       "the allocation) or a Ray cluster inside the allocation running `unison batch --ray auto`.")
    p.add_argument("--mode", choices=("torchrun", "ray"), default="torchrun")
    p.add_argument("--config", required=True, help="YAML run recipe for every rank")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, required=True)
    p.add_argument("--cpus-per-gpu", dest="cpus_per_gpu", type=int, default=8)
    p.add_argument("--jobs", help="JSONL file of jobs (batch); without it one video (generate)")
    p.add_argument("--out", help="output folder of the batch")
    p.add_argument("--ranks-per-engine", dest="ranks_per_engine", type=int,
                   help="ray mode: GPUs per engine (default: the config's parallel degrees)")
    p.add_argument("--partition")
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--job-name", dest="job_name", default="unison")


def _skip_share_help() -> str:
    """--skip-share's help, from what each cache kind declares (caching/planning.py)."""
    assumed = ", ".join(f"{k.name} {k.default_skip_share:g}" for k in registry.KINDS.values()
                        if k.default_skip_share is not None)
    counted = ", ".join(k.name for k in registry.KINDS.values() if k.schedule_skip_share is not None)
    return (f"share of steps the cache skips (default: {assumed}, all assumptions"
            + (f"; {counted}: its schedule's)" if counted else ")"))


def _add_plan(sub) -> None:
    from unison.engine.models import checkpoints

    p = sub.add_parser("plan", help="memory, FLOPs, bytes and projected time per rank of every layout over N GPUs",
                       description="For every parallel layout over --gpus N: memory per rank (from shapes), FLOPs "
                       "per step per rank (counted on the meta device), bytes per step per collective, and a "
                       "projected time; ranked, the best that fits marked. Loads no weights and needs no GPU.")
    p.add_argument("--family", help="a published checkpoint (its config.json values are built in): "
                   + ", ".join(checkpoints()))
    p.add_argument("--model", help="local diffusers-format model folder (its config files are read, not its weights)")
    p.add_argument("--config", help="YAML run recipe (a path, or a name under configs/)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the engine")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs sit in (default 1)")
    p.add_argument("--gpu", default="h100", help="h100, h200, a100, a800, h20, l40s or l20 (default h100)")
    p.add_argument("--interconnect", help="nvlink, pcie or ib inside a node (default: nvlink where the GPU has it)")
    p.add_argument("--cache", help=f"step cache: {', '.join(registry.names())}")
    p.add_argument("--skip-share", dest="skip_share", type=float, help=_skip_share_help())
    for flag in ("height", "width", "frames", "steps"):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument("--guidance", type=float, help="1 or less: one branch per step (a CFG-distilled LoRA's setting)")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA fused into the weights: the host memory its originals take (repeatable)")
    for axis in ("ulysses", "ring", "patch"):
        p.add_argument(f"--{axis}", type=int, help=f"only layouts with this {axis} degree")
    p.add_argument("--cfg-parallel", dest="cfg_parallel", type=int, choices=(1, 2), help="only layouts with this cfg degree")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config field")
    p.add_argument("--counts-cache", dest="counts_cache", default=None,
                   help="JSON file keeping counted FLOPs and peaks per shape (default ~/.cache/unison/plan-counts.json)")


def _add_make_tiny(sub) -> None:
    from unison.engine.models import SPECS

    p = sub.add_parser("make-tiny", help="save a tiny random-weight pipeline as a diffusers folder")
    p.add_argument("--family", required=True, choices=sorted(SPECS))
    p.add_argument("--out", required=True, help="folder to write (save_pretrained)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the saved transformer(s) and text encoder(s), float32 kept where diffusers "
                   "and transformers keep it when loading in that dtype; the VAE is saved in float32 "
                   "(load it in another dtype with model.vae_dtype)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unison", description="Render video with diffusion transformers.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_calibrate(sub)
    _add_batch(sub)
    _add_serve(sub)
    _add_slurm(sub)
    _add_plan(sub)
    _add_make_tiny(sub)
    return p


def _check_counts(args: argparse.Namespace) -> None:
    """--ranks-per-engine and --engines: at least 1, and only with --ray (they size Ray engines)."""
    for flag, value in (("--ranks-per-engine", args.ranks_per_engine), ("--engines", getattr(args, "engines", None))):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
        if value is not None and not args.ray:
            raise UserError(f"{flag} needs --ray (under torchrun all ranks are one engine)")


def cmd_generate(args: argparse.Namespace) -> int:
    from unison.engine.plan import plan_run

    from unison.launch.dist import DistEnv

    _check_counts(args)
    if args.ray:
        from unison.launch.runs import generate_on_ray

        return generate_on_ray(build_config(args), address=args.ray, ranks_per_engine=args.ranks_per_engine,
                               dry_run=args.dry_run)
    env = DistEnv.detect()
    config = resolve_auto(build_config(args), world_size=env.world_size, rank=env.rank)
    plan = plan_run(config, world_size=env.world_size, local_rank=env.local_rank, reads=input_files(args))
    if args.dry_run:
        if env.rank == 0:
            from unison.engine.plan import parallel_dims

            dims = parallel_dims(plan.config.parallel, world_size=env.world_size)
            print("\n".join(plan.describe() + dims.describe()))
        return 0
    if env.rank == 0:
        for note in plan.notes:  # what the plan decided for the user (a detected cache preset)
            print(f"unison: {note}", file=sys.stderr)
    from unison.engine.worker import Job, Worker
    from unison.launch.failure import FailureWatch

    timeout_s = plan.config.parallel.timeout_s
    show = env.rank == 0 and plan.config.output.progress

    def loading(progress) -> None:
        if show:
            print("unison: loading", file=sys.stderr)  # the render prints its own phases

    # The same worker batch and Ray drive: one job, the render's own progress shown.
    with env.joined(timeout_s=timeout_s, placement=plan.placement), \
            FailureWatch.from_env(rank=env.rank, world_size=env.world_size, timeout_s=timeout_s):
        worker = Worker(plan, on_progress=loading)
        outcome = worker.run(Job(id=Path(plan.config.output.path).stem, line=0, config=plan.config), progress=None)
    if env.rank == 0:
        print(outcome.summary)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from unison.launch.cache_calibration import run
    from unison.launch.dist import DistEnv

    if args.ray:
        raise UserError("calibrate runs in one process or under torchrun, not --ray")
    return run(build_config(args), args.out, DistEnv.detect(), reads=input_files(args))


def cmd_batch(args: argparse.Namespace) -> int:
    from unison.launch.runs import batch_local, batch_on_ray

    if args.max_retries < 0:
        raise UserError(f"--max-retries must be at least 0, got {args.max_retries}")
    _check_counts(args)
    config = build_config(args)
    if args.ray:
        return batch_on_ray(config, jobs=args.jobs, out=args.out, address=args.ray, engines=args.engines,
                            ranks_per_engine=args.ranks_per_engine, max_retries=args.max_retries,
                            progress=args.progress, reads=input_files(args))
    from unison.launch.dist import DistEnv

    env = DistEnv.detect()
    config = resolve_auto(config, world_size=env.world_size, rank=env.rank)
    return batch_local(config, jobs=args.jobs, out=args.out, max_retries=args.max_retries, progress=args.progress,
                       env=env, reads=input_files(args))


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from unison.launch.serve import TOKEN_ENV, ServeOptions, serve

    _check_counts(args)
    from importlib.util import find_spec

    for modules, package in ((("starlette",), "starlette"), (("uvicorn",), "uvicorn"),
                             (("python_multipart", "multipart"), "python-multipart")):
        if not any(find_spec(module) for module in modules):
            raise UserError(f"unison serve needs {package}: pip install 'unison-video[serve]'")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    options = ServeOptions(host=args.host, port=args.port, out=args.out, token=token, ray=args.ray,
                           engines=args.engines, ranks_per_engine=args.ranks_per_engine, adapters=tuple(args.adapter),
                           max_retries=args.max_retries, max_queued_per_client=args.max_queued_per_client,
                           max_queued=args.max_queued, max_upload_mb=args.max_upload_mb,
                           max_picture_side=args.max_picture_side)
    return serve(build_config(args), options, reads=input_files(args))


def cmd_slurm(args: argparse.Namespace) -> int:
    from unison.launch.slurm import SlurmRequest, check_request, render_script

    request = SlurmRequest(**{k: v for k, v in vars(args).items() if k != "command"})
    check_request(request)
    # A bad recipe fails here, not hours later in the queue.
    print(render_script(request, load_yaml(_find_config(args.config))), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from unison.launch import plan

    config = load_yaml(_find_config(args.config)) if args.config else RunConfig()
    if args.family and args.model:
        raise UserError("give --family or --model, not both")
    config = config_from_dict({"model": {"path": args.model} if args.model else {},
                               "sampling": {k: getattr(args, k) for k in ("height", "width", "frames", "steps",
                                                                          "guidance") if getattr(args, k) is not None},
                               "cache": {"kind": args.cache} if args.cache else {},
                               **({"lora": list(args.lora)} if args.lora else {})}, base=config)
    config = apply_overrides(config, args.set or [])
    if args.family:  # a published model, whatever folder the recipe names
        config = config_from_dict({"model": {"path": None}}, base=config)
    if args.skip_share is not None and config.cache.kind == registry.NONE:
        raise UserError("--skip-share is the share of steps a cache skips: give --cache KIND with it")
    only = {axis: v for axis, v in (("ulysses", args.ulysses), ("ring", args.ring), ("cfg", args.cfg_parallel),
                                    ("patch", args.patch)) if v is not None}
    # Degrees the config fixes (a recipe's or --set parallel.X=N) constrain the layouts too.
    for axis in plan.FILTERS:
        fixed = getattr(config.parallel, axis)
        if fixed > 1 and only.setdefault(axis, fixed) != fixed:
            raise UserError(f"--{'cfg-parallel' if axis == 'cfg' else axis} {only[axis]} and parallel.{axis}={fixed} "
                            f"disagree; give one")
    if args.counts_cache:
        from unison.engine.targets import check_landings, check_writable

        check_writable(args.counts_cache, what="--counts-cache")
        check_landings({"--counts-cache": args.counts_cache}, model_path=config.model.path,
                       reads=input_files(args))
    request = plan.Request(gpus=args.gpus, nodes=args.nodes, gpu=args.gpu.lower(), interconnect=args.interconnect,
                           family=args.family, skip_share=args.skip_share, only=only,
                           **({"counts_cache": Path(args.counts_cache)} if args.counts_cache else {}))
    plan.check_request(request)
    model, sampling = plan.real_model(config, request)
    setting, rows, refused = plan.check_layouts(model, sampling, config, request)
    print(plan.format_plan(model, sampling, setting, rows, refused, plan.calibrated(request)))
    if config.lora:
        print(plan.lora_line(config, model.spec))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from unison.engine.models import get_spec

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out is a file, not a folder: {out}")
    from unison.engine.limits import SEED_RANGE

    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1] - 2:  # the preset also seeds seed + 1 and + 2
        raise UserError(f"--seed must be between -2**63 and 2**64-3 (what torch.manual_seed takes), got {args.seed}")
    pipe = get_spec(args.family).build_tiny(args.seed)
    if args.dtype != "float32":
        import torch

        from unison.engine.precision import DTYPES
        from unison.engine.precision import cast_component

        # Stored as a real checkpoint in that dtype would be; the VAE stays float32, as diffusers'
        # Wan examples load it (it is small, and float32 on disk loses nothing for any vae_dtype).
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name != "vae":
                cast_component(component, DTYPES[args.dtype])
    existed = out.exists()
    try:
        pipe.save_pretrained(out)
    except OSError as err:  # a read-only filesystem, a full disk: what this command made goes
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise WriteFailed(f"could not write {out}: {failure_reason(err)}") from None
    print(f"wrote a tiny {args.family} pipeline ({args.dtype}) to {out}")
    return 0


def entry() -> None:
    """The `unison` command and `python -m unison`: main(), with 143 kept for a SIGTERM or SIGUSR1
    that arrives after the command's work, while the process ends (engine/io/stop.py)."""
    exit_143_until_the_end()
    code = main()
    ignore_signals_while_exiting()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["generate", *argv]  # `unison` alone runs the embedded default
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    commands = {"generate": cmd_generate, "calibrate": cmd_calibrate, "batch": cmd_batch, "serve": cmd_serve,
                "slurm": cmd_slurm,
                "plan": cmd_plan, "make-tiny": cmd_make_tiny}
    try:
        with signals_exit_143():
            return commands[args.command](args)
    except UserError as err:
        print(f"unison: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Preempted as err:  # before a batch's summary: the batch is not over
        print(f"unison: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (PeerFailed, RenderFailed) as err:  # RenderFailed: e.g. NonFiniteLatents, nothing written
        print(f"unison: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except WriteFailed as err:
        print(f"unison: error: {err}", file=sys.stderr)
        return EXIT_WRITE
    except KeyboardInterrupt:
        print("unison: interrupted; finished videos are kept (a batch resumes when run again)", file=sys.stderr)
        return EXIT_INTERRUPTED
