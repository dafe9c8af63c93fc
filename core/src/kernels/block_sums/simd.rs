//! SIMD intrinsics. Entry points run only after [`super::available`] (the `*_tiles` ones after
//! [`crate::kernels::amx::available`] too); every load reads a fixed-size array through a pointer to it.

use std::arch::x86_64::*;

use super::{Emit, PASS_ROWS, Q4_1x16, Q8_0x16, ROWS, TILE_PASS_ROWS, TileBlock};
use crate::kernels::amx::{self, Configured, Sums, Weights};
use crate::kernels::blocks::ActivationBlock;

/// 1.5 · 2²³: integer sums added onto its bits give floats from which subtracting it leaves exactly that
/// integer (|sum| < 2²²), a conversion on the adder pipes (see `paired`).
const MAGIC: f32 = 12_582_912.0;

pub fn q4_1(tile: &[Q4_1x16], rows: &[&[ActivationBlock]], out: &mut [[f32; ROWS]; PASS_ROWS]) {
    // SAFETY: the caller checked the instruction sets at run time.
    unsafe {
        match rows.len() {
            0 => {}
            1 => q4_1_pass::<1>(tile, rows, out),
            2 => q4_1_pass::<2>(tile, rows, out),
            3 => q4_1_pass::<3>(tile, rows, out),
            4 => q4_1_pass::<4>(tile, rows, out),
            5 => q4_1_pass::<5>(tile, rows, out),
            6 => q4_1_pass::<6>(tile, rows, out),
            7 => q4_1_pass::<7>(tile, rows, out),
            _ => q4_1_pass::<PASS_ROWS>(tile, rows, out),
        }
    }
}

pub fn q8_0(
    tile: &[Q8_0x16],
    rows: &[&[ActivationBlock]],
    shifts: &[&[i32]],
    out: &mut [[f32; ROWS]; PASS_ROWS],
) {
    // SAFETY: the caller checked the instruction sets at run time.
    unsafe {
        match rows.len() {
            0 => {}
            1 => q8_0_pass::<1>(tile, rows, shifts, out),
            2 => q8_0_pass::<2>(tile, rows, shifts, out),
            3 => q8_0_pass::<3>(tile, rows, shifts, out),
            4 => q8_0_pass::<4>(tile, rows, shifts, out),
            5 => q8_0_pass::<5>(tile, rows, shifts, out),
            6 => q8_0_pass::<6>(tile, rows, shifts, out),
            7 => q8_0_pass::<7>(tile, rows, shifts, out),
            _ => q8_0_pass::<PASS_ROWS>(tile, rows, shifts, out),
        }
    }
}

#[target_feature(enable = "avx512f")]
fn load_u8x64(bytes: &[u8; 64]) -> __m512i {
    // SAFETY: reads exactly the 64 bytes of the array (unaligned load).
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

#[target_feature(enable = "avx512f,f16c")]
fn load_f16x16(values: &[half::f16; ROWS]) -> __m512 {
    // SAFETY: reads exactly the 32 bytes of the array (unaligned load).
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(values.as_ptr().cast()) })
}

/// Blocks ahead to prefetch: about 2 KB, as the `vec_dot` kernels do (`dot::simd::PREFETCH_BLOCKS_Q4_1`).
const AHEAD_BYTES: usize = 2048;

/// Hints every cache line of `blocks[i]` (past the slice: whatever follows, usually the next tile).
#[inline]
#[target_feature(enable = "sse")]
fn prefetch<T>(blocks: &[T], i: usize) {
    let start: *const u8 = blocks.as_ptr().wrapping_add(i).cast();
    for line in (0..std::mem::size_of::<T>()).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line).cast());
    }
}

/// An activation block's 32 bytes as eight words, word `g` holding values `4g..4g+4`.
fn words(a: &ActivationBlock) -> [i32; 8] {
    bytemuck::cast(a.qs)
}

/// Activation rows cut to the tile's block count, as an array the loops index without checks.
fn rows_of<'a, T, const R: usize>(rows: &[&'a [T]], blocks: usize) -> Option<[&'a [T]; R]> {
    let mut cut = [&[][..]; R];
    for (dst, row) in cut.iter_mut().zip(rows) {
        *dst = row.get(..blocks)?;
    }
    Some(cut)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q4_1_pass<const R: usize>(
    tile: &[Q4_1x16],
    rows: &[&[ActivationBlock]],
    out: &mut [[f32; ROWS]; PASS_ROWS],
) {
    let Some(acts) = rows_of::<ActivationBlock, R>(rows, tile.len()) else {
        return;
    };
    let low_nibbles = _mm512_set1_epi8(0x0F);
    let magic_bits = _mm512_castps_si512(_mm512_set1_ps(MAGIC));
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, w) in tile.iter().enumerate() {
        prefetch(tile, b + AHEAD_BYTES / std::mem::size_of::<Q4_1x16>());
        let mut q = [_mm512_setzero_si512(); 8];
        for (c, chunk) in w.qs.iter().enumerate() {
            let packed = load_u8x64(chunk);
            q[c] = _mm512_and_si512(packed, low_nibbles);
            q[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low_nibbles);
        }
        let (d, m) = (load_f16x16(&w.d), load_f16x16(&w.m));
        for r in 0..R {
            let a = &acts[r][b];
            let mut sums = magic_bits;
            for (g, &word) in words(a).iter().enumerate() {
                sums = _mm512_dpbusd_epi32(sums, q[g], _mm512_set1_epi32(word));
            }
            let sums = _mm512_sub_ps(_mm512_castsi512_ps(sums), _mm512_set1_ps(MAGIC));
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d));
            acc[r] = _mm512_fmadd_ps(scale, sums, acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s), acc[r]);
        }
    }
    for r in 0..R {
        // SAFETY: writes exactly the 16 floats of the array.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q8_0_pass<const R: usize>(
    tile: &[Q8_0x16],
    rows: &[&[ActivationBlock]],
    shifts: &[&[i32]],
    out: &mut [[f32; ROWS]; PASS_ROWS],
) {
    let (Some(acts), Some(shifts)) = (
        rows_of::<ActivationBlock, R>(rows, tile.len()),
        rows_of::<i32, R>(shifts, tile.len()),
    ) else {
        return;
    };
    let magic_bits = _mm512_castps_si512(_mm512_set1_ps(MAGIC));
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, w) in tile.iter().enumerate() {
        prefetch(tile, b + AHEAD_BYTES / std::mem::size_of::<Q8_0x16>());
        let q: [__m512i; 8] = std::array::from_fn(|g| load_u8x64(&w.qs[g]));
        let d = load_f16x16(&w.d);
        for r in 0..R {
            let a = &acts[r][b];
            // Σ (q_w + 128)·q_a counts 128 · Σ q_a too much: start that much below the magic bits.
            let mut sums = _mm512_sub_epi32(magic_bits, _mm512_set1_epi32(shifts[r][b]));
            for (g, &word) in words(a).iter().enumerate() {
                sums = _mm512_dpbusd_epi32(sums, q[g], _mm512_set1_epi32(word));
            }
            let sums = _mm512_sub_ps(_mm512_castsi512_ps(sums), _mm512_set1_ps(MAGIC));
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d));
            acc[r] = _mm512_fmadd_ps(scale, sums, acc[r]);
        }
    }
    for r in 0..R {
        // SAFETY: writes exactly the 16 floats of the array.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
}

pub fn q4_1_tiles(
    configured: Configured<'_>,
    tile: &[Q4_1x16],
    passes: &[TileBlock],
    rows: usize,
    emit: &mut Emit<'_>,
) {
    UNPACKED.with_borrow_mut(|unpacked| {
        // SAFETY: tiles are only prepared where `available()` found the AVX-512 and `amx::available()` the
        // AMX.
        unsafe { unpack_q4_1(tile, unpacked) };
        for_each_pass(tile.len(), passes, rows, emit, |acts, pass_rows, out| {
            // SAFETY: as above.
            unsafe {
                match pass_rows {
                    0..=4 => q4_1_tiles_pass::<4>(configured, tile, unpacked, acts, out),
                    5..=8 => q4_1_tiles_pass::<8>(configured, tile, unpacked, acts, out),
                    9..=12 => q4_1_tiles_pass::<12>(configured, tile, unpacked, acts, out),
                    _ => q4_1_tiles_pass::<TILE_PASS_ROWS>(configured, tile, unpacked, acts, out),
                }
            }
        });
    });
}

pub fn q8_0_tiles(
    configured: Configured<'_>,
    tile: &[Q8_0x16],
    passes: &[TileBlock],
    rows: usize,
    emit: &mut Emit<'_>,
) {
    for_each_pass(tile.len(), passes, rows, emit, |acts, pass_rows, out| {
        // SAFETY: as in `q4_1_tiles`.
        unsafe {
            match pass_rows {
                0..=4 => q8_0_tiles_pass::<4>(configured, tile, acts, out),
                5..=8 => q8_0_tiles_pass::<8>(configured, tile, acts, out),
                9..=12 => q8_0_tiles_pass::<12>(configured, tile, acts, out),
                _ => q8_0_tiles_pass::<TILE_PASS_ROWS>(configured, tile, acts, out),
            }
        }
    });
}

/// Runs `pass(activation blocks, real rows, sums)` on each 16-row pass of `passes` (`per_row` blocks each) and
/// emits its sums.
fn for_each_pass(
    per_row: usize,
    passes: &[TileBlock],
    rows: usize,
    emit: &mut Emit<'_>,
    mut pass: impl FnMut(&[TileBlock], usize, &mut [[f32; ROWS]; TILE_PASS_ROWS]),
) {
    for (index, acts) in passes.chunks_exact(per_row.max(1)).enumerate() {
        let first = index * TILE_PASS_ROWS;
        let pass_rows = TILE_PASS_ROWS.min(rows.saturating_sub(first));
        let mut sums = [[0f32; ROWS]; TILE_PASS_ROWS];
        pass(acts, pass_rows, &mut sums);
        emit(first, pass_rows, &sums);
    }
}

/// A tile's blocks unpacked to bytes in the tiles' layout, once for every pass of activation rows. All of them
/// first: a tile load right after the stores that wrote its bytes would wait for them to reach the cache.
#[target_feature(enable = "avx512f,avx512bw")]
fn unpack_q4_1(tile: &[Q4_1x16], unpacked: &mut Vec<Weights>) {
    unpacked.resize_with(tile.len(), || Weights([[0; 64]; 8]));
    let low_nibbles = _mm512_set1_epi8(0x0F);
    for (b, (w, dst)) in tile.iter().zip(unpacked.iter_mut()).enumerate() {
        prefetch(tile, b + AHEAD_BYTES / std::mem::size_of::<Q4_1x16>());
        for (c, chunk) in w.qs.iter().enumerate() {
            let packed = load_u8x64(chunk);
            let high = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low_nibbles);
            // SAFETY: each store writes exactly one 64-byte row of the buffer.
            unsafe {
                _mm512_store_si512(
                    dst.0[c].as_mut_ptr().cast(),
                    _mm512_and_si512(packed, low_nibbles),
                );
                _mm512_store_si512(dst.0[c + 4].as_mut_ptr().cast(), high);
            }
        }
    }
}

thread_local! {
    /// A tile's blocks unpacked, reused from call to call.
    static UNPACKED: std::cell::RefCell<Vec<Weights>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `R` accumulators of 16 weight rows each: rows past the real ones hold zero activations.
#[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
fn q4_1_tiles_pass<const R: usize>(
    configured: Configured<'_>,
    tile: &[Q4_1x16],
    unpacked: &[Weights],
    acts: &[TileBlock],
    out: &mut [[f32; ROWS]; TILE_PASS_ROWS],
) {
    let mut sums = Sums([[0; ROWS]; TILE_PASS_ROWS]);
    let mut acc = [_mm512_setzero_ps(); R];
    for ((w, a), weights) in tile.iter().zip(acts).zip(unpacked) {
        amx::multiply(configured, &a.qs, &weights.0, &mut sums);
        let (d, m) = (load_f16x16(&w.d), load_f16x16(&w.m));
        for (r, acc) in acc.iter_mut().enumerate() {
            let ints = load_i32x16(&sums.0[r]);
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d[r]));
            *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(ints), *acc);
            *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s[r]), *acc);
        }
    }
    for r in 0..R {
        // SAFETY: writes exactly the 16 floats of the array.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
}

#[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
fn q8_0_tiles_pass<const R: usize>(
    configured: Configured<'_>,
    tile: &[Q8_0x16],
    acts: &[TileBlock],
    out: &mut [[f32; ROWS]; TILE_PASS_ROWS],
) {
    let mut sums = Sums([[0; ROWS]; TILE_PASS_ROWS]);
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, (w, a)) in tile.iter().zip(acts).enumerate() {
        prefetch(tile, b + AHEAD_BYTES / std::mem::size_of::<Q8_0x16>());
        amx::multiply(configured, &a.qs, &w.qs, &mut sums);
        let d = load_f16x16(&w.d);
        for (r, acc) in acc.iter_mut().enumerate() {
            // Σ a·(q_w + 128) counts 128 · Σ a too much.
            let ints = _mm512_sub_epi32(load_i32x16(&sums.0[r]), _mm512_set1_epi32(a.shift[r]));
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d[r]));
            *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(ints), *acc);
        }
    }
    for r in 0..R {
        // SAFETY: writes exactly the 16 floats of the array.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
}

#[target_feature(enable = "avx512f")]
fn load_i32x16(values: &[i32; ROWS]) -> __m512i {
    // SAFETY: reads exactly the 16 integers of the array (unaligned load).
    unsafe { _mm512_loadu_si512(values.as_ptr().cast()) }
}
