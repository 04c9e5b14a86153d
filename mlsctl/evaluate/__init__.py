"""Evaluation protocols: metrics as pure functions, and the runners behind `mlsctl eval`."""
