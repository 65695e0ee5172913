"""Extract the PTX of kernels from a CubeCL compilation cache (no GPU needed).

CubeCL's CUDA runtime caches each compiled kernel's PTX in `<cache>/cuda/<version>/ptx/
chunk*.cbor` (the `cubecl.toml` that scripts/device/lease.sh writes puts it under
/tmp/cubecl-cache; `save-cache` brings it back as .carry/cubecl-cache.tar.xz). Usage:

    mkdir -p /tmp/cc && tar -xJf .carry/cubecl-cache.tar.xz -C /tmp/cc
    python3 scripts/ptx_from_cache.py /tmp/cc OUT_DIR [NAME_SUBSTRING]

writes OUT_DIR/<entry point>_<n>.ptx for every cached kernel whose entry point contains
NAME_SUBSTRING (all when omitted) and prints an opcode histogram of each, so a kernel
version's instruction mix can be read between leases.
"""
import collections, glob, os, re, struct, sys


def cbor_len(d, k):
    """Length field of the CBOR head at d[k] (major type ignored); returns (len, next)."""
    info = d[k] & 0x1F
    if info < 24:
        return info, k + 1
    size = {24: 1, 25: 2, 26: 4, 27: 8}[info]
    return int.from_bytes(d[k + 1 : k + 1 + size], "big"), k + 1 + size


def entries(path):
    d = open(path, "rb").read()
    pos = 0
    while True:
        i = d.find(b"oentrypoint_name", pos)
        if i < 0:
            return
        n, k = cbor_len(d, i + len(b"oentrypoint_name"))
        name = d[k : k + n].decode()
        p = d.find(b"cptx", k + n)
        count, q = cbor_len(d, p + 4)
        out = bytearray()
        # The PTX is stored as an array of small unsigned integers, one per byte.
        for _ in range(count):
            b = d[q]
            if b < 24:
                out.append(b)
                q += 1
            else:
                out.append(d[q + 1])
                q += 2
        yield name, out.decode(errors="replace")
        pos = q


def main():
    cache, out_dir = sys.argv[1], sys.argv[2]
    want = sys.argv[3] if len(sys.argv) > 3 else ""
    os.makedirs(out_dir, exist_ok=True)
    seen = collections.Counter()
    for chunk in sorted(glob.glob(os.path.join(cache, "cuda", "*", "ptx", "chunk*.cbor"))):
        for name, ptx in entries(chunk):
            if want not in name:
                continue
            seen[name] += 1
            path = os.path.join(out_dir, f"{name}_{seen[name]}.ptx")
            open(path, "w").write(ptx)
            ops = collections.Counter(
                m.group(1) for m in re.finditer(r"^\s+(?:@%p\d+\s+)?([a-z][\w.:]*)", ptx, re.M)
            )
            top = " ".join(f"{k}={v}" for k, v in ops.most_common(25))
            print(f"{path}: {sum(ops.values())} instructions\n  {top}")


if __name__ == "__main__":
    main()
