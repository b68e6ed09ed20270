"""forge: one YAML recipe in, quantized serving artifacts, engines, gates and images out."""

__version__ = "0.1.0"
