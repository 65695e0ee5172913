"""Compile a CUDA source with NVRTC (as CubeCL does) and report ptxas register/spill stats."""
import ctypes, glob, os, subprocess, sys
src_path = sys.argv[1]
src = open(src_path).read().encode()
cands = glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*") + glob.glob("/usr/lib/x86_64-linux-gnu/libnvrtc.so*")
try:
    import nvidia, importlib
    for p in nvidia.__path__:
        cands += glob.glob(os.path.join(p, "*", "lib", "libnvrtc.so*"))
except Exception as e:
    print("no nvidia pkgs", e)
print("nvrtc candidates", cands[:6])
lib = ctypes.CDLL([c for c in cands if "builtins" not in c][0])
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"k.cu", 0, None, None) == 0
incs = glob.glob("/usr/local/cuda*/include/cccl") + glob.glob("/usr/local/cuda*/targets/x86_64-linux/include/cccl")  # libcu++ (cuda/barrier) first
incs += glob.glob("/usr/local/cuda*/include") + glob.glob("/usr/local/cuda*/targets/x86_64-linux/include")
try:
    import nvidia
    for p in nvidia.__path__:
        incs += glob.glob(os.path.join(p, "*", "include"))
except Exception:
    pass
opts = [b"--gpu-architecture=compute_90a", b"-lineinfo"] + [("--include-path=" + i).encode() for i in incs]
arr = (ctypes.c_char_p * len(opts))(*opts)
rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
print("nvrtc rc", rc, log.value.decode()[:2000])
lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
lib.nvrtcGetPTX(prog, ptx)
open("/tmp/k.ptx", "wb").write(ptx.value)
ptxas = glob.glob("/usr/local/cuda*/bin/ptxas")
try:
    import triton
    ptxas += glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
except Exception as e:
    print("no triton", e)
print("ptxas candidates", ptxas)
r = subprocess.run([ptxas[0], "-v", "-arch=sm_90a", "-warn-spills", "/tmp/k.ptx", "-o", "/tmp/k.cubin"], capture_output=True, text=True)
print(r.stdout[-3000:], r.stderr[-3000:])
print("local ld/st in ptx:", ptx.value.count(b"ld.local"), ptx.value.count(b"st.local"))
# SASS (the instructions the GPU runs) of the compiled kernel, when a disassembler is at
# hand: written next to the source and summarised as an opcode histogram, so the per-tile
# instruction count of a kernel version can be read without a profiler.
dis = [os.path.join(os.path.dirname(p), "cuobjdump") for p in ptxas]
dis = [d for d in dis if os.path.exists(d)]
if dis and os.path.exists("/tmp/k.cubin"):
    sass = subprocess.run([dis[0], "-sass", "/tmp/k.cubin"], capture_output=True, text=True).stdout
    out = os.path.splitext(src_path)[0] + ".sass"
    open(out, "w").write(sass)
    ops = {}
    for line in sass.splitlines():
        parts = line.split("*/")
        if len(parts) > 1 and line.strip().startswith("/*") and parts[1].strip():
            tok = parts[1].strip().split()
            op = tok[1] if tok[0].startswith("@") else tok[0]
            op = op.rstrip(";").split(".")[0]
            ops[op] = ops.get(op, 0) + 1
    print("sass written to", out, "instructions:", sum(ops.values()))
    print("sass ops:", " ".join(f"{k}={v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:30]))
else:
    print("no cuobjdump next to", ptxas)
