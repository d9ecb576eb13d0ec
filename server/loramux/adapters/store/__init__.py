"""The on-disk adapter store: layout, uploads, the safetensors check. Imports no torch."""
