"""rlhf-sweep: simulate RLHF reward over-optimization, sweep its knobs, and explain the drift."""

__version__ = "0.1.0"
