//! The order in which a launch's cubes take their blocks (the kernels' side is
//! `components::schedule::cube_block`).

use super::forced::allowed;
use super::{BandArgs, ForcedPlan, Grid, Unsupported};

/// Heads per group of the heavy-first order. On the H200 (bf16, d = 128, causal) groups
/// of 64 heads ran as fast as or faster than groups of 4 and 16 at n = 1024, 4096 and
/// 16384 (kernel times -3%, -5%, -6% against the natural order).
const HEAVY_FIRST_HEADS: u32 = 64;

/// Heads per group of the heavy-first cube order for `grid`, 0 for the natural order.
/// Only bands with no left bound and a right bound (causal) are reordered: there a query
/// block's cost grows with its index (a key block's shrinks), and the natural order would
/// leave every head's heaviest block for the end.
pub fn heavy_first(band: &BandArgs, grid: &Grid, forced: &ForcedPlan) -> Result<u32, Unsupported> {
    let forced = allowed(
        "heavy_first",
        forced.heavy_first,
        &[0, 1, 2, 4, 8, 16, 32, 64],
    )?;
    Ok(forced.unwrap_or(if band.is_causal_like() && grid.x > 1 {
        HEAVY_FIRST_HEADS
    } else {
        0
    }))
}
