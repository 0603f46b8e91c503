"""Tests against a real vLLM (CPU build, tiny random-weight model): see vllm_server.py."""
