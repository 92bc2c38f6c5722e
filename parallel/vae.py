"""Parallel VAE decode: the VAE's own tiled decode, with its tiles spread over a group of ranks.

Decoding a 720p video on one rank is slow, and without tiling it runs out of memory. Here the
latent video is cut into the same overlapping spatial tiles that diffusers' tiled decode uses
(most VAEs size them by `tile_sample_min_*` / `tile_sample_stride_*`; a family whose VAE sizes
them otherwise declares its `TileGeometry`), every rank of the group decodes a contiguous,
cost-balanced run of them, and group rank 0 receives the decoded tiles in order and blends them
with the same linear ramps into the video. The result equals `vae.enable_tiling();
vae.decode(z)` on one rank, to float32 rounding (the tests hold it to a relative error of 1e-6
and see exact equality on the CPU).

Frames. The Wan VAE is causal in time: it decodes one latent frame after another and carries a
feature cache of the previous frames through every causal convolution. Tiles are therefore never
split in time: each Wan tile runs all latent frames, in order, through the decoder with its own
freshly cleared cache, exactly as diffusers' tiled decode does, so the split is purely spatial.
The HunyuanVideo VAE decodes long latents in overlapping temporal chunks (its framewise
decoding, on by default, `tile_sample_*_num_frames`); each (chunk, spatial tile) pair is one unit
of work, and rank 0 blends tiles into chunks and chunks into the video as diffusers does.
The HunyuanVideo 1.5 VAE is causal in time too (causal convolutions, and an attention where a
frame sees only itself and earlier ones), but it keeps no cache between calls and never chunks
time: each tile runs all its latent frames through the decoder in one call, as diffusers' tiled
decode does, so its split is purely spatial as well.

Memory. A rank holds the activations of one tile at a time and the decoded tiles it owns until
they are sent (about 1/N of them). Rank 0 blends each tile into the video as it arrives, keeping
only the strips later blends read (bottom rows of the previous row of tiles, right columns of
the previous tile, last frames of the previous chunk), not every overlapping tile at once; so
even one rank needs less than diffusers' tiled decode, which holds all tiles and then copies.
Per-tile activations are the same on every rank and in diffusers (the VAE decodes one tile at a
time either way): what parallelism removes is the decoded tiles.

Gather. gloo has no gather of unequal sizes, so each owner sends its tiles to rank 0 point to
point (a small shape header, then the tile), in the order rank 0 blends them. The VAE's weights
must be in place on every rank (no CPU-offload hooks: the decoder is called directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from unison.parallel.comm import CommStats


@dataclass(frozen=True)
class TileGeometry:
    """How a VAE's tiled decode cuts the latent frame and blends the decoded tiles, as (height,
    width) pairs read from the VAE's tiling settings when a decode is planned."""

    tile: tuple[int, int]
    """Latent rows and columns of a tile; the frame is tiled when it is larger in either."""
    stride: tuple[int, int]
    """Latent rows and columns from one tile's start to the next."""
    blend: tuple[int, int]
    """Decoded pixels cross-faded from the previous tile into the next."""
    keep: tuple[int, int]
    """Decoded pixels each tile contributes after blending (its first ones)."""
    crop: bool = True
    """Whether the joined tiles are cut to the latent size times the compression; False: the video
    is the tiles' contributions joined as they are (diffusers' HunyuanVideo 1.5 decode, which
    differs from the latent size only when its latent and pixel tile sizes disagree)."""


def _sample_geometry(vae, patch: int) -> TileGeometry:
    """The usual convention (Wan, HunyuanVideo): pixel tile and stride sizes, `tile_sample_min_*`
    and `tile_sample_stride_*`, with latent sizes derived from them; `patch` folds the pixels."""
    ratio = vae.spatial_compression_ratio
    keep = (vae.tile_sample_stride_height // patch, vae.tile_sample_stride_width // patch)
    return TileGeometry(tile=(vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio),
                        stride=(vae.tile_sample_stride_height // ratio, vae.tile_sample_stride_width // ratio),
                        blend=(vae.tile_sample_min_height // patch - keep[0],
                               vae.tile_sample_min_width // patch - keep[1]),
                        keep=keep)


@dataclass(frozen=True)
class VaeTiling:
    """What parallel decode needs to know of a model family's VAE, declared by the family
    (engine/models/<family>/vae.py): how diffusers' tiled decode cuts its latents, decodes one
    tile and finishes the blended video."""

    name: str
    """The VAE as its family calls it (for messages)."""
    decode_tile: Callable[[torch.nn.Module, torch.Tensor, bool], torch.Tensor]
    """(vae, a tile's latents, whether the frame is tiled) -> the tile decoded."""
    pixel_patch: Callable[[torch.nn.Module], int] = lambda vae: 1
    """The pixel patch the decoder's output is folded by (unfolded by `finish`); 1: none."""
    framewise: Callable[[torch.nn.Module], bool] = lambda vae: False
    """Whether the VAE also decodes long latents in overlapping temporal chunks
    (`tile_sample_*_num_frames`)."""
    finish: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lambda vae, video: video
    """(vae, the blended video) -> the video as the VAE's own decode returns it."""
    geometry: Callable[[torch.nn.Module], TileGeometry] | None = None
    """(vae) -> how its tiled decode cuts and blends; None: from `tile_sample_min_*` and
    `tile_sample_stride_*`, the pixels folded by `pixel_patch`."""


@dataclass(frozen=True)
class Tile:
    """One unit of decode work: latent frames, rows and columns as [start, stop) ranges."""

    chunk: int
    row: int
    col: int
    frames: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def cost(self) -> int:
        return ((self.frames[1] - self.frames[0]) * (self.rows[1] - self.rows[0])
                * (self.cols[1] - self.cols[0]))


@dataclass(frozen=True)
class TilePlan:
    """Where diffusers' tiled decode cuts a latent video, and how it blends the pieces back."""

    tiling: VaeTiling
    tiles: tuple[Tile, ...]
    """In blending order: chunk, then row, then column."""
    grid: tuple[int, int]
    """Tile rows and columns per chunk ((1, 1) when the frame fits in one tile)."""
    spatial: bool
    """Whether the frame is tiled (blend and crop) or decoded whole."""
    blend: tuple[int, int]
    """Overlap blended between neighbouring tiles, decoded pixels (height, width)."""
    stride: tuple[int, int]
    """Decoded pixels each tile contributes (height, width) before the final crop."""
    size: tuple[int, int]
    """Decoded frame size (height, width) the joined tiles are cut to; Wan 2.2's patchified size
    before unpatchify."""
    chunks: int = 1
    blend_frames: int = 0
    """HunyuanVideo framewise decoding: decoded frames blended between chunks, and those each
    chunk contributes; `frames` is the decoded length."""
    stride_frames: int = 0
    frames: int = 0

    def owners(self, n: int) -> list[int]:
        """The rank that decodes each tile: contiguous runs of about equal latent volume (a rank
        gets no tile when there are fewer tiles than ranks; a single tile stays on rank 0)."""
        if len(self.tiles) == 1:
            return [0]
        total, done, out = sum(t.cost for t in self.tiles), 0, []
        for t in self.tiles:
            out.append(min(n - 1, (2 * done + t.cost) * n // (2 * total)))
            done += t.cost
        return out


def _starts(length: int, tile: int, stride: int, tiled: bool) -> list[tuple[int, int]]:
    if not tiled:
        return [(0, length)]
    return [(s, min(s + tile, length)) for s in range(0, length, stride)]


def plan_tiles(vae, shape: tuple[int, ...], tiling: VaeTiling) -> TilePlan:
    """The tiles of a latent video of `shape` (B, C, F, H, W), as the VAE's tiled decode cuts it."""
    if len(shape) != 5:
        raise ValueError(f"expected latents (batch, channels, frames, height, width), got shape {tuple(shape)}")
    _, _, frames, height, width = shape
    ratio = vae.spatial_compression_ratio
    patch = tiling.pixel_patch(vae)
    g = tiling.geometry(vae) if tiling.geometry is not None else _sample_geometry(vae, patch)
    spatial = height > g.tile[0] or width > g.tile[1]
    rows = _starts(height, g.tile[0], g.stride[0], spatial)
    cols = _starts(width, g.tile[1], g.stride[1], spatial)
    if g.crop:
        size = (height * ratio // patch, width * ratio // patch)
    else:  # as long as the contributions joined: each tile's decoded extent, at most `keep`
        size = tuple(sum(min((stop - start) * ratio // patch, keep) for start, stop in starts)
                     for starts, keep in ((rows, g.keep[0]), (cols, g.keep[1])))
    temporal = {}
    chunks = [(0, frames)]
    if tiling.framewise(vae):
        t_ratio = vae.temporal_compression_ratio
        t_tile, t_stride = vae.tile_sample_min_num_frames // t_ratio, vae.tile_sample_stride_num_frames // t_ratio
        if frames > t_tile:
            # Each chunk takes one latent frame more than its tile; its first decoded frame is dropped.
            chunks = [(s, min(s + t_tile + 1, frames)) for s in range(0, frames, t_stride)]
            temporal = dict(blend_frames=vae.tile_sample_min_num_frames - vae.tile_sample_stride_num_frames,
                            stride_frames=vae.tile_sample_stride_num_frames, frames=(frames - 1) * t_ratio + 1)
    tiles = tuple(Tile(chunk=c, row=i, col=j, frames=f, rows=r, cols=k) for c, f in enumerate(chunks)
                  for i, r in enumerate(rows) for j, k in enumerate(cols))
    return TilePlan(tiling=tiling, tiles=tiles, grid=(len(rows), len(cols)), spatial=spatial, blend=g.blend,
                    stride=g.keep, size=size, chunks=len(chunks), **temporal)


def _blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first `extent` slices of `cur` along `dim` from the last ones of `prev`, in
    place, one slice at a time with Python-float weights (the same rounding as diffusers)."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    for k in range(extent):
        w = k / extent
        mixed = prev.select(dim, prev.shape[dim] - extent + k) * (1 - w) + cur.select(dim, k) * w
        cur.select(dim, k).copy_(mixed)


def _tail(x: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """A copy of the last `extent` slices along `dim`: all a later blend reads of a tile."""
    k = min(x.shape[dim], max(extent, 0))
    return x.narrow(dim, x.shape[dim] - k, k).clone()


class _Canvas:
    """Blends decoded tiles, arriving in plan order, into the video. A blend reads the neighbours'
    already blended pixels, so it keeps, after blending, the bottom strip of each tile of the
    previous row, the right strip of the previous tile and the last frames of the previous chunk."""

    def __init__(self, plan: TilePlan):
        self.plan = plan
        self.above: dict[int, torch.Tensor] = {}
        self.left: torch.Tensor | None = None
        self.frame: torch.Tensor | None = None
        self.y = self.y_next = self.x = 0
        self.video: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        self.t = 0

    def add(self, tile: Tile, x: torch.Tensor) -> None:
        p = self.plan
        if not p.spatial:
            return self._add_chunk(tile.chunk, x)
        if tile.row > 0:
            _blend(self.above[tile.col], x, p.blend[0], dim=-2)
        if tile.col > 0:
            _blend(self.left, x, p.blend[1], dim=-1)
        self.above[tile.col], self.left = _tail(x, p.blend[0], -2), _tail(x, p.blend[1], -1)
        if tile.row == tile.col == 0:
            self.frame = x.new_empty((*x.shape[:3], *p.size))
            self.y_next = 0
        if tile.col == 0:
            self.y, self.x = self.y_next, 0
            self.y_next += min(x.shape[-2], p.stride[0])
        h = max(0, min(x.shape[-2], p.stride[0], p.size[0] - self.y))
        w = max(0, min(x.shape[-1], p.stride[1], p.size[1] - self.x))
        self.frame[..., self.y:self.y + h, self.x:self.x + w] = x[..., :h, :w]
        self.x += min(x.shape[-1], p.stride[1])
        if (tile.row, tile.col) == (p.grid[0] - 1, p.grid[1] - 1):
            self.above, self.left = {}, None
            self._add_chunk(tile.chunk, self.frame[..., :min(self.y_next, p.size[0]), :min(self.x, p.size[1])])

    def _add_chunk(self, index: int, x: torch.Tensor) -> None:
        p = self.plan
        if p.chunks == 1:
            self.video = x
            return
        if index > 0:
            x = x[:, :, 1:]
            _blend(self.previous, x, p.blend_frames, dim=2)
        if self.video is None:
            self.video = x.new_empty((*x.shape[:2], p.frames, *x.shape[3:]))
        keep = p.stride_frames + (1 if index == 0 else 0)
        n = max(0, min(x.shape[2], keep, p.frames - self.t))
        self.video[:, :, self.t:self.t + n] = x[:, :, :n]
        self.t += min(x.shape[2], keep)
        self.previous = _tail(x, p.blend_frames, 2)

    def result(self) -> torch.Tensor:
        return self.video if self.plan.chunks == 1 else self.video[:, :, :min(self.t, self.plan.frames)]


def _decode_tile(vae, plan: TilePlan, latents: torch.Tensor, tile: Tile) -> torch.Tensor:
    z = latents[:, :, slice(*tile.frames), slice(*tile.rows), slice(*tile.cols)]
    return plan.tiling.decode_tile(vae, z, plan.spatial)


@torch.no_grad()
def parallel_decode(vae, latents: torch.Tensor, *, tiling: VaeTiling, group,
                    stats: CommStats | None = None) -> torch.Tensor | None:
    """Decode `latents` (as `vae.decode` receives them, already scaled) with the VAE's tiled decode,
    its tiles spread over `group`. Every rank of the group calls this with the same latents and VAE
    weights; group rank 0 gets the video (B, C, frames, H, W), the others None. `group=None` decodes
    every tile here. Always tiles (whatever `vae.use_tiling` says); `stats` counts the bytes sent."""
    plan = plan_tiles(vae, tuple(latents.shape), tiling)
    n, me = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    owners = plan.owners(n)
    if me != 0:  # decode every owned tile, then send them in order (rank 0 is busy until then)
        mine = [_decode_tile(vae, plan, latents, t) for t, o in zip(plan.tiles, owners) if o == me]
        dst = dist.get_global_rank(group, 0)
        for x in mine:
            x = x.contiguous()
            dist.send(torch.tensor(x.shape, dtype=torch.int64, device=x.device), dst, group=group)
            dist.send(x, dst, group=group)
            if stats is not None:
                stats.add("vae_gather", x.numel() * x.element_size())
        return None
    # Rank 0's tiles come first in the plan's order: it blends each as soon as it is decoded,
    # then takes the others' tiles as they arrive.
    canvas = _Canvas(plan)
    for tile, owner in zip(plan.tiles, owners):
        if owner == 0:
            x = _decode_tile(vae, plan, latents, tile)
        else:
            src = dist.get_global_rank(group, owner)
            shape = torch.empty(5, dtype=torch.int64, device=latents.device)
            dist.recv(shape, src, group=group)
            x = torch.empty(shape.tolist(), dtype=vae.dtype, device=latents.device)
            dist.recv(x, src, group=group)
        canvas.add(tile, x)
        del x
    return tiling.finish(vae, canvas.result())


class ParallelVAE:
    """Stands in for a VAE: `decode` is `parallel_decode` over `group`, every other attribute is the
    VAE's, so that a model family's own decode step (latent scaling, then `vae.decode`) runs
    unchanged. Collective: every rank of the group calls `decode`; ranks other than 0 get None."""

    def __init__(self, vae, *, tiling: VaeTiling, group, stats: CommStats | None = None):
        self._vae, self._tiling, self._group, self._stats = vae, tiling, group, stats

    def __getattr__(self, name: str):
        return getattr(self._vae, name)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        video = parallel_decode(self._vae, z, tiling=self._tiling, group=self._group, stats=self._stats)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=video)
        return (video,)
