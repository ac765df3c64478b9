"""The declarative warm set: the file's spec, the reconciler that keeps the cache in
line with it, and its Prometheus collector."""
