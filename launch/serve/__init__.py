"""`unison serve`: OpenAI's Videos API and a status page over the same engines a batch uses.

The server owns one job store (--out DIR, a batch folder: launch/serve/store.py), locked for its
life (a second server or a batch on the same folder is refused), and one engine driver: a local
engine in this process, or K Ray engines of N ranks (--ray). Requests are checked as `unison
generate` checks its input, written durably, then queued; the engines render them in order of
acceptance and every attempt is recorded in the store's manifest. A restart renders what is
queued and continues what was running from its last step checkpoint; a completed video is never
rendered again. SIGTERM or Ctrl-C: no new job starts, the running one stops at its next step with
a checkpoint (recorded preempted), and the server exits; starting it again resumes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from unison.engine.config import RunConfig, config_from_dict, lora_from_text
from unison.engine.errors import UserError

log = logging.getLogger("unison")

TOKEN_ENV = "UNISON_SERVE_TOKEN"
DEFAULT_CHECKPOINT_EVERY = 5
"""Step checkpoints a served render writes when its recipe asks for none (a crash loses at most
this many steps of the job under way)."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    out: str = "unison-serve"
    token: str | None = None
    ray: str | None = None
    engines: int | None = None
    ranks_per_engine: int | None = None
    adapters: tuple[str, ...] = ()
    """NAME=PATH[:SCALE] entries: the LoRAs a request may name."""
    max_retries: int = 2
    max_queued_per_client: int = 32
    max_queued: int = 1000
    max_upload_mb: float = 20.0
    max_picture_side: int = 4096


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(options: ServeOptions) -> None:
    """Refusals before anything loads: a reachable server needs a token; counts must be sane."""
    if not options.token and not is_loopback(options.host):
        raise UserError(f"--host {options.host} is reachable from other machines: give a bearer token (--token, or "
                        f"{TOKEN_ENV}), or bind 127.0.0.1")
    if not 0 <= options.port <= 65535:
        raise UserError(f"--port must be 0-65535, got {options.port}")
    for flag, value in (("--max-queued-per-client", options.max_queued_per_client),
                        ("--max-queued", options.max_queued), ("--max-picture-side", options.max_picture_side)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not options.max_upload_mb > 0:
        raise UserError(f"--max-upload-mb must be positive, got {options.max_upload_mb}")
    if options.max_retries < 0:
        raise UserError(f"--max-retries must be at least 0, got {options.max_retries}")
    if options.token is not None and len(options.token) < 16:
        raise UserError("--token must be at least 16 characters (e.g. `python -c 'import secrets; "
                        "print(secrets.token_urlsafe())'`)")


def adapters_from(entries: tuple[str, ...]) -> dict[str, dict]:
    """--adapter NAME=PATH[:SCALE] -> name -> a lora entry; each file must exist now."""
    out: dict[str, dict] = {}
    for text in entries:
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise UserError(f"--adapter takes NAME=PATH[:SCALE], got {text!r}")
        if name in out:
            raise UserError(f"--adapter {name} given twice")
        lora = lora_from_text(rest)
        path = Path(lora.path).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"--adapter {name}: no such file: {lora.path}")
        out[name] = {"path": str(path), "scale": lora.scale}
    return out


@contextlib.contextmanager
def _stop_is_the_end():
    """SIGTERM and SIGINT stop the server cleanly (uvicorn's shutdown: the engines checkpoint), and
    that is a normal end (exit 0), not the CLI's 143 of an interrupted render: uvicorn raises the
    signal again once it is down, and finds this handler, which notes it and does nothing."""
    import signal

    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(config: RunConfig, options: ServeOptions, *, reads: dict[str, str] | None = None) -> int:
    from unison.engine.plan import plan_run
    from unison.engine.targets import check_batch_output
    from unison.launch.dist import DistEnv
    from unison.launch.runs import engine_config

    check_options(options)
    env = DistEnv.detect()
    if options.ray is None and (options.engines is not None or options.ranks_per_engine is not None):
        raise UserError("--engines and --ranks-per-engine need --ray (a local engine is one process; under "
                        "torchrun every rank is one engine)")
    if options.ray is not None and env.world_size > 1:
        raise UserError("--ray starts its own engines: run `unison serve --ray` as one process, not under torchrun")
    output = {"progress": False}
    if config.output.checkpoint_every == 0:
        output["checkpoint_every"] = DEFAULT_CHECKPOINT_EVERY
    config = config_from_dict({"output": output}, base=config)
    p = config.parallel
    ranks = options.ranks_per_engine or p.ulysses * p.ring * p.cfg * p.patch
    if options.ray is None:
        ranks = env.world_size
    plan = plan_run(engine_config(config), world_size=ranks, local_rank=env.local_rank, reads=reads)
    adapters = adapters_from(options.adapters)  # refused here, before any rank joins
    check_batch_output(Path(options.out).resolve(), config)
    if env.world_size > 1:
        return _serve_torchrun(config, options, plan, env, adapters=adapters)
    return _serve(config, options, plan, ranks, adapters=adapters)


def _serve_torchrun(config: RunConfig, options: ServeOptions, plan, env, *, adapters: dict[str, dict]) -> int:
    """Every rank of a torchrun world is one engine: rank 0 serves and decides, the others follow
    (launch/serve/service.follow) over a gloo group of their own."""
    import datetime

    import torch.distributed as dist

    from unison.launch.failure import FailureWatch
    from unison.launch.serve.service import follow

    timeout_s = plan.config.parallel.timeout_s
    with env.joined(timeout_s=timeout_s, placement=plan.placement), \
            FailureWatch.from_env(rank=env.rank, world_size=env.world_size, timeout_s=timeout_s):
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        if env.rank != 0:
            with _stop_is_the_end():  # rank 0 says when to stop; a signal stops a render at its step
                follow(plan, control)
            return 0
        return _serve(config, options, plan, env.world_size, adapters=adapters, control=control)


def _engines_line(options: ServeOptions, ranks: int, *, torchrun: bool) -> str:
    if options.ray is not None:
        return f"Ray: {options.engines or 'as many engines as the GPUs hold'} x {ranks} ranks"
    return f"1 engine of {ranks} ranks (torchrun)" if torchrun else "1 local engine"


def _serve(config: RunConfig, options: ServeOptions, plan, ranks: int, *, adapters: dict[str, dict],
           control=None) -> int:
    """The server over checked input (`serve` has planned the engine, read the adapters and checked
    the store's folder)."""
    import uvicorn

    from unison.launch.batch import OutputLock
    from unison.launch.serve.app import build_app
    from unison.launch.serve.requests import Served
    from unison.launch.serve.service import Limits, LocalDriver, RayDriver, Service
    from unison.launch.serve.store import JobStore

    out_dir = Path(options.out).resolve()
    resolved = plan.config
    name = Path(resolved.model.path).name if resolved.model.path else f"tiny-{resolved.model.family}"
    served = Served(model=name, aliases=(resolved.model.family,), fps=resolved.output.fps,
                    frames=resolved.sampling.frames, width=resolved.sampling.width, height=resolved.sampling.height,
                    adapters=adapters, max_picture_side=options.max_picture_side)
    limits = Limits(max_queued_per_client=options.max_queued_per_client, max_queued=options.max_queued,
                    max_upload_bytes=int(options.max_upload_mb * 2**20))
    with contextlib.ExitStack() as owned:
        owned.enter_context(OutputLock(out_dir))
        store = JobStore(out_dir)
        service = Service(base=config, store=store, served=served, limits=limits, world_size=ranks,
                          max_retries=options.max_retries)
        if options.ray is not None:
            from unison.launch.ray_batch import connect, options_for_cluster

            connect(options.ray, ranks=(options.engines or 1) * ranks)
            driver = RayDriver(service, config, options_for_cluster(engines=options.engines, ranks_per_engine=ranks))
        else:
            driver = LocalDriver(service, plan, control=control, on_fatal=lambda: setattr(server, "should_exit", True))

        @contextlib.asynccontextmanager
        async def lifespan(app):
            driver.start()
            try:
                yield
            finally:
                from starlette.concurrency import run_in_threadpool

                service.stop()
                driver.stop()
                await run_in_threadpool(driver.join)
                service.ledger.close()

        sock = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((options.host, options.port))
        except OSError as err:
            raise UserError(f"cannot listen on {options.host}:{options.port} ({err.strerror or err})") from None
        port = sock.getsockname()[1]
        app = build_app(service, token=options.token, lifespan=lifespan)
        where = f"{'[' + options.host + ']' if ':' in options.host else options.host}:{port}"
        counts = service.counts()
        print(f"unison serve: {served.model} on http://{where}/ (API /v1/videos; store {out_dir}; "
              f"{counts['queued']} queued, {counts['completed']} completed; "
              f"{_engines_line(options, ranks, torchrun=control is not None)}"
              f"{'; bearer token required' if options.token else ''})", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        with _stop_is_the_end():
            server.run(sockets=[sock])
    if driver.error is not None and control is not None:
        raise RuntimeError(f"the engine failed ({driver.error}); torchrun --max-restarts starts the server again, "
                           f"and it resumes") from driver.error
    print("unison serve: stopped; queued and stopped jobs resume when it starts again", file=sys.stderr, flush=True)
    return 0
