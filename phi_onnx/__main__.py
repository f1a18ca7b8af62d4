"""`python -m phi_onnx` runs the CLI."""

from phi_onnx.cli import main

main()
