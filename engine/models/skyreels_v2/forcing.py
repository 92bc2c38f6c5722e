"""SkyReels-V2 diffusion forcing (diffusers' SkyReelsV2DiffusionForcingPipeline and
SkyReelsV2DiffusionForcingImageToVideoPipeline): the loop is engine/windows.py's; these hooks are
what the family adds to it.

- The text is encoded as SkyReels-V2's other pipelines encode it (Wan's umT5 encoding).
- Every forward takes `enable_diffusion_forcing=True` (the modulation becomes per token: a
  timestep per frame) and, for checkpoints with inject_sample_info (DF-1.3B), the fps embedding's
  index: 0 for 16 fps, 1 for any other rate, as diffusers maps it.
- The causal block is the transformer's `num_frame_per_block` (diffusers' `_set_ar_attention`,
  a config change that outlives the call): set before every render, so one render's choice never
  leaks into the next.
- Image-to-video takes no CLIP tokens: the picture is VAE-encoded (the distribution's mode,
  normalised) to one latent frame, given to the first window as a finished frame. The step matrix
  of every window is built against the full window length (the text-to-video pipeline builds it
  against each window's own length): the two pipelines differ there, and so do these hooks.
  One checkpoint serves both: `skyreels-v2-df` takes an optional picture (then it is the
  image-to-video pipeline's render), `skyreels-v2-df-i2v` requires one.
- Extension (sampling.extend, diffusers' SkyReelsV2DiffusionForcingVideoToVideoPipeline): the
  given video's last overlap_frames frames, resized, VAE-encoded and normalised, are the first
  window's given frames (cut to whole causal blocks); the step matrices are the text-to-video
  pipeline's. The given video is read twice, a frame at a time (for its last frames, and into the
  written video), never held whole. diffusers' video-to-video output is the given video followed
  by the decode of every latent frame, so the overlap appears twice; here the written video is
  the given one followed by the new frames only (the latents are diffusers').
"""

from __future__ import annotations

import torch

from unison.engine import images, schedulers
from unison.engine.errors import UserError
from unison.engine.models.spec import Conditioning
from unison.engine.models.skyreels_v2.hooks import SkyReelsHooks
from unison.engine.io.video import video_frames, video_info
from unison.engine.models.wan.vae import decode_stream, latent_stats


class ForcingHooks(SkyReelsHooks):
    """SkyReels-V2 DF text-to-video."""

    def __init__(self, family: str, *, title: str):
        super().__init__(family, title=title)
        self.takes_image = True
        self.clip_tokens = False
        self.takes_last = True

    def base_is_window(self, sampling) -> bool:
        """Each window's step matrix is built against the window's own length (diffusers' T2V and
        V2V pipelines), not the full window's (its I2V pipeline)."""
        return sampling.image is None

    def given_frames(self, sampling) -> int:
        """Latent frames a picture gives the first window (an extension's are the windows' own
        overlap: engine/windows.Windows.prefix)."""
        return 0 if sampling.image is None else 1

    def default_size(self, sampling, read) -> tuple[int, int] | None:
        """An extension takes the given video's size, each side down to a multiple of 16."""
        if sampling.extend is None:
            return None
        frame = next(video_frames(sampling.extend), None)
        if frame is None:
            raise UserError(f"sampling.extend: {sampling.extend} has no frames")
        return max(16, frame.shape[0] // 16 * 16), max(16, frame.shape[1] // 16 * 16)

    def check_sampling(self, sampling) -> None:
        images.check_images(sampling, family=self.family, takes_image=self.takes_image, needs_image=self.i2v,
                            takes_last=True)
        if sampling.last_image is not None:
            from unison.engine.windows import Windows

            windows = Windows.of(sampling, temporal=4, block=sampling.causal_block_size)
            if windows.count > 1 or sampling.causal_block_size > 1:
                # diffusers appends the end frame to the last window but counts it as long as that
                # window's given frames (the overlap, after the first window), and as a block of one.
                raise UserError(f"sampling.last_image takes one window and causal_block_size 1, as diffusers' DF "
                                f"image-to-video pipeline runs it; got {windows.count} windows, causal_block_size "
                                f"{sampling.causal_block_size}")
        if sampling.extend is not None:
            if sampling.image is not None or self.i2v:
                raise UserError("sampling.extend continues a video from its own last frames: give it without "
                                "sampling.image, to skyreels-v2-df")
            if sampling.overlap_frames is not None:
                count = video_info(sampling.extend)[0]
                if count < sampling.overlap_frames:
                    raise UserError(f"sampling.extend: {sampling.extend} has {count} frames, fewer than "
                                    f"sampling.overlap_frames ({sampling.overlap_frames}) to continue from")
        schedulers.check(sampling.scheduler, sampling.flow_shift, family=self.family, sigmas=False)
        if sampling.true_cfg_scale is not None or sampling.guidance_2 is not None:
            raise UserError(f"{self.family} runs classifier-free guidance with --guidance alone")

    def layout_problem(self, sampling, parallel) -> str | None:
        if getattr(parallel, "vae_tiling", False):  # the planner's layouts carry the VAE's tiling
            return "diffusion forcing decodes window by window, untiled (output.vae_tiling is refused)"
        if sampling.causal_block_size > 1 and getattr(parallel, "attention_backend", "auto") == "xfuser":
            return (f"sampling.causal_block_size {sampling.causal_block_size} puts a block-causal mask on every "
                    f"self-attention, which the xfuser backend does not take; use flash-attn or sdpa")
        return None

    def encode(self, pipe, sampling, device: torch.device) -> Conditioning:
        conditioning = super().encode(pipe, dataclass_without_picture(sampling), device)
        fps = [0 if sampling.fps == 16 else 1]  # diffusers' mapping of the rate to the embedding's index
        for branch in (conditioning.cond, conditioning.uncond):
            if branch is not None:
                branch.update(enable_diffusion_forcing=True, fps=fps)
        if sampling.image is not None:
            pictures = _picture_latents(pipe, sampling, device)
            conditioning.video["given"] = pictures[:1]
            if sampling.last_image is not None:  # the last frame's latent frame, appended to the last window
                conditioning.video["end"] = pictures[1:]
        if sampling.extend is not None:
            conditioning.video["given"] = _video_latents(pipe, sampling, device)
        return conditioning

    def step_matrix(self, frames: int, timesteps: torch.Tensor, *, base: int, ar_step: int, ready: int, block: int):
        """diffusers' generate_timestep_matrix (it reads nothing of its pipeline): per row, the
        timestep of every frame, which frames step, and the frames the forward takes."""
        from diffusers import SkyReelsV2DiffusionForcingPipeline

        matrix, _, mask, intervals = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(
            None, frames, timesteps, base, ar_step, ready, block)
        return matrix, mask, intervals

    def set_block(self, pipe, block: int) -> None:
        pipe.transformer._set_ar_attention(block)

    def first_prefix(self, conditioning: Conditioning) -> torch.Tensor | None:
        """The latent frames the first window is given (None: text-to-video, none)."""
        return conditioning.video.get("given")

    def end_count(self, sampling) -> int:
        """Latent frames given at the end of the last window (a last frame's picture: 1)."""
        return 0 if sampling.last_image is None else 1

    def end_frames(self, conditioning: Conditioning) -> torch.Tensor | None:
        """Latent frames appended, given, to the last window (the last frame's picture), or None."""
        return conditioning.video.get("end")

    def latent_shape(self, pipe, sampling) -> tuple[int, int, int, int]:
        """(batch, channels, height, width) of the latents; frames come per window."""
        return (1, pipe.transformer.config.in_channels, sampling.height // pipe.vae_scale_factor_spatial,
                sampling.width // pipe.vae_scale_factor_spatial)

    def condition_frames(self, sampling) -> int:
        return 1 if sampling.image is not None else 0

    def written_frames(self, pipe, sampling, pieces):
        """uint8 (F, H, W, 3) chunks of the video as written: the decoded windows, and for an
        extension the given video (resized as diffusers resizes it) before them, the decoded
        overlap left out, each frame decoded from the file once. Returns (a function giving the
        frames in all, once the chunks are spent; the chunks)."""
        from unison.engine.io.video import to_uint8_frames

        def decoded(drop: int):
            for video in decode_stream(pipe.vae, _without_end(pieces) if sampling.last_image else pieces):
                frames = to_uint8_frames(pipe.video_processor.postprocess_video(video, output_type="np")[0])
                cut = min(drop, len(frames))
                drop -= cut
                if cut < len(frames):
                    yield frames[cut:]

        if sampling.extend is None:
            return lambda: sampling.frames, decoded(0)
        given = [0]

        def counted():
            for chunk in _given_frames(pipe, sampling):
                given[0] += len(chunk)
                yield chunk

        return lambda: given[0] + sampling.frames - sampling.overlap_frames, \
            _chain(counted(), decoded(sampling.overlap_frames))


class ForcingImageHooks(ForcingHooks):
    """SkyReels-V2 DF image-to-video: the picture's latent frame given to the first window."""

    i2v = True

    def model_input(self, pipe, latents, conditioning):
        return latents


def dataclass_without_picture(sampling):
    """The sampling settings as Wan's text encoding reads them (the picture is encoded here)."""
    import dataclasses

    return dataclasses.replace(sampling, image=None, last_image=None)


def _picture_latents(pipe, sampling, device: torch.device) -> torch.Tensor:
    """The picture (and the last frame's, as a second batch entry) VAE-encoded to one latent frame
    each, the distribution's mode, normalised (as diffusers' DF image-to-video pipeline; its float32
    preprocessing, then the VAE's dtype): (pictures, channels, 1, h, w)."""
    vae = pipe.vae
    size = dict(height=sampling.height, width=sampling.width, mode=sampling.image_resize)
    paths = [sampling.image] + ([sampling.last_image] if sampling.last_image is not None else [])
    picture = torch.cat([images.for_vae(pipe.video_processor, images.read(path, what), **size)
                         for path, what in zip(paths, ("sampling.image", "sampling.last_image"))])
    picture = picture.to(device, torch.float32)
    encoded = vae.encode(picture.unsqueeze(2).to(vae.device, vae.dtype)).latent_dist.mode().to(device, torch.float32)
    mean, inv_std = latent_stats(vae, device, torch.float32)
    return (encoded - mean) * inv_std


def _chain(*parts):
    for part in parts:
        yield from part


def _pil(frames):
    from PIL import Image

    return [Image.fromarray(frame) for frame in frames]


def _given_frames(pipe, sampling, chunk: int = 16):
    """The given video, resized to the render's size as diffusers preprocesses it (and back to
    uint8 as its output is postprocessed), `chunk` frames at a time."""
    from unison.engine.io.video import to_uint8_frames

    batch = []
    for frame in _chain(video_frames(sampling.extend), [None]):
        if frame is not None:
            batch.append(frame)
        if batch and (frame is None or len(batch) == chunk):
            video = pipe.video_processor.preprocess_video(_pil(batch), height=sampling.height, width=sampling.width)
            yield to_uint8_frames(pipe.video_processor.postprocess_video(video, output_type="np")[0])
            batch = []


def _video_latents(pipe, sampling, device: torch.device) -> torch.Tensor:
    """The given video's last overlap_frames frames, resized, VAE-encoded (the mode) and normalised,
    as diffusers' video-to-video pipeline encodes them (float32 preprocessing, the VAE's dtype)."""
    import collections

    last = collections.deque(video_frames(sampling.extend), maxlen=sampling.overlap_frames)
    vae = pipe.vae
    video = pipe.video_processor.preprocess_video(_pil(last), height=sampling.height, width=sampling.width)
    video = video.to(device, torch.float32).to(vae.dtype)
    encoded = vae.encode(video).latent_dist.mode().to(torch.float32)
    mean, inv_std = latent_stats(vae, device, vae.dtype)  # diffusers' video-to-video: in the VAE's dtype
    return (encoded - mean) * inv_std


def forward_inputs(config: dict, hidden_states: torch.Tensor, text_tokens: int, dtype: torch.dtype) -> dict:
    """A diffusion-forcing forward's arguments around `hidden_states`, empty on its device (the
    planner's meta device; the GPU suite fills them): a timestep per latent frame, the text, the
    fps embedding's index where the checkpoint has one (MetaTransformer.inputs)."""
    device, frames = hidden_states.device, hidden_states.shape[2] // int(config.get("patch_size", (1, 2, 2))[0])
    inputs = dict(hidden_states=hidden_states, timestep=torch.empty(1, frames, device=device),
                  encoder_hidden_states=torch.empty(1, text_tokens, config.get("text_dim", 4096), device=device,
                                                    dtype=dtype),
                  enable_diffusion_forcing=True, return_dict=False)
    if config.get("inject_sample_info"):
        inputs["fps"] = [1]
    return inputs


def _without_end(pieces):
    """The pieces with the last one's last latent frame left out (the end frame's, which diffusers
    trims before decoding)."""
    held = None
    for piece in pieces:
        if held is not None:
            yield held
        held = piece
    if held is not None:
        yield held[:, :, :-1]
