"""Safetensors (and, on request, pickle) checkpoints: headers, the index, byte ranges."""
