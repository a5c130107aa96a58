"""Launchers: local, MPI and SLURM scripts, the launch plan (`biobert plan`) and the whole-pipeline demo."""
