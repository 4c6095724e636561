"""Shared vocabulary of the captioner: settings, messages, URIs, storage, results, metrics."""
