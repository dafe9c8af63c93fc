//! Dot products of quantized weight rows with quantized activation rows, in ggml's exact order of operations.
//!
//! ggml's AVX2 kernels (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0`, and tinyBLAS for Q8_0) keep eight f32
//! lanes: lane `l` receives, for every block in turn, the exact integer sum of elements `4l..4l+4` times the block's
//! combined scale, through one fused multiply-add. The lanes are summed at the end in `hsum_float_8`'s tree order;
//! Q4_1 adds its separately accumulated `m * s` term last. Reproducing that order makes our matmuls return the same
//! floats as llama.cpp's, which is what lets greedy continuations agree token for token.
//!
//! Each kernel has a scalar reference (portable, readable, the definition) and an AVX2 version that computes
//! several activation rows per pass over a weight row, so k tokens cost one read of the weights. A property test
//! checks that both return identical bits.

use super::blocks::{ActivationBlock, BlockQ4_1, BlockQ8_0};

/// Sums eight lanes as `hsum_float_8` does: high half onto low half, then pairs, then the last two.
fn hsum8(a: [f32; 8]) -> f32 {
    let [a0, a1, a2, a3, a4, a5, a6, a7] = a;
    let (r0, r1, r2, r3) = (a4 + a0, a5 + a1, a6 + a2, a7 + a3);
    (r0 + r2) + (r1 + r3)
}

/// Scalar reference for one Q4_1 weight row against one Q8_1 activation row.
pub fn q4_1_reference(weights: &[BlockQ4_1], activations: &[ActivationBlock]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut min_term = 0f32;
    for (w, a) in weights.iter().zip(activations) {
        let scale = w.d.to_f32() * a.d;
        min_term = w.m.to_f32().mul_add(a.s, min_term);
        let q = w.nibbles();
        for (l, lane) in lanes.iter_mut().enumerate() {
            let sum: i32 = (4 * l..4 * l + 4)
                .map(|e| i32::from(q[e]) * i32::from(a.qs[e]))
                .sum();
            *lane = scale.mul_add(sum as f32, *lane);
        }
    }
    hsum8(lanes) + min_term
}

/// Scalar reference for one Q8_0 weight row against one Q8_0 activation row.
pub fn q8_0_reference(weights: &[BlockQ8_0], activations: &[ActivationBlock]) -> f32 {
    let mut lanes = [0f32; 8];
    for (w, a) in weights.iter().zip(activations) {
        let scale = w.d.to_f32() * a.d;
        for (l, lane) in lanes.iter_mut().enumerate() {
            let sum: i32 = (4 * l..4 * l + 4)
                .map(|e| i32::from(w.qs[e]) * i32::from(a.qs[e]))
                .sum();
            *lane = scale.mul_add(sum as f32, *lane);
        }
    }
    hsum8(lanes)
}

/// The instruction sets the kernels have versions for. All return the reference's bits: VNNI's `vpdpbusd` sums
/// four byte products in one instruction where AVX2 takes two (`vpmaddubsw` then `vpmaddwd`), with the same
/// integer result, so the float order is untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    /// AVX-512 VNNI on 256-bit registers (with AVX-512 VL).
    Avx512Vnni,
}

impl Isa {
    /// The fastest one this CPU has, detected once at run time (a build without AVX flags still uses them where
    /// present; a CPU without them falls back to the references).
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512Vnni, Isa::Avx2]
                .into_iter()
                .find(|isa| isa.available())
                .unwrap_or(Isa::Scalar)
        })
    }

    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => avx2,
                Isa::Avx512Vnni => avx2 && has!("avx512vnni") && has!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }
}

/// `out[r] = dot(weights, acts[r])` for every activation row, in passes of up to [`ACTIVATION_ROWS`] rows over the
/// weight row, with a chosen instruction set (one this CPU lacks runs the reference). The matmuls call the same
/// kernels through [`q4_1_few_rows`], which loops over weight rows inside them; this per-row entry point is what the
/// tests compare across instruction sets.
///
/// One weight row at a time is deliberate: decoding streams the weights from memory, and rows read in order form
/// one sequential stream the hardware prefetcher follows; interleaving several rows measured slower here.
pub fn q4_1_rows_on(isa: Isa, weights: &[BlockQ4_1], acts: &[&[ActivationBlock]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.available() {
        match isa {
            Isa::Avx512Vnni => return simd::vnni::q4_1_rows(weights, acts, out),
            Isa::Avx2 => return simd::avx2::q4_1_rows(weights, acts, out),
            Isa::Scalar => {}
        }
    }
    for (o, a) in out.iter_mut().zip(acts) {
        *o = q4_1_reference(weights, a);
    }
}

/// [`q4_1_rows_on`] for Q8_0 weights.
pub fn q8_0_rows_on(isa: Isa, weights: &[BlockQ8_0], acts: &[&[ActivationBlock]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.available() {
        match isa {
            Isa::Avx512Vnni => return simd::vnni::q8_0_rows(weights, acts, out),
            Isa::Avx2 => return simd::avx2::q8_0_rows(weights, acts, out),
            Isa::Scalar => {}
        }
    }
    for (o, a) in out.iter_mut().zip(acts) {
        *o = q8_0_reference(weights, a);
    }
}

/// For up to [`ACTIVATION_ROWS`] activation rows (a decode step, a short verification): `out[r * n + i]` = weight
/// row `i` · activation row `r`, for the `n` rows of `per_row` blocks in `weights`. The whole loop runs inside one
/// SIMD function, so a step pays no dispatch per weight row. More rows than that take the reference.
pub fn q4_1_few_rows(
    weights: &[BlockQ4_1],
    per_row: usize,
    acts: &[&[ActivationBlock]],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if acts.len() <= ACTIVATION_ROWS {
        match Isa::best() {
            Isa::Avx512Vnni => return simd::vnni::q4_1_few_rows(weights, per_row, acts, out),
            Isa::Avx2 => return simd::avx2::q4_1_few_rows(weights, per_row, acts, out),
            Isa::Scalar => {}
        }
    }
    few_rows_reference(weights, per_row, acts, out, q4_1_reference);
}

/// [`q4_1_few_rows`] for Q8_0 weights.
pub fn q8_0_few_rows(
    weights: &[BlockQ8_0],
    per_row: usize,
    acts: &[&[ActivationBlock]],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if acts.len() <= ACTIVATION_ROWS {
        match Isa::best() {
            Isa::Avx512Vnni => return simd::vnni::q8_0_few_rows(weights, per_row, acts, out),
            Isa::Avx2 => return simd::avx2::q8_0_few_rows(weights, per_row, acts, out),
            Isa::Scalar => {}
        }
    }
    few_rows_reference(weights, per_row, acts, out, q8_0_reference);
}

fn few_rows_reference<W>(
    weights: &[W],
    per_row: usize,
    acts: &[&[ActivationBlock]],
    out: &mut [f32],
    reference: fn(&[W], &[ActivationBlock]) -> f32,
) {
    let n = weights.len() / per_row.max(1);
    for (i, row) in weights.chunks_exact(per_row.max(1)).enumerate() {
        for (r, act) in acts.iter().enumerate() {
            if let Some(o) = out.get_mut(r * n + i) {
                *o = reference(row, act);
            }
        }
    }
}

/// Most activation rows per pass over a weight row (one accumulator register each).
pub const ACTIVATION_ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) mod simd {
    //! The only unsafe code in Specula: SIMD intrinsics. Every entry point is called only after
    //! `Isa::available()`, and every load reads a fixed-size array through a pointer to it.
    use std::arch::x86_64::*;

    use super::{ACTIVATION_ROWS, ActivationBlock, BlockQ4_1, BlockQ8_0};

    #[target_feature(enable = "avx2,fma")]
    fn hsum(x: __m256) -> f32 {
        let mut res = _mm256_extractf128_ps(x, 1);
        res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    #[target_feature(enable = "avx2,fma")]
    fn load32(bytes: &[i8; 32]) -> __m256i {
        // SAFETY: reads exactly the 32 bytes of the array (unaligned load).
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }

    /// How far ahead of the block being read the kernels ask for weights (2 KB, the best of 0.5 to 8 KB
    /// measured): decoding streams every weight from memory once, and on some hosts the hardware prefetcher
    /// alone leaves the kernel waiting on each new cache line (34 against 24 ms a step on one host here).
    pub(crate) const PREFETCH_BLOCKS_Q4_1: usize = 2048 / std::mem::size_of::<BlockQ4_1>();
    pub(crate) const PREFETCH_BLOCKS_Q8_0: usize = 2048 / std::mem::size_of::<BlockQ8_0>();

    /// Hints that `blocks[i]` will be read soon. Past the end of the slice it hints at whatever follows (the
    /// next row, usually); a prefetch never faults and never changes a result.
    #[inline]
    #[target_feature(enable = "sse")]
    pub(crate) fn prefetch<W>(blocks: &[W], i: usize) {
        _mm_prefetch::<_MM_HINT_T0>(blocks.as_ptr().wrapping_add(i).cast());
    }

    /// A block's f16 scale (and offset) widened with one conversion instead of two (the same values): lanes 0
    /// and 1.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn widen(d: half::f16, m: half::f16) -> __m128 {
        let bits = u32::from(d.to_bits()) | (u32::from(m.to_bits()) << 16);
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
    }

    /// The activation rows cut to the length they share with the weight row, as an array kept in registers.
    fn common<'a, W, const N: usize>(
        weights: &[W],
        acts: &[&'a [ActivationBlock]],
    ) -> (usize, [&'a [ActivationBlock]; N]) {
        let blocks = acts.iter().map(|r| r.len()).fold(weights.len(), usize::min);
        let rows =
            std::array::from_fn(|i| acts.get(i).and_then(|r| r.get(..blocks)).unwrap_or(&[]));
        (blocks, rows)
    }

    /// The kernels, written once and compiled for each instruction set with its own `idot`: eight lane sums of
    /// four u8 × i8 products each.
    macro_rules! kernels {
        ($features:literal) => {
            pub fn q4_1_rows(weights: &[BlockQ4_1], acts: &[&[ActivationBlock]], out: &mut [f32]) {
                // SAFETY: the caller checked the instruction set at run time.
                unsafe {
                    for (acts, out) in acts
                        .chunks(ACTIVATION_ROWS)
                        .zip(out.chunks_mut(ACTIVATION_ROWS))
                    {
                        match acts.len() {
                            4 => q4_1::<4>(weights, acts, out),
                            3 => q4_1::<3>(weights, acts, out),
                            2 => q4_1::<2>(weights, acts, out),
                            _ => q4_1::<1>(weights, acts, out),
                        }
                    }
                }
            }

            pub fn q8_0_rows(weights: &[BlockQ8_0], acts: &[&[ActivationBlock]], out: &mut [f32]) {
                // SAFETY: the caller checked the instruction set at run time.
                unsafe {
                    for (acts, out) in acts
                        .chunks(ACTIVATION_ROWS)
                        .zip(out.chunks_mut(ACTIVATION_ROWS))
                    {
                        match acts.len() {
                            4 => q8_0::<4>(weights, acts, out),
                            3 => q8_0::<3>(weights, acts, out),
                            2 => q8_0::<2>(weights, acts, out),
                            _ => q8_0::<1>(weights, acts, out),
                        }
                    }
                }
            }

            pub fn q4_1_few_rows(
                weights: &[BlockQ4_1],
                per_row: usize,
                acts: &[&[ActivationBlock]],
                out: &mut [f32],
            ) {
                // SAFETY: the caller checked the instruction set at run time.
                unsafe {
                    match acts.len() {
                        4 => q4_1_matrix::<4>(weights, per_row, acts, out),
                        3 => q4_1_matrix::<3>(weights, per_row, acts, out),
                        2 => q4_1_matrix::<2>(weights, per_row, acts, out),
                        _ => q4_1_matrix::<1>(weights, per_row, acts, out),
                    }
                }
            }

            pub fn q8_0_few_rows(
                weights: &[BlockQ8_0],
                per_row: usize,
                acts: &[&[ActivationBlock]],
                out: &mut [f32],
            ) {
                // SAFETY: the caller checked the instruction set at run time.
                unsafe {
                    match acts.len() {
                        4 => q8_0_matrix::<4>(weights, per_row, acts, out),
                        3 => q8_0_matrix::<3>(weights, per_row, acts, out),
                        2 => q8_0_matrix::<2>(weights, per_row, acts, out),
                        _ => q8_0_matrix::<1>(weights, per_row, acts, out),
                    }
                }
            }

            #[target_feature(enable = $features)]
            fn q4_1_matrix<const R: usize>(
                weights: &[BlockQ4_1],
                per_row: usize,
                acts: &[&[ActivationBlock]],
                out: &mut [f32],
            ) {
                let n = weights.len() / per_row.max(1);
                let mut sums = [0f32; R];
                for (i, row) in weights.chunks_exact(per_row.max(1)).enumerate() {
                    q4_1::<R>(row, acts, &mut sums);
                    for (r, &v) in sums.iter().enumerate() {
                        if let Some(o) = out.get_mut(r * n + i) {
                            *o = v;
                        }
                    }
                }
            }

            #[target_feature(enable = $features)]
            fn q8_0_matrix<const R: usize>(
                weights: &[BlockQ8_0],
                per_row: usize,
                acts: &[&[ActivationBlock]],
                out: &mut [f32],
            ) {
                let n = weights.len() / per_row.max(1);
                let mut sums = [0f32; R];
                for (i, row) in weights.chunks_exact(per_row.max(1)).enumerate() {
                    q8_0::<R>(row, acts, &mut sums);
                    for (r, &v) in sums.iter().enumerate() {
                        if let Some(o) = out.get_mut(r * n + i) {
                            *o = v;
                        }
                    }
                }
            }

            #[inline]
            #[target_feature(enable = $features)]
            fn q4_1<const R: usize>(
                weights: &[BlockQ4_1],
                acts: &[&[ActivationBlock]],
                out: &mut [f32],
            ) {
                let (blocks, a) = common::<_, R>(weights, acts);
                let low_nibbles = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut min_term = [0f32; R];
                for (b, w) in weights.iter().enumerate().take(blocks) {
                    prefetch(weights, b + PREFETCH_BLOCKS_Q4_1);
                    // SAFETY: reads exactly the 16 bytes of `qs`.
                    let packed = unsafe { _mm_loadu_si128(w.qs.as_ptr().cast()) };
                    let qw = _mm256_and_si256(
                        low_nibbles,
                        _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
                    );
                    let dm = widen(w.d, w.m);
                    let (d, m) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
                    for r in 0..R {
                        let ab = &a[r][b];
                        min_term[r] = m.mul_add(ab.s, min_term[r]);
                        let scale = _mm256_set1_ps(d * ab.d);
                        let sums = _mm256_cvtepi32_ps(idot(qw, load32(&ab.qs)));
                        acc[r] = _mm256_fmadd_ps(scale, sums, acc[r]);
                    }
                }
                for (r, o) in out.iter_mut().enumerate().take(R) {
                    *o = hsum(acc[r]) + min_term[r];
                }
            }

            #[inline]
            #[target_feature(enable = $features)]
            fn q8_0<const R: usize>(
                weights: &[BlockQ8_0],
                acts: &[&[ActivationBlock]],
                out: &mut [f32],
            ) {
                let (blocks, a) = common::<_, R>(weights, acts);
                let mut acc = [_mm256_setzero_ps(); R];
                for (b, w) in weights.iter().enumerate().take(blocks) {
                    prefetch(weights, b + PREFETCH_BLOCKS_Q8_0);
                    let qw = load32(&w.qs);
                    // u8 × i8 products: |w| times the activation carrying w's sign.
                    let magnitude = _mm256_sign_epi8(qw, qw);
                    let d = w.d.to_f32();
                    for r in 0..R {
                        let ab = &a[r][b];
                        let scale = _mm256_set1_ps(d * ab.d);
                        let signed = _mm256_sign_epi8(load32(&ab.qs), qw);
                        let sums = _mm256_cvtepi32_ps(idot(magnitude, signed));
                        acc[r] = _mm256_fmadd_ps(scale, sums, acc[r]);
                    }
                }
                for (r, o) in out.iter_mut().enumerate().take(R) {
                    *o = hsum(acc[r]);
                }
            }
        };
    }

    pub mod avx2 {
        use super::*;

        #[target_feature(enable = "avx2,fma,f16c")]
        fn idot(unsigned: __m256i, signed: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(unsigned, signed))
        }

        kernels!("avx2,fma,f16c");
    }

    pub mod vnni {
        use super::*;

        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        fn idot(unsigned: __m256i, signed: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned, signed)
        }

        kernels!("avx2,fma,f16c,avx512vnni,avx512vl");
    }
}

#[cfg(test)]
mod tests {
    use half::f16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::kernels::blocks::quantize_activations;

    fn random_row(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        // Activations with outliers, like a residual stream's.
        (0..n)
            .map(|_| {
                let v: f32 = rng.random_range(-1.0..1.0);
                if rng.random_bool(0.02) { v * 40.0 } else { v }
            })
            .collect()
    }

    fn random_q4_1(rng: &mut ChaCha8Rng, blocks: usize) -> Vec<BlockQ4_1> {
        (0..blocks)
            .map(|_| BlockQ4_1 {
                d: f16::from_f32(rng.random_range(0.0..0.05)),
                m: f16::from_f32(rng.random_range(-0.4..0.0)),
                qs: std::array::from_fn(|_| rng.random()),
            })
            .collect()
    }

    fn random_q8_0(rng: &mut ChaCha8Rng, blocks: usize) -> Vec<BlockQ8_0> {
        (0..blocks)
            .map(|_| BlockQ8_0 {
                d: f16::from_f32(rng.random_range(0.0..0.01)),
                qs: std::array::from_fn(|_| rng.random_range(-127..=127)),
            })
            .collect()
    }

    fn quantized_rows(
        rng: &mut ChaCha8Rng,
        rows: usize,
        cols: usize,
    ) -> (Vec<Vec<f32>>, Vec<Vec<ActivationBlock>>) {
        let floats: Vec<Vec<f32>> = (0..rows).map(|_| random_row(rng, cols)).collect();
        let quantized = floats
            .iter()
            .map(|row| {
                let mut q = Vec::new();
                quantize_activations(row, &mut q);
                q
            })
            .collect();
        (floats, quantized)
    }

    #[test]
    fn simd_kernels_return_the_references_bits_for_every_row_count() {
        eprintln!(
            "instruction sets here: {:?}",
            [Isa::Avx512Vnni, Isa::Avx2].map(Isa::available)
        );
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..200 {
            let blocks = 1 + case % 48;
            let (_, acts) = quantized_rows(&mut rng, 10, blocks * 32);
            let q4 = random_q4_1(&mut rng, blocks);
            let q8 = random_q8_0(&mut rng, blocks);
            for n in 1..=10 {
                let rows: Vec<&[ActivationBlock]> =
                    acts.iter().take(n).map(Vec::as_slice).collect();
                for isa in [Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar] {
                    let mut got = vec![f32::NAN; n];
                    q4_1_rows_on(isa, &q4, &rows, &mut got);
                    for (g, row) in got.iter().zip(&rows) {
                        assert_eq!(
                            g.to_bits(),
                            q4_1_reference(&q4, row).to_bits(),
                            "Q4_1 {isa:?}, {blocks} blocks, {n} rows"
                        );
                    }
                    q8_0_rows_on(isa, &q8, &rows, &mut got);
                    for (g, row) in got.iter().zip(&rows) {
                        assert_eq!(
                            g.to_bits(),
                            q8_0_reference(&q8, row).to_bits(),
                            "Q8_0 {isa:?}, {blocks} blocks, {n} rows"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn references_approximate_the_float_dot_product() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..100 {
            let blocks = 18;
            let (floats, acts) = quantized_rows(&mut rng, 1, blocks * 32);
            let q4 = random_q4_1(&mut rng, blocks);
            let w: Vec<f32> = q4.iter().flat_map(BlockQ4_1::dequantize).collect();
            let exact: f32 = w.iter().zip(&floats[0]).map(|(a, b)| a * b).sum();
            // Activation quantization error: half a step (max/254) per element, times the weights' magnitudes.
            let bound: f32 = acts[0]
                .iter()
                .zip(w.chunks(32))
                .map(|(a, ws)| a.d * 0.5 * ws.iter().map(|x| x.abs()).sum::<f32>())
                .sum::<f32>()
                * 1.01
                + 1e-3;
            let got = q4_1_reference(&q4, &acts[0]);
            assert!(
                (got - exact).abs() <= bound,
                "Q4_1: {got} vs {exact} (bound {bound})"
            );

            let q8 = random_q8_0(&mut rng, blocks);
            let w: Vec<f32> = q8.iter().flat_map(BlockQ8_0::dequantize).collect();
            let exact: f32 = w.iter().zip(&floats[0]).map(|(a, b)| a * b).sum();
            let got = q8_0_reference(&q8, &acts[0]);
            let bound: f32 = acts[0]
                .iter()
                .zip(w.chunks(32))
                .map(|(a, ws)| a.d * 0.5 * ws.iter().map(|x| x.abs()).sum::<f32>())
                .sum::<f32>()
                * 1.01
                + 1e-3;
            assert!(
                (got - exact).abs() <= bound,
                "Q8_0: {got} vs {exact} (bound {bound})"
            );
        }
    }
}
