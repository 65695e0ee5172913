#!/usr/bin/env bash
# The whole test suite: every crate on the CPU (ndarray; Flex for f16/bf16), and the CubeCL
# kernels on WGPU.
# WGPU tests run on a software Vulkan device (Mesa's lavapipe) where no GPU is present;
# this script installs it on Debian/Ubuntu when it is missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 && ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing a software Vulkan device (mesa-vulkan-drivers) for the WGPU tests"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
    else
        echo "== no Vulkan driver found and cannot install one: install mesa-vulkan-drivers" >&2
        echo "== (or run cargo test --workspace without the wgpu feature: CPU suite only)" >&2
        exit 1
    fi
fi

# The CUDA build must compile kernels with NVRTC (cubecl-cuda's `cpp`) at the version the
# build environment's cubecl-llvm stand-in claims (build-support/): a build on the LLVM
# compiler would panic on its first CUDA device start there.
cuda_tree="$(cargo tree -e features -i cubecl-cuda --features burn-attn/cuda)"
if ! grep -q '^cubecl-cuda v0.11.3$' <<<"$cuda_tree" || ! grep -q 'cubecl-cuda feature "cpp"' <<<"$cuda_tree"; then
    echo "== the cuda build must use cubecl-cuda 0.11.3 with its cpp (NVRTC) feature:" >&2
    head -1 <<<"$cuda_tree" >&2
    exit 1
fi

# A one-off build gains nothing from incremental state, which takes gigabytes.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "== disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ') free"
cargo test --workspace --features burn-attn/wgpu,burn-attn/flex "$@"

# The published crates package in dependency order. Without verification and lockfile:
# both resolve cubecl-cuda's cubecl-llvm without the workspace's stand-in, which needs
# llvm-sys from the network.
cargo package --workspace --exclude burn-attn-bench --no-verify --exclude-lockfile --allow-dirty --quiet
echo "== disk after the suite: $(df -h --output=avail . | tail -1 | tr -d ' ') free; target/ holds $(du -sh target 2>/dev/null | cut -f1)"
