//! Rounding f32 values to the nearest f16 (ties to even), as ggml's f16 stores do. llama.cpp's attention rounds
//! its running sum of values to f16 after every cell, so this runs 64 values at a time once per cell and head:
//! F16C converts 8 values per instruction. [`crate::ggml_float::round_f16`] is the scalar reference.

use crate::ggml_float::round_f16;

/// Rounds every value to the nearest f16, in place.
pub fn round_to_f16(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *F16C.get_or_init(|| {
            std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("avx")
        }) {
            simd::round_to_f16(values);
            return;
        }
    }
    for v in values {
        *v = round_f16(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::{
        _MM_FROUND_TO_NEAREST_INT, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps,
        _mm256_storeu_ps,
    };

    use crate::ggml_float::round_f16;

    pub fn round_to_f16(values: &mut [f32]) {
        // SAFETY: the caller checked F16C and AVX at run time.
        unsafe { round_with_f16c(values) }
    }

    #[target_feature(enable = "avx,f16c")]
    fn round_with_f16c(values: &mut [f32]) {
        let mut chunks = values.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: loads and stores exactly the 8 values of the chunk (unaligned).
            unsafe {
                let x = _mm256_loadu_ps(chunk.as_ptr());
                let half = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                _mm256_storeu_ps(chunk.as_mut_ptr(), _mm256_cvtph_ps(half));
            }
        }
        for v in chunks.into_remainder() {
            *v = round_f16(*v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_rounding_equals_the_scalar_reference() {
        let mut values: Vec<f32> = (0..100_003u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .filter(|x| !x.is_nan())
            .collect();
        let want: Vec<u32> = values.iter().map(|&x| round_f16(x).to_bits()).collect();
        round_to_f16(&mut values);
        let got: Vec<u32> = values.iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want);
    }
}
