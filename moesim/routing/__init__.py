"""The routing stage: token-to-expert assignments to per-GPU token counts and byte matrices."""
