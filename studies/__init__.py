"""The shipped study files. A package only so that they travel in the wheel (as rlhf_sweep.studies)."""
