"""Fixture sections for STDGP and the objective: projection, uncertainty weighting, feature
distances, the regularizer gate and one surrogate step."""
