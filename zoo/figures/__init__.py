"""Figures of each model, one module per model, drawn for its entry (:mod:`zoo.entries`)."""
