"""Parallel execution, with explicit process groups throughout.

- dims: ParallelDims (the topology) and the process groups
- comm: the collectives (every one takes its group and counts its bytes)
- attention: sequence-parallel attention (Ulysses, Ring, both) and its kernels
- sequence: TokenPlan (where a family's tokens are split, as data) and the split and gather
- cfg: classifier-free guidance, and its two branches on two halves of the ranks
- stale, patch, pipefusion: stale K/V (one base), displaced patches, PipeFusion
- shard: FSDP2 weight sharding of the blocks
- vae: parallel VAE decode (a family's VaeTiling says how its VAE decodes a tile)
- cost: analytic byte counts per step (the planner's and the tests' reference)
"""
