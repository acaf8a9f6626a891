"""Architecture specs (data, not code paths) and presets."""
