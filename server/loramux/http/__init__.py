"""The OpenAI-compatible HTTP API (FastAPI + uvicorn), served beside gRPC over the same engine."""
