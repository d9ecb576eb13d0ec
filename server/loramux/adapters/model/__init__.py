"""The wrapped base model: multi-adapter linears, bottleneck insertion points, the decoder-layer finder."""
