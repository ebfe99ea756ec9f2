"""Put first on PYTHONPATH, this makes `import wandb` fail: a server without wandb."""

raise ImportError("wandb is hidden from this test server")
