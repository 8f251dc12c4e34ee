"""Machinery shared by the paper's studies in `experiments/`: reports and a resumable runner."""
