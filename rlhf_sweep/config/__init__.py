"""Configuration: the typed dataclasses that `conf/` mirrors, the algorithm registry, the one Hydra entry point, world draws, config and study folders."""
