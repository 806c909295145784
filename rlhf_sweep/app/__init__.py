"""The command line (`rlhf-sweep`) and the dashboards."""
