//! [`LinearAttentionBackend`] for the CubeCL backend `Cube`: every product is a pass of the
//! chunked kernel, recorded in the fusion stream as a [`LinearPassLaunch`]; the
//! element-wise steps between passes are Burn tensor ops (fused by the stream).
//!
//! A feature map fused into the loads maps the operands that are `q` or `k` in each pass;
//! the gradients with respect to the mapped `q`, `k` then take the map's derivative.
//!
//! The backward, for `out_i = n_i / den_i` with `n_i = sum_j (q_i . k_j) v_j` over the
//! keys row `i` sees: `dn_i = dO_i / den_i` and `dd_i = -(dO_i . out_i) / den_i` (0 and
//! `dO` unnormalised), then
//! - `dq_i = sum_j (dn_i . v_j + dd_i) k_j`: a forward pass with `a = dn`, `b = v`, `c =
//!   k` and `dd` as the rows' scalar (causal: from the starting state transposed);
//! - `dk_j = sum_i (v_j . dn_i + dd_i) q_i` and `dv_j = sum_i (k_j . q_i) dn_i`: passes over
//!   the rows that see key `j` (reversed when causal), per query head, then summed over
//!   each group of query heads sharing a kv head (non-causal: the states are summed
//!   before they are applied).

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::{backend_extension, tensor::FloatTensor, Backend, Cube};
use burn::tensor::{DType, Device, Tensor};
use burn_attn_kernels::launch::{linear_pass, LinearOperands, LinearState};
use burn_attn_kernels::plan::{plan_linear, segment_rows, LinearMode, LinearSizes};
use burn_cubecl::ops::numeric::zeros_client;
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor, CubeBackend};

use super::cube_impl::precision_of;
use super::linear_kernel::{LinearAttentionBackend, LinearCall};
use super::sparse::cube_caps;
use super::{lift, lower};
use crate::dispatch::{report, Dispatch, Implementation, Pass};

/// One pass as the fusion stream records it: the mode, grid heads, sizes of its outputs.
#[derive(Debug, Clone)]
pub(crate) struct PassCall {
    mode: LinearMode,
    heads: usize,
    eps: f32,
    chunk: Option<usize>,
    batch: usize,
    rows: usize,
    dim: usize,
    value_dim: usize,
    dtype: DType,
    /// Rows per segment where the pass runs in segments (its states then have `segments *
    /// batch` batches).
    segment_rows: Option<usize>,
}

impl PassCall {
    /// The states' batches: `segments * batch`.
    fn state_batches(&self) -> usize {
        self.segment_rows
            .map_or(1, |per| self.rows.div_ceil(per).max(1))
            * self.batch
    }
}

/// A pass's outputs: rows, divisor, state `s`, `z`, `x` (placeholders of their rank where
/// the mode writes none).
#[allow(clippy::too_many_arguments)]
fn pass_outputs(
    _a: &TensorSpec,
    _b: &TensorSpec,
    _c: &TensorSpec,
    _extra: &TensorSpec,
    _s: &TensorSpec,
    _z: &TensorSpec,
    _x: &TensorSpec,
    call: &PassCall,
) -> (TensorSpec, TensorSpec, TensorSpec, TensorSpec, TensorSpec) {
    let spec = |shape: Vec<usize>, dtype: DType| TensorSpec::new(shape.into(), dtype);
    let PassCall {
        mode,
        heads,
        batch,
        rows,
        dim,
        value_dim,
        dtype,
        ..
    } = call.clone();
    let (h, b, states) = (heads, batch, call.state_batches());
    let rows_out = mode.outputs;
    let den = mode.outputs && mode.normalise;
    let state = mode.state_out;
    (
        spec(
            if rows_out {
                vec![b, h, rows, value_dim]
            } else {
                vec![1; 4]
            },
            dtype,
        ),
        spec(if den { vec![b, h, rows] } else { vec![1; 3] }, DType::F32),
        spec(
            if state {
                vec![states, h, dim, value_dim]
            } else {
                vec![1; 4]
            },
            DType::F32,
        ),
        spec(
            if state {
                vec![states, h, dim]
            } else {
                vec![1; 3]
            },
            DType::F32,
        ),
        spec(
            if state {
                vec![states, h, value_dim]
            } else {
                vec![1; 3]
            },
            DType::F32,
        ),
    )
}

/// The linear kernel's launches, recorded in the fused backend's stream.
#[backend_extension(Cube, Fusion)]
pub(crate) trait LinearPassLaunch: Backend {
    /// One pass: `(out, den, s, z, x)` (see [`pass_outputs`]).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[fusion(meta = pass_outputs)]
    fn linear_pass(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        extra: FloatTensor<Self>,
        s: FloatTensor<Self>,
        z: FloatTensor<Self>,
        x: FloatTensor<Self>,
        call: PassCall,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

impl LinearPassLaunch for CubeBackend {
    fn linear_pass(
        a: CubeTensor,
        b: CubeTensor,
        c: CubeTensor,
        extra: CubeTensor,
        s: CubeTensor,
        z: CubeTensor,
        x: CubeTensor,
        call: PassCall,
    ) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
        let mode = call.mode;
        let keys = mode.reads_keys();
        let operands = LinearOperands {
            a: mode.reads_rows().then(|| into_contiguous(a.clone())),
            b: keys.then(|| into_contiguous(b)),
            c: keys.then(|| into_contiguous(c)),
            extra: mode.reads_scalars().then(|| into_contiguous(extra)),
            state: mode.state_in.then(|| LinearState {
                s: into_contiguous(s),
                z: into_contiguous(z),
                x: into_contiguous(x),
            }),
        };
        let done = linear_pass(
            mode,
            operands,
            call.heads,
            call.eps,
            call.chunk,
            call.segment_rows,
        )
        .unwrap_or_else(|why| {
            panic!("burn-attn: a linear pass was planned for this call but declined: {why}")
        });
        let placeholder = |rank: usize, dtype: DType| {
            zeros_client(
                a.client.clone(),
                a.device.clone(),
                vec![1; rank].into(),
                dtype,
            )
        };
        let state = done.state;
        (
            done.out.unwrap_or_else(|| placeholder(4, call.dtype)),
            done.den.unwrap_or_else(|| placeholder(3, DType::F32)),
            state
                .as_ref()
                .map_or_else(|| placeholder(4, DType::F32), |s| s.s.clone()),
            state
                .as_ref()
                .map_or_else(|| placeholder(3, DType::F32), |s| s.z.clone()),
            state.map_or_else(|| placeholder(3, DType::F32), |s| s.x),
        )
    }
}

/// A state of one pass: `s: [batch, heads, dim, value_dim]`, `z: [batch, heads, dim]`, `x:
/// [batch, heads, value_dim]`, f32.
#[derive(Clone)]
struct PassState {
    s: Tensor<4>,
    z: Tensor<3>,
    x: Tensor<3>,
}

impl PassState {
    /// `s` with zero `z` and `x`.
    fn of(s: Tensor<4>) -> Self {
        let [b, h, dim, value_dim] = s.dims();
        let device = s.device();
        Self {
            z: Tensor::zeros([b, h, dim], (&device, DType::F32)),
            x: Tensor::zeros([b, h, value_dim], (&device, DType::F32)),
            s,
        }
    }

    /// The start state of each of `segments` segments (segment-major batches, as a
    /// segmented pass writes and reads them) from their own states: the sum of the
    /// segments before, plus `start` (the pass's own start, `[batch, ..]`) where given.
    fn prefix(self, segments: usize, start: Option<&PassState>) -> Self {
        fn exclusive<const D: usize, const E: usize>(
            t: Tensor<D>,
            segments: usize,
            start: Option<Tensor<D>>,
        ) -> Tensor<D> {
            let dims = t.dims();
            let split = by_segment::<D, E>(dims, segments);
            let t = t.reshape(split);
            let mut prefix = t.clone().cumsum(0) - t;
            if let Some(start) = start {
                let mut one = split;
                one[0] = 1;
                prefix = prefix + start.reshape(one);
            }
            prefix.reshape(dims)
        }
        Self {
            s: exclusive::<4, 5>(self.s, segments, start.map(|s| s.s.clone())),
            z: exclusive::<3, 4>(self.z, segments, start.map(|s| s.z.clone())),
            x: exclusive::<3, 4>(self.x, segments, start.map(|s| s.x.clone())),
        }
    }

    /// The state after every segment: their sum plus `start` where given.
    fn total(self, segments: usize, start: Option<&PassState>) -> Self {
        fn sum<const D: usize, const E: usize>(
            t: Tensor<D>,
            segments: usize,
            start: Option<Tensor<D>>,
        ) -> Tensor<D> {
            let mut dims = t.dims();
            let split = by_segment::<D, E>(dims, segments);
            dims[0] /= segments;
            let total = t.reshape(split).sum_dim(0).reshape(dims);
            match start {
                Some(start) => total + start,
                None => total,
            }
        }
        Self {
            s: sum::<4, 5>(self.s, segments, start.map(|s| s.s.clone())),
            z: sum::<3, 4>(self.z, segments, start.map(|s| s.z.clone())),
            x: sum::<3, 4>(self.x, segments, start.map(|s| s.x.clone())),
        }
    }

    /// Summed over each group of `group` consecutive heads.
    fn group_sum(self, group: usize) -> Self {
        Self {
            s: sum_head_groups::<4, 5>(self.s, group),
            z: sum_head_groups::<3, 4>(self.z, group),
            x: sum_head_groups::<3, 4>(self.x, group),
        }
    }
}

/// `t` (`[batch, heads, ..]`) summed over each group of `group` consecutive heads, in f32,
/// its dtype kept.
fn sum_head_groups<const D: usize, const E: usize>(t: Tensor<D>, group: usize) -> Tensor<D> {
    if group == 1 {
        return t;
    }
    let dtype = t.dtype();
    let mut dims = t.dims();
    dims[1] /= group;
    let mut split = [0; E];
    split[0] = dims[0];
    split[1] = dims[1];
    split[2] = group;
    split[3..].copy_from_slice(&dims[2..]);
    t.cast(DType::F32)
        .reshape(split)
        .sum_dim(2)
        .reshape(dims)
        .cast(dtype)
}

/// `[segments * batch, rest..]` as `[segments, batch, rest..]`.
fn by_segment<const D: usize, const E: usize>(dims: [usize; D], segments: usize) -> [usize; E] {
    let mut split = [0; E];
    split[0] = segments;
    split[1] = dims[0] / segments;
    split[2..].copy_from_slice(&dims[1..]);
    split
}

/// One pass's operands as tensors (any absent one a placeholder).
#[derive(Default)]
struct PassInputs {
    a: Option<Tensor<4>>,
    b: Option<Tensor<4>>,
    c: Option<Tensor<4>>,
    extra: Option<Tensor<3>>,
    state: Option<PassState>,
}

/// The sizes one pass walks: batch, rows, head dim, value dim, the operands' dtype and
/// device.
fn pass_sizes(
    mode: &LinearMode,
    inputs: &PassInputs,
) -> (usize, usize, usize, usize, DType, Device) {
    let rows_of = inputs.a.as_ref().or(inputs.b.as_ref());
    let any = rows_of
        .or(inputs.c.as_ref())
        .expect("a pass has a row operand");
    let [batch, _, _, _] = any.dims();
    let rows = if mode.reads_rows() {
        inputs.a.as_ref().map(|t| t.dims()[2])
    } else {
        inputs.b.as_ref().map(|t| t.dims()[2])
    }
    .expect("the mode's row operand");
    let dim = match (&inputs.a, &inputs.b, &inputs.state) {
        (Some(t), _, _) | (None, Some(t), _) => t.dims()[3],
        (_, _, Some(state)) => state.s.dims()[2],
        _ => unreachable!("a pass has a head dim"),
    };
    let value_dim = match (&inputs.c, &inputs.state) {
        (Some(t), _) => t.dims()[3],
        (None, Some(state)) => state.s.dims()[3],
        _ => unreachable!("a pass has a value dim"),
    };
    (batch, rows, dim, value_dim, any.dtype(), any.device())
}

/// Runs one pass of `mode` with `heads` grid heads: `(out, den, state)`. A causal pass
/// with too few cubes for the device runs in segments (see `plan::segment_rows`): a state
/// pass gives each segment's own state, their prefix sums each segment's start.
fn run_pass(
    mode: LinearMode,
    heads: usize,
    call: &LinearCall,
    inputs: PassInputs,
) -> (Tensor<4>, Tensor<3>, PassState) {
    let (batch, rows, dim, value_dim, dtype, device) = pass_sizes(&mode, &inputs);
    let segment = (mode.intra)
        .then(|| {
            let caps = cube_caps(&device)?;
            let precision = precision_of(dtype, dtype, dtype).ok()?;
            let sizes = LinearSizes {
                batch,
                heads,
                rows,
                dim,
                value_dim,
                span: 0,
                // The staging does not change the segments.
                aligned_rows: false,
            };
            let plan =
                plan_linear(&sizes, &mode, precision, &caps, call.options.kernel_chunk).ok()?;
            Some(segment_rows(&sizes, &plan)).filter(|&per| per < rows)
        })
        .flatten();
    let Some(per) = segment else {
        return run_one(mode, heads, call, inputs, None);
    };
    let segments = rows.div_ceil(per);
    // Each segment's own state, then the exclusive prefix over segments plus the start.
    let state_mode = LinearMode {
        intra: false,
        outputs: false,
        update: true,
        state_in: false,
        state_out: true,
        ..mode
    };
    let own = run_one(
        state_mode,
        heads,
        call,
        PassInputs {
            b: inputs.b.clone(),
            c: inputs.c.clone(),
            extra: inputs.extra.clone(),
            ..Default::default()
        },
        Some(per),
    )
    .2;
    let start = inputs.state.clone();
    let prefix = own.clone().prefix(segments, start.as_ref());
    let main_mode = LinearMode {
        state_in: true,
        state_out: false,
        ..mode
    };
    let (out, den, _) = run_one(
        main_mode,
        heads,
        call,
        PassInputs {
            state: Some(prefix),
            ..inputs
        },
        Some(per),
    );
    let state = if mode.state_out {
        own.total(segments, start.as_ref())
    } else {
        PassState::of(Tensor::zeros([1, 1, 1, 1], (&device, DType::F32)))
    };
    (out, den, state)
}

/// Runs one pass of `mode` with `heads` grid heads, in segments of `segment_rows` where
/// given: `(out, den, state)`.
fn run_one(
    mode: LinearMode,
    heads: usize,
    call: &LinearCall,
    inputs: PassInputs,
    segment_rows: Option<usize>,
) -> (Tensor<4>, Tensor<3>, PassState) {
    let (batch, rows, dim, value_dim, dtype, device) = pass_sizes(&mode, &inputs);
    let rows4 = || Tensor::<4>::zeros([1, 1, 1, 1], (&device, dtype));
    let f32_3 = || Tensor::<3>::zeros([1, 1, 1], (&device, DType::F32));
    let f32_4 = || Tensor::<4>::zeros([1, 1, 1, 1], (&device, DType::F32));
    let state = inputs.state.unwrap_or_else(|| PassState {
        s: f32_4(),
        z: f32_3(),
        x: f32_3(),
    });
    let low = |t: Tensor<4>| lower::<Cube, 4>(t);
    let low3 = |t: Tensor<3>| lower::<Cube, 3>(t);
    let pass = PassCall {
        mode,
        heads,
        eps: call.options.eps as f32,
        chunk: call.options.kernel_chunk,
        batch,
        rows,
        dim,
        value_dim,
        dtype,
        segment_rows,
    };
    let (out, den, s, z, x) = <Cube as LinearPassLaunch>::linear_pass(
        low(inputs.a.unwrap_or_else(rows4)),
        low(inputs.b.unwrap_or_else(rows4)),
        low(inputs.c.unwrap_or_else(rows4)),
        low3(inputs.extra.unwrap_or_else(f32_3)),
        low(state.s),
        low3(state.z),
        low3(state.x),
        pass,
    );
    (
        lift::<Cube, 4>(out),
        lift::<Cube, 3>(den),
        PassState {
            s: lift::<Cube, 4>(s),
            z: lift::<Cube, 3>(z),
            x: lift::<Cube, 3>(x),
        },
    )
}

impl LinearAttentionBackend for Cube {
    fn linear_attention_kernel(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        call: LinearCall,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (q, k, v) = (lift::<Cube, 4>(q), lift::<Cube, 4>(k), lift::<Cube, 4>(v));
        let (heads, kv_heads) = (q.dims()[1], k.dims()[1]);
        let (out, den, state) = if call.causal {
            let state = call.state_in.then(|| {
                let s = lift::<Cube, 4>(s0);
                PassState {
                    z: lift::<Cube, 3>(z0),
                    ..PassState::of(s)
                }
            });
            let mode = call.causal_passes().forward;
            let inputs = PassInputs {
                a: Some(q),
                b: Some(k),
                c: Some(v),
                state,
                ..Default::default()
            };
            run_pass(mode, heads, &call, inputs)
        } else {
            let keys = PassInputs {
                b: Some(k),
                c: Some(v),
                ..Default::default()
            };
            let passes = call.full_passes();
            let (_, _, state) = run_pass(passes.state, kv_heads, &call, keys);
            let (out, den, _) = run_pass(
                passes.apply,
                heads,
                &call,
                PassInputs {
                    a: Some(q),
                    state: Some(state.clone()),
                    ..Default::default()
                },
            );
            let device = out.device();
            let no_state = PassState {
                s: Tensor::zeros([1, 1, 1, 1], (&device, DType::F32)),
                z: Tensor::zeros([1, 1, 1], (&device, DType::F32)),
                x: Tensor::zeros([1, 1, 1], (&device, DType::F32)),
            };
            (out, den, no_state)
        };
        (
            lower::<Cube, 4>(out),
            lower::<Cube, 3>(den),
            lower::<Cube, 4>(state.s),
            lower::<Cube, 3>(state.z),
        )
    }

    fn linear_attention_kernel_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        out: FloatTensor<Self>,
        den: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        call: LinearCall,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        report(
            call.options.log.as_ref(),
            Dispatch {
                pass: Pass::Backward,
                served: if call.matrix_backward {
                    Implementation::LinearChunkMmaBackward
                } else {
                    Implementation::LinearChunkBackward
                },
                declined: Vec::new(),
            },
        );
        let (q, k, v) = (lift::<Cube, 4>(q), lift::<Cube, 4>(k), lift::<Cube, 4>(v));
        let (q_raw, k_raw) = (q.clone(), k.clone());
        let dtype = q.dtype();
        let d_out = lift::<Cube, 4>(d_out).cast(dtype);
        let (heads, kv_heads) = (q.dims()[1], k.dims()[1]);
        let group = heads / kv_heads;
        // The gradient of the numerator, and of the divisor (the rows' scalar).
        let (dn, dd) = if call.options.normalise {
            let den = lift::<Cube, 3>(den);
            let d_out = d_out.cast(DType::F32);
            let dn = d_out.clone() / den.clone().unsqueeze_dim::<4>(3);
            let dot = (d_out * lift::<Cube, 4>(out).cast(DType::F32))
                .sum_dim(3)
                .squeeze_dim::<3>(3);
            (dn.cast(dtype), Some(-dot / den))
        } else {
            (d_out, None)
        };
        let (dq, dk, dv) = if call.causal {
            let start = call.state_in.then(|| PassState {
                x: lift::<Cube, 3>(z0),
                ..PassState::of(lift::<Cube, 4>(s0).swap_dims(2, 3))
            });
            let passes = call.causal_passes();
            let (dq, _, _) = run_pass(
                passes.dq,
                heads,
                &call,
                PassInputs {
                    a: Some(dn.clone()),
                    b: Some(v.clone()),
                    c: Some(k.clone()),
                    extra: dd.clone(),
                    state: start,
                },
            );
            let (dk, _, _) = run_pass(
                passes.dk,
                heads,
                &call,
                PassInputs {
                    a: Some(v),
                    b: Some(dn.clone()),
                    c: Some(q.clone()),
                    extra: dd,
                    state: None,
                },
            );
            let (dv, _, _) = run_pass(
                passes.dv,
                heads,
                &call,
                PassInputs {
                    a: Some(k),
                    b: Some(q),
                    c: Some(dn),
                    ..Default::default()
                },
            );
            (
                dq,
                sum_head_groups::<4, 5>(dk, group),
                sum_head_groups::<4, 5>(dv, group),
            )
        } else {
            let state = |mode: LinearMode, heads: usize, inputs: PassInputs| {
                run_pass(mode, heads, &call, inputs).2
            };
            let apply = |mode: LinearMode, heads: usize, inputs: PassInputs| {
                run_pass(mode, heads, &call, inputs).0
            };
            let passes = call.full_passes();
            // dQ from sum_j v_j^T k_j (and sum_j k_j for the divisor's scalar).
            let s_vk = state(
                passes.dq_state,
                kv_heads,
                PassInputs {
                    b: Some(v.clone()),
                    c: Some(k.clone()),
                    ..Default::default()
                },
            );
            let dq = apply(
                passes.dq_apply,
                heads,
                PassInputs {
                    a: Some(dn.clone()),
                    extra: dd.clone(),
                    state: Some(s_vk),
                    ..Default::default()
                },
            );
            // dK from sum_i dn_i^T q_i (and sum_i dd_i q_i), summed over each group.
            let s_dq = state(
                passes.dk_state,
                heads,
                PassInputs {
                    b: Some(dn.clone()),
                    c: Some(q.clone()),
                    extra: dd,
                    ..Default::default()
                },
            );
            let dk = apply(
                passes.dk_apply,
                kv_heads,
                PassInputs {
                    a: Some(v),
                    state: Some(s_dq.group_sum(group)),
                    ..Default::default()
                },
            );
            // dV from sum_i q_i^T dn_i, summed over each group.
            let s_qd = state(
                passes.dv_state,
                heads,
                PassInputs {
                    b: Some(q),
                    c: Some(dn),
                    ..Default::default()
                },
            );
            let dv = apply(
                passes.dv_apply,
                kv_heads,
                PassInputs {
                    a: Some(k),
                    state: Some(s_qd.group_sum(group)),
                    ..Default::default()
                },
            );
            (dq, dk, dv)
        };
        // Gradients with respect to phi(q), phi(k) to those of the raw q, k.
        let (dq, dk) = match call.options.feature_map {
            Some(map) => {
                let chain = |grad: Tensor<4>, x: Tensor<4>| {
                    (grad.cast(DType::F32) * map.derivative(x.cast(DType::F32))).cast(dtype)
                };
                (chain(dq, q_raw), chain(dk, k_raw))
            }
            None => (dq, dk),
        };
        (
            lower::<Cube, 4>(dq),
            lower::<Cube, 4>(dk),
            lower::<Cube, 4>(dv),
        )
    }
}
