"""The only ray.train / ray.tune code: the per-worker function and the driver that builds the TorchTrainer."""
