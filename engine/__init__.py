"""The engine: configs, model specs, building pipelines, the denoising loop, video output."""
