"""Datasets: torchvision's, a user's .npz, splits, batches and preprocessing."""
