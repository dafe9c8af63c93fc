//! The weight matrices of one projection, applied with our kernels ([`crate::kernels`]) or candle's.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::kernels::QuantMatrix;

/// Which matmul kernels the forward uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// Ours ([`crate::kernels`]) in ggml's `vec_dot` arithmetic: llama.cpp's on CPUs without AMX (and the
    /// fixtures'), several tokens per read of the weights, our thread pool. Formats they do not cover fall back to
    /// candle's.
    #[default]
    VecDot,
    /// Ours with the weights interleaved for per-block integer sums ([`crate::kernels::block_sums`]): llama.cpp's
    /// arithmetic on CPUs with AMX, and verification forwards that cost little more than a step. Needs AVX-512
    /// VNNI (AMX tiles where present).
    BlockSums,
    /// candle's `QMatMul` everywhere: bit-identical to candle-transformers' `quantized_llama`, which is how the
    /// parity test checks the rest of the forward.
    Candle,
}

impl Kernels {
    /// What llama.cpp's CPU backend runs on this CPU: its AMX kernels' arithmetic where it has AMX-INT8 (and the
    /// AVX-512 VNNI our version of it needs), `vec_dot` elsewhere.
    pub fn llama_cpp_here() -> Self {
        if crate::kernels::amx::available() && crate::kernels::block_sums::available() {
            Self::BlockSums
        } else {
            Self::VecDot
        }
    }

    /// The name the trace's model info (`matmul`) and `specula bench` use, and `--matmul` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::VecDot => "vec-dot",
            Self::BlockSums => "block-sums",
            Self::Candle => "candle",
        }
    }
}

/// One or more weight matrices applied to the same input (`y = x Wᵀ` each), returned separately.
pub(super) struct Projections {
    kernel: ProjectionKernel,
    /// Output width of each matrix, in order.
    widths: Vec<usize>,
}

enum ProjectionKernel {
    Candle(Vec<QMatMul>),
    /// The matrices stacked into one, so the input is quantized once and read in one pass.
    Specula(Arc<QuantMatrix>),
}

impl Projections {
    pub(super) fn load(tensors: Vec<Arc<QTensor>>, kernels: Kernels) -> Result<Self> {
        let widths = tensors
            .iter()
            .map(|t| t.shape().dims().first().copied().unwrap_or(0))
            .collect();
        if kernels != Kernels::Candle {
            let own: Option<Vec<QuantMatrix>> = tensors
                .iter()
                .map(|t| QuantMatrix::from_qtensor(t))
                .collect::<candle_core::Result<_>>()?;
            let stacked = own.and_then(|m| QuantMatrix::stack(&m.iter().collect::<Vec<_>>()));
            if let Some(mut matrix) = stacked {
                if kernels == Kernels::BlockSums {
                    matrix = matrix.interleaved();
                }
                return Ok(Self {
                    kernel: ProjectionKernel::Specula(Arc::new(matrix)),
                    widths,
                });
            }
        }
        let candle = tensors
            .into_iter()
            .map(QMatMul::from_arc)
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            kernel: ProjectionKernel::Candle(candle),
            widths,
        })
    }

    /// Our own kernels' matrix, while nothing else shares it (during loading).
    pub(super) fn matrix_mut(&mut self) -> Option<&mut QuantMatrix> {
        match &mut self.kernel {
            ProjectionKernel::Specula(matrix) => Arc::get_mut(matrix),
            ProjectionKernel::Candle(_) => None,
        }
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match &self.kernel {
            ProjectionKernel::Candle(matmuls) => Ok(matmuls
                .iter()
                .map(|m| m.forward(x))
                .collect::<candle_core::Result<_>>()?),
            ProjectionKernel::Specula(matrix) => {
                let mut dims = x.dims().to_vec();
                let cols = dims.pop().unwrap_or(0);
                if cols != matrix.cols {
                    return Err(Error::InvalidInput(format!(
                        "matmul: input width {cols}, weights expect {}",
                        matrix.cols
                    )));
                }
                let t = x.elem_count() / cols.max(1);
                let input = x.flatten_all()?.to_vec1::<f32>()?;
                let parts = self.forward_rows(&input, t)?;
                parts
                    .into_iter()
                    .zip(&self.widths)
                    .map(|(part, &w)| {
                        let mut shape = dims.clone();
                        shape.push(w);
                        Ok(Tensor::from_vec(part, shape, x.device())?)
                    })
                    .collect()
            }
        }
    }

    /// `x` holds `t` rows of the input width; returns each matrix's `t` output rows.
    pub(super) fn forward_rows(&self, x: &[f32], t: usize) -> Result<Vec<Vec<f32>>> {
        match &self.kernel {
            ProjectionKernel::Specula(matrix) => {
                if x.len() != t * matrix.cols {
                    return Err(Error::InvalidInput(format!(
                        "matmul: {} values are not {t} rows of {}",
                        x.len(),
                        matrix.cols
                    )));
                }
                let output = matrix.matmul(x, t);
                if let [_] = self.widths.as_slice() {
                    // One projection (o, down, the LM head): nothing to split, no copy.
                    return Ok(vec![output]);
                }
                let mut parts: Vec<Vec<f32>> = self
                    .widths
                    .iter()
                    .map(|w| Vec::with_capacity(t * w))
                    .collect();
                for row in output.chunks_exact(matrix.rows) {
                    let mut rest = row;
                    for (part, &w) in parts.iter_mut().zip(&self.widths) {
                        let (mine, tail) = rest.split_at(w.min(rest.len()));
                        part.extend_from_slice(mine);
                        rest = tail;
                    }
                }
                Ok(parts)
            }
            ProjectionKernel::Candle(_) => {
                let cols = x.len() / t.max(1);
                let input = Tensor::from_slice(x, (t, cols), &Device::Cpu)?;
                self.forward(&input)?
                    .into_iter()
                    .map(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
                    .collect()
            }
        }
    }

    /// The single output of a one-matrix projection, on rows.
    pub(super) fn forward_one_rows(&self, x: &[f32], t: usize) -> Result<Vec<f32>> {
        self.forward_rows(x, t)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::InvalidInput("projection without weights".into()))
    }
}
