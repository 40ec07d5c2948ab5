"""Shipped weights (the digits teacher) as safetensors."""
