"""Amortized guides q(z | x); each module mirrors the model of the same name."""
