//! AVX-512 versions of the forward's per-element passes: SwiGLU with ggml's vector exp, the quantization of
//! activations before a matmul, and the one-token attention path's online softmax for 64-wide heads. Each does
//! exactly the roundings of the scalar emulation it replaces ([`Flavor::silu`],
//! [`super::blocks::quantize_activations_reference`], `attention::online`); those stay the definition and the
//! fallback, and property tests hold each pair together.
//!
//! They matter most for multi-token forwards, whose cost grows with every token: in scalar code these passes made
//! up about a quarter of a 16-token verification.

use crate::ggml_float::Flavor;

use super::blocks::{ActivationBlock, BLOCK};

/// Whether this CPU runs the AVX-512 versions.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx512f") && has!("avx512dq") && has!("avx512bw") && has!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `silu(gate) * up`, element by element, in the arithmetic of `flavor` (ggml's `ggml_vec_swiglu_f32`).
pub fn swiglu(flavor: Flavor, gate: &[f32], up: &[f32]) -> Vec<f32> {
    let n = gate.len().min(up.len());
    let mut out = vec![0f32; n];
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if flavor == Flavor::Avx512 && available() {
        done = simd::swiglu(gate, up, &mut out);
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up).skip(done) {
        *o = flavor.silu(g) * u;
    }
    out
}

/// `expf` of every value, with libm's bits: 16 at a time where the CPU has AVX-512 (glibc's FMA build, which its
/// loader picks on such a CPU, reproduced operation for operation), libm itself elsewhere.
pub fn exp_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        simd::exp_in_place(values);
        return;
    }
    for v in values {
        *v = v.exp();
    }
}

/// Appends the blocks of one row (length a multiple of 32), as ggml's `quantize_row_q8_1` does.
pub fn quantize_row(row: &[f32], out: &mut Vec<ActivationBlock>) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        for block in row.chunks_exact(BLOCK) {
            if let Ok(block) = <&[f32; BLOCK]>::try_from(block) {
                out.push(simd::quantize_block(block));
            }
        }
        return;
    }
    super::blocks::quantize_activations_reference(row, out);
}

/// The state an online softmax leaves: the largest score, the sum of weights, the weighted sum of values.
#[derive(Clone, Debug, PartialEq)]
pub struct OnlineSoftmax {
    pub max: f32,
    pub sum: f32,
    pub acc: Vec<f32>,
}

impl OnlineSoftmax {
    /// Before the first cell.
    pub fn start(d: usize) -> Self {
        Self {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            acc: vec![0.0; d],
        }
    }
}

/// llama.cpp's one-token flash attention (AVX-512 build, f16 keys and values) for query heads of width 64 that
/// attend to the same cells of one key-value head: `queries` already rounded to f16, scores scaled by `scale`,
/// the cells' keys and values in order. Continues each head's `states` (one per query, 64-wide) over the cells,
/// so a run of cells can be split: cells every head sees, then each token's own. The weighted values are summed
/// in f16, rounded after every cell as ggml's f16 buffer does. Each head is computed exactly as alone; together
/// they share the loads and, more importantly, fill the pipeline: one head's running sum is a chain of dependent
/// roundings. Returns `false`, touching nothing, where this CPU lacks AVX-512.
pub fn online_softmax_64<T: Stored64>(
    queries: &[&[f32; 64]],
    scale: f32,
    cells: &[(&T, &T)],
    states: &mut [OnlineSoftmax],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if available() && states.iter().all(|s| s.acc.len() == 64) {
        simd::online_softmax_64(queries, scale, cells, states);
        return true;
    }
    let _ = (queries, scale, cells, states);
    false
}

/// For each head h: `accs[h] ← values[i] · weights[h][i] + accs[h]` (fused, f32) for each value i in order, a
/// zero weight leaving the sum as it is: the weighted sum of values in ggml's tiled attention, for query heads
/// that share the values, their independent chains of FMAs side by side. Returns `false`, touching nothing,
/// where this CPU lacks AVX-512.
pub fn weighted_sums_64<T: Stored64>(
    accs: &mut [[f32; 64]],
    values: &[&T],
    weights: &[[f32; 64]],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if available() && values.len() <= 64 && weights.len() == accs.len() {
        simd::weighted_sums_64(accs, values, weights);
        return true;
    }
    let _ = (accs, values, weights);
    false
}

/// One tile's 64 attention scores before scaling, for each query head: `dots[h][c] = Σ_dk keys[dk][c] ·
/// queries[h][dk]`, fused in dk order (the keys transposed, 64 cells a row, as ggml's tiled path packs them), the
/// heads' chains side by side. Returns `false`, touching nothing, where this CPU lacks AVX-512.
pub fn tile_dots_64(keys: &[f32; 64 * 64], queries: &[&[f32; 64]], dots: &mut [[f32; 64]]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if available() && dots.len() == queries.len() {
        simd::tile_dots_64(keys, queries, dots);
        return true;
    }
    let _ = (keys, queries, dots);
    false
}

/// `ggml_vec_soft_max_f32` of the AVX-512 build on 64 scores: each becomes `ggml_v_expf(x − max)`; returns their
/// sum, each register of 16 reduced in f32 and the four added in f64. `None` where this CPU lacks AVX-512.
pub fn soft_max_64(scores: &mut [f32; 64], max: f32) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        return Some(simd::soft_max_64(scores, max));
    }
    let _ = (scores, max);
    None
}

/// 64 keys or values as a cache stores them: f32, or f16 (converted on load, exactly). Sealed: the vector
/// code reads a value's bytes by this answer, so only these two types may give it.
pub trait Stored64: Sync + sealed::Sealed {
    /// Whether the 64 values are f16.
    const F16: bool;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for [f32; 64] {}
    impl Sealed for [half::f16; 64] {}
}

impl Stored64 for [f32; 64] {
    const F16: bool = false;
}

impl Stored64 for [half::f16; 64] {
    const F16: bool = true;
}

/// glibc's `__exp2f_data.tab`: 2^(i/32) as doubles with i/32 taken out of the exponent.
#[cfg(target_arch = "x86_64")]
const EXP2F_TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd;

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::kernels::blocks::quantize_activations_reference;

    #[test]
    fn vector_passes_equal_the_scalar_definitions() {
        eprintln!("AVX-512 vector passes here: {}", available());
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for case in 0..200 {
            let n = 32 * (1 + case % 50);
            // Ordinary values, outliers, zeros (an all-zero block has d = 0), and exp's saturation range.
            let row: Vec<f32> = (0..n)
                .map(|i| match (case % 7, i % 97) {
                    (0, _) => 0.0,
                    (_, 0) => rng.random_range(-300.0..300.0),
                    _ => {
                        rng.random_range(-4.0..4.0) * if rng.random_bool(0.02) { 30.0 } else { 1.0 }
                    }
                })
                .collect();
            let up: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let (mut got, mut want) = (Vec::new(), Vec::new());
            quantize_row(&row, &mut got);
            quantize_activations_reference(&row, &mut want);
            assert_eq!(got, want, "quantization, case {case}");
            for flavor in [Flavor::Avx512, Flavor::Avx2] {
                // An odd length leaves a tail for the scalar loop.
                let len = n - case % 5;
                let got = swiglu(flavor, &row[..len], &up[..len]);
                for (i, g) in got.iter().enumerate() {
                    let want = flavor.silu(row[i]) * up[i];
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "swiglu {flavor:?}, x = {}",
                        row[i]
                    );
                }
            }
        }
    }

    /// The tiled attention's vector pieces must give the scalar definitions' bits: dot products of a key tile,
    /// ggml's softmax of a tile (masked cells at −∞, scores far below the maximum, a maximum that is a score),
    /// and the weighted sum of f32 or f16 values.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn tiled_attention_pieces_equal_the_scalar_definitions() {
        use crate::ggml_float::Flavor;
        if !available() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for case in 0..100 {
            let spread = [0.5f32, 4.0, 40.0, 300.0][case % 4];
            let keys: Vec<f32> = (0..64 * 64).map(|_| rng.random_range(-2.0..2.0)).collect();
            let query: [f32; 64] = std::array::from_fn(|_| rng.random_range(-2.0..2.0));
            let mut want = [0f32; 64];
            for (row, &q) in keys.chunks_exact(64).zip(&query) {
                for (dot, &k) in want.iter_mut().zip(row) {
                    *dot = k.mul_add(q, *dot);
                }
            }
            let keys: &[f32; 64 * 64] = keys.as_slice().try_into().unwrap();
            // Up to six heads: more than one pass of four.
            let heads = 1 + case % 6;
            let queries: Vec<[f32; 64]> = (0..heads)
                .map(|h| {
                    if h == 0 {
                        query
                    } else {
                        std::array::from_fn(|_| rng.random_range(-2.0..2.0))
                    }
                })
                .collect();
            let refs: Vec<&[f32; 64]> = queries.iter().collect();
            let mut got = vec![[0f32; 64]; heads];
            assert!(tile_dots_64(keys, &refs, &mut got));
            assert_eq!(bits(&got[0]), bits(&want), "dots, case {case}");
            for (h, got) in got.iter().enumerate() {
                let mut want = [0f32; 64];
                for (row, &q) in keys.chunks_exact(64).zip(&queries[h]) {
                    for (dot, &k) in want.iter_mut().zip(row) {
                        *dot = k.mul_add(q, *dot);
                    }
                }
                assert_eq!(bits(got), bits(&want), "dots of head {h}, case {case}");
            }

            let mut scores: [f32; 64] = std::array::from_fn(|i| {
                if i % 7 == 3 {
                    f32::NEG_INFINITY
                } else {
                    rng.random_range(-spread..spread)
                }
            });
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut want = scores;
            let want_sum = Flavor::Avx512.soft_max(&mut want, max);
            let got_sum = soft_max_64(&mut scores, max).unwrap();
            assert_eq!(bits(&scores), bits(&want), "softmax, case {case}");
            assert_eq!(
                got_sum.to_bits(),
                want_sum.to_bits(),
                "softmax sum, case {case}"
            );

            let values: Vec<[f32; 64]> = (0..1 + case % 64)
                .map(|_| {
                    std::array::from_fn(|_| {
                        half::f16::from_f32(rng.random_range(-3.0..3.0)).to_f32()
                    })
                })
                .collect();
            let halves: Vec<[half::f16; 64]> =
                values.iter().map(|v| v.map(half::f16::from_f32)).collect();
            // Each head its own weights, some exactly zero (skipped, as the scalar path skips them).
            let weights: Vec<[f32; 64]> = (0..heads)
                .map(|_| {
                    std::array::from_fn(|_| {
                        if rng.random_bool(0.2) {
                            0.0
                        } else {
                            rng.random_range(0.0..1.0)
                        }
                    })
                })
                .collect();
            let starts: Vec<[f32; 64]> = (0..heads)
                .map(|_| std::array::from_fn(|_| rng.random_range(-1.0..1.0)))
                .collect();
            let (value_refs, half_refs): (Vec<&[f32; 64]>, Vec<&[half::f16; 64]>) =
                (values.iter().collect(), halves.iter().collect());
            let (mut from_f32, mut from_f16) = (starts.clone(), starts.clone());
            assert!(weighted_sums_64(&mut from_f32, &value_refs, &weights));
            assert!(weighted_sums_64(&mut from_f16, &half_refs, &weights));
            for h in 0..heads {
                let mut want = starts[h];
                for (v, &w) in values.iter().zip(&weights[h]) {
                    if w == 0.0 {
                        continue;
                    }
                    for (a, &v) in want.iter_mut().zip(v) {
                        *a = v.mul_add(w, *a);
                    }
                }
                assert_eq!(bits(&from_f32[h]), bits(&want), "weighted sum, case {case}");
                assert_eq!(
                    bits(&from_f16[h]),
                    bits(&want),
                    "weighted sum of f16, case {case}"
                );
            }
        }
    }

    /// Every float whose exp is neither 0 nor ∞ in steps, and the special values: the vector exp must return
    /// libm's bits. `exp_equals_libm_on_every_float` checks all 2.2 billion of them (about a minute; run by hand).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_equals_libm() {
        check_exp(4099);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "all 2.2 billion floats in [-104, 89]: about a minute"]
    fn exp_equals_libm_on_every_float() {
        check_exp(1);
    }

    #[cfg(target_arch = "x86_64")]
    fn check_exp(step: usize) {
        if !available() {
            return;
        }
        let special = [
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            -0.0,
            0.0,
            f32::from_bits(0xc2cf_f1b4),
            f32::from_bits(0xc2cf_f1b5),
            f32::from_bits(0x42b1_7217),
            f32::from_bits(0x42b1_7218),
            -88.0,
            88.0,
            -200.0,
            200.0,
        ];
        let ranges = [(0x8000_0000u32, 0xc2d0_0000u32), (0, 0x42b2_0000)];
        let mut values: Vec<f32> = special.to_vec();
        for (from, to) in ranges {
            values.extend((from..=to).step_by(step).map(f32::from_bits));
        }
        let mut got = values.clone();
        simd::exp_in_place(&mut got);
        for (x, g) in values.iter().zip(&got) {
            let want = x.exp();
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "exp({x:e}) = {g:e}, libm {want:e}"
            );
        }
    }
}
