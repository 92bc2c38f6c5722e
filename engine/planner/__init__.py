"""`unison plan`: every layout of a world size projected from the model's configs alone.

- model: a real checkpoint's components built on the meta device (the Hub's published shapes
  come from the family folders), their FLOPs and activation peaks;
- meta: the meta-device builder and the VAE's traced peaks;
- layouts: the layouts, their memory, FLOPs and bytes per step, and the ranking;
- hardware: the GPU table, calibrated from the GPU suite's results.

The run's own plan (what `plan_run` decides before loading) is engine/plan.py's; both take the
layout rules from one function there."""
