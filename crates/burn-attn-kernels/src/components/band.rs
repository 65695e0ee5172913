//! The band a block of rows visits: which columns (keys, or queries in the transposed
//! pass) the rows of a cube and of one of its planes can see, and which every row sees.
//!
//! Row `i` sees column `j` iff `i + offset - left <= j <= i + offset + right` and
//! `0 <= j < seq_cols` (`i32` arithmetic, so windows past the sequence clamp instead of
//! wrapping). The transposed pass over key blocks uses the same bounds with `-offset` and
//! the sides swapped.

use cubecl::prelude::*;

/// Column bounds of a cube's row block and of one plane's rows in it.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub(crate) struct BandBounds {
    /// First column some row of the cube sees (clamped at 0).
    pub start: i32,
    /// One past the last column some row of the cube sees (clamped at the columns).
    pub end: i32,
    /// Lowest and highest column some row of the plane sees (unclamped).
    pub plane_lo: i32,
    pub plane_hi: i32,
    /// Every row of the plane sees the columns `full_lo..=full_hi` (unclamped).
    pub full_lo: i32,
    pub full_hi: i32,
    /// The plane has at least one valid row.
    pub plane_rows: bool,
    /// Every row of the plane is valid.
    pub plane_full: bool,
}

#[cube]
impl BandBounds {
    /// The bounds of the cube's rows `r0 .. r0 + cube_rows` and the plane's rows
    /// `w0 .. w0 + plane_rows` (both cut at `seq_rows`, and both non-empty for the cube:
    /// `r0 < seq_rows`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        r0: usize,
        w0: usize,
        seq_rows: usize,
        seq_cols: usize,
        offset: i32,
        left: i32,
        right: i32,
        #[comptime] cube_rows: usize,
        #[comptime] plane_rows: usize,
    ) -> BandBounds {
        let r_last = min(r0 + cube_rows, seq_rows) - 1;
        let w_last = min(w0 + comptime!(plane_rows - 1), seq_rows - 1);
        BandBounds {
            start: max(r0 as i32 + offset - left, 0),
            end: min(r_last as i32 + offset + right + 1, seq_cols as i32),
            plane_lo: w0 as i32 + offset - left,
            plane_hi: w_last as i32 + offset + right,
            full_lo: w_last as i32 + offset - left,
            full_hi: w0 as i32 + offset + right,
            plane_rows: w0 < seq_rows,
            plane_full: w0 + plane_rows <= seq_rows,
        }
    }

    /// Whether some row of the plane sees a column of `first..=last`.
    pub fn plane_sees(&self, first: i32, last: i32) -> bool {
        self.plane_rows && last >= self.plane_lo && first <= self.plane_hi
    }

    /// Whether every row of the plane sees every column of `first..=last` (so the tile
    /// needs no per-element mask): all rows valid, the columns inside the sequence and in
    /// every row's band.
    pub fn tile_unmasked(&self, first: i32, last: i32, seq_cols: usize) -> bool {
        self.plane_full && last < seq_cols as i32 && first >= self.full_lo && last <= self.full_hi
    }
}
