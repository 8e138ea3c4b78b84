"""Demo and test infrastructure, not the backend: a local Label Studio stack (``make demo``, the end-to-end
tests) and tiny random checkpoints (``mllm-backend tiny-model``, the plumbing tests)."""
