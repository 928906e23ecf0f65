"""One adapter per model of the zoo: its registry entry and everything a reader of
``models/X.py`` does not need (option checks that name command-line flags, building from data,
initialization, evaluation extras, figures)."""
