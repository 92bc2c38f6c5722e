"""The GPU suite cannot rot: its --smoke run (the same code at tiny shapes on the CPU) completes
every section, and its one-GPU stand-in for a rank computes exactly one rank's share."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_suite  # noqa: E402


def test_smoke_run_completes_every_section(tmp_path):
    path, sections = gpu_suite.run_suite(smoke=True, out=tmp_path, skip_tests=True)
    assert path.is_file() and path.parent == tmp_path
    rows = [row for section in sections.values() for row in section]
    assert rows and not [row for row in rows if "error" in row], rows
    forward = sections["one forward, per-rank share of Ulysses N (compute only)"]
    assert [(r["case"], r["ranks"]) for r in forward] == [("tiny Wan", 1), ("tiny Wan", 2), ("tiny Wan", 4),
                                                          ("tiny HunyuanVideo", 1), ("tiny HunyuanVideo", 2)]
    assert all(r["seconds"] > 0 for r in forward)
    caches = {r["cache"]: r for r in sections["cache overhead, never skipping"]}
    # Never-skipping settings really never skip (else the overhead would be understated).
    assert caches["fbcache"]["skipped"] == 0 and caches["pab"]["skipped"] == 0
    assert {r["mode"] for r in sections["eager vs compiled (model.compile=blocks)"]} == {"eager", "compiled"}
    text = path.read_text()
    for title in sections:
        assert f"## {title}" in text


def test_a_simulated_rank_computes_one_ranks_share(monkeypatch):
    """Ulysses N on one device: the blocks see 1/N of the tokens, self-attention sees every token
    with 1/N of the heads (the shapes one rank of N computes)."""
    case = gpu_suite.smoke_cases()[0]
    transformer = gpu_suite.build_transformer(case, torch.device("cpu"), torch.float32)
    kwargs = gpu_suite.inputs(case, transformer, torch.device("cpu"), torch.float32)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kw):
        q, k = (args[:2] if len(args) >= 2 else (kw["query"], kw["key"]))
        seen.append(("attention", tuple(q.shape), tuple(k.shape)))
        return sdpa(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    block = transformer.blocks[0]
    tokens, heads = 3 * 4 * 4, transformer.config.num_attention_heads
    for n in (1, 2, 4):
        seen.clear()
        with torch.no_grad(), gpu_suite.simulated_rank(transformer, "wan", n):
            hook = block.register_forward_pre_hook(lambda m, args: seen.append(("block", args[0].shape[1])))
            out = transformer(**kwargs)[0]
            hook.remove()
        assert out.shape == kwargs["hidden_states"].shape
        assert ("block", tokens // n) in seen
        self_attention = [s for s in seen if s[0] == "attention" and s[2][2] == tokens]
        # (batch, heads, tokens, head_dim) as sdpa takes it: every token, 1/N of the heads
        assert self_attention and all(s[1][1] == heads // n and s[1][2] == tokens for s in self_attention), seen
