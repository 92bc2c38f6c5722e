"""Parallel execution: topology (ParallelDims), collectives, parallel attention and VAE decode."""
