"""The reference runtime: eager PyTorch on the CPU; a stage is its slice file mapped into a stage module."""
