"""The plan: choose format, scheme and layers to remove so the model fits the target (planner, plan
schema, memory estimate, quality priors)."""
