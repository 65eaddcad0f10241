"""Core algorithms: the linear bridge, the automatic strategy and the quality guard."""
