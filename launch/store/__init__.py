"""What a run keeps on disk: checkpoints (written atomically, verified, converted), RNG states, the
run folder and its lock."""
