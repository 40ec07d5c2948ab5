"""YAML presets, one per (teacher, method); installed as onestep.configs."""
