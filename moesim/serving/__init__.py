"""Serving: requests, continuous batching, prefill/decode disaggregation, latency metrics."""
