#!/usr/bin/env python3
"""Registers and spills of the CUDA kernels CubeCL generated, without a GPU.

CubeCL logs the CUDA source of every kernel it compiles when a run sets
`CUBECL_DEBUG_LOG=<file>` (`scripts/device/run.sh sources` does it on the device). This
script compiles each logged kernel the way CubeCL does (NVRTC, `-lineinfo`, the device's
architecture) and runs `ptxas -v` on the PTX, printing each kernel's registers and spill
bytes: the numbers Nsight Compute reports on the device, on any x86-64 Linux machine.

The CUDA compilers come from NVIDIA's wheels (no driver needed):

    pip install --target ~/cuda-wheels nvidia-cuda-nvrtc-cu12==12.8.93 \
        nvidia-cuda-nvcc-cu12==12.8.93 nvidia-cuda-runtime-cu12==12.8.90 \
        nvidia-cuda-cccl-cu12==12.8.90
    python3 scripts/device/registers.py cubecl-sources.log.xz --wheels ~/cuda-wheels

`--keep DIR` writes each kernel's source (`<name>.cu`) there, to edit and check again with
`--source FILE`: a quick way to test what drives a kernel's register count.
"""

import argparse
import ctypes
import lzma
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ENTRY = re.compile(r"__global__ void __launch_bounds__\(\d+\)\s+(\w+)\(")


def logged_kernels(log_text):
    """(name, source) of every CUDA kernel in a CubeCL compilation log."""
    lines = log_text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```cpp":
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            source = "\n".join(lines[i + 1 : j])
            entry = ENTRY.search(source)
            if entry:
                yield entry.group(1), source
            i = j
        i += 1


class Compiler:
    """NVRTC and ptxas from the wheels under `root` (`nvidia/<package>/...`)."""

    def __init__(self, root, arch):
        nvidia = Path(root).expanduser() / "nvidia"
        self.nvrtc = ctypes.CDLL(str(nvidia / "cuda_nvrtc/lib/libnvrtc.so.12"))
        self.ptxas = str(nvidia / "cuda_nvcc/bin/ptxas")
        self.includes = [nvidia / "cuda_cccl/include", nvidia / "cuda_runtime/include"]
        self.arch = arch

    def ptx(self, source):
        """The PTX of `source`, or an error with NVRTC's log."""
        program = ctypes.c_void_p()
        check = self.nvrtc.nvrtcCreateProgram(
            ctypes.byref(program), source.encode(), b"kernel.cu", 0, None, None
        )
        if check != 0:
            raise RuntimeError(f"nvrtcCreateProgram failed ({check})")
        options = [f"--gpu-architecture={self.arch}".encode(), b"-lineinfo"]
        options += [f"--include-path={path}".encode() for path in self.includes]
        array = (ctypes.c_char_p * len(options))(*options)
        status = self.nvrtc.nvrtcCompileProgram(program, len(options), array)
        size = ctypes.c_size_t()
        if status != 0:
            self.nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self.nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(log.value.decode(errors="replace")[:2000])
        self.nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        self.nvrtc.nvrtcGetPTX(program, ptx)
        return ptx.value

    def usage(self, source):
        """(registers, spill store bytes, spill load bytes) of `source`'s kernel."""
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "kernel.ptx"
            ptx.write_bytes(self.ptx(source))
            run = subprocess.run(
                [self.ptxas, "-v", f"-arch={self.arch}", str(ptx), "-o", str(Path(tmp) / "k")],
                capture_output=True,
                text=True,
            )
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-2000:])
        registers = re.search(r"Used (\d+) registers", run.stderr)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
        return (
            int(registers.group(1)) if registers else None,
            int(spills.group(1)) if spills else 0,
            int(spills.group(2)) if spills else 0,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", nargs="?", help="CubeCL compilation log (.xz or plain)")
    parser.add_argument("--source", help="one kernel's CUDA source instead of a log")
    parser.add_argument("--wheels", required=True, help="where the NVIDIA wheels are installed")
    parser.add_argument("--arch", default="sm_90a", help="as CubeCL passes it (sm_90a: H100/H200)")
    parser.add_argument("--only", default="", help="kernels whose name contains this")
    parser.add_argument("--keep", help="write each kernel's source into this folder")
    args = parser.parse_args()
    if not args.log and not args.source:
        parser.error("give a log or --source")

    compiler = Compiler(args.wheels, args.arch)
    if args.source:
        kernels = [(Path(args.source).stem, Path(args.source).read_text())]
    else:
        path = Path(args.log)
        text = lzma.open(path, "rt").read() if path.suffix == ".xz" else path.read_text()
        kernels = [(n, s) for n, s in logged_kernels(text) if args.only in n]
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    failed = 0
    print(f"{'kernel':<64} {'registers':>9} {'spill st':>9} {'spill ld':>9}")
    for name, source in kernels:
        if args.keep:
            (Path(args.keep) / f"{name}.cu").write_text(source)
        try:
            registers, stores, loads = compiler.usage(source)
            print(f"{name:<64} {registers:>9} {stores:>9} {loads:>9}")
        except RuntimeError as error:
            failed += 1
            print(f"{name:<64} failed: {str(error).splitlines()[0]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
