"""Generative models p(x, z); each module gives the closed forms it has beside the model."""
