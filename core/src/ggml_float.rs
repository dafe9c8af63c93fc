//! llama.cpp's CPU float arithmetic, reproduced operation for operation, so that our forward gives llama.cpp's
//! logits bit for bit (the engine issue asks for its greedy output).
//!
//! ggml picks a CPU variant at run time; its vector width decides the order in which sums are paired and which
//! polynomial `exp` uses. [`Flavor`] names the two x86 variants we follow. Every function here is scalar code
//! with the vector code's exact sequence of roundings (`mul_add` where ggml uses an FMA instruction), checked
//! against values dumped from llama.cpp itself (see `core/tests/reference.rs`).

/// The ggml CPU variant whose arithmetic we follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// 16-lane AVX-512 builds (Skylake-X and later, Zen 4): what llama.cpp loads on a CPU with AVX-512.
    Avx512,
    /// 8-lane AVX2 builds (Haswell and later).
    Avx2,
}

impl Flavor {
    /// The variant llama.cpp loads on this CPU.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512dq")
            {
                return Flavor::Avx512;
            }
        }
        Flavor::Avx2
    }

    /// f32 lanes of one vector register.
    pub fn lanes(self) -> usize {
        match self {
            Flavor::Avx512 => 16,
            Flavor::Avx2 => 8,
        }
    }

    /// Sum of one register's lanes in the order ggml reduces it (`_mm512_reduce_add_ps`: halves, then halves
    /// again; AVX2: the two 128-bit halves, then two horizontal adds).
    #[inline]
    pub fn reduce(self, lanes: &[f32]) -> f32 {
        match self {
            Flavor::Avx512 => {
                let mut v = [0f32; 16];
                for (slot, &x) in v.iter_mut().zip(lanes) {
                    *slot = x;
                }
                let mut width = 8;
                while width >= 1 {
                    for i in 0..width {
                        v[i] += v[i + width];
                    }
                    width /= 2;
                }
                v[0]
            }
            Flavor::Avx2 => {
                let mut v = [0f32; 8];
                for (slot, &x) in v.iter_mut().zip(lanes) {
                    *slot = x;
                }
                let t = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
                (t[0] + t[1]) + (t[2] + t[3])
            }
        }
    }

    /// `ggml_v_expf`: the polynomial exp of ggml's vector code (softmax tiles, SiLU). Not libm's `expf`.
    pub fn expf(self, x: f32) -> f32 {
        let c = |bits: u32| f32::from_bits(bits);
        let r = c(0x4b40_0000); // 0x1.8p23
        let z = x.mul_add(c(0x3fb8_aa3b), r);
        let n = z - r;
        let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
        let u = b * b;
        let poly = c(0x3c07_2010)
            .mul_add(b, c(0x3d2b_9f17))
            .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)));
        match self {
            Flavor::Avx512 => {
                let j = poly.mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
                if n.abs() > 192.0 {
                    return if n <= 0.0 { 0.0 } else { f32::INFINITY };
                }
                // `_mm512_scalef_ps(j, n)`: j·2ⁿ rounded once (exact in f64, |n| ≤ 192; 2ⁿ built from its bits).
                let two_to_n = f64::from_bits(((n as i64 + 1023) as u64) << 52);
                (f64::from(j) * two_to_n) as f32
            }
            Flavor::Avx2 => {
                let j = poly.mul_add(u, c(0x3f7f_fff6) * b);
                let e = z.to_bits().wrapping_shl(23);
                let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
                if n.abs() <= 126.0 {
                    return k.mul_add(j, k);
                }
                let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
                let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
                if n.abs() > 192.0 {
                    return s1 * s1;
                }
                let s2 = f32::from_bits(e.wrapping_sub(g));
                s2.mul_add(j, s2) * s1
            }
        }
    }

    /// `ggml_v_silu`: x / (1 + exp(−x)) with ggml's vector exp.
    pub fn silu(self, x: f32) -> f32 {
        x / (1.0 + self.expf(0.0 - x))
    }

    /// `ggml_vec_dot_f16` on values already rounded to f16: four accumulators of one register each, then
    /// [`Flavor::reduce`]; leftovers beyond a multiple of four registers are added in f64.
    #[inline]
    pub fn dot_f16(self, x: &[f32], y: &[f32]) -> f32 {
        // The common case, a head of exactly four registers: f16 products are exact in f32, so the four
        // accumulators are plain products and only the pairing of the sums matters.
        if let (Flavor::Avx512, Ok(x), Ok(y)) =
            (self, <&[f32; 64]>::try_from(x), <&[f32; 64]>::try_from(y))
        {
            let mut r = [0f32; 16];
            for l in 0..16 {
                r[l] = (x[l] * y[l] + x[32 + l] * y[32 + l])
                    + (x[16 + l] * y[16 + l] + x[48 + l] * y[48 + l]);
            }
            return self.reduce(&r);
        }
        let lanes = self.lanes();
        let step = 4 * lanes;
        let full = x.len().min(y.len()) / step * step;
        let mut sums = [[0f32; 16]; 4];
        for (xs, ys) in x[..full]
            .chunks_exact(step)
            .zip(y[..full].chunks_exact(step))
        {
            for (j, sum) in sums.iter_mut().enumerate() {
                let (xj, yj) = (&xs[j * lanes..], &ys[j * lanes..]);
                for ((acc, &a), &b) in sum[..lanes].iter_mut().zip(xj).zip(yj) {
                    *acc = a.mul_add(b, *acc);
                }
            }
        }
        let mut reduced = [0f32; 16];
        for l in 0..lanes {
            reduced[l] = (sums[0][l] + sums[2][l]) + (sums[1][l] + sums[3][l]);
        }
        let mut total = f64::from(self.reduce(&reduced[..lanes]));
        for (a, b) in x[full..].iter().zip(&y[full..]) {
            total += f64::from(a * b);
        }
        total as f32
    }

    /// `ggml_vec_soft_max_f32`: writes exp(x − max) (ggml's vector exp) and returns their sum, each register
    /// reduced in f32 and the registers summed in f64.
    pub fn soft_max(self, x: &mut [f32], max: f32) -> f64 {
        let lanes = self.lanes();
        let mut sum = 0f64;
        let mut chunks = x.chunks_exact_mut(lanes);
        for chunk in &mut chunks {
            for v in chunk.iter_mut() {
                *v = self.expf(*v - max);
            }
            sum += f64::from(self.reduce(chunk));
        }
        for v in chunks.into_remainder() {
            *v = (*v - max).exp();
            sum += f64::from(*v);
        }
        sum
    }
}

/// The nearest f16 of `x` (ties to even; overflow to infinity), as an f32. Integer arithmetic on the bits, so
/// that loops over it vectorise; tested equal to `half`'s conversion (F16C) below.
#[inline]
pub fn round_f16(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let abs = bits & 0x7fff_ffff;
    // Normal f16 range (from 2^-14): keep 10 mantissa bits, ties to even, carrying into the exponent.
    let kept = (abs + 0x0fff + ((abs >> 13) & 1)) & 0xffff_e000;
    let normal = if kept > 0x477f_e000 {
        0x7f80_0000
    } else {
        kept
    };
    // Below 2^-14 f16 is subnormal: a fixed step of 2^-24, and x·2^24 < 2^10 is exact, so rounding it is too.
    let tiny = (f32::from_bits(abs) * 16_777_216.0).round_ties_even() * (1.0 / 16_777_216.0);
    let rounded = if abs >= 0x3880_0000 {
        normal
    } else {
        tiny.to_bits()
    };
    // NaN stays NaN (the arithmetic above could turn its payload into infinity).
    f32::from_bits(sign | if abs > 0x7f80_0000 { abs } else { rounded })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_is_close_to_exp_and_saturates_like_ggml() {
        for flavor in [Flavor::Avx512, Flavor::Avx2] {
            for i in -2000..2000 {
                let x = i as f32 * 0.043;
                let (ours, exact) = (flavor.expf(x), x.exp());
                assert!(
                    (ours - exact).abs() <= exact * 3e-7 + f32::MIN_POSITIVE,
                    "{flavor:?} exp({x}) = {ours}, libm {exact}"
                );
            }
            assert_eq!(flavor.expf(f32::NEG_INFINITY), 0.0);
            assert_eq!(flavor.expf(-200.0), 0.0);
            assert_eq!(flavor.expf(200.0), f32::INFINITY);
            assert_eq!(flavor.expf(0.0), 1.0);
        }
    }

    #[test]
    fn f16_dot_of_exact_products_is_the_sum() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) * 0.25).collect();
        let y: Vec<f32> = (0..64).map(|i| (i % 7) as f32 - 3.0).collect();
        let exact: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        for flavor in [Flavor::Avx512, Flavor::Avx2] {
            assert_eq!(flavor.dot_f16(&x, &y), exact);
        }
    }

    #[test]
    fn rounding_to_f16_equals_the_conversion_to_f16() {
        let mut bits = 0u32;
        // Every 97th bit pattern: all exponents, normal and subnormal f16, overflow, infinities, NaN.
        while let Some(next) = bits.checked_add(97) {
            let x = f32::from_bits(bits);
            let want = half::f16::from_f32(x).to_f32();
            let got = round_f16(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e} ({bits:#x}): {got:e}, f16 conversion {want:e}"
            );
            bits = next;
        }
    }

    #[test]
    fn rounding_to_f16_keeps_representable_values() {
        let v: Vec<f32> = [1.0, 0.5, 1.000_976_6, 65504.0, 1.0e-3, std::f32::consts::PI]
            .into_iter()
            .map(round_f16)
            .collect();
        assert_eq!(&v[..4], &[1.0, 0.5, 1.000_976_6, 65504.0]);
        assert_eq!(v[5], 3.140625);
    }
}
