//! The key-tile step the matrix-unit forwards (`flash_mma`, `flash_mma_sparse`) share:
//! acquire the tile's K and V (the next tile's copies in flight), then, where the plane
//! has rows that see the tile, `S = Q K^T`, the online-softmax step and `O += P V`, and
//! a cube barrier before the buffer is staged again. The kernels differ only in which
//! tiles they visit and which elements they mask.

use cubecl::prelude::*;

use super::fragments::{acc_set, MmaVecAcc};
use super::pipeline::{acquire_pair, BufferBarriers};
use super::products::{ForwardProducts, LaneOffsets, ProductTile};
use super::softmax::{flag_bit, online_softmax_tile, TileBand};
use super::staging::{HeadRows, StageTile};

/// One key tile, the one starting at key `t0`, for the whole cube: acquires its K and V
/// into buffer `stage` (staging the tile at `next` when `has_next`, with `async_copy`),
/// and where `visit` (the plane has rows that see the tile) runs the products and the
/// softmax step on this plane's registers (`hide`, `masked`, `use_hide`: the element
/// mask of [`online_softmax_tile`]; with `use_drop` too, a `masked` tile's probabilities
/// whose dropped bit is set leave `P V`; the caller scales the kept ones' sum, the output
/// accumulators, by `1 / (1 - p)` at the end, so `P` stays within the softmax step's range
/// in f16; with `use_bias`, a `masked` tile's scores take the `bias` terms, one per
/// accumulator element, `4 * tile` + element). Ends with a cube barrier: every plane is done with the buffer before it is
/// staged again.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mma_key_tile<F: Float, P: ForwardProducts>(
    k: &Tensor<F>,
    k_at: HeadRows,
    v: &Tensor<F>,
    v_at: HeadRows,
    q_smem: &[F],
    k_smem: &mut [F],
    v_smem: &mut [F],
    barriers: &BufferBarriers,
    lanes: LaneOffsets,
    s_acc: &mut Array<Vector<f32, MmaVecAcc>>,
    o_acc: &mut Array<Vector<f32, MmaVecAcc>>,
    m_row: &mut Array<f32>,
    l_row: &mut Array<f32>,
    hide: &Array<u32>,
    bias: &Array<f32>,
    softcap: f32,
    band: TileBand,
    scale: f32,
    t0: i32,
    next: i32,
    has_next: bool,
    visit: bool,
    masked: bool,
    stage: usize,
    tid: usize,
    #[comptime] k_tile: StageTile,
    #[comptime] v_tile: StageTile,
    #[comptime] tile: ProductTile,
    #[comptime] c_vs: usize,
    #[comptime] ptx_exp: bool,
    #[comptime] async_copy: bool,
    #[comptime] use_hide: bool,
    #[comptime] use_drop: bool,
    #[comptime] use_bias: bool,
    #[comptime] use_softcap: bool,
) {
    acquire_pair::<F>(
        k,
        k_at,
        k_smem,
        v,
        v_at,
        v_smem,
        barriers,
        usize::cast_from(t0),
        usize::cast_from(next),
        has_next,
        stage,
        tid,
        k_tile,
        v_tile,
        async_copy,
    );
    if visit {
        P::scores::<F>(
            q_smem,
            &*k_smem,
            stage * comptime!(k_tile.len()),
            lanes,
            s_acc,
            tile,
        );
        online_softmax_tile(
            s_acc,
            o_acc,
            m_row,
            l_row,
            scale,
            band,
            t0,
            hide,
            masked,
            bias,
            softcap,
            tile.m_tiles,
            tile.k_tiles,
            tile.v_tiles,
            c_vs,
            ptx_exp,
            use_hide,
            use_bias,
            use_softcap,
        );
        // Nested: the outer switch is comptime.
        #[allow(clippy::collapsible_if)]
        if comptime!(use_drop) {
            if masked {
                #[unroll]
                for t in 0..comptime!(tile.m_tiles * tile.k_tiles) {
                    #[unroll]
                    for e in 0..4usize {
                        let at = flag_bit(t, e) + 1;
                        let dropped = (hide[at / 32] >> (at % 32) as u32) & 1 != 0;
                        if dropped {
                            acc_set(s_acc, t, e, c_vs, 0.0f32);
                        }
                    }
                }
            }
        }
        P::accumulate::<F>(
            &*s_acc,
            &*v_smem,
            stage * comptime!(v_tile.len()),
            lanes,
            o_acc,
            tile,
        );
    }
    sync_cube();
}
