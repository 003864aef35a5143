"""Typer commands. Each module imports only light modules at top level so ``--help`` is instant;
heavy libraries (torch, onnxruntime, tensorrt) are imported inside the command."""
