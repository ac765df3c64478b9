"""Filling missing blobs: pieces from the origin or from peers, one flight per blob."""
