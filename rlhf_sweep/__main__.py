"""`python -m rlhf_sweep ...` is `rlhf-sweep ...`."""

from rlhf_sweep.app.cli import main

if __name__ == "__main__":
    main()
