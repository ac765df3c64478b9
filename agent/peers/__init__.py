"""Other agents: who they are and whether they answer (membership), who owns a piece
(placement), and the requests that ask them for pieces (client)."""
