//! Matrix-unit fragments and products (PTX `m16n8k16`): the fragment vector sizes, the
//! accumulator element accessors, and the backward's products from `ldmatrix` loads
//! (the forward's are `products`).
//!
//! Register layouts are PTX's: lane `l` has group `g = l / 4` and `t = l % 4`;
//! accumulator element `e` sits at row `g + 8 * (e / 2)`, column `2 * t + e % 2`.

use cubecl::cmma::MatrixIdent;
use cubecl::cmma::MmaDefinition;
use cubecl::define_size;
use cubecl::prelude::*;

define_size!(pub MmaVecA);
define_size!(pub MmaVecB);
define_size!(pub MmaVecAcc);

/// Binds the fragment vector sizes to what the device's `m16n8k16` definition uses.
#[cube]
#[allow(unused_variables)]
pub(crate) fn register_vector_sizes<F: Float>(def: MmaDefinition<F, F, f32>) {
    let a = def.vector_size(MatrixIdent::A);
    let b = def.vector_size(MatrixIdent::B);
    let acc = def.vector_size(MatrixIdent::Accumulator);
    intrinsic!(|scope| {
        scope.register_size::<MmaVecA>(a);
        scope.register_size::<MmaVecB>(b);
        scope.register_size::<MmaVecAcc>(acc);
    });
}

/// Element `e` (0..4) of accumulator tile `tile` in an array of such tiles.
/// (Indices are constants once the callers' loops are unrolled, so the arrays stay in
/// registers.)
#[cube]
pub(crate) fn acc_get(
    arr: &Array<Vector<f32, MmaVecAcc>>,
    tile: usize,
    e: usize,
    #[comptime] vs: usize,
) -> f32 {
    let per_tile = comptime!(4 / vs);
    arr[tile * per_tile + e / vs].extract_dynamic(e % vs)
}

/// Sets element `e` (0..4) of accumulator tile `tile`.
#[cube]
pub(crate) fn acc_set(
    arr: &mut Array<Vector<f32, MmaVecAcc>>,
    tile: usize,
    e: usize,
    #[comptime] vs: usize,
    value: f32,
) {
    let per_tile = comptime!(4 / vs);
    let mut vector = arr[tile * per_tile + e / vs];
    vector.insert_dynamic(e % vs, value);
    arr[tile * per_tile + e / vs] = vector;
}

/// Two MMAs sharing one `A` fragment: `acc` tiles `first` and `first + 1` += `A` times
/// the two `B` fragments of one `ldmatrix.x4` (`b_regs`, `b_vecs` vectors each). `b_frag`
/// and `c_frag` are scratch registers (the instruction takes whole arrays).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mma_pair<F: Float>(
    def: MmaDefinition<F, F, f32>,
    a_frag: &Array<Vector<F, MmaVecA>>,
    b_regs: &Array<Vector<F, MmaVecB>>,
    acc: &mut Array<Vector<f32, MmaVecAcc>>,
    first: usize,
    b_frag: &mut Array<Vector<F, MmaVecB>>,
    c_frag: &mut Array<Vector<f32, MmaVecAcc>>,
    #[comptime] b_vecs: usize,
    #[comptime] c_vecs: usize,
) {
    #[unroll]
    for half in 0..2usize {
        #[unroll]
        for i in 0..b_vecs {
            b_frag[i] = b_regs[half * b_vecs + i];
        }
        #[unroll]
        for i in 0..c_vecs {
            c_frag[i] = acc[(first + half) * c_vecs + i];
        }
        def.execute_inplace(a_frag, &*b_frag, c_frag);
        #[unroll]
        for i in 0..c_vecs {
            acc[(first + half) * c_vecs + i] = c_frag[i];
        }
    }
}

/// One plane's products on `m16n8k16` from `ldmatrix` loads (the backward's): the
/// definition and the fragment registers the instructions take (whole arrays, so scratch).
#[derive(CubeType)]
pub(crate) struct PlaneMma<F: Float> {
    pub def: MmaDefinition<F, F, f32>,
    a: Array<Vector<F, MmaVecA>>,
    b: Array<Vector<F, MmaVecB>>,
    c: Array<Vector<f32, MmaVecAcc>>,
}

#[cube]
impl<F: Float> PlaneMma<F> {
    /// The `m16n8k16` definition for `F`, with the fragment vector sizes bound.
    pub fn new() -> PlaneMma<F> {
        let def = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
        register_vector_sizes::<F>(def);
        PlaneMma::<F> {
            def,
            a: Array::new(def.vectors_per_lane(MatrixIdent::A)),
            b: Array::new(def.vectors_per_lane(MatrixIdent::B)),
            c: Array::new(def.vectors_per_lane(MatrixIdent::Accumulator)),
        }
    }

    /// `acc = A B^T` (for the plane's unit `lane`, as every product here) over `k_chunks`
    /// chunks of 16 columns, for `n_tiles` (even) output tiles
    /// of 8 columns: `A` is the plane's 16 rows of `a_smem` from element `a_row0`, `B^T` the
    /// `8 * n_tiles` rows of `b_smem` from element `b_row0` (the staged buffer), both
    /// `[row][col]` with the given strides. `ldmatrix.x4` gives the `A` blocks (rows 0-7 |
    /// 8-15) x (cols 0-7 | 8-15) and, per pair of `B` tiles, the blocks (rows 0-7 | 8-15 of
    /// the pair) x (cols 0-7 | 8-15).
    #[allow(clippy::too_many_arguments)]
    pub fn a_bt(
        &mut self,
        lane: usize,
        a_smem: &[F],
        a_row0: usize,
        b_smem: &[F],
        b_row0: usize,
        acc: &mut Array<Vector<f32, MmaVecAcc>>,
        #[comptime] a_stride: usize,
        #[comptime] b_stride: usize,
        #[comptime] k_chunks: usize,
        #[comptime] n_tiles: usize,
    ) {
        let c_vecs = self.def.vectors_per_lane(MatrixIdent::Accumulator);
        #[unroll]
        for i in 0..comptime!(n_tiles * c_vecs) {
            acc[i] = Vector::new(f32::new(0.0));
        }
        self.smem_product(
            lane, a_smem, a_row0, b_smem, b_row0, acc, a_stride, false, b_stride, false, k_chunks,
            1usize, n_tiles,
        );
    }

    /// `acc += A B` for `m_tiles` row tiles of 16 and `n_tiles` (even) column tiles of 8 over
    /// `k_chunks` chunks of 16, both operands from shared memory: output tile `(mt, nt)` is
    /// `acc` tile `mt * n_tiles + nt`. `A` starts at element `a0` and is stored `[m][k]`
    /// (`a_km` off) or `[k][m]` (`a_km` on, read with `ldmatrix.trans`); `B` starts at `b0`
    /// and is stored `[n][k]` (`b_kn` off) or `[k][n]` (`b_kn` on, read with
    /// `ldmatrix.trans`). Strides are in elements, rows 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn smem_product(
        &mut self,
        lane: usize,
        a_smem: &[F],
        a0: usize,
        b_smem: &[F],
        b0: usize,
        acc: &mut Array<Vector<f32, MmaVecAcc>>,
        #[comptime] a_stride: usize,
        #[comptime] a_km: bool,
        #[comptime] b_stride: usize,
        #[comptime] b_kn: bool,
        #[comptime] k_chunks: usize,
        #[comptime] m_tiles: usize,
        #[comptime] n_tiles: usize,
    ) {
        let def = self.def;
        let a_vecs = def.vectors_per_lane(MatrixIdent::A);
        let ld_block = lane / 8;
        let ld_row = lane % 8;
        let mut a_all = Array::<Vector<F, MmaVecA>>::new(comptime!(m_tiles * a_vecs));
        #[unroll]
        for kc in 0..k_chunks {
            // A blocks (m 0-7 | 8-15) x (k 0-7 | 8-15), block `ld_block` = m half
            // `ld_block % 2`, k half `ld_block / 2`.
            #[unroll]
            for mt in 0..m_tiles {
                let a_off = if comptime!(a_km) {
                    a0 + (kc * 16 + 8 * (ld_block / 2) + ld_row) * a_stride
                        + mt * 16
                        + 8 * (ld_block % 2)
                } else {
                    a0 + (mt * 16 + ld_row + 8 * (ld_block % 2)) * a_stride
                        + kc * 16
                        + 8 * (ld_block / 2)
                };
                let a_regs = def.load_matrix::<F, MmaVecA>(
                    &a_smem[a_off..a_off + 8],
                    MatrixIdent::A,
                    4usize,
                    a_km,
                );
                #[unroll]
                for i in 0..a_vecs {
                    a_all[mt * a_vecs + i] = a_regs[i];
                }
            }
            self.b_columns(
                lane, &a_all, b_smem, b0, kc, acc, b_stride, b_kn, m_tiles, n_tiles,
            );
        }
    }

    /// `acc += A B` over `k_chunks` chunks of 16 rows of `B`, for `n_tiles` (even) output
    /// tiles: `A` is the plane's accumulator tiles `src` (tiles `2c` and `2c + 1` form the `A`
    /// fragment of chunk `c`), converted to `F`; `B` is `b_smem` from element `b_row0` as
    /// stored, `[k][n]` with stride `b_stride`, read with `ldmatrix.trans` (blocks (k 0-7 |
    /// 8-15) x (n 0-7 | 8-15) of each pair of output tiles).
    #[allow(clippy::too_many_arguments)]
    pub fn acc_b(
        &mut self,
        lane: usize,
        src: &Array<Vector<f32, MmaVecAcc>>,
        b_smem: &[F],
        b_row0: usize,
        acc: &mut Array<Vector<f32, MmaVecAcc>>,
        #[comptime] b_stride: usize,
        #[comptime] k_chunks: usize,
        #[comptime] n_tiles: usize,
    ) {
        self.acc_b_rows(
            lane, src, b_smem, b_row0, acc, b_stride, k_chunks, n_tiles, 1usize,
        );
    }

    /// [`Self::acc_b`] for `m_tiles` row tiles of 16 sharing each `B` fragment: `src` holds
    /// row tile `mt`'s `2 * k_chunks` tiles from tile `mt * 2 * k_chunks`, and `acc` its
    /// `n_tiles` output tiles from tile `mt * n_tiles`.
    #[allow(clippy::too_many_arguments)]
    pub fn acc_b_rows(
        &mut self,
        lane: usize,
        src: &Array<Vector<f32, MmaVecAcc>>,
        b_smem: &[F],
        b_row0: usize,
        acc: &mut Array<Vector<f32, MmaVecAcc>>,
        #[comptime] b_stride: usize,
        #[comptime] k_chunks: usize,
        #[comptime] n_tiles: usize,
        #[comptime] m_tiles: usize,
    ) {
        let def = self.def;
        let a_vs = def.vector_size(MatrixIdent::A);
        let a_vecs = def.vectors_per_lane(MatrixIdent::A);
        let c_vs = def.vector_size(MatrixIdent::Accumulator);
        let mut a_all = Array::<Vector<F, MmaVecA>>::new(comptime!(m_tiles * a_vecs));
        #[unroll]
        for kc in 0..k_chunks {
            // A elements 0..4 are tile 2kc's accumulator elements, 4..8 tile 2kc + 1's (of
            // each row tile).
            #[unroll]
            for mt in 0..m_tiles {
                #[unroll]
                for i in 0..a_vecs {
                    let mut vector = Vector::empty();
                    #[unroll]
                    for n in 0..a_vs {
                        let ei = i * a_vs + n;
                        vector.insert_dynamic(
                            n,
                            F::cast_from(acc_get(
                                src,
                                mt * 2 * k_chunks + kc * 2 + ei / 4,
                                ei % 4,
                                c_vs,
                            )),
                        );
                    }
                    a_all[mt * a_vecs + i] = vector;
                }
            }
            self.b_columns(
                lane, &a_all, b_smem, b_row0, kc, acc, b_stride, true, m_tiles, n_tiles,
            );
        }
    }

    /// One chunk `kc` of 16 `k` of a product: `acc` tile `mt * n_tiles + nt` += row tile
    /// `mt`'s `A` fragment (`a_all`, `m_tiles` fragments) times `B`'s column tile `nt`, each
    /// pair of `B` tiles one `ldmatrix.x4` of the blocks (n 0-7 | 8-15) x (k 0-7 | 8-15),
    /// `B` stored from element `b0` as `[n][k]` (`b_kn` off) or `[k][n]` (`b_kn` on, read
    /// with `ldmatrix.trans`) with stride `b_stride`.
    #[allow(clippy::too_many_arguments)]
    fn b_columns(
        &mut self,
        lane: usize,
        a_all: &Array<Vector<F, MmaVecA>>,
        b_smem: &[F],
        b0: usize,
        kc: usize,
        acc: &mut Array<Vector<f32, MmaVecAcc>>,
        #[comptime] b_stride: usize,
        #[comptime] b_kn: bool,
        #[comptime] m_tiles: usize,
        #[comptime] n_tiles: usize,
    ) {
        let def = self.def;
        let a_vecs = def.vectors_per_lane(MatrixIdent::A);
        let b_vecs = def.vectors_per_lane(MatrixIdent::B);
        let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
        let ld_block = lane / 8;
        let ld_row = lane % 8;
        #[unroll]
        for np in 0..comptime!(n_tiles / 2) {
            let b_off = if comptime!(b_kn) {
                b0 + (kc * 16 + 8 * (ld_block % 2) + ld_row) * b_stride
                    + np * 16
                    + 8 * (ld_block / 2)
            } else {
                b0 + (np * 16 + 8 * (ld_block / 2) + ld_row) * b_stride
                    + kc * 16
                    + 8 * (ld_block % 2)
            };
            let b_regs = def.load_matrix::<F, MmaVecB>(
                &b_smem[b_off..b_off + 8],
                MatrixIdent::B,
                4usize,
                b_kn,
            );
            #[unroll]
            for mt in 0..m_tiles {
                #[unroll]
                for i in 0..a_vecs {
                    self.a[i] = a_all[mt * a_vecs + i];
                }
                mma_pair::<F>(
                    def,
                    &self.a,
                    &b_regs,
                    acc,
                    mt * n_tiles + 2 * np,
                    &mut self.b,
                    &mut self.c,
                    b_vecs,
                    c_vecs,
                );
            }
        }
    }
}
