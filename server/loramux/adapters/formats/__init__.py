"""Adapter file formats: detect (which format, which weights file), PEFT, AdapterHub."""
