//! The portable forward over a block-sparse plan: `flash_unit`'s key-tile step
//! (`components::unit_forward`) on the key blocks a query block's
//! lists name (`components::key_blocks`) instead of a band's range, with the element rules
//! (`components::element_rules`) on the partially visible ones. A list's block is
//! `q_tiles_per_block x k_tiles_per_block` of the kernel's `block_q x block_k` tiles, so
//! one plan serves kernels of smaller tiles.

use cubecl::prelude::*;

use crate::components::element_rules::{ElementRules, RuleSet};
use crate::components::key_blocks::KeyBlockList;
use crate::components::schedule::CubeHead;
use crate::components::softmax::NEG_BIG;
use crate::components::staging::stage_rows;
use crate::components::unit_forward::{attend_key_tile, write_unit_rows};

/// FlashAttention forward without matrix units over a block-sparse plan.
///
/// Launch as `flash_unit_kernel` (natural cube order). The lists (`partial_count`,
/// `partial_index`, `full_count`, `full_index`: i32, `[batch, heads, q_blocks]` and `[batch,
/// heads, q_blocks, k_blocks]`, any strides, a batch or head dimension of 1 shared) are on a grid
/// of `(q_tiles_per_block * block_q) x (k_tiles_per_block * block_k)` blocks. A query row sees a key of a listed full block whenever the
/// key is below `seq_k`; of a partial block when `rules` (and the tensors its switches name:
/// `layout`, `padding`, `doc_q`, `doc_k`, i32; 1-element placeholders where off) let it. A row
/// whose lists are empty outputs 0 with lse `neg_inf`, as in `flash_unit_kernel`. With
/// `rules.dropout`, probabilities are dropped as `ElementRules::drops` says (seed `seed[0]`);
/// with score terms (`rules.key_bias`: `key_bias`, `rules.soft_edge`: `reach`, f32
/// `[batch or 1, heads or 1, seq]`) every visited tile adds them to its scaled scores.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn flash_unit_sparse_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    partial_count: &Tensor<i32>,
    partial_index: &Tensor<i32>,
    full_count: &Tensor<i32>,
    full_index: &Tensor<i32>,
    layout: &Tensor<i32>,
    padding: &Tensor<i32>,
    doc_q: &Tensor<i32>,
    doc_k: &Tensor<i32>,
    dense: &Tensor<i32>,
    seed: &Tensor<i32>,
    key_bias: &Tensor<f32>,
    reach: &Tensor<f32>,
    slopes: &Tensor<f32>,
    element_rules: ElementRules,
    q_tiles_per_block: u32,
    k_tiles_per_block: u32,
    scale: f32,
    neg_inf: f32,
    #[comptime] rules: RuleSet,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let rq = comptime!(block_q / row_threads);
    let rk = comptime!(block_k / col_threads);
    let rv = comptime!(value_dim.div_ceil(col_threads));
    let units = comptime!(row_threads * col_threads);
    let q_stride = comptime!(block_q + 1);
    let k_stride = comptime!(block_k + 1);

    let cube = CubeHead::query_major(q, k, 0u32);
    let (b, h, kvh) = (cube.batch, cube.head, cube.kv_head);
    let (seq_q, seq_k) = (cube.seq_q, cube.seq_k);
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    let r0 = cube.block * block_q;
    let list = KeyBlockList::new(
        partial_count,
        partial_index,
        full_count,
        full_index,
        b,
        h,
        cube.block / q_tiles_per_block as usize,
    );

    let mut q_t = Shared::<[F]>::new_slice(comptime!(dim * q_stride));
    let mut kv =
        Shared::<[F]>::new_slice(comptime!(usize::max(dim * k_stride, block_k * value_dim)));
    let mut p_tile = Shared::<[f32]>::new_slice(comptime!(block_q * k_stride));
    let mut partial = Shared::<[f32]>::new_slice(comptime!(block_q * col_threads));

    let q_base = b * q.stride(0) + h * q.stride(1);
    let k_base = b * k.stride(0) + kvh * k.stride(1);
    let v_base = b * v.stride(0) + kvh * v.stride(1);
    stage_rows::<F>(q, &mut q_t, q_base, r0, seq_q, dim, block_q, units, true);

    let mut s = Array::<f32>::new(comptime!(rq * rk));
    let mut o = Array::<f32>::new(comptime!(rq * rv));
    let mut m = Array::<f32>::new(rq);
    let mut l = Array::<f32>::new(rq);
    let mut hide = Array::<u32>::new(comptime!(rq * rk));
    let terms = comptime!(rules.has_terms());
    let mut bias = Array::<f32>::new(comptime!(if terms { rq * rk } else { 1 }));
    let mut slope = Array::<f32>::new(comptime!(if terms { rq * rk } else { 1 }));
    #[unroll]
    for i in 0..comptime!(rq * rv) {
        o[i] = f32::new(0.0);
    }
    #[unroll]
    for a in 0..rq {
        m[a] = f32::new(NEG_BIG);
        l[a] = f32::new(0.0);
    }
    // The softmax step's band admits every key of every tile here: the rules carry the
    // band.
    let lo0 = -(comptime!(block_q as i32));
    let hi0 = seq_k as i32;

    for e in 0..list.len {
        let kb = list.block(e, partial_index, full_index);
        // The block's key tiles; a tile past the sequence end has no key.
        for sub in 0..k_tiles_per_block {
            let t0 = (kb * k_tiles_per_block + sub) * comptime!(block_k as u32);
            // Partial blocks take the rules; full ones none, but a tile over the sequence
            // end still masks the keys past it (the rules hide them), and with dropout or
            // score terms every tile takes its flags.
            let masked = e < list.partial
                || t0 as usize + block_k > seq_k
                || comptime!(rules.dropout || terms);
            if (t0 as usize) < seq_k {
                if masked {
                    element_rules.hide_tile(
                        &mut hide,
                        &mut bias,
                        &mut slope,
                        b,
                        h,
                        r0 + ty,
                        t0 as usize + tx,
                        seq_q,
                        seq_k,
                        layout,
                        padding,
                        doc_q,
                        doc_k,
                        dense,
                        seed,
                        key_bias,
                        reach,
                        slopes,
                        rules,
                        rq,
                        row_threads,
                        rk,
                        col_threads,
                        false,
                    );
                }
                attend_key_tile::<F>(
                    k,
                    v,
                    &q_t,
                    &mut kv,
                    &mut p_tile,
                    &mut partial,
                    &mut s,
                    &mut o,
                    &mut m,
                    &mut l,
                    &hide,
                    &bias,
                    k_base,
                    v_base,
                    t0 as i32,
                    masked,
                    lo0,
                    hi0,
                    seq_k,
                    scale,
                    element_rules.keep_scale,
                    dim,
                    value_dim,
                    block_q,
                    block_k,
                    row_threads,
                    col_threads,
                    true,
                    terms,
                    element_rules.softcap,
                    comptime!(rules.softcap),
                );
            }
        }
    }

    write_unit_rows::<F>(
        out,
        lse,
        &o,
        &m,
        &l,
        &mut partial,
        b,
        h,
        r0,
        seq_q,
        neg_inf,
        value_dim,
        rq,
        rv,
        row_threads,
        col_threads,
    );
}
