"""Core algorithms added for issue 13 (bridge, automatic strategy, quality guard)."""
