"""Adapters: formats on disk, the store, the tiered cache, and the layers that apply them."""
