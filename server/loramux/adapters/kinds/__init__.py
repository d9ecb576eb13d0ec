"""The math of each kind of adapter (LoRA and batched LoRA, bottleneck, soft prompt) and their base types."""
