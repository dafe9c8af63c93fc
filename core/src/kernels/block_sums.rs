//! Per-block integer sums over weights interleaved 16 rows at a time: llama.cpp's arithmetic on CPUs where it
//! runs its AMX backend, in which several activation rows cost little more than one.
//!
//! ggml's `vec_dot` (which [`super::dot`] and [`super::paired`] reproduce, and which llama.cpp runs on CPUs without
//! AMX) keeps eight float lanes of four-product sums per weight block, so each block and activation row needs
//! eight conversions and eight multiply-adds: about one cycle, whatever the layout, which bounds multi-token
//! forwards. Where the CPU has AMX-INT8, llama.cpp's CPU backend instead repacks Q4_1 and Q8_0 weights
//! (`ggml-cpu/amx/mmq.cpp`) and sums each block's 32 products as one integer, with AMX tiles for several rows and
//! AVX512-VNNI for one. This module does the same: 16 weight rows' blocks side by side ([`Q4_1x16`],
//! [`Q8_0x16`]) so that one `vpdpbusd` multiplies four weights of all 16 rows by four activation bytes broadcast
//! to every lane, or one tile multiply ([`super::amx`]) a block of 16 weight rows by 16 activation rows; then a
//! block's 16 integer sums need one conversion and one multiply-add. The order of operations per weight row and
//! activation row is mmq.cpp's ([`q4_1_reference`], [`q8_0_reference`]), one f32 accumulator in block order:
//!
//! `acc = fma(d_w · d_a, Σ q_w q_a, acc)`, then for Q4_1 `acc = fma(m_w, s_a, acc)`.
//!
//! Greedy continuations then equal llama.cpp's on such a CPU (40 of 40 prompts, `block_sums_equal_llama_cpp_on_amx`),
//! where `vec_dot`'s part from them after near-ties. The rows of an activation matrix never meet, so one row gives
//! the same bits alone or among many, with either instruction: verifying drafts gives exactly the logits decoding
//! them one by one gives. The trace's model info records the arithmetic (`matmul: "block-sums"`).
//!
//! The interleaved layout holds exactly the file's bytes, rearranged (Q8_0's shifted by 128, see [`Q8_0x16`]),
//! so the model takes no more memory; a matrix whose rows are not a multiple of 16 is padded with zero rows.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::blocks::{ActivationBlock, BlockQ4_1, BlockQ8_0};

/// Weight rows interleaved per block.
pub const ROWS: usize = 16;
/// Activation rows per pass over a tile of weight rows: their accumulators and the unpacked weights fill the
/// 32 vector registers.
const PASS_ROWS: usize = 8;
/// Activation rows from which a matmul multiplies with AMX tiles, where the CPU has them: one tile multiply
/// gives a block's sums for 16 weight rows and up to 16 activation rows, where `vpdpbusd` needs eight
/// instructions per activation row. Q4_1 weights must be unpacked into bytes for the tiles first, which costs
/// more than the tiles save below 16 rows; Q8_0 weights load as they are. (Measured with `forward_profile`.)
const Q4_1_TILES_FROM: usize = 16;
const Q8_0_TILES_FROM: usize = 8;
/// Activation rows per tile multiply.
const TILE_PASS_ROWS: usize = 16;

/// Block `b` of 16 consecutive Q4_1 weight rows. Row `j`'s 16 bytes of nibbles are four little-endian words, and
/// word `c` sits in lane `j` of `qs[c]`: its low nibbles are the row's weights `4c..4c+4`, its high nibbles
/// `16+4c..16+4c+4` (the file's own nibble order, so unpacking a chunk gives two groups of four weights for all
/// 16 rows).
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct Q4_1x16 {
    pub d: [f16; ROWS],
    pub m: [f16; ROWS],
    pub qs: [[u8; 64]; 4],
}

/// Block `b` of 16 consecutive Q8_0 weight rows: row `j`'s weights `4g..4g+4` in lane `j` of `qs[g]`, each plus
/// 128 (`vpdpbusd` multiplies unsigned by signed bytes; the activations' side subtracts 128 · their sum).
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct Q8_0x16 {
    pub d: [f16; ROWS],
    pub qs: [[u8; 64]; 8],
}

/// The weights of `rows` rows of `per_row` blocks (row-major) interleaved: tile `t`'s blocks at
/// `[t * per_row..(t + 1) * per_row]`, the last tile padded with zero rows.
pub fn interleave_q4_1(blocks: &[BlockQ4_1], rows: usize, per_row: usize) -> Vec<Q4_1x16> {
    interleave(blocks, rows, per_row, |tile: &mut Q4_1x16, j, w| {
        tile.d[j] = w.d;
        tile.m[j] = w.m;
        for (c, chunk) in tile.qs.iter_mut().enumerate() {
            chunk[4 * j..4 * j + 4].copy_from_slice(&w.qs[4 * c..4 * c + 4]);
        }
    })
}

/// [`interleave_q4_1`] for Q8_0.
pub fn interleave_q8_0(blocks: &[BlockQ8_0], rows: usize, per_row: usize) -> Vec<Q8_0x16> {
    interleave(blocks, rows, per_row, |tile: &mut Q8_0x16, j, w| {
        tile.d[j] = w.d;
        for (g, chunk) in tile.qs.iter_mut().enumerate() {
            for (dst, &q) in chunk[4 * j..4 * j + 4]
                .iter_mut()
                .zip(&w.qs[4 * g..4 * g + 4])
            {
                *dst = q.wrapping_sub(i8::MIN) as u8;
            }
        }
    })
}

/// Padding rows (and rows past the end of `blocks`) are zero blocks.
fn interleave<W: Zeroable, T: Zeroable>(
    blocks: &[W],
    rows: usize,
    per_row: usize,
    mut put: impl FnMut(&mut T, usize, &W),
) -> Vec<T> {
    let zero = W::zeroed();
    let mut tiles = Vec::with_capacity(rows.div_ceil(ROWS) * per_row);
    for first in (0..rows).step_by(ROWS) {
        for b in 0..per_row {
            let mut tile = T::zeroed();
            for j in 0..ROWS {
                let w = (first + j < rows)
                    .then(|| blocks.get((first + j) * per_row + b))
                    .flatten();
                put(&mut tile, j, w.unwrap_or(&zero));
            }
            tiles.push(tile);
        }
    }
    tiles
}

impl Q4_1x16 {
    /// Row `j`'s block, as the file stores it.
    pub fn row(&self, j: usize) -> BlockQ4_1 {
        let mut qs = [0u8; 16];
        for (c, chunk) in self.qs.iter().enumerate() {
            qs[4 * c..4 * c + 4].copy_from_slice(&chunk[4 * j..4 * j + 4]);
        }
        BlockQ4_1 {
            d: self.d[j],
            m: self.m[j],
            qs,
        }
    }
}

impl Q8_0x16 {
    /// Row `j`'s block, as the file stores it.
    pub fn row(&self, j: usize) -> BlockQ8_0 {
        let mut qs = [0i8; 32];
        for (g, chunk) in self.qs.iter().enumerate() {
            for (dst, &q) in qs[4 * g..4 * g + 4]
                .iter_mut()
                .zip(&chunk[4 * j..4 * j + 4])
            {
                *dst = (q ^ 0x80) as i8;
            }
        }
        BlockQ8_0 { d: self.d[j], qs }
    }
}

/// The arithmetic for one Q4_1 weight row and one activation row, in portable scalar code: the definition the
/// kernels are tested against.
pub fn q4_1_reference(weights: &[BlockQ4_1], activations: &[ActivationBlock]) -> f32 {
    let mut acc = 0f32;
    for (w, a) in weights.iter().zip(activations) {
        let sum: i32 = w
            .nibbles()
            .iter()
            .zip(&a.qs)
            .map(|(&q, &x)| i32::from(q) * i32::from(x))
            .sum();
        let scale = w.d.to_f32() * a.d;
        acc = scale.mul_add(sum as f32, acc);
        acc = w.m.to_f32().mul_add(a.s, acc);
    }
    acc
}

/// [`q4_1_reference`] for Q8_0 weights (no `m` term).
pub fn q8_0_reference(weights: &[BlockQ8_0], activations: &[ActivationBlock]) -> f32 {
    let mut acc = 0f32;
    for (w, a) in weights.iter().zip(activations) {
        let sum: i32 =
            w.qs.iter()
                .zip(&a.qs)
                .map(|(&q, &x)| i32::from(q) * i32::from(x))
                .sum();
        acc = (w.d.to_f32() * a.d).mul_add(sum as f32, acc);
    }
    acc
}

/// Whether this CPU has the instructions (checked once; the scalar reference runs otherwise).
pub fn available() -> bool {
    super::paired::PairedActivations::available()
}

/// [`available`], or the error that says why block sums cannot be used here.
pub fn require() -> crate::error::Result<()> {
    if available() {
        Ok(())
    } else {
        Err(crate::error::Error::InvalidInput(
            "block sums need a CPU with AVX-512 VNNI; this one has none".into(),
        ))
    }
}

/// Activation rows (row-major, `per_row` blocks each) ready for the kernels.
pub struct Activations {
    per_row: usize,
    blocks: Vec<ActivationBlock>,
    /// `[row * per_row + block]`: 128 · Σ q_a, what shifting Q8_0 weights by 128 adds to a block's sum (empty
    /// for Q4_1 weights).
    shifts: Vec<i32>,
    /// `[pass * per_row + block]`: the rows again, 16 per pass, for the AMX tiles (empty unless used).
    tile_blocks: Vec<TileBlock>,
}

/// One block of up to 16 activation rows: the tile multiply's left operand and what scales its sums.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct TileBlock {
    /// Row `r`'s 32 values (missing rows zero).
    qs: [[i8; 32]; TILE_PASS_ROWS],
    d: [f32; TILE_PASS_ROWS],
    s: [f32; TILE_PASS_ROWS],
    /// 128 · Σ q_a (Q8_0 weights only).
    shift: [i32; TILE_PASS_ROWS],
}

impl Activations {
    pub fn new(blocks: Vec<ActivationBlock>, per_row: usize, q8_0: bool) -> Self {
        let shifts = if q8_0 {
            blocks
                .iter()
                .map(|a| 128 * a.qs.iter().map(|&q| i32::from(q)).sum::<i32>())
                .collect()
        } else {
            Vec::new()
        };
        let per_row = per_row.max(1);
        let rows = blocks.len() / per_row;
        let tiles_from = if q8_0 {
            Q8_0_TILES_FROM
        } else {
            Q4_1_TILES_FROM
        };
        // The tile kernels' scaling runs the same AVX-512 as the rest of this module.
        let tile_blocks = if rows >= tiles_from && available() && super::amx::available() {
            tile_blocks(&blocks, &shifts, per_row)
        } else {
            Vec::new()
        };
        Self {
            per_row,
            blocks,
            shifts,
            tile_blocks,
        }
    }

    /// For the tiles in `weights` holding `n` real weight rows: `out[r * n + i]` = weight row `i` · activation
    /// row `r`, bit for bit [`q4_1_reference`].
    pub fn q4_1(&self, weights: &[Q4_1x16], n: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.with_tiles(weights, n, out, simd::q4_1_tiles) {
            return;
        }
        self.vector_passes(weights, n, out, |tile, j, acts| {
            q4_1_reference(&tile_row(tile, Q4_1x16::row, j), acts)
        });
    }

    /// [`Self::q4_1`] for Q8_0 weights, bit for bit [`q8_0_reference`] (needs `q8_0` in [`Self::new`]).
    pub fn q8_0(&self, weights: &[Q8_0x16], n: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.with_tiles(weights, n, out, simd::q8_0_tiles) {
            return;
        }
        self.vector_passes(weights, n, out, |tile, j, acts| {
            q8_0_reference(&tile_row(tile, Q8_0x16::row, j), acts)
        });
    }

    /// The `vpdpbusd` path of [`Self::q4_1`] and [`Self::q8_0`], 8 activation rows per pass over a tile; where the
    /// CPU lacks the instructions, `reference(tile, weight row, activation row)`.
    fn vector_passes<W: VectorWeights>(
        &self,
        weights: &[W],
        n: usize,
        out: &mut [f32],
        reference: fn(&[W], usize, &[ActivationBlock]) -> f32,
    ) {
        let rows: Vec<&[ActivationBlock]> = self.blocks.chunks_exact(self.per_row).collect();
        // Q8_0's shifts by row; empty rows for Q4_1, which has none.
        let shifts: Vec<&[i32]> = (0..rows.len())
            .map(|r| {
                let at = r * self.per_row;
                self.shifts.get(at..at + self.per_row).unwrap_or(&[])
            })
            .collect();
        for (t, tile) in weights.chunks_exact(self.per_row).enumerate() {
            let passes = rows.chunks(PASS_ROWS).zip(shifts.chunks(PASS_ROWS));
            for (pass, (rows, shifts)) in passes.enumerate() {
                let mut sums = [[0f32; ROWS]; PASS_ROWS];
                #[cfg(target_arch = "x86_64")]
                let done = available() && {
                    W::vector(tile, rows, shifts, &mut sums);
                    true
                };
                #[cfg(not(target_arch = "x86_64"))]
                let done = false;
                if !done {
                    for (acts, row_sums) in rows.iter().zip(sums.iter_mut()) {
                        for (j, sum) in row_sums.iter_mut().enumerate() {
                            *sum = reference(tile, j, acts);
                        }
                    }
                }
                scatter(&sums, rows.len(), pass * PASS_ROWS, t, n, out);
            }
        }
    }
}

/// The interleaved formats' `vpdpbusd` kernels: one tile against up to 8 activation rows.
trait VectorWeights: Sized {
    #[cfg(target_arch = "x86_64")]
    fn vector(
        tile: &[Self],
        rows: &[&[ActivationBlock]],
        shifts: &[&[i32]],
        out: &mut [[f32; ROWS]; PASS_ROWS],
    );
}

impl VectorWeights for Q4_1x16 {
    #[cfg(target_arch = "x86_64")]
    fn vector(
        tile: &[Self],
        rows: &[&[ActivationBlock]],
        _shifts: &[&[i32]],
        out: &mut [[f32; ROWS]; PASS_ROWS],
    ) {
        simd::q4_1(tile, rows, out);
    }
}

impl VectorWeights for Q8_0x16 {
    #[cfg(target_arch = "x86_64")]
    fn vector(
        tile: &[Self],
        rows: &[&[ActivationBlock]],
        shifts: &[&[i32]],
        out: &mut [[f32; ROWS]; PASS_ROWS],
    ) {
        simd::q8_0(tile, rows, shifts, out);
    }
}

/// Where a tile kernel hands each pass's sums: `emit(first activation row, real rows, sums)`.
#[cfg(target_arch = "x86_64")]
type Emit<'e> = dyn FnMut(usize, usize, &[[f32; ROWS]; TILE_PASS_ROWS]) + 'e;

/// A tile kernel: one tile of weight rows against every pass of activation rows (`rows` of them real).
#[cfg(target_arch = "x86_64")]
type TileKernel<W> =
    for<'a> fn(super::amx::Configured<'a>, &[W], &[TileBlock], usize, &mut Emit<'_>);

impl Activations {
    /// The AMX path of [`Self::q4_1`] and [`Self::q8_0`]: false (nothing written) unless the rows were prepared
    /// for tiles and this thread got them.
    #[cfg(target_arch = "x86_64")]
    fn with_tiles<W>(
        &self,
        weights: &[W],
        n: usize,
        out: &mut [f32],
        kernel: TileKernel<W>,
    ) -> bool {
        if self.tile_blocks.is_empty() {
            return false;
        }
        let rows = self.blocks.len() / self.per_row;
        super::amx::with_tiles(|configured| {
            let Some(configured) = configured else {
                return false;
            };
            for (t, tile) in weights.chunks_exact(self.per_row).enumerate() {
                kernel(
                    configured,
                    tile,
                    &self.tile_blocks,
                    rows,
                    &mut |first, pass_rows, sums| {
                        scatter(sums, pass_rows, first, t, n, out);
                    },
                );
            }
            true
        })
    }
}

/// The rows regrouped 16 per pass for the tiles, padded with zero rows; `shifts` as in [`Activations`] (empty
/// for Q4_1).
fn tile_blocks(blocks: &[ActivationBlock], shifts: &[i32], per_row: usize) -> Vec<TileBlock> {
    let rows: Vec<&[ActivationBlock]> = blocks.chunks_exact(per_row).collect();
    let mut out = Vec::with_capacity(rows.len().div_ceil(TILE_PASS_ROWS) * per_row);
    for (p, pass) in rows.chunks(TILE_PASS_ROWS).enumerate() {
        for b in 0..per_row {
            let mut tile = TileBlock {
                qs: [[0; 32]; TILE_PASS_ROWS],
                d: [0.0; TILE_PASS_ROWS],
                s: [0.0; TILE_PASS_ROWS],
                shift: [0; TILE_PASS_ROWS],
            };
            for (r, row) in pass.iter().enumerate() {
                if let Some(a) = row.get(b) {
                    tile.qs[r] = a.qs;
                    tile.d[r] = a.d;
                    tile.s[r] = a.s;
                    let at = (p * TILE_PASS_ROWS + r) * per_row + b;
                    tile.shift[r] = shifts.get(at).copied().unwrap_or(0);
                }
            }
            out.push(tile);
        }
    }
    out
}

/// Weight row `j` of a tile, block by block, as the file stores it.
fn tile_row<T, W>(tile: &[T], row: fn(&T, usize) -> W, j: usize) -> Vec<W> {
    tile.iter().map(|block| row(block, j)).collect()
}

/// Writes a pass's sums (`sums[r][j]`: activation row `first_row + r`, weight row `t * 16 + j`) into
/// activation-row-major `out`, leaving out the padding rows.
fn scatter(
    sums: &[[f32; ROWS]],
    rows: usize,
    first_row: usize,
    t: usize,
    n: usize,
    out: &mut [f32],
) {
    let first = t * ROWS;
    let len = ROWS.min(n.saturating_sub(first));
    for (r, row_sums) in sums.iter().enumerate().take(rows) {
        let at = (first_row + r) * n + first;
        if let (Some(dst), Some(src)) = (out.get_mut(at..at + len), row_sums.get(..len)) {
            dst.copy_from_slice(src);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd;

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::kernels::blocks::{BLOCK, quantize_activations};

    fn q4_1_blocks(rng: &mut ChaCha8Rng, n: usize) -> Vec<BlockQ4_1> {
        (0..n)
            .map(|_| BlockQ4_1 {
                d: f16::from_f32(rng.random_range(0.0..0.05)),
                m: f16::from_f32(rng.random_range(-0.4..0.0)),
                qs: std::array::from_fn(|_| rng.random()),
            })
            .collect()
    }

    fn q8_0_blocks(rng: &mut ChaCha8Rng, n: usize) -> Vec<BlockQ8_0> {
        (0..n)
            .map(|_| BlockQ8_0 {
                d: f16::from_f32(rng.random_range(0.0..0.01)),
                qs: std::array::from_fn(|_| rng.random_range(-128..=127)),
            })
            .collect()
    }

    #[test]
    fn interleaving_keeps_every_rows_blocks() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (rows, per_row) = (21, 3);
        let q4 = q4_1_blocks(&mut rng, rows * per_row);
        let q8 = q8_0_blocks(&mut rng, rows * per_row);
        let (t4, t8) = (
            interleave_q4_1(&q4, rows, per_row),
            interleave_q8_0(&q8, rows, per_row),
        );
        assert_eq!(t4.len(), 2 * per_row);
        for row in 0..32 {
            for b in 0..per_row {
                let at = (row / ROWS) * per_row + b;
                let (got4, got8) = (t4[at].row(row % ROWS), t8[at].row(row % ROWS));
                if row < rows {
                    assert_eq!(got4, q4[row * per_row + b]);
                    assert_eq!(got8, q8[row * per_row + b]);
                } else {
                    assert_eq!(got4, BlockQ4_1::zeroed(), "padding row {row}");
                    assert_eq!(got8, BlockQ8_0::zeroed(), "padding row {row}");
                }
            }
        }
    }

    #[test]
    fn kernels_return_the_references_bits_for_any_rows() {
        eprintln!("AVX-512 VNNI block sums here: {}", available());
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..24 {
            let per_row = 1 + case % 20;
            let weight_rows = [1, 16, 17, 40][case % 4];
            let q4 = q4_1_blocks(&mut rng, weight_rows * per_row);
            let q8 = q8_0_blocks(&mut rng, weight_rows * per_row);
            let (t4, t8) = (
                interleave_q4_1(&q4, weight_rows, per_row),
                interleave_q8_0(&q8, weight_rows, per_row),
            );
            for rows in [1, 2, 5, 8, 9, 17, 33] {
                let mut acts = Vec::new();
                for _ in 0..rows {
                    let row: Vec<f32> = (0..per_row * BLOCK)
                        .map(|_| {
                            let v: f32 = rng.random_range(-1.0..1.0);
                            if rng.random_bool(0.02) { v * 40.0 } else { v }
                        })
                        .collect();
                    quantize_activations(&row, &mut acts);
                }
                let prepared = Activations::new(acts.clone(), per_row, true);
                let act = |r: usize| &acts[r * per_row..(r + 1) * per_row];
                let check = |got: &[f32], what: &str, want: &dyn Fn(usize, usize) -> f32| {
                    for r in 0..rows {
                        for i in 0..weight_rows {
                            assert_eq!(
                                got[r * weight_rows + i].to_bits(),
                                want(r, i).to_bits(),
                                "{what}: {per_row} blocks, weight row {i}, activation row {r} of {rows}"
                            );
                        }
                    }
                };
                let weight_row = |i: usize| i * per_row..(i + 1) * per_row;
                let mut got = vec![f32::NAN; rows * weight_rows];
                prepared.q4_1(&t4, weight_rows, &mut got);
                check(&got, "Q4_1", &|r, i| {
                    q4_1_reference(&q4[weight_row(i)], act(r))
                });
                got.fill(f32::NAN);
                prepared.q8_0(&t8, weight_rows, &mut got);
                check(&got, "Q8_0", &|r, i| {
                    q8_0_reference(&q8[weight_row(i)], act(r))
                });
            }
        }
    }

    #[test]
    fn block_sums_round_apart_from_vec_dot_but_as_precisely() {
        // The two arithmetics are different definitions (else the option would be pointless to record), and
        // both stay within float rounding of the exact dot product.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let per_row = 18;
        let mut differ = 0;
        for _ in 0..200 {
            let w = q4_1_blocks(&mut rng, per_row);
            let row: Vec<f32> = (0..per_row * BLOCK)
                .map(|_| rng.random_range(-3.0..3.0))
                .collect();
            let mut acts = Vec::new();
            quantize_activations(&row, &mut acts);
            let terms: Vec<f64> = w
                .iter()
                .zip(&acts)
                .flat_map(|(w, a)| {
                    let dot: i64 = w
                        .nibbles()
                        .iter()
                        .zip(&a.qs)
                        .map(|(&q, &x)| i64::from(q) * i64::from(x))
                        .sum();
                    [
                        f64::from(w.d.to_f32()) * f64::from(a.d) * dot as f64,
                        f64::from(w.m.to_f32()) * f64::from(a.s),
                    ]
                })
                .collect();
            let exact: f64 = terms.iter().sum();
            let size: f64 = terms.iter().map(|t| t.abs()).sum();
            let sums = q4_1_reference(&w, &acts);
            let vec_dot = crate::kernels::dot::q4_1_reference(&w, &acts);
            differ += usize::from(sums.to_bits() != vec_dot.to_bits());
            for got in [sums, vec_dot] {
                // A few roundings of f32 (2⁻²⁴ each) at the size of the terms.
                assert!(
                    (f64::from(got) - exact).abs() < 1e-6 * size,
                    "{got} vs {exact}"
                );
            }
        }
        assert!(differ > 20, "only {differ} of 200 differ");
    }
}
