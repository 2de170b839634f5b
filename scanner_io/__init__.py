"""Scanner I/O: frame model, wire codec, sources, MCAP recording and replay, THz simulator."""
