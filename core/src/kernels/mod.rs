//! Quantized matrix multiplication for the model's weights: the file's own GGUF blocks against activations
//! quantized once per row, in llama.cpp's order of operations, several rows per pass over the weights, split
//! across threads.
//!
//! candle 0.11's Q4_1 kernel is scalar, reads each weight block once per activation row (so verifying k draft
//! tokens costs k weight reads) and threads through a barrier pool that stalls under contention. This module
//! replaces it for the formats the default model uses (Q4_1 blocks, Q8_0 embeddings as the tied LM head); other
//! formats keep candle's `QMatMul`.
//!
//! - [`block_sums`]: weights interleaved 16 rows at a time and each block summed as one integer, llama.cpp's
//!   arithmetic on CPUs where it runs its AMX backend; several rows cost little more than one.
//! - [`amx`]: the AMX tile registers and the one tile multiply [`block_sums`] uses.
//! - [`blocks`]: block layouts and activation quantization.
//! - [`dot`]: scalar reference dot products and their AVX2 versions (bit-identical).
//! - [`paired`]: the AVX-512 kernels for several activation rows (two rows per register; bit-identical).
//! - [`pool`]: the thread split.
//! - [`f16`]: rounding to f16 (llama.cpp's attention arithmetic).
//! - [`huge_pages`]: weight storage advised for transparent huge pages.
//! - [`vector`]: AVX-512 SwiGLU and activation quantization (bit-identical to their scalar definitions).

pub mod amx;
pub mod block_sums;
pub mod blocks;
pub mod dot;
pub mod f16;
pub mod huge_pages;
pub mod paired;
pub mod pool;
pub mod vector;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::quantized::{GgmlDType, QTensor};

use block_sums::{Q4_1x16, Q8_0x16};
use blocks::{ActivationBlock, BLOCK, BlockQ4_1, BlockQ8_0};
use huge_pages::{ArenaWriter, BlockBuffer};
use paired::PairedActivations;
use pool::{ComputePool, Job};

/// Weight rows of one matrix in a supported GGUF block format.
#[derive(Clone, Debug, PartialEq)]
pub enum Blocks {
    Q4_1(BlockBuffer<BlockQ4_1>),
    Q8_0(BlockBuffer<BlockQ8_0>),
    /// Interleaved for [`block_sums`], 16 rows per tile (the last padded).
    Q4_1x16(BlockBuffer<Q4_1x16>),
    Q8_0x16(BlockBuffer<Q8_0x16>),
}

/// A `(rows, cols)` weight matrix, `y = x Wᵀ`, stored as the file's quantized blocks (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantMatrix {
    pub rows: usize,
    pub cols: usize,
    blocks: Blocks,
}

/// The blocks of every part, in order, if `of` finds each part's blocks in the wanted format.
fn concat<T: bytemuck::Pod>(
    parts: &[&QuantMatrix],
    of: impl Fn(&Blocks) -> Option<&BlockBuffer<T>>,
) -> Option<BlockBuffer<T>> {
    let parts: Vec<&BlockBuffer<T>> = parts.iter().map(|p| of(&p.blocks)).collect::<Option<_>>()?;
    Some(parts.into_iter().flat_map(|b| b.iter().copied()).collect())
}

impl QuantMatrix {
    /// Takes a 2-D tensor's blocks, or `None` for a format these kernels do not cover.
    pub fn from_qtensor(tensor: &QTensor) -> candle_core::Result<Option<Self>> {
        let (rows, cols) = match tensor.shape().dims() {
            &[rows, cols] if cols % BLOCK == 0 => (rows, cols),
            _ => return Ok(None),
        };
        let data = tensor.data()?;
        let blocks = match tensor.dtype() {
            GgmlDType::Q4_1 => Blocks::Q4_1(
                data.chunks_exact(BlockQ4_1::BYTES)
                    .filter_map(|c| c.try_into().ok().map(BlockQ4_1::from_bytes))
                    .collect(),
            ),
            GgmlDType::Q8_0 => Blocks::Q8_0(
                data.chunks_exact(BlockQ8_0::BYTES)
                    .filter_map(|c| c.try_into().ok().map(BlockQ8_0::from_bytes))
                    .collect(),
            ),
            _ => return Ok(None),
        };
        let matrix = Self { rows, cols, blocks };
        if matrix.block_count() != rows * cols / BLOCK {
            candle_core::bail!(
                "quantized tensor holds {} blocks, expected {}",
                matrix.block_count(),
                rows * cols / BLOCK
            );
        }
        Ok(Some(matrix))
    }

    /// Stacks matrices with the same format and width into one (fusing the q/k/v or gate/up projections into a
    /// single pass over their shared input). `None` if they differ.
    pub fn stack(parts: &[&QuantMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.cols != first.cols) {
            return None;
        }
        // Stacked before interleaving: tiles of rows cannot be concatenated once padded.
        let blocks = match &first.blocks {
            Blocks::Q4_1(_) => Blocks::Q4_1(concat(parts, |b| match b {
                Blocks::Q4_1(b) => Some(b),
                _ => None,
            })?),
            Blocks::Q8_0(_) => Blocks::Q8_0(concat(parts, |b| match b {
                Blocks::Q8_0(b) => Some(b),
                _ => None,
            })?),
            Blocks::Q4_1x16(_) | Blocks::Q8_0x16(_) => return None,
        };
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            blocks,
        })
    }

    /// The same matrix in [`block_sums`]' interleaved layout (the same bytes, rearranged): every later matmul
    /// takes the block-sums arithmetic.
    pub fn interleaved(self) -> Self {
        let per_row = self.cols / BLOCK;
        let blocks = match &self.blocks {
            Blocks::Q4_1(b) => Blocks::Q4_1x16(
                block_sums::interleave_q4_1(b, self.rows, per_row)
                    .into_iter()
                    .collect(),
            ),
            Blocks::Q8_0(b) => Blocks::Q8_0x16(
                block_sums::interleave_q8_0(b, self.rows, per_row)
                    .into_iter()
                    .collect(),
            ),
            Blocks::Q4_1x16(_) | Blocks::Q8_0x16(_) => return self,
        };
        Self { blocks, ..self }
    }

    /// Whether matmuls take the [`block_sums`] arithmetic (the matrix is [`Self::interleaved`]).
    pub fn is_interleaved(&self) -> bool {
        matches!(self.blocks, Blocks::Q4_1x16(_) | Blocks::Q8_0x16(_))
    }

    /// Moves the blocks of `matrices`, in order (the order the forward reads them), into one mapping advised
    /// for huge pages (see [`huge_pages`]). Returns whether every matrix moved; one that did not keeps its own
    /// blocks.
    pub fn pack(matrices: &mut [&mut QuantMatrix]) -> bool {
        let room = matrices
            .iter()
            .map(|m| match &m.blocks {
                Blocks::Q4_1(b) => ArenaWriter::room_for(b),
                Blocks::Q8_0(b) => ArenaWriter::room_for(b),
                Blocks::Q4_1x16(b) => ArenaWriter::room_for(b),
                Blocks::Q8_0x16(b) => ArenaWriter::room_for(b),
            })
            .sum();
        let Some(mut writer) = ArenaWriter::new(room) else {
            return false;
        };
        // A matrix the arena has no room for (none, if `room` is right) keeps its own blocks.
        let written: Vec<_> = matrices
            .iter_mut()
            .map(|m| match &mut m.blocks {
                Blocks::Q4_1(b) => writer.write(b),
                Blocks::Q8_0(b) => writer.write(b),
                Blocks::Q4_1x16(b) => writer.write(b),
                Blocks::Q8_0x16(b) => writer.write(b),
            })
            .collect();
        let arena = writer.finish();
        let mut all = true;
        for (m, written) in matrices.iter_mut().zip(written) {
            match (&mut m.blocks, written) {
                (Blocks::Q4_1(b), Some(w)) => huge_pages::place(b, &arena, w),
                (Blocks::Q8_0(b), Some(w)) => huge_pages::place(b, &arena, w),
                (Blocks::Q4_1x16(b), Some(w)) => huge_pages::place(b, &arena, w),
                (Blocks::Q8_0x16(b), Some(w)) => huge_pages::place(b, &arena, w),
                (_, None) => all = false,
            }
        }
        all
    }

    /// Blocks stored, padding rows included.
    fn block_count(&self) -> usize {
        match &self.blocks {
            Blocks::Q4_1(b) => b.len(),
            Blocks::Q8_0(b) => b.len(),
            Blocks::Q4_1x16(b) => b.len() * block_sums::ROWS,
            Blocks::Q8_0x16(b) => b.len() * block_sums::ROWS,
        }
    }

    /// Dequantized rows (tests and reference computations).
    pub fn dequantize(&self) -> Vec<f32> {
        let per_row = (self.cols / BLOCK).max(1);
        match &self.blocks {
            Blocks::Q4_1(b) => b.iter().flat_map(|b| b.dequantize()).collect(),
            Blocks::Q8_0(b) => b.iter().flat_map(|b| b.dequantize()).collect(),
            Blocks::Q4_1x16(b) => {
                dequantize_tiles(b, self.rows, per_row, |t, j| t.row(j).dequantize())
            }
            Blocks::Q8_0x16(b) => {
                dequantize_tiles(b, self.rows, per_row, |t, j| t.row(j).dequantize())
            }
        }
    }

    /// `x` holds `t` rows of `cols` values; returns `t` rows of `rows` values, in the arithmetic of the
    /// matrix's layout (`vec_dot`'s, or [`block_sums`]' once [`Self::interleaved`]).
    pub fn matmul(self: &Arc<Self>, x: &[f32], t: usize) -> Vec<f32> {
        self.matmul_on(compute_pool(), x, t)
    }

    /// [`Self::matmul`] on a given pool (tests run several pool sizes in one process).
    pub fn matmul_on(self: &Arc<Self>, pool: &ComputePool, x: &[f32], t: usize) -> Vec<f32> {
        let mut activations = Vec::with_capacity(t * self.cols / BLOCK);
        for row in x.chunks_exact(self.cols).take(t) {
            blocks::quantize_activations(row, &mut activations);
        }
        let threads = pool.threads();
        let per_row = self.cols / BLOCK;
        // Enough chunks that a helper stalled by the scheduler leaves little behind, few enough to stay cheap;
        // whole tiles of 16 weight rows for the block-sums kernels.
        let chunk_rows = if threads == 1 {
            self.rows
        } else {
            let rows = (self.rows / (8 * threads)).clamp(16, 256);
            if self.is_interleaved() {
                rows.next_multiple_of(block_sums::ROWS)
            } else {
                rows
            }
        };
        // One row streams the weights at memory speed with the 256-bit kernel; several rows are bound by
        // arithmetic, where pairing rows in 512-bit registers halves the instructions.
        let paired = (!self.is_interleaved() && t > PAIRED_FROM && PairedActivations::available())
            .then(|| PairedActivations::new(&activations, per_row));
        let (activations, block_sums) = if self.is_interleaved() {
            let q8_0 = matches!(self.blocks, Blocks::Q8_0x16(_));
            let prepared = block_sums::Activations::new(activations, per_row, q8_0);
            (Vec::new(), Some(prepared))
        } else {
            (activations, None)
        };
        let job = Arc::new(MatmulJob {
            matrix: self.clone(),
            activations,
            paired,
            block_sums,
            t,
            chunk_rows,
            results: (0..self.rows.div_ceil(chunk_rows))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        });
        pool.run(job.clone());
        // One chunk of every row is already laid out as the result (one thread): taken, not copied.
        if let [only] = job.results.as_slice() {
            let mut values = only.lock().unwrap_or_else(PoisonError::into_inner);
            if values.len() == t * self.rows {
                return std::mem::take(&mut *values);
            }
        }
        // Chunks hold t runs of their rows' values (activation row-major), so each lands with one copy.
        let mut out = vec![0f32; t * self.rows];
        for (c, chunk) in job.results.iter().enumerate() {
            let chunk = chunk.lock().unwrap_or_else(PoisonError::into_inner);
            let first = c * chunk_rows;
            let len = chunk.len() / t.max(1);
            for (r, values) in chunk.chunks_exact(len.max(1)).enumerate() {
                if let Some(slot) = out.get_mut(r * self.rows + first..r * self.rows + first + len)
                {
                    slot.copy_from_slice(values);
                }
            }
        }
        out
    }
}

/// The first `rows` rows of an interleaved matrix, dequantized: row `j` of a tile by `row`.
fn dequantize_tiles<T>(
    tiles: &[T],
    rows: usize,
    per_row: usize,
    row: impl Fn(&T, usize) -> [f32; BLOCK],
) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| {
            let first = r / block_sums::ROWS * per_row;
            let blocks = tiles.get(first..first + per_row).unwrap_or(&[]);
            blocks
                .iter()
                .flat_map(|t| row(t, r % block_sums::ROWS))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Above this many activation rows the paired AVX-512 kernels win; at or below it, the 256-bit kernels with one
/// register per row (a decode step, a short verification).
const PAIRED_FROM: usize = 2;

struct MatmulJob {
    matrix: Arc<QuantMatrix>,
    activations: Vec<ActivationBlock>,
    paired: Option<PairedActivations>,
    block_sums: Option<block_sums::Activations>,
    t: usize,
    chunk_rows: usize,
    results: Vec<Mutex<Vec<f32>>>,
}

impl Job for MatmulJob {
    fn chunks(&self) -> usize {
        self.results.len()
    }

    fn run_chunk(&self, index: usize) {
        let m = &self.matrix;
        let per_row = m.cols / BLOCK;
        let first = index * self.chunk_rows;
        let last = (first + self.chunk_rows).min(m.rows);
        let len = last - first;
        let range = first * per_row..last * per_row;
        let mut values = vec![0f32; len * self.t];
        // Interleaved chunks start on a tile (one chunk starts at 0; several are a multiple of 16 rows each).
        let tiles_range =
            first / block_sums::ROWS * per_row..last.div_ceil(block_sums::ROWS) * per_row;
        if let (Some(acts), Blocks::Q4_1x16(b)) = (&self.block_sums, &m.blocks) {
            acts.q4_1(b.get(tiles_range).unwrap_or(&[]), len, &mut values);
        } else if let (Some(acts), Blocks::Q8_0x16(b)) = (&self.block_sums, &m.blocks) {
            acts.q8_0(b.get(tiles_range).unwrap_or(&[]), len, &mut values);
        } else if let Some(paired) = &self.paired {
            match &m.blocks {
                Blocks::Q4_1(b) => paired.q4_1(b.get(range).unwrap_or(&[]), per_row, &mut values),
                Blocks::Q8_0(b) => paired.q8_0(b.get(range).unwrap_or(&[]), per_row, &mut values),
                Blocks::Q4_1x16(_) | Blocks::Q8_0x16(_) => {}
            }
        } else {
            let acts: Vec<&[ActivationBlock]> = self.activations.chunks_exact(per_row).collect();
            for (acts, values) in acts
                .chunks(dot::ACTIVATION_ROWS)
                .zip(values.chunks_mut(dot::ACTIVATION_ROWS * len))
            {
                match &m.blocks {
                    Blocks::Q4_1(b) => dot::q4_1_few_rows(
                        b.get(range.clone()).unwrap_or(&[]),
                        per_row,
                        acts,
                        values,
                    ),
                    Blocks::Q8_0(b) => dot::q8_0_few_rows(
                        b.get(range.clone()).unwrap_or(&[]),
                        per_row,
                        acts,
                        values,
                    ),
                    Blocks::Q4_1x16(_) | Blocks::Q8_0x16(_) => {}
                }
            }
        }
        if let Some(slot) = self.results.get(index) {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = values;
        }
    }
}

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<ComputePool> = OnceLock::new();

/// Sets the compute threads (the caller included). Takes effect if called before the first matmul.
pub fn set_threads(threads: usize) {
    THREADS.store(threads.max(1), Ordering::SeqCst);
}

pub(crate) fn compute_pool() -> &'static ComputePool {
    POOL.get_or_init(|| {
        let configured = THREADS.load(Ordering::SeqCst);
        let threads = if configured > 0 {
            configured
        } else {
            std::env::var("SPECULA_THREADS")
                .ok()
                .or_else(|| std::env::var("CANDLE_NUM_THREADS").ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
        };
        ComputePool::new(threads)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use half::f16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize, q8: bool) -> QuantMatrix {
        let n = rows * cols / BLOCK;
        let blocks = if q8 {
            Blocks::Q8_0(
                (0..n)
                    .map(|_| BlockQ8_0 {
                        d: f16::from_f32(rng.random_range(0.0..0.01)),
                        qs: std::array::from_fn(|_| rng.random_range(-127..=127)),
                    })
                    .collect(),
            )
        } else {
            Blocks::Q4_1(
                (0..n)
                    .map(|_| BlockQ4_1 {
                        d: f16::from_f32(rng.random_range(0.0..0.05)),
                        m: f16::from_f32(rng.random_range(-0.4..0.0)),
                        qs: std::array::from_fn(|_| rng.random()),
                    })
                    .collect(),
            )
        };
        QuantMatrix { rows, cols, blocks }
    }

    /// Row by row with the scalar reference: what every thread split and row count must reproduce bit for bit.
    fn reference(m: &QuantMatrix, x: &[f32], t: usize) -> Vec<f32> {
        let per_row = m.cols / BLOCK;
        let mut out = vec![0f32; t * m.rows];
        for (r, input) in x.chunks_exact(m.cols).enumerate() {
            let mut acts = Vec::new();
            blocks::quantize_activations(input, &mut acts);
            for row in 0..m.rows {
                let range = row * per_row..(row + 1) * per_row;
                out[r * m.rows + row] = match &m.blocks {
                    Blocks::Q4_1(b) => dot::q4_1_reference(&b[range], &acts),
                    Blocks::Q8_0(b) => dot::q8_0_reference(&b[range], &acts),
                    _ => unreachable!("references take the file's layout"),
                };
            }
        }
        out
    }

    /// The [`block_sums`] references, row by row, on the file's layout.
    fn reference_block_sums(m: &QuantMatrix, x: &[f32]) -> Vec<f32> {
        let per_row = m.cols / BLOCK;
        x.chunks_exact(m.cols)
            .flat_map(|input| {
                let mut acts = Vec::new();
                blocks::quantize_activations(input, &mut acts);
                (0..m.rows)
                    .map(|row| {
                        let range = row * per_row..(row + 1) * per_row;
                        match &m.blocks {
                            Blocks::Q4_1(b) => block_sums::q4_1_reference(&b[range], &acts),
                            Blocks::Q8_0(b) => block_sums::q8_0_reference(&b[range], &acts),
                            _ => unreachable!("references take the file's layout"),
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn matmul_equals_the_row_by_row_reference_for_any_rows_and_threads() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let pools: Vec<ComputePool> = (1..=3).map(ComputePool::new).collect();
        for case in 0..24 {
            // Row counts that do and do not divide into chunks; both block formats.
            let rows = [1, 7, 64, 300, 577][case % 5];
            let cols = 32 * (1 + case % 4);
            let m = Arc::new(matrix(&mut rng, rows, cols, case % 2 == 1));
            let interleaved = Arc::new((*m).clone().interleaved());
            assert!(interleaved.is_interleaved() && !m.is_interleaved());
            assert_eq!(interleaved.dequantize(), m.dequantize());
            for t in [1, 2, 3, 4, 5, 6, 16, 19] {
                let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let want = reference(&m, &x, t);
                let want_sums = reference_block_sums(&m, &x);
                for pool in &pools {
                    let got = interleaved.matmul_on(pool, &x, t);
                    assert_eq!(
                        got,
                        want_sums,
                        "block sums: rows {rows} cols {cols} t {t} threads {}",
                        pool.threads()
                    );
                    let got = m.matmul_on(pool, &x, t);
                    assert_eq!(
                        got,
                        want,
                        "rows {rows} cols {cols} t {t} threads {}",
                        pool.threads()
                    );
                }
            }
        }
    }

    #[test]
    fn stacking_concatenates_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a = matrix(&mut rng, 5, 64, false);
        let b = matrix(&mut rng, 3, 64, false);
        let stacked = QuantMatrix::stack(&[&a, &b]).unwrap();
        assert_eq!((stacked.rows, stacked.cols), (8, 64));
        assert_eq!(
            stacked.dequantize(),
            [a.dequantize(), b.dequantize()].concat()
        );
        let q8 = matrix(&mut rng, 2, 64, true);
        assert!(
            QuantMatrix::stack(&[&a, &q8]).is_none(),
            "formats must match"
        );
        let narrow = matrix(&mut rng, 2, 32, false);
        assert!(
            QuantMatrix::stack(&[&a, &narrow]).is_none(),
            "widths must match"
        );
    }
}
