"""The model: facts from config.json, architecture tables, where a checkpoint comes from, the demo model,
and the storage type of every tensor per export scheme."""
