"""Compile artifacts: the index of (key, fingerprint) -> bundle blob, and fetching
bundles from peers."""
