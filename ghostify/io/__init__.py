"""Reading and writing: converted checkpoints and model SPEC strings."""
