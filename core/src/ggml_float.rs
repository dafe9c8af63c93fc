//! llama.cpp's CPU float arithmetic, reproduced operation for operation, so that our forward gives llama.cpp's
//! logits bit for bit (the engine issue asks for its greedy output).
//!
//! ggml picks a CPU variant at run time; its vector width decides the order in which sums are paired and which
//! polynomial `exp` uses. [`Flavor`] names the two x86 variants we follow. Every function here is scalar code
//! with the vector code's exact sequence of roundings (`mul_add` where ggml uses an FMA instruction), checked
//! against values dumped from llama.cpp itself (see `core/tests/reference.rs`).

use half::f16;
use half::slice::HalfFloatSliceExt;

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
                // `_mm512_scalef_ps(j, n)`: j·2ⁿ rounded once (exact in f64, |n| ≤ 192).
                (f64::from(j) * 2f64.powi(n as i32)) as f32
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
    pub fn dot_f16(self, x: &[f32], y: &[f32]) -> f32 {
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

/// Rounds every value to the nearest f16 (ties to even), as ggml's f16 stores do; F16C does 8 at a time.
pub fn round_to_f16(values: &mut [f32], scratch: &mut Vec<f16>) {
    scratch.clear();
    scratch.resize(values.len(), f16::ZERO);
    scratch.convert_from_f32_slice(values);
    scratch.convert_to_f32_slice(values);
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
    fn rounding_to_f16_keeps_representable_values() {
        let mut v = vec![1.0, 0.5, 1.000_976_6, 65504.0, 1.0e-3, std::f32::consts::PI];
        round_to_f16(&mut v, &mut Vec::new());
        assert_eq!(&v[..4], &[1.0, 0.5, 1.000_976_6, 65504.0]);
        assert_eq!(v[5], 3.140625);
    }
}
