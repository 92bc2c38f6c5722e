"""LoRA per render (engine/lora.py): the latents against diffusers' own pipeline after
`load_lora_weights` + `set_adapters` (unfused) on every family's tiny model, one LoRA and two
stacked in two key formats; an engine that switches LoRAs renders as a fresh one does, bitwise;
N ranks with a LoRA equal one rank with it (sequence parallel, FSDP2 shards); compiled blocks are
not recompiled by a switch; the resolved config and the checkpoint fingerprint record each file;
a batch job's LoRA; and a table of bad input, refused in one line before any weight loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import families
from multirank import run_ranks
from test_parallel_engine import _config
from unison.engine.config import LoraConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig, load_yaml
from unison.engine.io.checkpoint import fingerprint
from unison.engine.models import SPECS, get_spec
from unison.engine.render import Engine
from unison.launch.cli import main

RANK = 2


def _targets(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers of every block's attention and MLP (what LoRAs train), by diffusers name."""
    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and "blocks." in name and (".attn" in name or ".ff" in name)
            and "norm" not in name}


# Original-repository names of the diffusers modules that a second key format names (the
# loaders convert them back): Wan's and SkyReels-V2's checkpoint names, HunyuanVideo's.
WAN_ORIGINAL = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                "ffn.net.2": "ffn.2"}
HUNYUAN_ORIGINAL = {"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj",
                    "ff.net.0.proj": "img_mlp.fc1", "ff.net.2": "img_mlp.fc2", "ff_context.net.0.proj": "txt_mlp.fc1",
                    "ff_context.net.2": "txt_mlp.fc2"}


def _original_name(transformer_class: str, name: str) -> str | None:
    """`name` in the second format of this architecture, or None where it names no such module."""
    prefix, _, rest = name.partition(".")
    index, _, module = rest.partition(".")
    if transformer_class in ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel"):
        return f"diffusion_model.blocks.{index}.{WAN_ORIGINAL[module]}" if module in WAN_ORIGINAL else None
    if transformer_class == "HunyuanVideoTransformer3DModel" and prefix == "transformer_blocks":
        return f"diffusion_model.double_blocks.{index}.{HUNYUAN_ORIGINAL[module]}" if module in HUNYUAN_ORIGINAL else None
    return None


def write_lora(path: Path, transformer: torch.nn.Module, *, seed: int, original: bool = False,
               transformer_class: str = "") -> Path:
    """A random rank-2 LoRA on every attention and MLP layer of the blocks. Diffusers keys
    (`transformer.<module>.lora_A.weight`), or with `original` the architecture's second format:
    Wan's and SkyReels-V2's checkpoint names with kohya's lora_down/lora_up and an alpha,
    HunyuanVideo's checkpoint names, or (HunyuanVideo 1.5, whose pipeline has no converter) peft
    keys without the `transformer.` prefix, as its release's trainer saves them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in _targets(transformer).items():
        down = torch.randn(RANK, module.in_features, generator=g) * 0.2
        up = torch.randn(module.out_features, RANK, generator=g) * 0.2
        if not original:
            state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = down, up
            continue
        if transformer_class == "HunyuanVideo15Transformer3DModel":
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
            continue
        key = _original_name(transformer_class, name)
        if key is None and transformer_class == "HunyuanVideoTransformer3DModel" and name.startswith(
                "transformer_blocks.") and name.endswith(".attn.to_q"):
            # The fused q, k, v projection (what tells diffusers this is HunyuanVideo's format):
            # lora_A shared, lora_B three stacked halves of q, k and v.
            key = f"diffusion_model.double_blocks.{name.split('.')[1]}.img_attn_qkv"
            up = torch.randn(3 * module.out_features, RANK, generator=g) * 0.2
        if key is None:
            continue
        if key.startswith("diffusion_model.double_blocks"):
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
        else:
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = torch.tensor(1.0)  # scale alpha / rank = 0.5, folded in by diffusers
    assert state, transformer_class
    save_file(state, str(path))
    return path


def _diffusers_latents(pipe, family: str, sampling, loras: list[tuple[Path, float]]):
    """diffusers' pipeline with `loras` loaded as adapters (into both experts of a two-expert
    model) and weighted by set_adapters, unfused."""
    names = []
    for i, (path, _) in enumerate(loras):
        name = f"l{i}"
        if hasattr(pipe, "load_lora_weights"):
            pipe.load_lora_weights(str(path), adapter_name=name)
            if getattr(pipe, "transformer_2", None) is not None:
                pipe.load_lora_weights(str(path), adapter_name=name, load_into_transformer_2=True)
        else:  # HunyuanVideo 1.5: no pipeline loader; its transformer's, as its release loads LoRAs
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
            prefix = "transformer" if any(k.startswith("transformer.") for k in keys) else None
            pipe.transformer.load_lora_adapter(str(path), adapter_name=name, prefix=prefix)
        names.append(name)
    scales = [scale for _, scale in loras]
    (pipe if hasattr(pipe, "set_adapters") else pipe.transformer).set_adapters(names, scales)
    return families.run(pipe, family, sampling)


@pytest.mark.parametrize("family", list(SPECS))
def test_latents_equal_diffusers_with_one_lora_and_two_stacked(family, tiny_folder, tmp_path):
    """One engine: LoRA A (diffusers keys) at 0.7, then A with B (the second key format) at -0.5
    stacked, a switch in between. float32: the fused weights and diffusers' unfused adapters differ
    by the rounding of W x + s B (A x) against (W + s B A) x, about 1e-7 per layer; the latents
    (about unit size) after 3 steps of 2-4 blocks stay within 1e-5. The LoRAs move the latents by
    more than 1e-2, so the bound is not met by ignoring them."""
    folder = tiny_folder(family)
    spec = get_spec(family)
    pipe = families.pipeline(family, folder)
    a = write_lora(tmp_path / "a.safetensors", pipe.transformer, seed=1)
    b = write_lora(tmp_path / "b.safetensors", pipe.transformer, seed=2, original=True,
                   transformer_class=spec.transformer_class)
    sampling = families.sampling(family, steps=3, folder=tmp_path)
    base = RunConfig(model=ModelConfig(path=folder), sampling=sampling, output=OutputConfig(decode=False, progress=False))
    engine = Engine.from_config(dataclasses.replace(base, lora=(LoraConfig(path=str(a), scale=0.7),)))
    one = engine.render()
    two = engine.render(dataclasses.replace(base, lora=(LoraConfig(path=str(a), scale=0.7),
                                                         LoraConfig(path=str(b), scale=-0.5))))
    plain = families.run(pipe, family, sampling)
    theirs_one = _diffusers_latents(pipe, family, sampling, [(a, 0.7)])
    pipe = families.pipeline(family, folder)
    theirs_two = _diffusers_latents(pipe, family, sampling, [(a, 0.7), (b, -0.5)])
    assert (theirs_one - plain).abs().max() > 1e-2 and (theirs_two - theirs_one).abs().max() > 1e-2
    assert (one.latents - theirs_one).abs().max() <= 1e-5
    assert (two.latents - theirs_two).abs().max() <= 1e-5


def _tiny_lora(tmp_path: Path, family: str, *, seed: int, name: str) -> Path:
    pipe = get_spec(family).build_tiny(0)
    return write_lora(tmp_path / name, pipe.transformer, seed=seed)


def test_switching_renders_as_a_fresh_engine_does(tmp_path):
    """A batch's engine alternating LoRAs (A, none, B, A+B, A) renders each job bitwise as a fresh
    engine with that job's LoRAs: the originals come back exactly between jobs."""
    a = _tiny_lora(tmp_path, "wan", seed=1, name="a.safetensors")
    b = _tiny_lora(tmp_path, "wan", seed=2, name="b.safetensors")
    base = _config("wan", 48, ParallelConfig())
    jobs = [(LoraConfig(path=str(a)),), (), (LoraConfig(path=str(b), scale=0.5),),
            (LoraConfig(path=str(a)), LoraConfig(path=str(b), scale=0.5)), (LoraConfig(path=str(a)),)]
    engine = Engine.from_config(base)
    switched = [engine.render(dataclasses.replace(base, lora=loras)).latents for loras in jobs]
    for loras, latents in zip(jobs, switched):
        fresh = Engine.from_config(dataclasses.replace(base, lora=loras)).render().latents
        assert torch.equal(latents, fresh), loras
    assert not torch.equal(switched[0], switched[1]) and not torch.equal(switched[0], switched[2])
    # The skeleton holds the files of the last two renders with LoRAs (A+B, then A): two adapters.
    assert len(engine.loras.loaded["transformer"]) == 2
    engine.render(dataclasses.replace(base, lora=(LoraConfig(path=str(b), scale=0.3),)))
    engine.render(dataclasses.replace(base, lora=(LoraConfig(path=str(b), scale=0.2),)))
    assert len(engine.loras.loaded["transformer"]) == 1  # A dropped: used by neither of the last two


def _render_lora(rank, world, family, layout, loras):
    config = dataclasses.replace(_config(family, 48, ParallelConfig(**layout, timeout_s=60)), lora=loras)
    engine = Engine.from_config(config, world_size=world)
    first = engine.render().latents
    # A switch on the same engine: back to no LoRA, then the LoRA again (FSDP2: on the shards).
    none = engine.render(dataclasses.replace(config, lora=())).latents
    again = engine.render(config).latents
    return first, none, again


LAYOUTS = [("wan", dict(ulysses=2)), ("wan", dict(ring=2, shard_weights=True)),
           ("hunyuanvideo", dict(cfg=2, shard_weights=True)), ("wan", dict(patch=2)),
           ("wan", dict(patch=2, patch_mode="pipefusion")), ("wan", dict(ulysses=2, ring=2))]
"""Patch modes run all 4 steps in their exact warm-up (patch_warmup_steps 4), so they too equal
one rank to rounding."""


@pytest.mark.parametrize("family,layout", LAYOUTS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}{'' if v is True else v}" for k, v in v.items()))
def test_n_ranks_with_a_lora_equal_one_rank(family, layout, tmp_path):
    """Two ranks (sequence parallel, CFG parallel, FSDP2 shards: the change cut as each shard is;
    displaced patches; PipeFusion, each stage changing the blocks it holds) and four (USP: Ulysses
    2 x Ring 2) with a LoRA, then without, then with it again on the same engine: each the one-rank
    render (≤ 1e-5 relative), and the last equal to the first bitwise (the weights came back
    exactly)."""
    loras = (LoraConfig(path=str(_tiny_lora(tmp_path, family, seed=3, name="c.safetensors")), scale=0.8),)
    config = dataclasses.replace(_config(family, 48, ParallelConfig()), lora=loras)
    one = Engine.from_config(config).render().latents
    plain = Engine.from_config(dataclasses.replace(config, lora=())).render().latents
    assert (one - plain).abs().max() > 1e-2
    world = layout.get("ulysses", 1) * layout.get("ring", 1) * layout.get("cfg", 1) * layout.get("patch", 1)
    for first, none, again in run_ranks(world, _render_lora, family, layout, loras):
        assert ((first - one).norm() / one.norm()).item() <= 1e-5
        assert ((none - plain).norm() / plain.norm()).item() <= 1e-5
        assert torch.equal(first, again)


def test_a_switch_does_not_recompile_compiled_blocks(tmp_path):
    """Compiled blocks: the LoRAs change parameter values in place, never modules or shapes, so
    dynamo's count of compiled frames stays where the first render left it."""
    from torch._dynamo.utils import counters

    a = _tiny_lora(tmp_path, "wan", seed=1, name="a.safetensors")
    b = _tiny_lora(tmp_path, "wan", seed=2, name="b.safetensors")
    config = dataclasses.replace(_config("wan", 48, ParallelConfig()), lora=(LoraConfig(path=str(a)),))
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, compile="blocks"))
    engine = Engine.from_config(config)
    engine.render()
    frames = counters["stats"]["unique_graphs"]
    assert frames > 0
    for loras in [(LoraConfig(path=str(b)),), (), (LoraConfig(path=str(a)), LoraConfig(path=str(b), scale=-1.0))]:
        engine.render(dataclasses.replace(config, lora=loras))
    assert counters["stats"]["unique_graphs"] == frames


def test_the_resolved_config_and_the_fingerprint_record_each_file(tmp_path):
    """The resolved config lists each LoRA's path, scale, expert and SHA-256 (hashed here, apart);
    a changed file changes the fingerprint (a resume never mixes adapters) and is refused by a
    config that recorded the old one."""
    import hashlib

    from unison.engine.errors import UserError
    from unison.engine.plan import plan_run

    a = _tiny_lora(tmp_path, "wan", seed=1, name="a.safetensors")
    out = tmp_path / "video.mp4"
    config = dataclasses.replace(_config("wan", 48, ParallelConfig()), lora=(LoraConfig(path=str(a), scale=0.5),),
                                 output=OutputConfig(path=str(out), progress=False))
    result = Engine.from_config(config).render()
    recorded = load_yaml(result.config_path)
    assert recorded.lora == (LoraConfig(path=str(a), scale=0.5, sha256=hashlib.sha256(a.read_bytes()).hexdigest()),)
    before = fingerprint(recorded, world_size=1)
    _tiny_lora(tmp_path, "wan", seed=9, name="a.safetensors")  # the same path, other weights
    with pytest.raises(UserError, match=r"lora\[0\]\.path: .*a\.safetensors changed since this config was written"):
        plan_run(recorded)
    fresh = plan_run(dataclasses.replace(recorded, lora=(LoraConfig(path=str(a), scale=0.5),))).config
    assert fingerprint(fresh, world_size=1) != before
    assert fingerprint(plan_run(dataclasses.replace(config, lora=())).config, world_size=1) != before


def test_a_batch_job_names_its_lora_relative_to_the_jobs_file(tmp_path):
    """`lora` in a job line: its path relative to the JSONL file's folder; a job without it keeps
    the batch's; a job whose LoRA is bad is that job's problem alone."""
    from unison.launch.jobs import read_jobs

    folder = tmp_path / "batch"
    folder.mkdir()
    _tiny_lora(folder, "wan", seed=1, name="style.safetensors")
    (folder / "jobs.jsonl").write_text("\n".join(json.dumps(job) for job in [
        {"id": "a", "prompt": "a cat", "lora": [{"path": "style.safetensors", "scale": 0.6}]},
        {"id": "b", "prompt": "a dog"},
        {"id": "c", "prompt": "a cow", "lora": ["missing.safetensors:0.5"]},
        {"id": "d", "prompt": "a fox", "lora": []},
    ]) + "\n")
    base = dataclasses.replace(_config("wan", 48, ParallelConfig()), lora=(LoraConfig(path=str(folder / "style.safetensors")),))
    jobs, problems = read_jobs(folder / "jobs.jsonl", base=base, out_dir=tmp_path / "out")
    by_id = {job.id: job.config.lora for job in jobs}
    assert [(l.path, l.scale) for l in by_id["a"]] == [(str(folder / "style.safetensors"), 0.6)]
    assert [(l.path, l.scale) for l in by_id["b"]] == [(str(folder / "style.safetensors"), 1.0)]
    assert by_id["d"] == ()
    assert [str(p) for p in problems] == [f"line 3: lora[0].path: {folder / 'missing.safetensors'} not found"]


def _bad_files(tmp: Path, wan_folder: str) -> dict[str, Path]:
    from unison.engine.models import get_spec as spec_of

    wan = spec_of("wan").build_tiny(0).transformer
    files = {"text": tmp / "notes.safetensors", "empty": tmp / "empty.safetensors",
             "full": tmp / "full.safetensors", "hunyuan": tmp / "hunyuan.safetensors",
             "rank": tmp / "rank.safetensors", "half": tmp / "half.safetensors", "bin": tmp / "lora.bin",
             "good": tmp / "good.safetensors"}
    files["text"].write_text("not tensors")
    save_file({}, str(files["empty"]))
    save_file({k: v.contiguous() for k, v in list(wan.state_dict().items())[:4]}, str(files["full"]))
    write_lora(files["hunyuan"], spec_of("hunyuanvideo").build_tiny(0).transformer, seed=1)
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 40),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(48, 2)}, str(files["rank"]))
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 48)}, str(files["half"]))
    torch.save({"a": torch.zeros(1)}, files["bin"])
    files["dora"] = tmp / "dora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 48),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(48, 2),
               "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(48, 1)}, str(files["dora"]))
    write_lora(files["good"], wan, seed=1)
    return files


def test_bad_input_table(tmp_path, tiny_folder, monkeypatch, capsys):
    """Each bad LoRA: exit 2, one line naming the problem, before any weight loads."""
    import unison.engine.load as build

    wan_folder = tiny_folder("wan")
    f = _bad_files(tmp_path, wan_folder)
    (tmp_path / "two.yaml").write_text(f"model:\n  family: wan\nlora:\n  - path: {f['good']}\n    expert: low\n")
    cases = [
        (["--lora", str(tmp_path / "nowhere.safetensors")], "lora[0].path: " + str(tmp_path / "nowhere.safetensors")
         + " not found"),
        (["--lora", str(tmp_path)], f"lora[0].path: {tmp_path} is not a file"),
        (["--lora", str(f["text"])], "is not a .safetensors file"),
        (["--lora", str(f["bin"])], "is not a .safetensors file"),
        (["--lora", str(f["empty"])], "holds no tensors"),
        (["--lora", str(f["full"])], "holds no LoRA layers (4 tensors, such as 'condition_embedder."),
        (["--lora", str(f["hunyuan"])], "match no module of Wan 2.1 T2V (1.3B, 14B) (such as context_embedder.token_refiner."),
        (["--lora", str(f["rank"])], "the LoRA of blocks.0.attn1.to_q in " + str(f["rank"]) + " maps 40 inputs to 48 "
                                     "outputs at rank 2/2; Wan 2.1 T2V (1.3B, 14B)'s module takes 48 and gives 48"),
        (["--lora", str(f["half"])], "has lora_A but not lora_B for blocks.0.attn1.to_q"),
        (["--lora", str(f["dora"])], "is a DoRA ('diffusion_model.blocks.0.self_attn.q.dora_scale'); diffusers' "
                                     "loaders drop its magnitudes"),
        (["--lora", f"{f['good']}:nan"], "lora[0].scale must be a finite number, got 'nan'"),
        (["--config", str(tmp_path / "two.yaml")], "lora[0].expert: Wan 2.1 T2V (1.3B, 14B) has one transformer"),
    ]
    monkeypatch.setattr(build, "load_pipeline", lambda plan: pytest.fail("weights loaded before the error"))
    capsys.readouterr()
    for extra, expected in cases:
        model = [] if extra[0] == "--config" else ["--model", wan_folder, "--height", "48", "--width", "64"]
        code = main([*model, *extra, "--dry-run"])
        out, err = capsys.readouterr()
        err = err.strip()
        assert code == 2 and err.startswith("unison: error: ") and expected in err, (extra, err)
        assert "\n" not in err and out == "", (extra, err)
    assert main(["--model", wan_folder, "--height", "48", "--width", "64", "--lora", f"{f['good']}:0.5",
                 "--dry-run"]) == 0


def test_plan_counts_the_host_copy_of_what_a_lora_changes(tmp_path, capsys):
    """`unison plan` with a LoRA: a rank-64 LoRA on the query projection of Wan 14B's 40 blocks
    changes 40 weights of 5120 x 5120, whose bf16 originals take 40 * 5120 * 5120 * 2 bytes =
    1.95 GiB on the host; one branch per step at guidance 1 (a CFG-distilled LoRA's setting)."""
    state = {}
    for i in range(40):
        state[f"diffusion_model.blocks.{i}.self_attn.q.lora_A.weight"] = torch.zeros(64, 5120, dtype=torch.bfloat16)
        state[f"diffusion_model.blocks.{i}.self_attn.q.lora_B.weight"] = torch.zeros(5120, 64, dtype=torch.bfloat16)
    save_file(state, str(tmp_path / "q.safetensors"))
    assert main(["plan", "--family", "wan2.1-14b", "--gpus", "1", "--guidance", "1", "--steps", "4", "--height", "64",
                 "--width", "64", "--frames", "9",
                 "--lora", str(tmp_path / "q.safetensors"), "--counts-cache", str(tmp_path / "counts.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "4 steps, one branch per step" in lines[0]
    assert lines[-1].startswith(f"  LoRA: 1 file(s) fused into the weights before the steps: no GPU memory and no time "
                                f"per step; the originals of the 40 weights they change wait on the host to switch "
                                f"exactly: {40 * 5120 * 5120 * 2 / 2**30:.1f} GiB in bf16 per rank")


def test_expert_puts_each_lora_where_diffusers_loads_it(tiny_folder, tmp_path):
    """Wan 2.2 A14B: `expert: high` changes the high-noise transformer alone and `expert: low` the
    low-noise one, as diffusers' load_lora_weights (transformer) and load_lora_weights(...,
    load_into_transformer_2=True) do; float32 within 1e-5 as above."""
    folder = tiny_folder("wan2.2")
    pipe = families.pipeline("wan2.2", folder)
    a = write_lora(tmp_path / "high.safetensors", pipe.transformer, seed=4)
    b = write_lora(tmp_path / "low.safetensors", pipe.transformer_2, seed=5)
    sampling = families.sampling("wan2.2", steps=4, folder=tmp_path)
    ours = Engine.from_config(RunConfig(
        model=ModelConfig(path=folder), sampling=sampling, output=OutputConfig(decode=False, progress=False),
        lora=(LoraConfig(path=str(a), expert="high"), LoraConfig(path=str(b), expert="low", scale=0.5)))).render()
    pipe.load_lora_weights(str(a), adapter_name="high")
    pipe.load_lora_weights(str(b), adapter_name="low", load_into_transformer_2=True)
    pipe.transformer.set_adapters(["high"], [1.0])
    pipe.transformer_2.set_adapters(["low"], [0.5])
    theirs = families.run(pipe, "wan2.2", sampling)
    assert (ours.latents - theirs).abs().max() <= 1e-5


DISTILL_RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*-4step.yaml"))


@pytest.mark.parametrize("recipe", DISTILL_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_distillation_recipe_runs_its_published_schedule(recipe, tmp_path):
    """Each few-step LoRA recipe on its family's tiny model (tiny LoRAs in place of the published
    files, on the same experts): 4 steps at timesteps 1000 * 5s / (1 + 4s) for sigmas 1, 0.75, 0.5,
    0.25 (1000, 937.5, 833.3, 625), one branch per step (no CFG), and on Wan 2.2 A14B the first two
    steps on the high-noise expert and the last two on the low-noise one, as the recipes say;
    counted by hooks on the experts."""
    config = load_yaml(recipe)
    family = config.model.family
    spec = get_spec(family)
    pipe = spec.build_tiny(0)
    loras = tuple(dataclasses.replace(entry, path=str(write_lora(
        tmp_path / f"{i}.safetensors", getattr(pipe, experts_of_entry(entry, spec)[0]), seed=i)))
        for i, entry in enumerate(config.lora))
    recipe_sampling = config.sampling  # its schedule on the tiny model's size, text and picture
    sampling = dataclasses.replace(families.sampling(family, steps=4, folder=tmp_path), sigmas=recipe_sampling.sigmas,
                                   scheduler=recipe_sampling.scheduler, flow_shift=recipe_sampling.flow_shift,
                                   guidance=recipe_sampling.guidance, guidance_2=recipe_sampling.guidance_2)
    run = dataclasses.replace(config, model=ModelConfig(family=family), sampling=sampling, lora=loras,
                              output=OutputConfig(decode=False, progress=False))
    engine = Engine.from_config(run)
    calls = []
    for expert in spec.experts:
        getattr(engine.pipe, expert).register_forward_pre_hook(lambda *_, e=expert: calls.append(e))
    engine.render()
    assert engine.plan.config.sampling.steps == 4
    expected = [1000 * 5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)]
    assert torch.allclose(engine.pipe.scheduler.timesteps, torch.tensor(expected), rtol=0, atol=1e-3)
    if len(spec.experts) == 2:
        assert calls == ["transformer", "transformer", "transformer_2", "transformer_2"]
    else:
        assert calls == ["transformer"] * 4
    assert [entry.expert for entry in engine.loras.fused] == [entry.expert for entry in config.lora]


def experts_of_entry(entry: LoraConfig, spec) -> tuple[str, ...]:
    """The expert a recipe's entry names (the first for both)."""
    return {"low": spec.experts[-1:]}.get(entry.expert, spec.experts[:1])


def test_offloaded_experts_take_and_give_back_their_loras(monkeypatch, tmp_path):
    """Wan 2.2 A14B with model.offload (parked on `cpu:0`, as tests/test_offload.py does): LoRAs
    switched while an expert is parked land on its weights wherever they are, and each job equals
    a fresh engine without offload, bitwise."""
    from unison.engine.offload import Offloader

    monkeypatch.setattr(Offloader, "park", torch.device("cpu", 0))
    a = _tiny_lora(tmp_path, "wan2.2", seed=1, name="a.safetensors")
    b = _tiny_lora(tmp_path, "wan2.2", seed=2, name="b.safetensors")
    base = RunConfig(model=ModelConfig(family="wan2.2"), sampling=families.sampling("wan2.2", steps=4),
                     output=OutputConfig(decode=False, progress=False))
    offloaded = dataclasses.replace(base, model=dataclasses.replace(base.model, offload=True))
    jobs = [(LoraConfig(path=str(a)),), (LoraConfig(path=str(b), expert="low"),), (LoraConfig(path=str(a)),)]
    engine = Engine.from_config(offloaded)
    for loras in jobs:
        latents = engine.render(dataclasses.replace(offloaded, lora=loras)).latents
        assert torch.equal(latents, Engine.from_config(dataclasses.replace(base, lora=loras)).render().latents), loras
    assert any(device == "cpu:0" for _, device in engine.offloader.moves)


def test_bf16_fusion_is_no_further_from_float32_than_diffusers_fuse(tmp_path):
    """bf16 weights: the fused weight against the exact float32 sum W + s1 d1 + s2 d2 (two stacked
    LoRAs), ours (the float32 sum rounded once) against diffusers' fuse_lora (each change rounded,
    added in bf16 in turn): never further, measured over every changed weight of the tiny Wan."""
    import diffusers

    from unison.engine.lora import Loras

    pipe = get_spec("wan").build_tiny(0)
    a = write_lora(tmp_path / "a.safetensors", pipe.transformer, seed=1)
    b = write_lora(tmp_path / "b.safetensors", pipe.transformer, seed=2)
    exact_pipe = get_spec("wan").build_tiny(0)
    exact_pipe.load_lora_weights(str(a), adapter_name="a")
    exact_pipe.load_lora_weights(str(b), adapter_name="b")
    exact_pipe.set_adapters(["a", "b"], [0.7, 0.4])
    exact_pipe.fuse_lora(adapter_names=["a", "b"])  # in float32: the reference
    exact = {n.replace(".base_layer", ""): p.detach().clone() for n, p in exact_pipe.transformer.named_parameters()
             if "lora_" not in n}

    theirs = get_spec("wan").build_tiny(0)
    theirs.transformer.to(torch.bfloat16)
    theirs.load_lora_weights(str(a), adapter_name="a")
    theirs.load_lora_weights(str(b), adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.7, 0.4])
    theirs.fuse_lora(adapter_names=["a", "b"])
    fused_theirs = {n.replace(".base_layer", ""): p.detach() for n, p in theirs.transformer.named_parameters()
                    if "lora_" not in n}

    ours = get_spec("wan").build_tiny(0)
    ours.transformer.to(torch.bfloat16)
    loras = Loras(ours, get_spec("wan"))
    loras.use((LoraConfig(path=str(a), scale=0.7), LoraConfig(path=str(b), scale=0.4)))
    changed = [name for _, name in loras.originals]
    assert len(changed) == len(_targets(ours.transformer))
    mine = dict(ours.transformer.named_parameters())
    ours_err = sum((mine[n].float() - exact[n]).abs().sum().item() for n in changed)
    theirs_err = sum((fused_theirs[n].float() - exact[n]).abs().sum().item() for n in changed)
    assert ours_err <= theirs_err
    assert theirs_err > 0  # bf16 rounds: the comparison is not between two exact results


def _render_cached(rank, world, config):
    result = Engine.from_config(config, world_size=world).render()
    return result.latents, result.cache_decisions


def test_a_step_cache_with_a_lora_decides_as_one_rank(tmp_path):
    """First-Block Cache (data-dependent: the LoRA changes what it measures) under Ulysses 2 with a
    LoRA: every rank takes the one-rank decision at every step (verify on), and the latents equal
    one rank's; the threshold mixes skips and computes, so lockstep means something."""
    from unison.engine.config import CacheConfig

    loras = (LoraConfig(path=str(_tiny_lora(tmp_path, "wan", seed=3, name="c.safetensors")), scale=0.8),)
    cache = CacheConfig(kind="fbcache", threshold=0.2, verify=True)
    one = Engine.from_config(dataclasses.replace(_config("wan", 48, ParallelConfig()), lora=loras, cache=cache)).render()
    flags = [d[-1] for d in one.cache_decisions["transformer"]]
    assert True in flags and False in flags
    two = dataclasses.replace(_config("wan", 48, ParallelConfig(ulysses=2, timeout_s=60)), lora=loras, cache=cache)
    for latents, decisions in run_ranks(2, _render_cached, two):
        assert decisions == one.cache_decisions
        assert ((latents - one.latents).norm() / one.latents.norm()).item() <= 1e-5
