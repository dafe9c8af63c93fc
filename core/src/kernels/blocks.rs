//! GGUF block layouts and the quantization of activations, exactly as ggml's x86 CPU backend does it.

use half::f16;

/// Values per block in every format here.
pub const BLOCK: usize = 32;

/// GGUF `Q4_1`: 32 weights stored as `d * q + m` with 4-bit `q`. Element `j < 16` is the low nibble of `qs[j]`,
/// element `j + 16` its high nibble. 20 bytes on disk and in memory.
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

/// GGUF `Q8_0`: 32 weights stored as `d * q` with signed 8-bit `q`. 34 bytes.
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// One block of quantized activations: ggml's `block_q8_1` (for Q4_1 weights) or `block_q8_0` (for Q8_0
/// weights; `s` unused). ggml stores `d` and `s` as f16; they are kept here already widened (the same values), so
/// the kernels convert once per activation block instead of once per weight row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActivationBlock {
    pub d: f32,
    /// `d * sum(qs)`, rounded through f16: the Q4_1 kernel's `m` term needs it.
    pub s: f32,
    pub qs: [i8; 32],
}

impl BlockQ4_1 {
    pub const BYTES: usize = 20;

    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        let (head, qs) = b.split_at(4);
        let mut block = Self {
            d: f16::from_le_bytes([head[0], head[1]]),
            m: f16::from_le_bytes([head[2], head[3]]),
            qs: [0; 16],
        };
        block.qs.copy_from_slice(qs);
        block
    }

    /// The 32 weights as integers 0..=15, in element order.
    pub fn nibbles(&self) -> [u8; 32] {
        let mut q = [0u8; 32];
        for (j, &byte) in self.qs.iter().enumerate() {
            q[j] = byte & 0x0F;
            q[j + 16] = byte >> 4;
        }
        q
    }

    pub fn dequantize(&self) -> [f32; 32] {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        self.nibbles().map(|q| d * f32::from(q) + m)
    }
}

impl BlockQ8_0 {
    pub const BYTES: usize = 34;

    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        let (head, qs) = b.split_at(2);
        let mut block = Self {
            d: f16::from_le_bytes([head[0], head[1]]),
            qs: [0; 32],
        };
        for (q, &byte) in block.qs.iter_mut().zip(qs) {
            *q = i8::from_le_bytes([byte]);
        }
        block
    }

    pub fn dequantize(&self) -> [f32; 32] {
        let d = self.d.to_f32();
        self.qs.map(|q| d * f32::from(q))
    }
}

/// Quantizes a row of activations (length a multiple of 32) as ggml's AVX2 `quantize_row_q8_1` /
/// `quantize_row_q8_0` do: scale from the block's largest magnitude, multiply by `127 / max`, round half to even,
/// `d` and `s` rounded through f16. Runs ggml's AVX-512 code where the CPU has it ([`super::vector`]).
pub fn quantize_activations(row: &[f32], out: &mut Vec<ActivationBlock>) {
    super::vector::quantize_row(row, out);
}

/// [`quantize_activations`] in portable scalar code: the definition the vector version is tested against.
pub fn quantize_activations_reference(row: &[f32], out: &mut Vec<ActivationBlock>) {
    for block in row.chunks_exact(BLOCK) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        let inverse = if max != 0.0 { 127.0 / max } else { 0.0 };
        let mut qs = [0i8; 32];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(block) {
            // |v * inverse| <= 127 up to one rounding step, which the saturating cast absorbs as packs does.
            let rounded = (v * inverse).round_ties_even() as i32;
            sum += rounded;
            *q = rounded.clamp(-128, 127) as i8;
        }
        out.push(ActivationBlock {
            d: f16::from_f32(d).to_f32(),
            s: f16::from_f32(d * sum as f32).to_f32(),
            qs,
        });
    }
}
