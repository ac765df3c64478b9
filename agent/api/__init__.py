"""The agent's HTTP faces: the local API on the Unix socket, the node app (health,
metrics, peer routes) on the TCP port."""
