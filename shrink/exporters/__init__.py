"""Exporters: turn a shrunk model into artifacts other runtimes load (GPTQ, ...)."""
