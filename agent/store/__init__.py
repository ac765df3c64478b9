"""The node cache on disk: the only part that knows the layout under the cache root.

``store`` (blobs, accounting, model records, manifests), ``fill`` (one partial file
being written and hashed), ``snapshots`` (Hugging Face style directories of links).
"""
