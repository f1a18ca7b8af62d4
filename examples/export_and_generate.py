"""Export the bundled tiny-phi3 to int4 and generate from it through the library API.

    python examples/export_and_generate.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import phi_onnx
from phi_onnx import ExportOptions, export


def main(output: Path) -> None:
    """Export (once), then stream a chat reply and print the run's provider and speed."""
    if not (output / "model.onnx").is_file():
        result = export("tiny-phi3", output, ExportOptions(precision="int4", device="cpu"))
        print(f"exported {result.options.variant()} in {result.seconds:.1f} s")
    model = phi_onnx.load(output)
    for piece in model.chat_stream([{"role": "user", "content": "What does json.dumps do?"}]):
        print(piece, end="", flush=True)
    print()
    reply = model.generate("Return the", max_new_tokens=24)
    print(f"{reply.text!r} ({reply.new_tokens} tokens on {model.provider} via {model.backend})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/tiny-phi3-example"))
