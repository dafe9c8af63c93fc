//! SIMD intrinsics. Entry points run only after `available()`; every load and store goes through a
//! fixed-size array or a slice whose length was checked.
use std::arch::x86_64::*;

use half::f16;

use super::{ActivationBlock, BLOCK, EXP2F_TABLE, OnlineSoftmax, Stored64};

/// Heads per pass: four heads' running sums (16 registers) and a value (4) fit the 32 registers.
pub const MAX_HEADS: usize = 4;

/// Cells per call of [`online_avx512`]: their scores and weights stay on the stack, and the next chunk's
/// keys and values are fetched from memory while this one's are summed.
const CHUNK: usize = 32;

pub fn online_softmax_64<T: Stored64>(
    queries: &[&[f32; 64]],
    scale: f32,
    cells: &[(&T, &T)],
    states: &mut [OnlineSoftmax],
) {
    for (index, chunk) in cells.chunks(CHUNK).enumerate() {
        let next = cells.get((index + 1) * CHUNK..).unwrap_or_default();
        for (key, value) in next.iter().take(CHUNK) {
            prefetch(*key);
            prefetch(*value);
        }
        // Every group of heads over this chunk while its keys and values are in the nearest cache.
        for (queries, states) in queries.chunks(MAX_HEADS).zip(states.chunks_mut(MAX_HEADS)) {
            online_chunk(queries, scale, chunk, states);
        }
    }
}

pub fn weighted_sums_64<T: Stored64>(accs: &mut [[f32; 64]], values: &[&T], weights: &[[f32; 64]]) {
    for (accs, weights) in accs.chunks_mut(MAX_HEADS).zip(weights.chunks(MAX_HEADS)) {
        // SAFETY: the caller checked the instruction sets at run time.
        unsafe {
            match (accs, weights) {
                ([a], [wa]) => weighted_sums_avx512([a], values, [wa]),
                ([a, b], [wa, wb]) => weighted_sums_avx512([a, b], values, [wa, wb]),
                ([a, b, c], [wa, wb, wc]) => weighted_sums_avx512([a, b, c], values, [wa, wb, wc]),
                ([a, b, c, d], [wa, wb, wc, wd]) => {
                    weighted_sums_avx512([a, b, c, d], values, [wa, wb, wc, wd])
                }
                _ => debug_assert!(false, "accumulators and weights differ in number"),
            }
        }
    }
}

#[target_feature(enable = "avx512f,f16c")]
fn weighted_sums_avx512<T: Stored64, const H: usize>(
    accs: [&mut [f32; 64]; H],
    values: &[&T],
    weights: [&[f32; 64]; H],
) {
    let mut sums: [[__m512; 4]; H] = std::array::from_fn(|h| load64(accs[h]));
    for (i, value) in values.iter().enumerate() {
        let v = load_stored(*value);
        for (sums, weights) in sums.iter_mut().zip(weights) {
            let weight = weights.get(i).copied().unwrap_or(0.0);
            // A zero weight leaves the sum untouched (not even a zero's sign changes), as skipping it does.
            let live = if weight == 0.0 { 0 } else { 0xFFFF };
            let w = _mm512_set1_ps(weight);
            for (sum, v) in sums.iter_mut().zip(v) {
                *sum = _mm512_mask3_fmadd_ps(v, w, *sum, live);
            }
        }
    }
    for (acc, sums) in accs.into_iter().zip(sums) {
        for (chunk, sum) in acc.chunks_exact_mut(16).zip(sums) {
            // SAFETY: each chunk holds exactly 16 floats.
            unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), sum) };
        }
    }
}

pub fn tile_dots_64(keys: &[f32; 64 * 64], queries: &[&[f32; 64]], dots: &mut [[f32; 64]]) {
    for (queries, dots) in queries.chunks(MAX_HEADS).zip(dots.chunks_mut(MAX_HEADS)) {
        // SAFETY: the caller checked the instruction sets at run time.
        unsafe {
            match (queries, dots) {
                ([a], [da]) => tile_dots_avx512(keys, [a], [da]),
                ([a, b], [da, db]) => tile_dots_avx512(keys, [a, b], [da, db]),
                ([a, b, c], [da, db, dc]) => tile_dots_avx512(keys, [a, b, c], [da, db, dc]),
                ([a, b, c, d], [da, db, dc, dd]) => {
                    tile_dots_avx512(keys, [a, b, c, d], [da, db, dc, dd])
                }
                _ => debug_assert!(false, "queries and dots differ in number"),
            }
        }
    }
}

#[target_feature(enable = "avx512f")]
fn tile_dots_avx512<const H: usize>(
    keys: &[f32; 64 * 64],
    queries: [&[f32; 64]; H],
    out: [&mut [f32; 64]; H],
) {
    let mut dots = [[_mm512_setzero_ps(); 4]; H];
    for (dk, row) in keys.as_chunks::<64>().0.iter().enumerate() {
        let k = load64(row);
        for (dots, query) in dots.iter_mut().zip(queries) {
            let q = _mm512_set1_ps(query.get(dk).copied().unwrap_or(0.0));
            for (dot, k) in dots.iter_mut().zip(k) {
                *dot = _mm512_fmadd_ps(k, q, *dot);
            }
        }
    }
    for (out, dots) in out.into_iter().zip(dots) {
        for (chunk, dot) in out.chunks_exact_mut(16).zip(dots) {
            // SAFETY: each chunk holds exactly 16 floats.
            unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), dot) };
        }
    }
}

pub fn soft_max_64(scores: &mut [f32; 64], max: f32) -> f64 {
    // SAFETY: the caller checked the instruction sets at run time.
    unsafe { soft_max_avx512(scores, max) }
}

#[target_feature(enable = "avx512f,avx512dq")]
fn soft_max_avx512(scores: &mut [f32; 64], max: f32) -> f64 {
    let mut sum = 0f64;
    for chunk in scores.chunks_exact_mut(16) {
        // SAFETY: each chunk holds exactly 16 floats.
        let x = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
        let e = expf(_mm512_sub_ps(x, _mm512_set1_ps(max)));
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), e) };
        sum += f64::from(reduce_add(e));
    }
    sum
}

/// `_mm512_reduce_add_ps` as ggml's build computes it: halves, then halves again.
#[target_feature(enable = "avx512f,avx512dq")]
fn reduce_add(x: __m512) -> f32 {
    let eight = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps::<1>(x));
    let four = _mm_add_ps(
        _mm256_castps256_ps128(eight),
        _mm256_extractf128_ps::<1>(eight),
    );
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
}

/// Asks for `x`'s cache lines (a hint: never faults).
fn prefetch<T>(x: &T) {
    let start = std::ptr::from_ref(x).cast::<i8>();
    // Every line `x` touches: from its first byte in steps of a line, and its last byte (`x` need not start on
    // a line).
    let last = size_of::<T>().saturating_sub(1);
    for offset in (0..size_of::<T>()).step_by(64).chain([last]) {
        // SAFETY: a prefetch of any address is safe; this one lies within `x`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset)) };
    }
}

/// At most [`CHUNK`] cells.
fn online_chunk<T: Stored64>(
    queries: &[&[f32; 64]],
    scale: f32,
    cells: &[(&T, &T)],
    states: &mut [OnlineSoftmax],
) {
    // SAFETY: the caller checked the instruction sets at run time.
    unsafe {
        match (queries, states) {
            ([a], [sa]) => online_avx512([*a], scale, cells, [sa]),
            ([a, b], [sa, sb]) => online_avx512([*a, *b], scale, cells, [sa, sb]),
            ([a, b, c], [sa, sb, sc]) => online_avx512([*a, *b, *c], scale, cells, [sa, sb, sc]),
            ([a, b, c, d], [sa, sb, sc, sd]) => {
                online_avx512([*a, *b, *c, *d], scale, cells, [sa, sb, sc, sd])
            }
            (queries, states) => {
                for (q, state) in queries.iter().zip(states) {
                    online_avx512([*q], scale, cells, [state]);
                }
            }
        }
    }
}

/// `expf` of every value, as libm computes it.
pub fn exp_in_place(values: &mut [f32]) {
    // SAFETY: the caller checked the instruction sets at run time.
    unsafe { exp_avx512(values) }
}

#[target_feature(enable = "avx512f,avx512dq")]
fn exp_avx512(values: &mut [f32]) {
    let mut chunks = values.chunks_exact_mut(16);
    for chunk in &mut chunks {
        // SAFETY: the chunk holds exactly 16 floats.
        unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), expf16(_mm512_loadu_ps(chunk.as_ptr()))) };
    }
    for e in chunks.into_remainder() {
        *e = e.exp();
    }
}

/// glibc's `expf` (the FMA build its loader picks on any CPU with AVX-512): 2^(k/32) from a table times a
/// cubic in double precision, rounded once to f32. The same operations in the same order return libm's
/// bits; a test checks them against libm itself (all 2.2 billion floats in [-104, 89], run by hand).
#[target_feature(enable = "avx512f,avx512dq")]
fn expf16(x: __m512) -> __m512 {
    let halves = [
        _mm512_castps512_ps256(x),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))),
    ];
    // SAFETY: reads the table's 32 entries as four registers of 8.
    let table: [__m512i; 4] = std::array::from_fn(|i| unsafe {
        _mm512_loadu_si512(EXP2F_TABLE.as_ptr().add(8 * i).cast())
    });
    let [low, high] = halves.map(|half| {
        let xd = _mm512_cvtps_pd(half);
        let inv_ln2_n = _mm512_set1_pd(f64::from_bits(0x3ff7_1547_652b_82fe) * 32.0);
        let shift = _mm512_set1_pd(f64::from_bits(0x4338_0000_0000_0000));
        // x·32/ln 2 = k + r, k an integer, |r| ≤ 1/2 (both products fused, as GCC builds glibc).
        let shifted = _mm512_fmadd_pd(inv_ln2_n, xd, shift);
        let ki = _mm512_castpd_si512(shifted);
        let kd = _mm512_sub_pd(shifted, shift);
        let r = _mm512_fmsub_pd(inv_ln2_n, xd, kd);
        // 2^(k/32): the table entry for k mod 32, with k/32 added to its exponent.
        let [t0, t1, t2, t3] = table;
        let from_low = _mm512_permutex2var_epi64(t0, ki, t1);
        let from_high = _mm512_permutex2var_epi64(t2, ki, t3);
        let entry = _mm512_mask_blend_epi64(
            _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)),
            from_low,
            from_high,
        );
        let s = _mm512_castsi512_pd(_mm512_add_epi64(entry, _mm512_slli_epi64::<47>(ki)));
        let c = |bits: u64, n: f64| _mm512_set1_pd(f64::from_bits(bits) / n);
        let z = _mm512_fmadd_pd(
            c(0x3fac_6af8_4b91_2394, 32768.0),
            r,
            c(0x3fce_bfce_50fa_c4f3, 1024.0),
        );
        let r2 = _mm512_mul_pd(r, r);
        let y = _mm512_fmadd_pd(c(0x3fe6_2e42_ff0c_52d6, 32.0), r, _mm512_set1_pd(1.0));
        let y = _mm512_mul_pd(_mm512_fmadd_pd(z, r2, y), s);
        _mm512_cvtpd_ps(y)
    });
    let res = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castps_pd(_mm512_castps256_ps512(low)),
        _mm256_castps_pd(high),
    ));
    // The special cases of glibc's |x| ≥ 88 branch: underflow to 0 (−∞ included), overflow to ∞, NaN.
    let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(f32::from_bits(0xc2cf_f1b4)));
    let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(f32::from_bits(0x42b1_7217)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    let res = _mm512_mask_blend_ps(under, res, _mm512_setzero_ps());
    let res = _mm512_mask_blend_ps(over, res, _mm512_set1_ps(f32::INFINITY));
    _mm512_mask_blend_ps(nan, res, _mm512_add_ps(x, x))
}

#[target_feature(enable = "avx512f")]
fn load64(x: &[f32; 64]) -> [__m512; 4] {
    // SAFETY: reads the array's 64 floats as four registers.
    std::array::from_fn(|i| unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * i)) })
}

/// 64 stored values as f32: an f16 value converts exactly.
#[target_feature(enable = "avx512f,f16c")]
fn load_stored<T: Stored64>(x: &T) -> [__m512; 4] {
    let at = std::ptr::from_ref(x).cast::<u8>();
    // SAFETY: `T` is `[f32; 64]` (256 bytes, read as four registers of 16 floats) or `[f16; 64]` (128 bytes,
    // read as four halves of 16 f16 values).
    std::array::from_fn(|i| unsafe {
        if T::F16 {
            _mm512_cvtph_ps(_mm256_loadu_si256(at.add(32 * i).cast()))
        } else {
            _mm512_loadu_ps(at.add(64 * i).cast())
        }
    })
}

#[target_feature(enable = "avx512f,f16c")]
fn round_f16(x: __m512) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
}

/// In three passes, so that no call to libm's `expf` sits inside a vector loop (a call clobbers every vector
/// register, and the loop would spill its accumulators around each one): every score, then the running
/// maximum and the weights in scalar code, then the weighted values.
#[target_feature(enable = "avx512f,avx512dq,f16c")]
fn online_avx512<T: Stored64, const H: usize>(
    queries: [&[f32; 64]; H],
    scale: f32,
    cells: &[(&T, &T)],
    states: [&mut OnlineSoftmax; H],
) {
    let q = queries.map(|query| load64(query));
    debug_assert!(cells.len() <= CHUNK, "a chunk holds at most {CHUNK} cells");
    let cells = cells.get(..CHUNK).unwrap_or(cells);
    let mut all_scores = [[0f32; H]; CHUNK];
    let scores = all_scores.get_mut(..cells.len()).unwrap_or_default();
    for ((key, _), scores) in cells.iter().zip(scores.iter_mut()) {
        let k = load_stored(*key);
        for (score, q) in scores.iter_mut().zip(&q) {
            // `ggml_vec_dot_f16` of four registers: the f16 products are exact; accumulators pair as
            // (0 + 2) + (1 + 3), then `_mm512_reduce_add_ps` halves the register down to one lane.
            let lanes = _mm512_add_ps(
                _mm512_add_ps(_mm512_mul_ps(k[0], q[0]), _mm512_mul_ps(k[2], q[2])),
                _mm512_add_ps(_mm512_mul_ps(k[1], q[1]), _mm512_mul_ps(k[3], q[3])),
            );
            let eight = _mm256_add_ps(
                _mm512_castps512_ps256(lanes),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lanes))),
            );
            let four = _mm_add_ps(
                _mm256_castps256_ps128(eight),
                _mm256_extractf128_ps::<1>(eight),
            );
            let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
            let one = _mm_add_ss(two, _mm_movehdup_ps(two));
            *score = _mm_cvtss_f32(one) * scale;
        }
    }
    // Per cell and head: whether the cell raised the maximum (the sum so far is then rescaled by
    // exp(old max − score)), else its weight exp(score − max). The maxima are a scalar scan; the exps, the
    // bulk of the work, then run 16 at a time.
    let mut max: [f32; H] = std::array::from_fn(|h| states[h].max);
    let mut sum: [f32; H] = std::array::from_fn(|h| states[h].sum);
    let mut all_raised = [[false; H]; CHUNK];
    let raised = all_raised.get_mut(..cells.len()).unwrap_or_default();
    let exps = scores;
    for (exps, raised) in exps.iter_mut().zip(raised.iter_mut()) {
        for h in 0..H {
            let score = exps[h];
            raised[h] = score > max[h];
            exps[h] = if raised[h] {
                max[h] - score
            } else {
                score - max[h]
            };
            if raised[h] {
                max[h] = score;
            }
        }
    }
    exp_avx512(exps.as_flattened_mut());
    let mut steps = [[(false, 1f32, 1f32); H]; CHUNK];
    for ((steps, exps), raised) in steps.iter_mut().zip(exps.iter()).zip(raised.iter()) {
        *steps = std::array::from_fn(|h| {
            let (ms, vs) = if raised[h] {
                (exps[h], 1.0)
            } else {
                (1.0, exps[h])
            };
            // `S = S*ms + vs`, unfused as in ggml's build.
            sum[h] = sum[h] * ms + vs;
            (raised[h], ms, vs)
        });
    }
    let mut acc: [[__m512; 4]; H] = std::array::from_fn(|h| {
        <&[f32; 64]>::try_from(states[h].acc.as_slice())
            .map_or([_mm512_setzero_ps(); 4], |acc| load64(acc))
    });
    for ((_, value), steps) in cells.iter().zip(&steps) {
        let v = load_stored(*value);
        for (acc, &(raised, ms, vs)) in acc.iter_mut().zip(steps) {
            if raised {
                let factor = _mm512_set1_ps(ms);
                for a in acc.iter_mut() {
                    *a = round_f16(_mm512_mul_ps(*a, factor));
                }
            }
            let weight = _mm512_set1_ps(vs);
            for (a, v) in acc.iter_mut().zip(v) {
                *a = round_f16(_mm512_fmadd_ps(v, weight, *a));
            }
        }
    }
    for (h, state) in states.into_iter().enumerate() {
        state.max = max[h];
        state.sum = sum[h];
        for (chunk, a) in state.acc.chunks_exact_mut(16).zip(acc[h]) {
            // SAFETY: each chunk holds exactly 16 floats.
            unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), a) };
        }
    }
}

pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
    // SAFETY: the caller checked the instruction sets at run time.
    unsafe { swiglu_avx512(gate, up, out) }
}

pub fn quantize_block(block: &[f32; BLOCK]) -> ActivationBlock {
    // SAFETY: the caller checked the instruction sets at run time.
    unsafe { quantize_avx512(block) }
}

/// Returns how many leading elements it wrote (whole registers; the caller finishes the rest).
#[target_feature(enable = "avx512f,avx512dq")]
fn swiglu_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
    let mut done = 0;
    for ((g, u), o) in gate
        .chunks_exact(16)
        .zip(up.chunks_exact(16))
        .zip(out.chunks_exact_mut(16))
    {
        // SAFETY: each chunk holds exactly 16 floats.
        let (g, u) = unsafe { (_mm512_loadu_ps(g.as_ptr()), _mm512_loadu_ps(u.as_ptr())) };
        let y = _mm512_mul_ps(silu(g), u);
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), y) };
        done += 16;
    }
    done
}

/// `ggml_v_silu`.
#[target_feature(enable = "avx512f,avx512dq")]
fn silu(x: __m512) -> __m512 {
    let exp = expf(_mm512_sub_ps(_mm512_setzero_ps(), x));
    _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), exp))
}

/// `ggml_v_expf`, AVX-512 variant, constant for constant (`Flavor::expf` is its scalar definition).
#[target_feature(enable = "avx512f,avx512dq")]
fn expf(x: __m512) -> __m512 {
    let c = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
    let r = c(0x4b40_0000);
    let z = _mm512_fmadd_ps(x, c(0x3fb8_aa3b), r);
    let n = _mm512_sub_ps(z, r);
    let b = _mm512_fnmadd_ps(n, c(0x35bf_be8e), _mm512_fnmadd_ps(n, c(0x3f31_7200), x));
    let out_of_range = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
    let u = _mm512_mul_ps(b, b);
    let j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(
            _mm512_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
            u,
            _mm512_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
        ),
        u,
        _mm512_fmadd_ps(c(0x3f7f_fff6), b, _mm512_set1_ps(1.0)),
    );
    let res = _mm512_scalef_ps(j, n);
    if out_of_range == 0 {
        return res;
    }
    let zero = _mm512_setzero_ps();
    let alt = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero),
        _mm512_set1_ps(f32::INFINITY),
        zero,
    );
    _mm512_mask_blend_ps(out_of_range, res, alt)
}

/// One block of `quantize_row_q8_1`: scale from the largest magnitude, multiply by `127 / max`, round half to
/// even, saturate to i8; `d` and `s` through f16.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,f16c")]
fn quantize_avx512(block: &[f32; BLOCK]) -> ActivationBlock {
    // SAFETY: reads the block's 32 floats as two registers.
    let (v0, v1) = unsafe {
        (
            _mm512_loadu_ps(block.as_ptr()),
            _mm512_loadu_ps(block.as_ptr().add(16)),
        )
    };
    // The largest magnitude: max is exact, so the reduction order does not matter.
    let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    let d = max / 127.0;
    let inverse = if max != 0.0 { 127.0 / max } else { 0.0 };
    let scale = _mm512_set1_ps(inverse);
    let round = |v: __m512| {
        _mm512_cvtps_epi32(_mm512_roundscale_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm512_mul_ps(v, scale)))
    };
    let (i0, i1) = (round(v0), round(v1));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    let mut qs = [0i8; 32];
    // SAFETY: writes 16 bytes each into the 32-byte array.
    unsafe {
        _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128(qs.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(i1));
    }
    ActivationBlock {
        d: f16::from_f32(d).to_f32(),
        s: f16::from_f32(d * sum as f32).to_f32(),
        qs,
    }
}
