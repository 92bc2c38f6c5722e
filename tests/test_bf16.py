"""bfloat16 as real checkpoints run: `make-tiny --dtype`, the dtype of every loaded component
(float32 islands where diffusers keeps them), parity with diffusers' own pipeline in bfloat16 on
one rank and under Ulysses 2, and the dry run and render summary naming each component's dtype.

Tolerance in bfloat16: exact (relative error 0, `torch.equal`), measured on this machine for
one rank against diffusers (same calls on the same shapes) and for Ulysses 2 against one rank
(attention per head and row shards of the same matmuls). Nothing looser is meaningful: in
bfloat16 a one-ulp difference in one forward grows over the denoising steps to the size of the
whole bfloat16 effect: with SAMPLING below, Ring 2 (each chunk's output rounded to bfloat16
before the merge) ends 1.05e-2 from one rank, and bfloat16 against float32 compute of the same
weights is 1.10e-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multirank import run_ranks
from unison.engine.load import load_pipeline
from unison.engine.plan import plan_run
from unison.engine.config import ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig
from unison.engine.precision import describe_components
from unison.engine.models import SPECS
from unison.engine.render import Engine
from unison.launch.cli import main

PROMPT = "A cat walks on the grass, realistic"
NEGATIVE = "worst quality, blurred"
SAMPLING = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, frames=5, steps=4, guidance=5.0,
                seed=3, max_sequence_length=24)
WAN_ISLANDS = {"rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"}
"""diffusers 0.42's WanTransformer3DModel._keep_in_fp32_modules (HunyuanVideo's transformer has none)."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _stored_dtypes(folder: str, part: str) -> dict[str, str]:
    from safetensors import safe_open

    dtypes = {}
    for file in sorted(Path(folder, part).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            dtypes.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
    return dtypes


def _in_islands(name: str, islands) -> bool:
    return bool(set(name.split(".")) & set(islands))


def test_diffusers_islands_are_what_the_tests_expect():
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    assert set(WanTransformer3DModel._keep_in_fp32_modules) == WAN_ISLANDS
    assert not HunyuanVideoTransformer3DModel._keep_in_fp32_modules


@pytest.mark.parametrize("family, text_encoders", [("wan", ("text_encoder",)),
                                                   ("hunyuanvideo", ("text_encoder", "text_encoder_2"))])
def test_make_tiny_stores_bfloat16(tiny_folder, family, text_encoders):
    folder = tiny_folder(family, "bfloat16")
    transformer = _stored_dtypes(folder, "transformer")
    stored_f32 = {key for key, dtype in transformer.items() if dtype == "F32"}
    assert set(transformer.values()) <= {"BF16", "F32"}
    if family == "wan":
        # Exactly the tensors diffusers keeps in float32 when it loads in bfloat16.
        assert stored_f32 == {key for key in transformer if _in_islands(key, WAN_ISLANDS)}
        assert {"scale_shift_table", "blocks.0.scale_shift_table", "blocks.0.norm2.weight",
                "condition_embedder.time_embedder.linear_1.weight"} <= stored_f32
    else:
        assert stored_f32 == set()
    for part in text_encoders:
        assert set(_stored_dtypes(folder, part).values()) == {"BF16"}, part
    assert set(_stored_dtypes(folder, "vae").values()) == {"F32"}


def _tensor_dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: t.dtype for name, t in tensors if t.is_floating_point()}


def _load(dtype: str, *, family: str | None = None, path: str | None = None):
    # Width 64: a tiny Wan folder's position table ends at 512 pixels (the real defaults are 832 wide).
    plan = plan_run(RunConfig(model=ModelConfig(family=family or "auto", path=path, dtype=dtype),
                              sampling=SamplingConfig(width=64), output=OutputConfig(decode=False, progress=False)))
    return plan, load_pipeline(plan)


# (family, model.dtype, the folder's make-tiny dtype)
LOAD_CASES = [("wan", "bfloat16", "bfloat16"), ("hunyuanvideo", "bfloat16", "bfloat16"), ("wan", "float16", "float32")]


@pytest.mark.parametrize("family, dtype, stored", LOAD_CASES, ids=[f"{f}-{d}" for f, d, _ in LOAD_CASES])
def test_loaded_component_dtypes(tiny_folder, family, dtype, stored):
    """A folder (from_pretrained with a dtype dict) and the in-process preset (cast here) hold
    the same dtype in every tensor; the dry run's line says what the loaded modules hold."""
    want = getattr(torch, dtype)
    plan, pipe = _load(dtype, path=tiny_folder(family, stored))
    names = (*plan.spec.experts, *plan.spec.text_encoders, "vae")
    for name in plan.spec.experts:
        dtypes = _tensor_dtypes(getattr(pipe, name))
        islands = type(getattr(pipe, name))._keep_in_fp32_modules or ()
        assert {n for n, d in dtypes.items() if d == torch.float32} == {n for n in dtypes if _in_islands(n, islands)}
        assert set(dtypes.values()) == ({want, torch.float32} if islands else {want})
    for name in plan.spec.text_encoders:
        params = dict(getattr(pipe, name).named_parameters())
        # transformers' own load decides which modules stay float32 (umT5's `wo`: in float16 only
        # since transformers 5.x's strict/non-strict split, in bfloat16 too in 5.0).
        encoder = getattr(pipe, name)
        reference = type(encoder).from_pretrained(Path(tiny_folder(family, stored)) / name, dtype=want)
        kept = {n for n, p in reference.named_parameters() if p.dtype != want}
        assert kept <= {n for n in params if ".wo." in n}, kept  # nothing but umT5's `wo` is ever kept
        assert {n for n, p in params.items() if p.dtype != want} == kept, name
    if family == "hunyuanvideo":  # an unsaved buffer stays as built, as transformers loads it
        assert pipe.text_encoder.rotary_emb.inv_freq.dtype == torch.float32
    assert set(_tensor_dtypes(pipe.vae).values()) == {torch.float32}
    assert describe_components(pipe, names) == plan.components()

    _, tiny = _load(dtype, family=family)
    for name in names:
        assert _tensor_dtypes(getattr(tiny, name)) == _tensor_dtypes(getattr(pipe, name)), name


def _render(folder: str, dtype: str, *, parallel: ParallelConfig = ParallelConfig(), world: int = 1):
    config = RunConfig(model=ModelConfig(path=folder, dtype=dtype), sampling=SamplingConfig(**SAMPLING),
                       parallel=parallel, output=OutputConfig(decode=False, progress=False))
    return Engine.from_config(config, world_size=world).render()


def _ulysses_rank(rank: int, world: int, folder: str) -> torch.Tensor:
    return _render(folder, "bfloat16", parallel=ParallelConfig(ulysses=world, timeout_s=60), world=world).latents


def test_wan_bfloat16_equals_diffusers_on_one_rank_and_ulysses(tiny_folder):
    from diffusers import AutoencoderKLWan, WanPipeline

    folder = tiny_folder("wan", "bfloat16")
    ours = _render(folder, "bfloat16")
    assert ("components transformer bfloat16 (+float32 islands) on cpu, text_encoder bfloat16 on cpu, "
            "vae float32 on cpu") in ours.summary().splitlines()

    # diffusers as its Wan examples load it: the pipeline in bfloat16, the VAE in float32.
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(folder, vae=vae, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    s = SAMPLING
    theirs = pipe(prompt=s["prompt"], negative_prompt=s["negative_prompt"], height=s["height"], width=s["width"],
                  num_frames=s["frames"], num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                  max_sequence_length=s["max_sequence_length"], generator=torch.Generator("cpu").manual_seed(s["seed"]),
                  output_type="latent", return_dict=False)[0]
    assert ours.latents.dtype == theirs.dtype
    assert rel_err(ours.latents, theirs) == 0.0 and torch.equal(ours.latents, theirs)

    # bfloat16 really ran: the same weights computed in float32 end far outside the tolerance.
    float32 = _render(folder, "float32").latents
    assert rel_err(ours.latents, float32) > 2e-3

    for latents in run_ranks(2, _ulysses_rank, folder):
        assert rel_err(latents, ours.latents) == 0.0 and torch.equal(latents, ours.latents)


def test_dry_run_names_component_dtypes(tiny_folder, capsys, tmp_path):
    out = str(tmp_path / "x.mp4")

    def components(argv: list[str]) -> str:
        assert main(["generate", "--dry-run", "--output", out, *argv]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("components "))

    assert components([]) == "components transformer float32 on cpu, text_encoder float32 on cpu, vae float32 on cpu"
    assert components(["--set", "model.dtype=bfloat16"]) == (
        "components transformer bfloat16 (+float32 islands) on cpu, text_encoder bfloat16 on cpu, vae float32 on cpu")
    assert components(["--model", tiny_folder("hunyuanvideo", "bfloat16"), "--set", "model.dtype=bfloat16",
                       "--set", "model.vae_dtype=auto"]) == (
        "components transformer bfloat16 on cpu, text_encoder bfloat16 on cpu, text_encoder_2 bfloat16 on cpu, "
        "vae bfloat16 on cpu")
    # A folder names its text encoder's class: umT5 keeps `wo` in float32 when loaded in float16.
    assert components(["--model", tiny_folder("wan"), "--set", "model.dtype=float16", "--width", "64"]) == (
        "components transformer float16 (+float32 islands) on cpu, text_encoder float16 (+float32 islands) on cpu, "
        "vae float32 on cpu")


@pytest.mark.parametrize("family", sorted(SPECS))
def test_every_family_in_bfloat16_equals_diffusers(tiny_folder, tmp_path, family):
    """The registry's bfloat16 battery: each family's bfloat16 folder, loaded as diffusers' examples
    load it (the pipeline in bfloat16, the VAE and any CLIP image encoder in float32), gives the
    engine's latents bitwise (the same calls in the same order, so the same roundings)."""
    import families

    folder = tiny_folder(family, "bfloat16")
    sampling = families.sampling(family, steps=3, folder=tmp_path)
    config = RunConfig(model=ModelConfig(path=folder, dtype="bfloat16"), sampling=sampling,
                       output=OutputConfig(decode=False, progress=False))
    ours = Engine.from_config(config).render().latents
    import diffusers

    pipe = getattr(diffusers, SPECS[family].pipeline_class).from_pretrained(
        folder, dtype={"default": torch.bfloat16, "vae": torch.float32, "image_encoder": torch.float32})
    pipe.set_progress_bar_config(disable=True)
    theirs = families.run(pipe, family, sampling)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs), rel_err(ours, theirs)
