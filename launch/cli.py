"""The `unison` command line: generate, make-tiny.

Bad input is reported as one line on stderr with exit code 2, before any weights load.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from unison.engine.config import RunConfig, apply_overrides, config_from_dict, load_yaml
from unison.errors import PeerFailed, UserError

EXIT_USAGE = 2
EXIT_FAILED = 1

# Flag -> config key, for flags that set one field.
_FLAG_KEYS = {
    "model": "model.path",
    "prompt": "sampling.prompt",
    "negative_prompt": "sampling.negative_prompt",
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
}


def configs_dir() -> Path:
    """The repository's configs/ folder (the package is installed from the checkout)."""
    import unison.engine

    return Path(unison.engine.__file__).resolve().parent.parent / "configs"


def default_config_path() -> Path:
    return configs_dir() / "tiny-wan.yaml"


def _find_config(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    bundled = configs_dir() / name
    if bundled.is_file():
        return bundled
    raise UserError(f"config file not found: {name} (nor under {configs_dir()})")


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
    config = config_from_dict(nested, base=config)
    return apply_overrides(config, args.set or [])


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="render one video", description="Render one video.")
    p.add_argument("--config", help="YAML run recipe (a path, or a name under configs/)")
    p.add_argument("--model", help="local diffusers-format model folder")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="frame count, 4k+1")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float,
                   help="guidance scale (Wan: CFG; HunyuanVideo: embedded guidance)")
    p.add_argument("--guidance-2", dest="guidance_2", type=float,
                   help="Wan 2.2 A14B: guidance of the low-noise expert")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="output .mp4 path")
    p.add_argument("--save-latents", dest="save_latents", help="torch.save the final latents here")
    p.add_argument("--ulysses", type=int, help="Ulysses (all-to-all) degree")
    p.add_argument("--ring", type=int, help="ring-attention degree")
    p.add_argument("--cfg-parallel", dest="cfg_parallel", action="store_const", const=2,
                   help="run the two guidance branches on two halves of the ranks")
    p.add_argument("--cache", choices=("none", "fbcache", "pab"),
                   help="step cache: First-Block Cache or Pyramid Attention Broadcast (tune with --set cache.…)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config field")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; load nothing")


def _add_make_tiny(sub) -> None:
    from unison.engine.models import SPECS

    p = sub.add_parser("make-tiny", help="save a tiny random-weight pipeline as a diffusers folder")
    p.add_argument("--family", required=True, choices=sorted(SPECS))
    p.add_argument("--out", required=True, help="folder to write (save_pretrained)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unison", description="Render video with diffusion transformers.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_make_tiny(sub)
    return p


def cmd_generate(args: argparse.Namespace) -> int:
    from unison.engine.build import plan_run

    from unison.launch.dist import DistEnv

    env = DistEnv.from_env()
    plan = plan_run(build_config(args), world_size=env.world_size)
    if args.dry_run:
        if env.rank == 0:
            from unison.engine.build import parallel_dims

            dims = parallel_dims(plan.config.parallel, world_size=env.world_size)
            print("\n".join(plan.describe() + dims.describe()))
        return 0
    from unison.engine.render import Engine
    from unison.parallel.failure import FailureWatch

    timeout_s = plan.config.parallel.timeout_s
    env.init(timeout_s=timeout_s)
    with FailureWatch.from_env(rank=env.rank, world_size=env.world_size, timeout_s=timeout_s):
        result = Engine(plan).render()
    if env.rank == 0:
        print(result.summary())
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from unison.engine.models import get_spec

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out is a file, not a folder: {out}")
    pipe = get_spec(args.family).build_tiny(args.seed)
    pipe.save_pretrained(out)
    print(f"wrote a tiny {args.family} pipeline to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["generate", *argv]  # `unison` alone runs the embedded default
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    commands = {"generate": cmd_generate, "make-tiny": cmd_make_tiny}
    try:
        return commands[args.command](args)
    except UserError as err:
        print(f"unison: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except PeerFailed as err:
        print(f"unison: error: {err}", file=sys.stderr)
        return EXIT_FAILED
