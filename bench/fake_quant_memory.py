"""Memory a fake-quantizer holds beside its input and output, in units of the matrix (compression_memory's
FAKE_QUANT_TEMPORARIES and EXPORT_ROUND_TEMPORARIES).

    .venv/bin/python -m bench.fake_quant_memory [--grid asym4_g32] [--shape 11008 4096] [--shape 5632 2048]
    .venv/bin/python -m bench.fake_quant_memory --export-rounding Q4_K [--shape ...]

Each shape runs in a fresh child process (so one shape's high-water mark does not hide the next): a random
float32 [out, in] matrix, then `get_grid(GRID).fake_quantize(w)`, or with `--export-rounding TYPE` the export's
rounding with an importance matrix (`export_round`: the F16 intermediate, then libggml's weighted TYPE), what
the quantized model's perplexity applies to every linear; temporaries = VmHWM - RSS before the call - the
output's bytes, printed as bytes and as a multiple of the matrix.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, torch
from toolkit.compress.quant.grids import get_grid
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
torch.set_num_threads(2)
rows, cols = int(sys.argv[2]), int(sys.argv[3])
weight = torch.randn(rows, cols) * 0.02
if sys.argv[4] == "export":
    from toolkit.compress.quant.export_rounding import LinearRounding, export_round
    rounding = LinearRounding(sys.argv[1], gguf=True, with_imatrix=True)
    matrix = torch.rand(cols) + 0.5
    rounding.exact_grid(matrix).fake_quantize(weight[:256])  # load libggml before the baseline
    before = status("VmRSS")
    out = export_round(weight, rounding, matrix)
else:
    before = status("VmRSS")
    out = get_grid(sys.argv[1]).fake_quantize(weight)
temporaries = status("VmHWM") - before - out.numel() * 4
print(json.dumps({"grid": sys.argv[1], "how": sys.argv[4], "shape": [rows, cols], "matrix_bytes": weight.numel() * 4,
                  "temporaries_bytes": temporaries, "ratio": round(temporaries / (weight.numel() * 4), 2)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default="asym4_g32")
    parser.add_argument("--export-rounding", metavar="TYPE", help="measure export_round with a matrix instead")
    parser.add_argument("--shape", nargs=2, type=int, action="append", metavar=("OUT", "IN"))
    args = parser.parse_args()
    for rows, cols in args.shape or [(11008, 4096), (5632, 2048)]:
        grid, how = (args.export_rounding, "export") if args.export_rounding else (args.grid, "fake")
        command = [sys.executable, "-c", CHILD, grid, str(rows), str(cols), how]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        print(json.dumps(json.loads(result.stdout)))


if __name__ == "__main__":
    main()
