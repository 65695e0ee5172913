//! The portable FlashAttention backward kernels: no matrix units, no atomics.
//!
//! FlashAttention-2's scheme, recomputing the probabilities `P = exp(scale * q . k - lse)`
//! tile by tile from the forward's saved row log-sum-exp:
//! - [`flash_unit_backward_dq_kernel`], query-major: one unit per query row `i` computes
//!   `D_i = rowsum(dO_i * O_i)` (written out for the second kernel) and
//!   `dQ_i = scale * sum_j dS_ij k_j` over its band, with `dS_ij = P_ij (dO_i . v_j - D_i)`;
//!   K and V tiles are staged in shared memory as in the forward kernel.
//! - [`flash_unit_backward_dkdv_kernel`], key-major: one unit per key row `j` of one kv head
//!   computes `dV_j = sum_i P_ij dO_i` and `dK_j = scale * sum_i dS_ij q_i`, summing over
//!   every query head that shares the kv head (GQA/MQA) inside the kernel, so no two units
//!   write the same gradient row. Q and dO tiles (with the rows' lse and `D`) are staged in
//!   shared memory; only the query rows whose band can contain one of the cube's keys are
//!   visited.
//!
//! Each unit owns its output rows and sums in a fixed order: two runs give the same bits.
//! Band arithmetic is `i32` as in the forward kernel (`flash_unit.rs`): key `j` is visible
//! to query `i` iff `i + offset - left <= j <= i + offset + right` and `0 <= j < seq_k`,
//! `offset = seq_k - seq_q`, unbounded sides encoded by the launcher as `seq_q + seq_k`.
//! Rows whose lse is `-inf` (no visible key) contribute nothing.

use cubecl::prelude::*;

// Below NEG_BIG an lse is `-inf`: the row saw no key and has no probabilities.
use crate::flash_unit::{stage_rows, NEG_BIG};

/// Cooperatively stages entries `t0 .. t0 + rows` of one head of a `[b, h, n]` f32 tensor
/// into `tile`; entries past `n` are `fill` (the kernels never use them: padding rows
/// are masked).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_scalars(
    src: &Tensor<f32>,
    tile: &mut SharedMemory<f32>,
    base: usize,
    t0: usize,
    n: usize,
    fill: f32,
    #[comptime] rows: usize,
    #[comptime] units: usize,
) {
    let stride_n = src.stride(2);
    let mut idx = UNIT_POS_X as usize;
    while idx < rows {
        let i = t0 + idx;
        let mut val = fill;
        if i < n {
            val = src[base + i * stride_n];
        }
        tile[idx] = val;
        idx += units;
    }
}

/// Query-major backward: `D = rowsum(dO * O)` and `dQ`.
///
/// Launch with `CubeDim::new_1d(block_q)` and `CubeCount::Static(ceil(seq_q / block_q),
/// batch * heads, 1)`. `dq` is `[b, h, seq_q, head_dim]` in the input dtype, `delta` is
/// `[b, h, seq_q]` in f32 (read by [`flash_unit_backward_dkdv_kernel`]).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_unit_backward_dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    scale: f32,
    left: i32,
    right: i32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
    #[define(F)] _dtype: StorageType,
) {
    let heads = q.shape(1);
    let seq_q = q.shape(2);
    let kv_heads = k.shape(1);
    let seq_k = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads;
    let h = bh % heads;
    let kvh = h / (heads / kv_heads);

    let r0 = CUBE_POS_X as usize * block_q;
    let row = r0 + UNIT_POS_X as usize;
    let row_ok = row < seq_q;
    let r_last = min(r0 + block_q, seq_q) - 1;
    let offset = seq_k as i32 - seq_q as i32;
    let lo = row as i32 + offset - left;
    let hi = row as i32 + offset + right;
    // Keys any row of the cube can see (contiguous: both band edges grow with the row).
    let k_start = max(r0 as i32 + offset - left, 0);
    let k_end = min(r_last as i32 + offset + right + 1, seq_k as i32);

    // The scaled query row, the output-gradient row, D and the row's lse.
    let mut q_row = Array::<f32>::new(dim);
    let mut do_row = Array::<f32>::new(value_dim);
    let mut dq_acc = Array::<f32>::new(dim);
    let q_base = b * q.stride(0) + h * q.stride(1) + row * q.stride(2);
    let o_base = b * out.stride(0) + h * out.stride(1) + row * out.stride(2);
    let do_base = b * d_out.stride(0) + h * d_out.stride(1) + row * d_out.stride(2);
    let mut d_i = f32::new(0.0);
    let mut lse_i = f32::new(NEG_BIG);
    for d in 0..dim {
        let mut x = f32::new(0.0);
        if row_ok {
            x = f32::cast_from(q[q_base + d * q.stride(3)]) * scale;
        }
        q_row[d] = x;
        dq_acc[d] = f32::new(0.0);
    }
    for d in 0..value_dim {
        let mut g = f32::new(0.0);
        if row_ok {
            g = f32::cast_from(d_out[do_base + d * d_out.stride(3)]);
            d_i += g * f32::cast_from(out[o_base + d * out.stride(3)]);
        }
        do_row[d] = g;
    }
    if row_ok {
        lse_i = lse[b * lse.stride(0) + h * lse.stride(1) + row * lse.stride(2)];
    }
    // A row that saw no key (lse = -inf) has no probabilities: its dQ stays 0.
    let live = row_ok && lse_i >= f32::new(NEG_BIG);

    let mut k_tile = SharedMemory::<F>::new(block_k * dim);
    let mut v_tile = SharedMemory::<F>::new(block_k * value_dim);
    let k_base = b * k.stride(0) + kvh * k.stride(1);
    let v_base = b * v.stride(0) + kvh * v.stride(1);

    let mut t0 = k_start;
    while t0 < k_end {
        let start = usize::cast_from(t0);
        stage_rows::<F>(k, &mut k_tile, k_base, start, seq_k, dim, block_k, block_q);
        stage_rows::<F>(
            v,
            &mut v_tile,
            v_base,
            start,
            seq_k,
            value_dim,
            block_k,
            block_q,
        );
        sync_cube();
        for jj in 0..block_k {
            let j = t0 + jj as i32;
            if live && j >= lo && j <= hi && j < k_end {
                let kb = jj * dim;
                let vb = jj * value_dim;
                let mut s = f32::new(0.0);
                for d in 0..dim {
                    s += q_row[d] * f32::cast_from(k_tile[kb + d]);
                }
                let p = f32::exp(s - lse_i);
                let mut dp = f32::new(0.0);
                for d in 0..value_dim {
                    dp += do_row[d] * f32::cast_from(v_tile[vb + d]);
                }
                let ds = p * (dp - d_i);
                for d in 0..dim {
                    dq_acc[d] += ds * f32::cast_from(k_tile[kb + d]);
                }
            }
        }
        sync_cube();
        t0 += block_k as i32;
    }

    if row_ok {
        let dq_base = b * dq.stride(0) + h * dq.stride(1) + row * dq.stride(2);
        for d in 0..dim {
            dq[dq_base + d * dq.stride(3)] = F::cast_from(dq_acc[d] * scale);
        }
        delta[b * delta.stride(0) + h * delta.stride(1) + row * delta.stride(2)] = d_i;
    }
}

/// Key-major backward: `dK` and `dV`, summed over the query heads of each kv head.
///
/// Launch with `CubeDim::new_1d(block_k)` and `CubeCount::Static(ceil(seq_k / block_k),
/// batch * kv_heads, 1)`, after [`flash_unit_backward_dq_kernel`] has written `delta`.
/// `dk` is `[b, kv_heads, seq_k, head_dim]` and `dv` `[b, kv_heads, seq_k, value_dim]` in
/// the input dtype; `block_q` is the number of query rows staged per tile.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_unit_backward_dkdv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    left: i32,
    right: i32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_k: usize,
    #[comptime] block_q: usize,
    #[define(F)] _dtype: StorageType,
) {
    let heads = q.shape(1);
    let seq_q = q.shape(2);
    let kv_heads = k.shape(1);
    let seq_k = k.shape(2);
    let group = heads / kv_heads;
    let bkh = CUBE_POS_Y as usize;
    let b = bkh / kv_heads;
    let kvh = bkh % kv_heads;

    let c0 = CUBE_POS_X as usize * block_k;
    let col = c0 + UNIT_POS_X as usize;
    let col_ok = col < seq_k;
    let c_last = min(c0 + block_k, seq_k) - 1;
    let offset = seq_k as i32 - seq_q as i32;
    // Query i sees key j iff j - offset - right <= i <= j - offset + left.
    let i_lo = col as i32 - offset - right;
    let i_hi = col as i32 - offset + left;
    // Query rows that can see any key of the cube (contiguous, as in the dQ kernel).
    let q_start = max(c0 as i32 - offset - right, 0);
    let q_end = min(c_last as i32 - offset + left + 1, seq_q as i32);

    // The key row scaled (so `s = q . k_row`), the value row, and the two accumulators.
    let mut k_row = Array::<f32>::new(dim);
    let mut v_row = Array::<f32>::new(value_dim);
    let mut dk_acc = Array::<f32>::new(dim);
    let mut dv_acc = Array::<f32>::new(value_dim);
    let k_base = b * k.stride(0) + kvh * k.stride(1) + col * k.stride(2);
    let v_base = b * v.stride(0) + kvh * v.stride(1) + col * v.stride(2);
    for d in 0..dim {
        let mut x = f32::new(0.0);
        if col_ok {
            x = f32::cast_from(k[k_base + d * k.stride(3)]) * scale;
        }
        k_row[d] = x;
        dk_acc[d] = f32::new(0.0);
    }
    for d in 0..value_dim {
        let mut x = f32::new(0.0);
        if col_ok {
            x = f32::cast_from(v[v_base + d * v.stride(3)]);
        }
        v_row[d] = x;
        dv_acc[d] = f32::new(0.0);
    }

    let mut q_tile = SharedMemory::<F>::new(block_q * dim);
    let mut do_tile = SharedMemory::<F>::new(block_q * value_dim);
    let mut lse_tile = SharedMemory::<f32>::new(block_q);
    let mut delta_tile = SharedMemory::<f32>::new(block_q);

    // The query heads of this kv head, in a fixed order.
    for g in 0..group {
        let h = kvh * group + g;
        let q_base = b * q.stride(0) + h * q.stride(1);
        let do_base = b * d_out.stride(0) + h * d_out.stride(1);
        let lse_base = b * lse.stride(0) + h * lse.stride(1);
        let delta_base = b * delta.stride(0) + h * delta.stride(1);
        let mut t0 = q_start;
        while t0 < q_end {
            let start = usize::cast_from(t0);
            stage_rows::<F>(q, &mut q_tile, q_base, start, seq_q, dim, block_q, block_k);
            stage_rows::<F>(
                d_out,
                &mut do_tile,
                do_base,
                start,
                seq_q,
                value_dim,
                block_q,
                block_k,
            );
            stage_scalars(
                lse,
                &mut lse_tile,
                lse_base,
                start,
                seq_q,
                f32::new(0.0),
                block_q,
                block_k,
            );
            stage_scalars(
                delta,
                &mut delta_tile,
                delta_base,
                start,
                seq_q,
                f32::new(0.0),
                block_q,
                block_k,
            );
            sync_cube();
            for ii in 0..block_q {
                let i = t0 + ii as i32;
                let lse_i = lse_tile[ii];
                // Rows with lse = -inf saw no key; rows past q_end are padding.
                if col_ok && i >= i_lo && i <= i_hi && i < q_end && lse_i >= f32::new(NEG_BIG) {
                    let qb = ii * dim;
                    let ob = ii * value_dim;
                    let mut s = f32::new(0.0);
                    for d in 0..dim {
                        s += f32::cast_from(q_tile[qb + d]) * k_row[d];
                    }
                    let p = f32::exp(s - lse_i);
                    let mut dp = f32::new(0.0);
                    for d in 0..value_dim {
                        let g_o = f32::cast_from(do_tile[ob + d]);
                        dp += g_o * v_row[d];
                        dv_acc[d] += p * g_o;
                    }
                    let ds = p * (dp - delta_tile[ii]);
                    for d in 0..dim {
                        dk_acc[d] += ds * f32::cast_from(q_tile[qb + d]);
                    }
                }
            }
            sync_cube();
            t0 += block_q as i32;
        }
    }

    if col_ok {
        let dk_base = b * dk.stride(0) + kvh * dk.stride(1) + col * dk.stride(2);
        let dv_base = b * dv.stride(0) + kvh * dv.stride(1) + col * dv.stride(2);
        for d in 0..dim {
            dk[dk_base + d * dk.stride(3)] = F::cast_from(dk_acc[d] * scale);
        }
        for d in 0..value_dim {
            dv[dv_base + d * dv.stride(3)] = F::cast_from(dv_acc[d]);
        }
    }
}
