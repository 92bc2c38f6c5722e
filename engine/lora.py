"""LoRA adapters fused into the transformers' weights, chosen per render.

A render's `lora` entries (engine/config.py LoraConfig) are read by the family's own diffusers
loader: its pipeline class's `lora_state_dict`, which converts the original repositories' and the
kohya/musubi-style keys to diffusers' (a family whose pipeline has none, HunyuanVideo 1.5, takes
diffusers/peft keys, as its transformer's `load_lora_adapter` does). They are put into peft LoRA
layers on a *skeleton*: the transformer built from its config with no weights (meta tensors; each
linear and convolution layer holds a zero-size stand-in), so no copy of the model is made. peft
computes each layer's change (`get_delta_weight`: the adapter's own alpha/rank scaling; its bias
where it has one), and the change, times the entry's scale and summed over the entries, is added to
the real weight in float32 and rounded once to the weight's dtype, in place, layer by layer:

- no per-forward cost: the model runs its own layers; no adapter module is left in the forward;
- every mode alike: the change lands where the weight lives: a whole weight, an FSDP2 shard (the
  change cut as the parameter is, by `distribute_tensor` with no communication), an offloaded
  weight on the CPU. Modules and parameters keep their identity, so compiled blocks are not
  recompiled and hooks, caches and parallel wrappers stay attached;
- exact switching: before its first change, each touched weight (this rank's shard of it) is
  copied to the CPU; a render with other LoRAs writes each weight they change once, as its original
  plus their terms, and copies the originals of the rest back, bitwise, so an engine that switches
  renders what a fresh one would. Memory: the touched weights once more, on the host (LoRAs on
  every linear layer of a 14B model in bf16: about 28 GB). The files of the current and the
  previous render stay on the skeleton as peft adapters, so a batch alternating two LoRAs reads
  each once.

bf16: diffusers' `fuse_lora` adds each adapter's change to the bf16 weight in turn, one rounding
per adapter (and one of the change itself); here the float32 sum is rounded once, which is never
less accurate than diffusers' fuse against a float32 reference.

`check` runs before anything loads (engine/plan.py): the file (present, a .safetensors, LoRA
layers in it, its SHA-256 recorded in the resolved config), the scale, `expert`, and, where the
folder's config.json gives the architecture, that every layer names a module of this family with
its shapes. The tiny in-process presets are checked the same way when the render applies them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import re
import time
import weakref
from pathlib import Path
from typing import Callable, Iterator

import torch

from unison.engine.config import LoraConfig
from unison.engine.errors import UserError

LORA_KEY = re.compile(r"lora[._](A|B|down|up)\b|\.lora\.(down|up)\b|lora_unet_|lora_te")
"""What names a LoRA tensor in any format diffusers reads (peft's lora_A/lora_B, kohya's
lora_down/lora_up, musubi's lora_unet_ prefix)."""


# -- which expert takes which entry -----------------------------------------------------------------

def experts_of(lora: LoraConfig, spec) -> tuple[str, ...]:
    """The expert transformers `lora` changes: both of Wan 2.2 A14B's unless `expert` picks one."""
    if len(spec.experts) == 1:
        return spec.experts
    high, low = spec.experts
    return {"high": (high,), "low": (low,)}.get(lora.expert or "both", (high, low))


# -- reading a file ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from unison.engine.images import sha256 as file_sha256

    return file_sha256(path)


def sha256(path: Path) -> str:
    """The file's SHA-256, hashed once per (path, size, modification time): a batch of jobs that
    name one LoRA reads it once."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _tensor_names(path: Path, key: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # safetensors raises its own error types for a file that is not one
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(f"{key}.path: {path} is not a .safetensors file ({reason}); unison reads LoRAs "
                        f"as safetensors") from None


def check_file(lora: LoraConfig, *, key: str) -> LoraConfig:
    """`lora` with its file's SHA-256 recorded, after the checks the file alone allows."""
    path = Path(lora.path)
    if not path.exists():
        raise UserError(f"{key}.path: {path} not found")
    if not path.is_file():
        raise UserError(f"{key}.path: {path} is not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise UserError(f"{key}.path: cannot read {path} ({err.strerror or err})") from None
    names = _tensor_names(path, key)
    if not names:
        raise UserError(f"{key}.path: {path} holds no tensors; a LoRA holds lora_A/lora_B (or lora_down/lora_up) "
                        f"weights")
    if not any(LORA_KEY.search(name) for name in names):
        raise UserError(f"{key}.path: {path} holds no LoRA layers ({len(names)} tensors, such as {names[0]!r}); "
                        f"a full model checkpoint is not a LoRA")
    dora = next((name for name in names if "dora_scale" in name or "lora_magnitude" in name), None)
    if dora is not None:
        raise UserError(f"{key}.path: {path} is a DoRA ({dora!r}); diffusers' loaders drop its magnitudes, so it "
                        f"would render as another adapter: unison fuses plain LoRAs only")
    actual = sha256(path)
    if lora.sha256 is not None and lora.sha256 != actual:
        raise UserError(f"{key}.path: {path} changed since this config was written (sha256 {actual[:12]}…, "
                        f"recorded {lora.sha256[:12]}…); remove {key}.sha256 to use the new file")
    return dataclasses.replace(lora, sha256=actual)


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' logger at ERROR while its loaders run: their DoRA and unhandled-key notices are
    said here as errors of our own where they matter."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _state(spec, path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The file as diffusers-format LoRA layers (`transformer.<module>.lora_A.weight`, …), through
    the family's own loader, and its adapter metadata."""
    import diffusers

    pipeline = getattr(diffusers, spec.pipeline_class)
    try:
        with _quiet_diffusers():
            if hasattr(pipeline, "lora_state_dict"):
                state, metadata = pipeline.lora_state_dict(str(path), return_lora_metadata=True)
            else:
                from safetensors.torch import load_file

                state, metadata = load_file(str(path)), None
    except UserError:
        raise
    except Exception as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(f"{key}.path: diffusers cannot read {path} as a {spec.title} LoRA ({reason})") from None
    if not state:
        raise UserError(f"{key}.path: {path} holds no LoRA layers that {spec.title}'s loader reads")
    other = [name for name in state if "lora" not in name]
    if other:
        raise UserError(f"{key}.path: {path} holds weights that are not LoRA layers once read as a {spec.title} "
                        f"LoRA (such as {other[0]!r}); unison fuses LoRA layers only")
    return state, metadata


# -- the skeleton ---------------------------------------------------------------------------------

def _stand_in(shape: torch.Size) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(shape), requires_grad=False)


def skeleton(spec, config: dict) -> torch.nn.Module:
    """The family's transformer built from `config` with no weights: meta tensors, and zero-size
    float32 stand-ins (expanded scalars) in every linear and convolution layer, which is where
    peft puts its adapters and what it casts them to."""
    import diffusers

    cls = getattr(diffusers, spec.transformer_class)
    with torch.device("meta"):
        model = cls.from_config(config)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            module.weight = _stand_in(module.weight.shape)
            if module.bias is not None:
                module.bias = _stand_in(module.bias.shape)
    return model


def _layers(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module name (without the `transformer.` prefix) -> its LoRA tensors (lora_A.weight, …)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        module, _, part = name.removeprefix("transformer.").partition(".lora_")
        layers.setdefault(module, {})["lora_" + part] = tensor
    return layers


def check_fits(state: dict[str, torch.Tensor], model: torch.nn.Module, *, spec, expert: str, path: Path,
               key: str) -> None:
    """Every layer of `state` names a linear or convolution module of `model` (a skeleton or the
    transformer) with its shapes: else one line naming a few and the family."""
    modules = dict(model.named_modules())
    layers = _layers(state)
    missing = [m for m in layers if not hasattr(modules.get(m), "weight")]
    where = f"{spec.title}'s {expert}" if len(spec.experts) > 1 else spec.title
    if missing:
        raise UserError(f"{key}.path: {len(missing)} of the {len(layers)} layers of {path} match no module of "
                        f"{where} (such as {', '.join(missing[:3])}); a LoRA for another model?")
    for name, parts in layers.items():
        shape = tuple(modules[name].weight.shape)
        down, up = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if down is None or up is None:
            raise UserError(f"{key}.path: {path} has {'lora_B' if down is None else 'lora_A'} but not "
                            f"{'lora_A' if down is None else 'lora_B'} for {name}")
        if down.shape[0] != up.shape[1] or down.shape[1] != shape[1] or up.shape[0] != shape[0]:
            raise UserError(f"{key}.path: the LoRA of {name} in {path} maps {down.shape[1]} inputs to {up.shape[0]} "
                            f"outputs at rank {down.shape[0]}/{up.shape[1]}; {where}'s module takes {shape[1]} and "
                            f"gives {shape[0]}: a LoRA for another model or size?")


def _load(skeleton_model: torch.nn.Module, spec, state: dict, metadata, name: str) -> None:
    """Put one LoRA's layers into the skeleton as peft adapter `name`, as the family's pipeline
    loader would into the transformer."""
    import diffusers

    pipeline = getattr(diffusers, spec.pipeline_class)
    state = dict(state)
    with _quiet_diffusers():
        if hasattr(pipeline, "_maybe_expand_t2v_lora_for_i2v"):  # a T2V LoRA on Wan I2V: zeros for its image layers
            state = pipeline._maybe_expand_t2v_lora_for_i2v(transformer=skeleton_model, state_dict=state)
            state = {k: torch.zeros(v.shape, dtype=v.dtype) if v.is_meta else v for k, v in state.items()}
        if hasattr(pipeline, "load_lora_into_transformer"):
            pipeline.load_lora_into_transformer(state, transformer=skeleton_model, adapter_name=name,
                                                metadata=metadata, low_cpu_mem_usage=True)
        else:
            prefix = "transformer" if all(k.startswith("transformer.") for k in state) else None
            skeleton_model.load_lora_adapter(state, prefix=prefix, adapter_name=name, metadata=metadata,
                                             low_cpu_mem_usage=True)


@dataclasses.dataclass
class Change:
    """What the adapters add to one parameter: Σ factor · up @ down (low-rank terms, the plain
    LoRA layers: added by addmm in one pass over the weight, never formed whole), plus whole
    tensors (a bias; peft's own change where a layer is not plain: DoRA, conv, fan_in_fan_out)."""
    terms: list[tuple[torch.Tensor, torch.Tensor, float]] = dataclasses.field(default_factory=list)
    whole: torch.Tensor | None = None

    def add_whole(self, tensor: torch.Tensor) -> None:
        self.whole = tensor if self.whole is None else self.whole + tensor


@torch.no_grad()
def changes(model: torch.nn.Module, adapters: list[tuple[str, float]]) -> Iterator[tuple[str, Change]]:
    """(parameter name, Change) for every weight and bias the adapters of `model` (a skeleton
    with them loaded) change, one layer at a time: each adapter's change as peft computes it
    (`get_delta_weight`: up @ down · its alpha/rank scaling), times the entry's scale."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight, bias = Change(), Change()
        for adapter, scale in adapters:
            if adapter not in module.lora_A:
                continue
            plain = (type(module) is LoraLinear and not module.use_dora.get(adapter, False)
                     and not getattr(module, "fan_in_fan_out", False))
            if plain:  # peft's get_delta_weight for it: lora_B @ lora_A * scaling
                weight.terms.append((module.lora_B[adapter].weight.float(), module.lora_A[adapter].weight.float(),
                                     module.scaling[adapter] * scale))
            else:
                weight.add_whole(module.get_delta_weight(adapter).float() * scale)
            if module.lora_bias.get(adapter, False):
                bias.add_whole(module.lora_B[adapter].bias.float() * module.scaling[adapter] * scale)
        if weight.terms or weight.whole is not None:
            yield f"{name}.weight", weight
        if bias.whole is not None:
            yield f"{name}.bias", bias


# -- before loading -------------------------------------------------------------------------------

def check(loras: tuple[LoraConfig, ...], spec, *, read: Callable[[str], dict] | None) -> tuple[LoraConfig, ...]:
    """The entries with their files' SHA-256 recorded, or a one-line UserError: the file, the
    expert, and (given `read`, a model folder's config files) that every layer fits the family's
    transformer (built from config.json on the meta device; no weights read)."""
    checked = []
    for i, lora in enumerate(loras):
        key = f"lora[{i}]"
        if lora.expert is not None and len(spec.experts) == 1:
            raise UserError(f"{key}.expert: {spec.title} has one transformer; expert picks Wan 2.2 A14B's high-noise, "
                            f"low-noise or both experts: leave it out")
        lora = check_file(lora, key=key)
        if read is not None:
            for expert in experts_of(lora, spec):
                _check_structure(lora.path, lora.sha256, spec.family, expert, _frozen(read(f"{expert}/config.json")),
                                 key)
        checked.append(lora)
    return tuple(checked)


def _frozen(config: dict):
    import json

    return json.dumps(config, sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _check_structure(path: str, digest: str, family: str, expert: str, config: str, key: str) -> None:
    """Once per (file, expert config): a batch of jobs naming one LoRA builds one skeleton."""
    import json

    from unison.engine.models import get_spec

    spec = get_spec(family)
    state, _ = _state(spec, Path(path), key)
    check_fits(state, skeleton(spec, json.loads(config)), spec=spec, expert=expert, path=Path(path), key=key)


def host_copy(loras: tuple[LoraConfig, ...], spec, *, dtype_bytes: int = 2) -> tuple[int, int]:
    """(weights, bytes): how many weights the entries change (each expert's once, however many
    entries touch it) and the host memory their originals take at `dtype_bytes` per element: what
    an engine keeps to switch exactly, from the files' shapes (`unison plan`)."""
    touched: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(loras):
        state, _ = _state(spec, Path(entry.path), f"lora[{i}]")
        for module, parts in _layers(state).items():
            down, up = parts.get("lora_A.weight"), parts.get("lora_B.weight")
            if down is None or up is None:
                continue
            size = up.shape[0] * down[0].numel() + (up.shape[0] if "lora_B.bias" in parts else 0)
            for expert in experts_of(entry, spec):
                touched[(expert, module)] = size
    return len(touched), sum(touched.values()) * dtype_bytes


def _live(param: torch.Tensor) -> torch.Tensor:
    """The tensor holding a parameter's values on this rank: an FSDP2 shard's local rows, or the
    parameter's data wherever it is now."""
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param.data


# -- on the engine --------------------------------------------------------------------------------

class Loras:
    """The LoRAs fused into an engine's transformers; `use` switches them between renders."""

    def __init__(self, pipe, spec):
        """Before parallelism rebuilds the transformers (PipeFusion moves a stage's blocks under one
        runner and drops the rest): each module is found later by its name in the model as loaded,
        held weakly, so a dropped block is freed and skipped."""
        self.pipe, self.spec = pipe, spec
        self.modules = {expert: weakref.WeakValueDictionary(dict(getattr(pipe, expert).named_modules()))
                        for expert in spec.experts}
        self.fused: tuple[LoraConfig, ...] = ()
        self.originals: dict[tuple[str, str], tuple[torch.nn.Module, str, torch.Tensor]] = {}
        """(expert, parameter name) -> (its module, the parameter's name there, its original on the
        CPU). The live tensor is looked up at each use: offload moves parameter data between
        devices (a new tensor each move)."""
        self.seconds = 0.0
        """Seconds the last switch took (restore and fuse)."""
        self.skeletons: dict[str, torch.nn.Module] = {}
        """Per expert: its weightless copy, holding the LoRAs of the current and the previous
        render as peft adapters, so that a batch alternating LoRAs reads each file once."""
        self.loaded: dict[str, set[str]] = {}
        """Per expert: the adapters on its skeleton."""
        self.previous: dict[str, set[str]] = {}
        """Per expert: the adapters the last render with LoRAs there used."""
        self._stale: set[tuple[str, str]] | None = None
        """During a switch: the keys whose weights still hold the previous LoRAs' changes."""

    def use(self, loras: tuple[LoraConfig, ...]) -> bool:
        """Fuse `loras` (restoring the weights first when others are fused); False when they are
        the ones fused already."""
        if tuple(loras) == self.fused:
            return False
        started = time.perf_counter()
        # The weights the fused LoRAs changed: the new ones are computed from their host copies in
        # one pass (original + change, written over the weight); the rest are copied back after.
        self._stale = set(self.originals) if self.fused else set()
        self.fused = ()
        for expert in self.spec.experts:
            entries = [(i, lora) for i, lora in enumerate(loras) if expert in experts_of(lora, self.spec)]
            if entries:
                self._fuse(expert, entries)
        self.restore()
        self.fused = tuple(loras)
        self.seconds = time.perf_counter() - started
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Every weight changed by LoRAs no longer fused back to its original, bitwise (all of
        them when called alone). The host copies stay: the weights equal them again, and the next
        LoRAs need not copy what is copied."""
        stale = self._stale if self._stale is not None else (set(self.originals) if self.fused else set())
        for key in stale:
            module, attr, original = self.originals[key]
            tensor = _live(getattr(module, attr))
            tensor.copy_(original.to(tensor.device))
        self._stale = None
        self.fused = ()

    @torch.no_grad()
    def _fuse(self, expert: str, entries: list[tuple[int, LoraConfig]]) -> None:
        transformer = getattr(self.pipe, expert)
        if expert not in self.skeletons:
            self.skeletons[expert] = skeleton(self.spec, dict(transformer.config))
        model = self.skeletons[expert]
        adapters = []
        for i, lora in entries:
            name = f"lora_{lora.sha256 or hashlib.sha256(str(Path(lora.path).resolve()).encode()).hexdigest()}"[:21]
            if name not in self.loaded.setdefault(expert, set()):  # a file once read stays on the skeleton
                key, path = f"lora[{i}]", Path(lora.path)
                state, metadata = _state(self.spec, path, key)
                check_fits(state, model, spec=self.spec, expert=expert, path=path, key=key)
                _load(model, self.spec, state, metadata, name)
                self.loaded[expert].add(name)
            adapters.append((name, lora.scale))
        # The skeleton keeps the files of this render and of the last one with LoRAs on this
        # expert (a batch alternating two reads each once); older ones are dropped, so host
        # memory stays bounded over a long batch of different LoRAs.
        used = {name for name, _ in adapters}
        stale = self.loaded[expert] - used - self.previous.get(expert, set())
        if stale:
            model.delete_adapters(sorted(stale))
            self.loaded[expert] -= stale
        self.previous[expert] = used
        modules = self.modules[expert]
        for name, change in changes(model, adapters):
            owner, _, attr = name.rpartition(".")
            module = modules.get(owner)
            if module is None:  # a block this rank dropped (another PipeFusion stage's)
                continue
            self._add((expert, name), module, attr, change)

    def _add(self, key: tuple[str, str], module: torch.nn.Module, attr: str, change: Change) -> None:
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        param = getattr(module, attr)

        def local(tensor: torch.Tensor, placements) -> torch.Tensor:
            """This rank's part of `tensor` cut as the parameter is (no message: every rank has it)."""
            return distribute_tensor(tensor.to(param.device), param.device_mesh, placements,
                                     src_data_rank=None).to_local()

        terms, whole = change.terms, change.whole
        if isinstance(param, DTensor):  # an FSDP2 shard: this rank's rows
            if whole is not None:
                whole = local(whole, param.placements)
            if terms and tuple(param.placements) == (Shard(0),):  # the up factor's rows are the weight's
                terms = [(local(up, param.placements), down, f) for up, down, f in terms]
            elif terms:
                full = sum(up @ down * f for up, down, f in terms)
                whole = local(full, param.placements) if whole is None else whole + local(full, param.placements)
                terms = []
        tensor = _live(param)
        if tensor.is_meta:
            return
        if key not in self.originals:
            self.originals[key] = (module, attr, tensor.detach().to("cpu", copy=True))
        # The base: the weight itself, or where it still holds the previous LoRAs, its original.
        stale = self._stale is not None and key in self._stale
        if stale:
            self._stale.discard(key)
        base = self.originals[key][2].to(tensor.device) if stale else tensor
        if tensor.dtype != torch.float32:  # in float32, rounded once
            target = base.float()
        elif stale and terms:  # original + the first term, written over the weight in one pass
            up, down, factor = terms[0]
            torch.addmm(base, up.to(tensor.device), down.to(tensor.device), alpha=factor, out=tensor)
            target, terms = tensor, terms[1:]
        else:
            if stale:
                tensor.copy_(base)
            target = tensor
        for up, down, factor in terms:
            target.addmm_(up.to(tensor.device), down.to(tensor.device), alpha=factor)
        if whole is not None:
            target.add_(whole.to(tensor.device))
        if target is not tensor:
            tensor.copy_(target)
