"""Where a model's weights come from, one tensor at a time: ``WeightSource`` and its implementations."""
from edge_runtime.models.weights.base import MissingWeightError, WeightSource

__all__ = ["MissingWeightError", "WeightSource"]
