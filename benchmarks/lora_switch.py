"""LoRA cost on the CPU: the step time with a fused LoRA against none, and the seconds a switch
of LoRAs takes against the seconds loading the model takes, on the tiny Wan and on a mid-size
one (Wan 2.1 1.3B's block width, 1536 wide with 12 heads and an 8960 MLP, at 6 blocks: about
280M transformer parameters), from folders written here.

Step time: renders alternate (no LoRA, LoRA) on one engine so machine noise hits both;
the ratio of the median seconds per step, and of the fastest step of each side (on a busy 2-core
machine the least disturbed step is the steadier measure of a cost). Goal <= 1.01 (a fused LoRA leaves no adapter in the
forward). Switch: `Engine.loras.use` from one LoRA to another (restore the originals, fuse the
other), median over repeats, against the engine's load seconds (folder to ready engine, every
weight read from the disk, and again from the page cache).

    python benchmarks/lora_switch.py [--repeats 7]

Writes benchmarks/results/<date>-lora-switch-cpu.md naming the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def mid_folder(out: Path) -> Path:
    """The tiny Wan pipeline with a wider, deeper transformer (random weights), saved."""
    import diffusers

    from unison.engine.models import get_spec

    pipe = get_spec("wan").build_tiny(0)
    config = dict(pipe.transformer.config)
    config.update(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=6)
    torch.manual_seed(0)
    pipe.transformer = diffusers.WanTransformer3DModel.from_config(config)
    pipe.save_pretrained(out)
    return out


def measure(folder: Path, loras: list[Path], *, repeats: int, steps: int) -> dict:
    from unison.engine.config import LoraConfig, ModelConfig, OutputConfig, RunConfig, SamplingConfig
    from unison.engine.render import Engine

    base = RunConfig(model=ModelConfig(path=str(folder)),
                     sampling=SamplingConfig(prompt="a fox in the snow", negative_prompt="blurred", height=64,
                                             width=64, frames=9, steps=steps, guidance=5.0, max_sequence_length=16),
                     output=OutputConfig(decode=False, progress=False))
    with_lora = dataclasses.replace(base, lora=(LoraConfig(path=str(loras[0])),))

    def load_engine(cold: bool):
        """An engine from the folder with every weight read (safetensors maps the files and reads
        a weight when it is first touched: touch them all); cold: the folder's pages dropped from
        the page cache first, so the weights come from the disk."""
        if cold:
            os.sync()
            for file in folder.rglob("*"):
                if file.is_file():
                    fd = os.open(file, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
        started = time.perf_counter()
        engine = Engine.from_config(base)
        with torch.no_grad():
            for module in (engine.pipe.transformer, engine.pipe.text_encoder, engine.pipe.vae):
                sum(float(p.sum()) for p in module.parameters())
        return engine, time.perf_counter() - started

    _, cold = load_engine(cold=True)
    engine, warm = load_engine(cold=False)
    # One engine, LoRA and none alternating: the same modules either way; the switch before each
    # render is outside its denoising seconds.
    step = {"none": [], "lora": []}
    for _ in range(repeats):
        for name, config in (("none", base), ("lora", with_lora)):
            result = engine.render(config)
            step[name] += [record.seconds for record in result.loop.steps]
    switches = []
    for i in range(repeats):
        other = (LoraConfig(path=str(loras[(i + 1) % 2])),)
        assert engine.loras.use(other)
        switches.append(engine.loras.seconds)
    touched = len(engine.loras.originals)
    params = sum(p.numel() for p in engine.pipe.transformer.parameters())
    return dict(cold=cold, warm=warm, none=statistics.median(step["none"]), lora=statistics.median(step["lora"]),
                none_min=min(step["none"]), lora_min=min(step["lora"]),
                switch=statistics.median(switches), touched=touched, params=params)


def main() -> None:
    from loop_vs_diffusers import device_name
    from test_lora import write_lora
    from unison.engine.models import get_spec
    from unison.launch.cli import main as unison

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        unison(["make-tiny", "--family", "wan", "--out", str(tmp / "tiny")])
        folders = {"tiny Wan": tmp / "tiny", "mid-size Wan (6 blocks x 1536)": mid_folder(tmp / "mid")}
        import diffusers

        for name, folder in folders.items():
            transformer = diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer")
            loras = [write_lora(tmp / f"{name[:3]}-{i}.safetensors", transformer, seed=i) for i in (1, 2)]
            rows.append((name, measure(folder, loras, repeats=args.repeats, steps=args.steps)))
    lines = [f"# LoRA: step time fused vs none, switch vs load ({datetime.date.today()})", "",
             f"Device: {device_name(torch.device('cpu'))}; torch {torch.__version__}; `python "
             f"benchmarks/lora_switch.py --repeats {args.repeats} --steps {args.steps}`; 64x64, 9 frames, CFG "
             f"(two branches); a rank-2 LoRA on every attention and MLP layer of the blocks.", "",
             "| model | transformer params | weights changed | s/step none | s/step LoRA | ratio (medians) "
             "| ratio (fastest steps) | load s (disk) "
             "| load s (page cache) | switch s | switch / load (disk) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['touched']} | {r['none']:.4f} | {r['lora']:.4f} | "
                     f"{r['lora'] / r['none']:.3f} | {r['lora_min'] / r['none_min']:.3f} | {r['cold']:.2f} | {r['warm']:.2f} | {r['switch']:.3f} | "
                     f"{r['switch'] / r['cold']:.3f} |")
    lines += ["", "Medians of the repeats; one engine renders with the LoRA and without, alternating. Load: folder "
              "to a ready engine with every weight of the transformer, text encoder and VAE read (safetensors maps "
              "the files; each weight is read when touched), from the disk (the folder's pages dropped from the page "
              "cache with posix_fadvise first) and again from the page cache. Switch: each weight "
              "the next LoRA changes written once from its host original plus the LoRA's terms (its file read at "
              "its first use and kept), the others copied back."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / f"{datetime.date.today()}-lora-switch-cpu.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
