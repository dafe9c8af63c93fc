//! Many activation rows against one weight row at a time, with AVX-512: the kernels behind multi-token forwards
//! (draft verification, prompt chunks).
//!
//! The 256-bit kernels in [`super::dot`] spend about seven instructions per weight block and activation row, so a
//! forward of k tokens costs nearly k single steps once the weights are in cache. Here two activation rows share
//! one 512-bit register: a single `vpdpbusd` multiplies the weight block (unpacked once, copied into both halves)
//! by both rows' blocks, and one conversion, one multiply and one fused multiply-add finish both. The rows are
//! repacked once per matmul ([`PairedActivations`]) so the inner loop only streams contiguous memory: the two
//! rows' quantized values side by side, their scales already spread over the lanes they multiply, and every
//! row's `s` (Q4_1's `m` term) in one vector, which a single multiply-add per block updates for all rows.
//!
//! Each half of a register holds exactly the eight lanes the 256-bit kernel and ggml keep for that row, updated
//! by the same operations in the same block order, so the results are the reference's bits (a property test
//! checks every row count).

use super::blocks::{ActivationBlock, BLOCK, BlockQ4_1, BlockQ8_0};
use super::dot;

/// 1.5 · 2²³: a float whose last mantissa bit is worth 1, with 2²² of room either side. Integers added onto its
/// bits give floats from which subtracting it leaves exactly that integer (the kernels' int-to-float conversion).
const MAGIC: f32 = 12_582_912.0;

/// Row pairs per pass over a weight row: 16 rows keep 8 accumulators and the operands in the 32 registers.
pub const MAX_PAIRS: usize = 8;
const GROUP_ROWS: usize = 2 * MAX_PAIRS;

/// Activation rows repacked for the paired kernels, in groups of up to 16 rows (one pass over a weight row each).
#[derive(Clone, Debug)]
pub struct PairedActivations {
    rows: usize,
    groups: Vec<Group>,
}

#[derive(Clone, Debug)]
struct Group {
    pairs: usize,
    /// `[block * pairs + pair]`: the pair's two 32-value blocks side by side (an odd last row pairs with zeros).
    qs: Vec<[i8; 64]>,
    /// `[block]`: every row's `d`, row `r` of the group in lane `r`.
    scales: Vec<[f32; GROUP_ROWS]>,
    /// `[block]`: every row's `s`, row `r` of the group in lane `r`.
    sums: Vec<[f32; GROUP_ROWS]>,
    /// Same as `qs`, shifted to unsigned bytes (a + 128) for Q8_0 weights: `vpdpbusd` multiplies unsigned by
    /// signed bytes, and shifting the activations makes the weights' correction (−128 · their sum) a cost per
    /// weight block instead of per row.
    shifted: Vec<[u8; 64]>,
}

impl PairedActivations {
    /// Whether this CPU has the instructions (checked once; callers fall back to [`dot`] otherwise).
    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512vnni")
                    && has!("avx2")
                    && has!("fma")
                    && has!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        })
    }

    /// Repacks `rows` rows of `blocks_per_row` blocks each (row-major, as [`super::blocks::quantize_activations`]
    /// writes them).
    pub fn new(activations: &[ActivationBlock], blocks_per_row: usize) -> Self {
        let rows: Vec<&[ActivationBlock]> =
            activations.chunks_exact(blocks_per_row.max(1)).collect();
        let groups = rows
            .chunks(GROUP_ROWS)
            .map(|group| {
                let pairs = group.len().div_ceil(2);
                let mut qs = Vec::with_capacity(blocks_per_row * pairs);
                let mut scales = Vec::with_capacity(blocks_per_row);
                let mut sums = Vec::with_capacity(blocks_per_row);
                let mut shifted = Vec::with_capacity(blocks_per_row * pairs);
                for b in 0..blocks_per_row {
                    let block = |r: usize| group.get(r).and_then(|row| row.get(b));
                    for p in 0..pairs {
                        let mut q = [0i8; 64];
                        for (half, r) in [2 * p, 2 * p + 1].into_iter().enumerate() {
                            if let Some(a) = block(r) {
                                q[half * BLOCK..(half + 1) * BLOCK].copy_from_slice(&a.qs);
                            }
                        }
                        shifted.push(q.map(|v| v.wrapping_sub(i8::MIN) as u8));
                        qs.push(q);
                    }
                    scales.push(std::array::from_fn(|r| block(r).map_or(0.0, |a| a.d)));
                    sums.push(std::array::from_fn(|r| block(r).map_or(0.0, |a| a.s)));
                }
                Group {
                    pairs,
                    shifted,
                    qs,
                    scales,
                    sums,
                }
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

    /// For the `n` weight rows in `weights` (`per_row` blocks each): `out[r * n + i]` = weight row `i` · activation
    /// row `r`, bit for bit [`dot::q4_1_reference`].
    pub fn q4_1(&self, weights: &[BlockQ4_1], per_row: usize, out: &mut [f32]) {
        let n = weights.len() / per_row.max(1);
        for (group, out) in self.groups.iter().zip(out.chunks_mut(GROUP_ROWS * n)) {
            #[cfg(target_arch = "x86_64")]
            if Self::available() {
                simd::q4_1(group, weights, per_row, out);
                continue;
            }
            group.fallback(weights, per_row, out, dot::q4_1_reference);
        }
    }

    /// [`Self::q4_1`] for Q8_0 weights, bit for bit [`dot::q8_0_reference`].
    pub fn q8_0(&self, weights: &[BlockQ8_0], per_row: usize, out: &mut [f32]) {
        let n = weights.len() / per_row.max(1);
        for (group, out) in self.groups.iter().zip(out.chunks_mut(GROUP_ROWS * n)) {
            #[cfg(target_arch = "x86_64")]
            if Self::available() {
                simd::q8_0(group, weights, per_row, out);
                continue;
            }
            group.fallback(weights, per_row, out, dot::q8_0_reference);
        }
    }
}

impl Group {
    /// The reference kernel on the rows unpacked again (CPUs without AVX-512; tests).
    fn fallback<W>(
        &self,
        weights: &[W],
        per_row: usize,
        out: &mut [f32],
        reference: fn(&[W], &[ActivationBlock]) -> f32,
    ) {
        let n = weights.len() / per_row.max(1);
        for (r, out) in out.chunks_mut(n.max(1)).enumerate() {
            let (p, half) = (r / 2, r % 2);
            let row: Vec<ActivationBlock> = (0..per_row)
                .filter_map(|b| {
                    let q = self.qs.get(b * self.pairs + p)?;
                    let mut qs = [0i8; 32];
                    qs.copy_from_slice(q.get(half * BLOCK..(half + 1) * BLOCK)?);
                    Some(ActivationBlock {
                        d: *self.scales.get(b)?.get(r)?,
                        s: *self.sums.get(b)?.get(r)?,
                        qs,
                    })
                })
                .collect();
            for (o, weights) in out.iter_mut().zip(weights.chunks_exact(per_row.max(1))) {
                *o = reference(weights, &row);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    //! SIMD intrinsics. Entry points run only after `PairedActivations::available()`; every load reads a
    //! fixed-size array through a pointer to it.
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_0, Group, MAGIC, MAX_PAIRS};
    use crate::kernels::dot::simd::{PREFETCH_BLOCKS_Q4_1, PREFETCH_BLOCKS_Q8_0, prefetch, widen};

    pub fn q4_1(group: &Group, weights: &[BlockQ4_1], per_row: usize, out: &mut [f32]) {
        // SAFETY: the caller checked the instruction sets at run time.
        unsafe {
            match group.pairs {
                1 => q4_1_matrix::<1>(group, weights, per_row, out),
                2 => q4_1_matrix::<2>(group, weights, per_row, out),
                3 => q4_1_matrix::<3>(group, weights, per_row, out),
                4 => q4_1_matrix::<4>(group, weights, per_row, out),
                5 => q4_1_matrix::<5>(group, weights, per_row, out),
                6 => q4_1_matrix::<6>(group, weights, per_row, out),
                7 => q4_1_matrix::<7>(group, weights, per_row, out),
                _ => q4_1_matrix::<MAX_PAIRS>(group, weights, per_row, out),
            }
        }
    }

    /// Every weight row against the group's rows, scattered to activation-row-major `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn q4_1_matrix<const P: usize>(
        group: &Group,
        weights: &[BlockQ4_1],
        per_row: usize,
        out: &mut [f32],
    ) {
        let n = weights.len() / per_row.max(1);
        let mut sums = [0f32; 2 * MAX_PAIRS];
        for (i, row) in weights.chunks_exact(per_row.max(1)).enumerate() {
            // SAFETY: writes exactly the 16 floats of the array.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), q4_1_pairs::<P>(group, row)) };
            // The padding row of an odd group falls outside `out`.
            for (r, &v) in sums.iter().enumerate().take(2 * P) {
                if let Some(o) = out.get_mut(r * n + i) {
                    *o = v;
                }
            }
        }
    }

    pub fn q8_0(group: &Group, weights: &[BlockQ8_0], per_row: usize, out: &mut [f32]) {
        // SAFETY: the caller checked the instruction sets at run time.
        unsafe {
            match group.pairs {
                1 => q8_0_matrix::<1>(group, weights, per_row, out),
                2 => q8_0_matrix::<2>(group, weights, per_row, out),
                3 => q8_0_matrix::<3>(group, weights, per_row, out),
                4 => q8_0_matrix::<4>(group, weights, per_row, out),
                5 => q8_0_matrix::<5>(group, weights, per_row, out),
                6 => q8_0_matrix::<6>(group, weights, per_row, out),
                7 => q8_0_matrix::<7>(group, weights, per_row, out),
                _ => q8_0_matrix::<MAX_PAIRS>(group, weights, per_row, out),
            }
        }
    }

    /// Every weight row against the group's rows, scattered to activation-row-major `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn q8_0_matrix<const P: usize>(
        group: &Group,
        weights: &[BlockQ8_0],
        per_row: usize,
        out: &mut [f32],
    ) {
        let n = weights.len() / per_row.max(1);
        let mut sums = [0f32; 2 * MAX_PAIRS];
        for (i, row) in weights.chunks_exact(per_row.max(1)).enumerate() {
            // SAFETY: writes exactly the 16 floats of the array.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), q8_0_pairs::<P>(group, row)) };
            // The padding row of an odd group falls outside `out`.
            for (r, &v) in sums.iter().enumerate().take(2 * P) {
                if let Some(o) = out.get_mut(r * n + i) {
                    *o = v;
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    fn load_i8x64(bytes: &[i8; 64]) -> __m512i {
        // SAFETY: reads exactly the 64 bytes of the array (unaligned load).
        unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn load_f32x16(values: &[f32; 16]) -> __m512 {
        // SAFETY: reads exactly the 16 floats of the array (unaligned load).
        unsafe { _mm512_loadu_ps(values.as_ptr()) }
    }

    #[target_feature(enable = "avx512f")]
    fn load_u8x64(bytes: &[u8; 64]) -> __m512i {
        // SAFETY: reads exactly the 64 bytes of the array (unaligned load).
        unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn load_f32x8(values: &[f32; 16]) -> __m256 {
        // SAFETY: reads the array's first 8 floats (unaligned load).
        unsafe { _mm256_loadu_ps(values.as_ptr()) }
    }

    // SAFETY: a plain bit pattern (every lane 0x4B40_0000, MAGIC's bits).
    const MAGIC_BITS: __m512i = unsafe { std::mem::transmute([0x4B40_0000i32; 16]) };

    /// The exact float value of integer sums that `vpdpbusd` added onto [`MAGIC_BITS`] (|sum| < 2²², which four
    /// products of a byte and a nibble or two bytes always are). Subtracting runs on the adder pipes, where
    /// `vcvtdq2ps` would compete with the multiply-adds.
    #[target_feature(enable = "avx512f")]
    fn to_float(sums_on_magic: __m512i) -> __m512 {
        _mm512_sub_ps(_mm512_castsi512_ps(sums_on_magic), _mm512_set1_ps(MAGIC))
    }

    /// For pair `p`, the permutation putting lane `2p` in the low eight lanes and lane `2p + 1` in the high ones.
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn spreads<const P: usize>() -> [__m512i; P] {
        std::array::from_fn(|p| {
            let (first, second) = (2 * p as i32, 2 * p as i32 + 1);
            _mm512_set_epi32(
                second, second, second, second, second, second, second, second, first, first,
                first, first, first, first, first, first,
            )
        })
    }

    /// `hsum_float_8` of every row's eight lanes (row `2p + h` in half `h` of `acc[p]`), all rows at once and in
    /// row order. The additions pair exactly the lanes ggml's reduction pairs: lane `i` with `i + 4`, then the
    /// first of those sums with the third and the second with the fourth, then the two results.
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn hsum_rows<const P: usize>(acc: [__m512; P]) -> __m512 {
        let pair = |p: usize| acc.get(p).copied().unwrap_or(_mm512_setzero_ps());
        // Quarters of `acc[p]`: row 2p lanes 0..4 and 4..8, row 2p + 1 lanes 0..4 and 4..8.
        // Level 1: quarter q of `first[k]` holds row 4k + q's four sums of lanes i and i + 4.
        let first: [__m512; 4] = std::array::from_fn(|k| {
            let (a, b) = (pair(2 * k), pair(2 * k + 1));
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        });
        // Level 2: quarter q of `second[j]` holds rows 8j + q and 8j + 4 + q, two sums each.
        let second: [__m512; 2] = std::array::from_fn(|j| {
            let (e, f) = (first[2 * j], first[2 * j + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(e, f),
                _mm512_shuffle_ps::<0b11_10_11_10>(e, f),
            )
        });
        // Level 3: lane 4q + c holds row 4c + q.
        let transposed = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(second[0], second[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(second[0], second[1]),
        );
        let row_order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
        _mm512_permutexvar_ps(row_order, transposed)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn q4_1_pairs<const P: usize>(group: &Group, weights: &[BlockQ4_1]) -> __m512 {
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); P];
        let mut min_terms = _mm512_setzero_ps();
        let spread = spreads::<P>();
        let blocks = group.qs.chunks_exact(P).zip(&group.scales).zip(&group.sums);
        for (b, (w, ((qs, scales), row_sums))) in weights.iter().zip(blocks).enumerate() {
            let Ok(qs) = <&[[i8; 64]; P]>::try_from(qs) else {
                break;
            };
            prefetch(weights, b + PREFETCH_BLOCKS_Q4_1);
            // SAFETY: reads exactly the 16 bytes of `qs`.
            let packed = unsafe { _mm_loadu_si128(w.qs.as_ptr().cast()) };
            // Low nibbles (elements 0..16) then high nibbles (16..32), unpacked in 256 bits (half the work of
            // 512), then copied into both halves.
            let weight = _mm512_broadcast_i64x4(_mm256_and_si256(
                low_nibbles,
                _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed),
            ));
            let dm = widen(w.d, w.m);
            // Every row's d_w * d_a in one multiply, then spread to the pairs' lanes (a shuffle, which runs
            // beside the multiplies instead of competing with them); every row's m_w * s_a in one multiply-add.
            let scales = if P <= 4 {
                // Eight rows or fewer: 256-bit registers do it at half the cost.
                let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
                let low = _mm512_castps512_ps256(min_terms);
                min_terms = _mm512_castps256_ps512(_mm256_fmadd_ps(m, load_f32x8(row_sums), low));
                _mm512_castps256_ps512(_mm256_mul_ps(_mm256_broadcastss_ps(dm), load_f32x8(scales)))
            } else {
                let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
                min_terms = _mm512_fmadd_ps(m, load_f32x16(row_sums), min_terms);
                _mm512_mul_ps(_mm512_broadcastss_ps(dm), load_f32x16(scales))
            };
            for p in 0..P {
                let sums = to_float(_mm512_dpbusd_epi32(MAGIC_BITS, weight, load_i8x64(&qs[p])));
                let scale = _mm512_permutexvar_ps(spread[p], scales);
                acc[p] = _mm512_fmadd_ps(scale, sums, acc[p]);
            }
        }
        _mm512_add_ps(hsum_rows(acc), min_terms)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn q8_0_pairs<const P: usize>(group: &Group, weights: &[BlockQ8_0]) -> __m512 {
        let mut acc = [_mm512_setzero_ps(); P];
        let spread = spreads::<P>();
        let blocks = group.shifted.chunks_exact(P).zip(&group.scales);
        for (b, (w, (shifted, scales))) in weights.iter().zip(blocks).enumerate() {
            let Ok(shifted) = <&[[u8; 64]; P]>::try_from(shifted) else {
                break;
            };
            prefetch(weights, b + PREFETCH_BLOCKS_Q8_0);
            // SAFETY: reads exactly the 32 bytes of `qs`.
            let block = unsafe { _mm256_loadu_si256(w.qs.as_ptr().cast()) };
            let weight = _mm512_broadcast_i64x4(block);
            // Σ (a + 128)·w counts 128 · Σ w too much: start every lane that much below the magic bits.
            let start = _mm512_sub_epi32(
                MAGIC_BITS,
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), weight),
            );
            let d = widen(w.d, half::f16::ZERO);
            let scales = if P <= 4 {
                _mm512_castps256_ps512(_mm256_mul_ps(_mm256_broadcastss_ps(d), load_f32x8(scales)))
            } else {
                _mm512_mul_ps(_mm512_broadcastss_ps(d), load_f32x16(scales))
            };
            for p in 0..P {
                let sums = _mm512_sub_ps(
                    _mm512_castsi512_ps(_mm512_dpbusd_epi32(
                        start,
                        load_u8x64(&shifted[p]),
                        weight,
                    )),
                    _mm512_set1_ps(MAGIC),
                );
                let scale = _mm512_permutexvar_ps(spread[p], scales);
                acc[p] = _mm512_fmadd_ps(scale, sums, acc[p]);
            }
        }
        hsum_rows(acc)
    }
}

#[cfg(test)]
mod tests {
    use half::f16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::kernels::blocks::quantize_activations;

    #[test]
    fn paired_kernels_return_the_references_bits_for_every_row_count() {
        eprintln!(
            "AVX-512 paired kernels here: {}",
            PairedActivations::available()
        );
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for case in 0..60 {
            let blocks = 1 + case % 48;
            let weight_rows = 1 + case % 3;
            let q4: Vec<BlockQ4_1> = (0..blocks * weight_rows)
                .map(|_| BlockQ4_1 {
                    d: f16::from_f32(rng.random_range(0.0..0.05)),
                    m: f16::from_f32(rng.random_range(-0.4..0.0)),
                    qs: std::array::from_fn(|_| rng.random()),
                })
                .collect();
            let q8: Vec<BlockQ8_0> = (0..blocks * weight_rows)
                .map(|_| BlockQ8_0 {
                    d: f16::from_f32(rng.random_range(0.0..0.01)),
                    qs: std::array::from_fn(|_| rng.random_range(-127..=127)),
                })
                .collect();
            for rows in [1, 2, 3, 7, 8, 15, 16, 17, 33] {
                let mut acts = Vec::new();
                for _ in 0..rows {
                    let row: Vec<f32> = (0..blocks * BLOCK)
                        .map(|_| {
                            let v: f32 = rng.random_range(-1.0..1.0);
                            if rng.random_bool(0.02) { v * 40.0 } else { v }
                        })
                        .collect();
                    quantize_activations(&row, &mut acts);
                }
                let paired = PairedActivations::new(&acts, blocks);
                assert_eq!(paired.rows(), rows);
                let act = |r: usize| &acts[r * blocks..(r + 1) * blocks];
                let w4 = |i: usize| &q4[i * blocks..(i + 1) * blocks];
                let w8 = |i: usize| &q8[i * blocks..(i + 1) * blocks];
                let check = |got: &[f32], what: &str, want: &dyn Fn(usize, usize) -> f32| {
                    for r in 0..rows {
                        for i in 0..weight_rows {
                            assert_eq!(
                                got[r * weight_rows + i].to_bits(),
                                want(r, i).to_bits(),
                                "{what}: {blocks} blocks, weight row {i}, activation row {r} of {rows}"
                            );
                        }
                    }
                };
                let mut got = vec![f32::NAN; rows * weight_rows];
                paired.q4_1(&q4, blocks, &mut got);
                check(&got, "Q4_1", &|r, i| dot::q4_1_reference(w4(i), act(r)));
                paired.q8_0(&q8, blocks, &mut got);
                check(&got, "Q8_0", &|r, i| dot::q8_0_reference(w8(i), act(r)));
                // The fallback is what CPUs without AVX-512 run: it must agree too.
                got.fill(f32::NAN);
                for (group, out) in paired
                    .groups
                    .iter()
                    .zip(got.chunks_mut(GROUP_ROWS * weight_rows))
                {
                    group.fallback(&q4, blocks, out, dot::q4_1_reference);
                }
                check(&got, "fallback", &|r, i| dot::q4_1_reference(w4(i), act(r)));
            }
        }
    }
}
