"""Step caches (First-Block Cache, Pyramid Attention Broadcast) whose decisions ranks agree on."""
