#!/usr/bin/env bash
# The whole test suite: every crate on the CPU (ndarray), and the CubeCL kernels on WGPU.
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

# A one-off build gains nothing from incremental state, which takes gigabytes.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "== disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ') free"
cargo test --workspace --features burn-attn/wgpu "$@"
echo "== disk after the suite: $(df -h --output=avail . | tail -1 | tr -d ' ') free; target/ holds $(du -sh target 2>/dev/null | cut -f1)"
