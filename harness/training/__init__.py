"""The training machinery both training commands share: the epoch loop, checkpoints, a run's status, progress."""
