"""Helpers of `scripts/train_digits.py`: the digits data set, the model configs and the training loops."""
