"""loramux on Ray Serve: engine replicas, an adapter-affine request router, one front (needs `loramux[ray]`)."""
