//! Intel AMX tiles for prompt processing: an opt-in Q4_1 matmul with its own order of operations.
//!
//! The kernels in [`super::dot`] and [`super::paired`] reproduce ggml's `vec_dot` bit for bit, which keeps eight
//! float lanes of four-product sums per block; at about one cycle per weight block and activation row that
//! arithmetic is what bounds a long prompt. llama.cpp itself does not use it on CPUs with AMX: its CPU backend
//! repacks Q4_1 weights for AMX tiles and sums each block's 32 products as one integer. This module does the same
//! kind of thing: a tile multiply (`tdpbusd`) gives the exact integer dot product of 16 weight rows' block with 16
//! activation rows' block, and each block then adds into an f32 accumulator per (weight row, activation row):
//!
//! `main = fma(d_w · d_a, Σ q_w q_a, main)` block after block, the `m` terms summed apart as `vec_dot` sums them
//! (`min = fma(m_w, s_a, min)`), and `main + min` at the end ([`q4_1_reference`]). Keeping the two apart
//! matters: Q4_1's `m` term nearly cancels the main one, so adding both into one sum block by block would round
//! at the scale of the two large terms; `vec_dot` and this module round the same cancellation only once.
//!
//! Integer sums are exact either way, so this is as precise as `vec_dot` (a matmul's outputs differ from it by
//! about 1e-6 of their size); only the main sum's order differs (one sum of whole blocks instead of eight lanes
//! of four products each). The model amplifies such rounding (f16 keys and values, activations in the
//! hundreds): a prompt's last logits move by up to about one, the first token is llama.cpp's but for near-ties,
//! and 32-token greedy continuations match llama.cpp's on 18 of 40 prompts instead of 40 (the reference test
//! `prompt_tiles_change_prompts_only`). It is therefore never a default: the binary asks for it
//! (`--prompt-tiles`), the trace's model info records it, and only prompt chunks of 16 tokens or more use it. A
//! verification forward still takes the `vec_dot` kernels, so verifying drafts gives exactly the logits decoding
//! them one by one gives.
//!
//! Linux hands out the tile registers only to a process that asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which
//! [`available`] does once.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::blocks::{ActivationBlock, BLOCK, BlockQ4_1};

/// Rows of a tile: weight rows per pass, and activation rows per group.
pub const TILE_ROWS: usize = 16;

/// Whether this CPU and kernel give us AMX-INT8 tiles (asked once; the permission is per process).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            simd::request_tiles()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// [`available`], or the error that says why the tiles cannot be used here.
pub fn require() -> crate::error::Result<()> {
    if available() {
        Ok(())
    } else {
        Err(crate::error::Error::InvalidInput(
            "prompt tiles need a CPU with AMX-INT8 (and Linux 5.16 or later); this one has none"
                .into(),
        ))
    }
}

/// The arithmetic of the tile kernel for one weight row and one activation row: block sums' (the tiles compute
/// the same per-block integer sums as [`super::block_sums`]).
pub use super::block_sums::q4_1_reference;

/// Activation rows repacked for the tiles, 16 rows per group.
#[derive(Clone, Debug)]
pub struct TileActivations {
    rows: usize,
    groups: Vec<ActivationGroup>,
}

#[derive(Clone, Debug)]
struct ActivationGroup {
    /// `[block]`: the tile multiply's right operand, four bytes of each row side by side: byte `4k + i` of row
    /// `r` at `[k][4r + i]`, 8 × 64 bytes (rows past the last are zero).
    qs: Vec<[[i8; 64]; 8]>,
    /// `[block]`: every row's `d`, row `r` in lane `r`.
    scales: Vec<[f32; TILE_ROWS]>,
    /// `[block]`: every row's `s`.
    sums: Vec<[f32; TILE_ROWS]>,
}

impl TileActivations {
    /// Repacks `rows` rows of `blocks_per_row` blocks (row-major, as [`super::blocks::quantize_activations`] writes).
    pub fn new(activations: &[ActivationBlock], blocks_per_row: usize) -> Self {
        let rows: Vec<&[ActivationBlock]> =
            activations.chunks_exact(blocks_per_row.max(1)).collect();
        let groups = rows
            .chunks(TILE_ROWS)
            .map(|group| {
                let block = |r: usize, b: usize| group.get(r).and_then(|row| row.get(b));
                let mut qs = Vec::with_capacity(blocks_per_row);
                let mut scales = Vec::with_capacity(blocks_per_row);
                let mut sums = Vec::with_capacity(blocks_per_row);
                for b in 0..blocks_per_row {
                    let mut tile = [[0i8; 64]; 8];
                    for r in 0..group.len() {
                        if let Some(a) = block(r, b) {
                            for (k, quad) in a.qs.chunks_exact(4).enumerate() {
                                tile[k][4 * r..4 * r + 4].copy_from_slice(quad);
                            }
                        }
                    }
                    qs.push(tile);
                    scales.push(std::array::from_fn(|r| block(r, b).map_or(0.0, |a| a.d)));
                    sums.push(std::array::from_fn(|r| block(r, b).map_or(0.0, |a| a.s)));
                }
                ActivationGroup { qs, scales, sums }
            })
            .collect();
        Self {
            rows: rows.len(),
            groups,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// For the `n` weight rows in `weights` (`per_row` blocks each): `out[r * n + i]` = weight row `i` ·
    /// activation row `r`, bit for bit [`q4_1_reference`]. Runs the tiles when [`available`], the reference
    /// otherwise.
    pub fn q4_1(&self, weights: &[BlockQ4_1], per_row: usize, out: &mut [f32]) {
        let per_row = per_row.max(1);
        let n = weights.len() / per_row;
        let mut block = [[0f32; TILE_ROWS]; TILE_ROWS];
        let mut tile = WeightTile::with_blocks(per_row);
        let mut scratch = Scratch::default();
        with_tiles(|tiles| {
            for (w_tile, rows) in weights.chunks(TILE_ROWS * per_row).enumerate() {
                tile.fill(rows, per_row);
                let first = w_tile * TILE_ROWS;
                for (g, group) in self.groups.iter().enumerate() {
                    group.multiply(tiles, &tile, &mut scratch, &mut block);
                    // `block[i][r]`: weight row i of the tile, activation row r of the group.
                    for r in 0..TILE_ROWS.min(self.rows.saturating_sub(g * TILE_ROWS)) {
                        let at = (g * TILE_ROWS + r) * n + first;
                        if let Some(dst) = out.get_mut(at..at + tile.rows) {
                            for (d, column) in dst.iter_mut().zip(&block) {
                                *d = column[r];
                            }
                        }
                    }
                }
            }
        });
    }
}

/// Proof that this thread's tile registers are configured: only [`with_tiles`] makes one, and only while they are.
#[derive(Clone, Copy)]
pub(super) struct Configured(());

/// Releases the tiles when dropped, so a panic inside [`with_tiles`] does not leave them configured.
struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        simd::release();
    }
}

/// Runs `f` with the tile registers configured on this thread (`None` where AMX is not [`available`]).
pub(super) fn with_tiles<R>(f: impl FnOnce(Option<Configured>) -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if available() {
        simd::configure();
        let _release = Release;
        return f(Some(Configured(())));
    }
    f(None)
}

/// Integer tiles written by the tile multiply, kept between calls (zeroing them per call costs more than the
/// multiply).
#[derive(Default)]
struct Scratch {
    #[cfg(target_arch = "x86_64")]
    sums: simd::Sums,
}

/// Up to 16 weight rows unpacked for the tile multiply's left operand.
struct WeightTile {
    rows: usize,
    /// `[block]`: row `i`'s 32 weights as bytes 0..=15 at `[32 i..32 i + 32]` (missing rows zero).
    qs: Vec<[u8; TILE_ROWS * BLOCK]>,
    /// `[block]`: every row's `d` and `m`, widened.
    scales: Vec<[f32; TILE_ROWS]>,
    mins: Vec<[f32; TILE_ROWS]>,
}

impl WeightTile {
    fn with_blocks(per_row: usize) -> Self {
        Self {
            rows: 0,
            qs: vec![[0u8; TILE_ROWS * BLOCK]; per_row],
            scales: vec![[0f32; TILE_ROWS]; per_row],
            mins: vec![[0f32; TILE_ROWS]; per_row],
        }
    }

    /// Unpacks the rows of `weights` (at most 16, `per_row` blocks each), zeroing the rest.
    fn fill(&mut self, weights: &[BlockQ4_1], per_row: usize) {
        let rows: Vec<&[BlockQ4_1]> = weights.chunks_exact(per_row.max(1)).collect();
        if rows.len() < TILE_ROWS {
            self.qs.iter_mut().for_each(|t| t.fill(0));
        }
        self.rows = rows.len();
        for (i, row) in rows.iter().enumerate() {
            for (tile, w) in self.qs.iter_mut().zip(row.iter()) {
                // Element j < 16 is the low nibble of byte j, element j + 16 its high nibble: a block unpacks
                // as one 128-bit integer.
                const LOW: u128 = u128::from_le_bytes([0x0F; 16]);
                let packed = u128::from_le_bytes(w.qs);
                if let Some(dst) = tile.get_mut(i * BLOCK..(i + 1) * BLOCK) {
                    let (low, high) = dst.split_at_mut(BLOCK / 2);
                    low.copy_from_slice(&(packed & LOW).to_le_bytes());
                    high.copy_from_slice(&((packed >> 4) & LOW).to_le_bytes());
                }
            }
        }
        // Every row's `d` and `m` of a block, widened 16 at a time (one F16C instruction where there is one).
        let (mut d, mut m) = ([f16::ZERO; TILE_ROWS], [f16::ZERO; TILE_ROWS]);
        for (b, (scales, mins)) in self.scales.iter_mut().zip(&mut self.mins).enumerate() {
            for ((d, m), row) in d.iter_mut().zip(&mut m).zip(&rows) {
                if let Some(w) = row.get(b) {
                    (*d, *m) = (w.d, w.m);
                }
            }
            d.convert_to_f32_slice(scales);
            m.convert_to_f32_slice(mins);
        }
    }
}

impl ActivationGroup {
    /// `out[i][r]` = weight row `i` · activation row `r` over every block.
    fn multiply(
        &self,
        tiles: Option<Configured>,
        tile: &WeightTile,
        scratch: &mut Scratch,
        out: &mut [[f32; TILE_ROWS]; TILE_ROWS],
    ) {
        #[cfg(target_arch = "x86_64")]
        if let Some(configured) = tiles {
            simd::multiply(configured, self, tile, &mut scratch.sums, out);
            return;
        }
        let _ = (tiles, scratch);
        self.multiply_scalar(tile, out);
    }

    /// [`Self::multiply`] in the reference's scalar arithmetic (CPUs without AMX; tests).
    fn multiply_scalar(&self, tile: &WeightTile, out: &mut [[f32; TILE_ROWS]; TILE_ROWS]) {
        for (i, column) in out.iter_mut().enumerate() {
            for (r, o) in column.iter_mut().enumerate() {
                let (mut main, mut min) = (0f32, 0f32);
                let blocks = tile.qs.iter().zip(&tile.scales).zip(&tile.mins);
                let acts = self.qs.iter().zip(&self.scales).zip(&self.sums);
                for (((w, dw), mw), ((a, da), sa)) in blocks.zip(acts) {
                    let sum: i32 = (0..BLOCK)
                        .map(|k| i32::from(w[i * BLOCK + k]) * i32::from(a[k / 4][4 * r + k % 4]))
                        .sum();
                    main = (dw[i] * da[r]).mul_add(sum as f32, main);
                    min = mw[i].mul_add(sa[r], min);
                }
                *o = main + min;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    //! The tile instructions through inline assembly (Rust has no stable AMX intrinsics), and the AVX-512 code
    //! that scales each block's integer tile into the float accumulators. Entry points run only after
    //! [`super::available`].
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{ActivationGroup, Configured, TILE_ROWS, WeightTile};

    /// `arch_prctl` asks for the tile data state (`XFEATURE_XTILEDATA`).
    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;

    /// Checks CPUID for AMX-TILE and AMX-INT8 (and the AVX-512 the scaling needs), then asks Linux for the tiles.
    #[cfg(target_os = "linux")]
    pub fn request_tiles() -> bool {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx512f") && has!("avx512bw")) {
            return false;
        }
        let leaf7 = __cpuid_count(7, 0);
        let (tile, int8) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 25 & 1 == 1);
        if !(tile && int8) {
            return false;
        }
        // SAFETY: a plain system call with integer arguments; it fails cleanly where unsupported.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        granted == 0
    }

    /// The tile shapes: tmm0 16 × 16 integer sums (weight row × activation row), tmm1 16 weight rows × 32 bytes,
    /// tmm2 8 rows of 64 activation bytes (four of each of 16 rows).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 32, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    #[repr(C, align(64))]
    #[derive(Default)]
    pub struct Sums([[i32; TILE_ROWS]; TILE_ROWS]);

    /// One block's integer tile: 16 weight rows' 32 bytes against 16 activation rows' 32 bytes.
    #[inline]
    fn block_sums(weights: &[u8; 512], activations: &[[i8; 64]; 8], sums: &mut Sums) {
        // SAFETY: the configured shapes read exactly the 16 × 32 bytes of `weights` and the 8 × 64 bytes of
        // `activations`, and write exactly the 16 × 16 integers of `sums`; the caller configured the tiles on this
        // thread.
        unsafe {
            asm!(
                "tileloadd tmm1, [{w} + {s32}*1]",
                "tileloadd tmm2, [{a} + {s64}*1]",
                "tilezero tmm0",
                "tdpbusd tmm0, tmm1, tmm2",
                "tilestored [{c} + {s64}*1], tmm0",
                w = in(reg) weights.as_ptr(),
                a = in(reg) activations.as_ptr(),
                c = in(reg) sums.0.as_mut_ptr(),
                s32 = in(reg) 32usize,
                s64 = in(reg) 64usize,
                options(nostack),
            );
        }
    }

    /// Adds one block's integer tile into the main sums: `acc[i] = fma(d_w[i] · d_a, sums[i], acc[i])`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scale_into(
        acc: &mut [__m512; TILE_ROWS],
        sums: &Sums,
        weight_scales: &[f32; TILE_ROWS],
        scales: &[f32; TILE_ROWS],
    ) {
        // SAFETY: each load reads exactly one 16-float or 16-integer array.
        let da = unsafe { _mm512_loadu_ps(scales.as_ptr()) };
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let ints = unsafe { _mm512_load_si512(sums.0[i].as_ptr().cast()) };
            let scale = _mm512_mul_ps(_mm512_set1_ps(weight_scales[i]), da);
            *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(ints), *acc);
        }
    }

    /// Each weight row's `m` terms over every block, `min = fma(m_w, s_a, min)` in block order, added to its
    /// main sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn add_min_terms(acc: &mut [__m512; TILE_ROWS], tile: &WeightTile, group: &ActivationGroup) {
        for (i, acc) in acc.iter_mut().enumerate() {
            let mut min = _mm512_setzero_ps();
            for (mins, row_sums) in tile.mins.iter().zip(&group.sums) {
                // SAFETY: reads exactly one 16-float array.
                let sa = unsafe { _mm512_loadu_ps(row_sums.as_ptr()) };
                min = _mm512_fmadd_ps(_mm512_set1_ps(mins[i]), sa, min);
            }
            *acc = _mm512_add_ps(*acc, min);
        }
    }

    /// Loads the tile shapes on this thread.
    pub fn configure() {
        // SAFETY: loads the 64-byte configuration above; `available()` was granted the tiles.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    }

    /// Returns the tiles to their initial state (cheaper context switches).
    pub fn release() {
        // SAFETY: valid whether or not tiles are configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Runs only between [`configure`] and [`release`] on this thread.
    pub fn multiply(
        _configured: Configured,
        group: &ActivationGroup,
        tile: &WeightTile,
        sums: &mut Sums,
        out: &mut [[f32; TILE_ROWS]; TILE_ROWS],
    ) {
        // SAFETY: `available()` checked AVX-512 and was granted the tiles, which `Configured` proves are
        // configured on this thread.
        unsafe { multiply_tiles(group, tile, sums, out) }
    }

    #[target_feature(enable = "avx512f")]
    fn multiply_tiles(
        group: &ActivationGroup,
        tile: &WeightTile,
        sums: &mut Sums,
        out: &mut [[f32; TILE_ROWS]; TILE_ROWS],
    ) {
        let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
        let blocks = tile
            .qs
            .iter()
            .zip(&tile.scales)
            .zip(group.qs.iter().zip(&group.scales));
        for ((weights, dw), (activations, da)) in blocks {
            block_sums(weights, activations, sums);
            scale_into(&mut acc, sums, dw, da);
        }
        add_min_terms(&mut acc, tile, group);
        for (o, acc) in out.iter_mut().zip(acc) {
            // SAFETY: writes exactly the 16 floats of the array.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), acc) };
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::kernels::blocks::quantize_activations;

    #[test]
    fn tiles_return_the_references_bits_for_any_rows() {
        eprintln!("AMX tiles here: {}", available());
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for case in 0..24 {
            let blocks = 1 + case % 7 * 3;
            let weight_rows = [1, 5, 16, 17, 40][case % 5];
            let weights: Vec<BlockQ4_1> = (0..blocks * weight_rows)
                .map(|_| BlockQ4_1 {
                    d: f16::from_f32(rng.random_range(0.0..0.05)),
                    m: f16::from_f32(rng.random_range(-0.4..0.0)),
                    qs: std::array::from_fn(|_| rng.random()),
                })
                .collect();
            for rows in [1, 3, 16, 17, 40] {
                let mut acts = Vec::new();
                for _ in 0..rows {
                    let row: Vec<f32> = (0..blocks * BLOCK)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect();
                    quantize_activations(&row, &mut acts);
                }
                let tiles = TileActivations::new(&acts, blocks);
                assert_eq!(tiles.rows(), rows);
                let mut got = vec![f32::NAN; rows * weight_rows];
                tiles.q4_1(&weights, blocks, &mut got);
                for r in 0..rows {
                    for i in 0..weight_rows {
                        let want = q4_1_reference(
                            &weights[i * blocks..(i + 1) * blocks],
                            &acts[r * blocks..(r + 1) * blocks],
                        );
                        assert_eq!(
                            got[r * weight_rows + i].to_bits(),
                            want.to_bits(),
                            "{blocks} blocks, weight row {i} of {weight_rows}, activation row {r} of {rows}"
                        );
                    }
                }
                // The scalar path (CPUs without AMX) must agree too.
                let mut tile = WeightTile::with_blocks(blocks);
                tile.fill(&weights[..blocks * weight_rows.min(16)], blocks);
                let mut scratch = Scratch::default();
                for group in &tiles.groups {
                    let (mut simd, mut scalar) = ([[0f32; 16]; 16], [[0f32; 16]; 16]);
                    with_tiles(|t| group.multiply(t, &tile, &mut scratch, &mut simd));
                    group.multiply_scalar(&tile, &mut scalar);
                    assert_eq!(simd, scalar);
                }
            }
        }
    }
}
