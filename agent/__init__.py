"""warmstart node agent: store, origins, local API, CLI."""
