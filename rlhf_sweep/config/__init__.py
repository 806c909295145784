"""Configuration: the typed dataclasses that `conf/` mirrors, the one Hydra entry point, world draws, config and study folders."""
