"""Studies: the study file, Optuna storage, planned trials, worker processes and the sweep that runs them."""
