"""The target: device profiles (schema and loading) and the host measured now."""
