"""The shipped Hydra config groups. A package only so that they travel in the wheel (as rlhf_sweep.conf)."""
