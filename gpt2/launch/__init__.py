"""Launching runs as jobs: the plan of an ablation, local and SLURM executors, and the coordinator."""
