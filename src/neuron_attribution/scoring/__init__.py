"""Scores: float32 math on one trace and the model's weights. Nothing here runs a forward pass, except the
methods marked not static (integrated gradients)."""
