"""`rlhf-sweep compare-fixes`: which two fixes, raced over seeds and confirmed on held-out seeds."""
