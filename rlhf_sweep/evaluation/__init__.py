"""Measuring a policy: held-out metrics, the three verdicts and the diagnosis that ties each to its mechanism."""
