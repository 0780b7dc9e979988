"""Device profiles shipped with Bedside: one YAML file per target, a source for every figure (packaged as data)."""
