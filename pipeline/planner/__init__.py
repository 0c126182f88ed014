"""Resource planning: model shapes and presets, memory and compute estimates, GPU catalogue."""
