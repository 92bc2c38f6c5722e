"""The engine: what a render is, from a config to a video on disk.

- errors: the errors every layer may raise (UserError, Preempted, ...)
- config: the run's frozen config sections, loaded strictly
- plan (and the checks it calls: limits, images, targets, placement, schedulers, same_settings,
  cache_presets): plan_run, everything decided before any weights are read, and the layout rules
- load (precision, offload): the pipeline, each component in its dtype and place
- assemble (caches, compile): the one ordered function that makes the pipeline what the loop runs
- loop: the denoising loop, a short function over step hooks
- render: the Engine (load once, render many), worker: the Worker every launcher drives
- io/: atomic writes, the video encoder, step checkpoints, stop requests, fault injection
- models/: one folder per model family
- planner/: `unison plan`, projected from the model's configs
"""
