"""Transport-independent services: the rules each transport (p2pstdio, node RPC) adapts."""
