//! Our own Llama forward on candle-core's quantized tensors.
//!
//! candle-transformers' `quantized_llama` returns only the last position's logits, builds only causal masks,
//! hides its KV cache and captures nothing; decoding methods need all of that. This module computes the same
//! numbers (a test checks bit-parity with it) and adds: logits for every fed position, explicit positions and
//! masks (chains and trees), a KV cache that can be truncated, compacted and forked, attention and hidden-state
//! capture, and skipped layers for self-speculative drafts.
//!
//! Shapes: `b` batch rows (beams), `t` tokens fed this call, `s` = past + t keys, `h` query heads, `kv` key/value
//! heads (grouped-query attention: each kv head serves h/kv query heads), `d` head dimension.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{QTensor, gguf_file};

use crate::kernels::QuantMatrix;
use candle_core::{DType, Device, Tensor};

use crate::attention::{self, Arithmetic, AttentionJob, AttentionPath, Cells, KeyTiles};
use crate::error::{Error, Result};
use crate::ggml_float::Flavor;
pub use crate::kv_cache::KvCache;
use crate::kv_cache::LayerCache;
use crate::trace::{AttentionMap, ModelInfo};

mod gguf;
mod projections;

pub use gguf::{Config, read_gguf_header};
use gguf::{file_name, read_tensor, vector};
pub use projections::Kernels;
use projections::Projections;

struct Layer {
    attn_norm: Vec<f32>,
    /// Query, key and value projections of the normed input, computed together.
    qkv: Projections,
    wo: Projections,
    ffn_norm: Vec<f32>,
    /// Gate and up projections, computed together.
    gate_up: Projections,
    down: Projections,
}

/// The weights. Loaded once and shared (`Arc<Llama>`) by every run; all per-run state lives in [`KvCache`].
pub struct Llama {
    pub config: Config,
    pub info: ModelInfo,
    embeddings: Arc<QTensor>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    lm_head: Projections,
    /// RoPE tables, one row of d/2 values per position up to the context length.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// llama.cpp's rounding with our own kernels; exact f32 with candle's (the parity reference).
    arithmetic: Arithmetic,
    device: Device,
}

/// Which keys each fed token may attend to, among the tokens fed in the same call. Every fed token sees the
/// whole cache (the past) and itself.
#[derive(Clone, Debug, PartialEq)]
pub enum Mask {
    /// Token i sees fed tokens 0..=i: a chain.
    Causal,
    /// `parents[i]` is the index (among the fed tokens) of token i's parent, or `None` when it hangs directly off
    /// the past. Token i sees itself and its ancestors: a draft tree verified in one forward.
    Tree(Vec<Option<usize>>),
}

/// Which logits a forward returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last fed position's (prefill, plain decoding).
    Last,
    /// Every fed position's (verifying drafts).
    All,
}

/// What a forward computes besides logits. The default captures nothing and costs nothing extra.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capture {
    /// Layers whose attention probabilities to return.
    pub attention_layers: BTreeSet<usize>,
    /// With `attention_layers`: instead of whole (b, h, t, s) tensors, reduce each fed token's attention to an
    /// [`AttentionMap`] of its `k` largest weights per row as it is computed, since a long prompt's rows at
    /// every layer take gigabytes (30 layers × 9 heads × 512 × 2,000 f32 for one 512-token chunk).
    pub attention_top_k: Option<usize>,
    /// Return the residual stream after the embeddings and after every layer.
    pub hidden_states: bool,
    /// Layers to skip (self-speculative drafting). Skipped layers add nothing to the KV cache.
    pub skip_layers: BTreeSet<usize>,
    /// Feed a causal chunk as a prompt (as llama.cpp batches a prompt) even though every position's logits are
    /// asked for. A causal chunk asking for the last logits only is always fed as a prompt; anything else is fed
    /// as tokens decoded one at a time (drafts to verify), so that it gives their logits bit for bit.
    pub prompt: bool,
}

/// What `attend` keeps of the attention weights.
enum Keep<'a> {
    Nothing,
    /// Whole rows, as (b, h, t, s).
    Dense,
    /// Each fed token's rows, reduced into its map as layer `layer`.
    Maps {
        layer: usize,
        maps: &'a mut [AttentionMap],
    },
}

pub struct ForwardOutput {
    /// (b, n, vocab), n = 1 for [`Logits::Last`], t for [`Logits::All`].
    pub logits: Tensor,
    /// (layer, probabilities of shape (b, h, t, s)) for each captured layer, unless `attention_top_k` was set.
    pub attention: Vec<(usize, Tensor)>,
    /// With `attention_top_k`: one map per fed token (b·t, row-major), every captured layer in order.
    pub attention_maps: Vec<AttentionMap>,
    /// (b, t, dim) residual streams: index 0 after the embeddings, index i+1 after layer i (skipped layers repeat
    /// their input). Empty unless captured.
    pub hidden_states: Vec<Tensor>,
}

impl Llama {
    /// Loads the weights of a Llama-architecture GGUF, keeping the file's own quantized blocks.
    /// `file` and `ct` come from [`read_gguf_header`]; `sha256` is recorded in traces.
    pub fn load(
        path: &Path,
        file: &mut File,
        ct: &gguf_file::Content,
        sha256: String,
        kernels: Kernels,
    ) -> Result<Self> {
        if kernels == Kernels::BlockSums {
            crate::kernels::block_sums::require()?;
        }
        let device = Device::Cpu;
        let config = Config::from_gguf(ct, path)?;
        let file_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut tensor = |name: &str| -> Result<QTensor> {
            if !ct.tensor_infos.contains_key(name) {
                return Err(Error::MissingTensor {
                    path: path.to_owned(),
                    name: name.to_owned(),
                });
            }
            read_tensor(ct, file, name, &device).map_err(|e| Error::ModelFile {
                path: path.to_owned(),
                message: format!("tensor `{name}`: {e} (the file may be truncated or corrupt)"),
            })
        };
        let embeddings = Arc::new(tensor("token_embd.weight")?);
        let final_norm = vector(tensor("output_norm.weight")?, &device)?;
        // Tied embeddings: files without `output.weight` (SmolLM2) reuse the embedding matrix as the LM head.
        let lm_head = if ct.tensor_infos.contains_key("output.weight") {
            Arc::new(tensor("output.weight")?)
        } else {
            embeddings.clone()
        };
        let mut lm_head = Projections::load(vec![lm_head], kernels)?;
        let mut layers = Vec::with_capacity(config.n_layers);
        let mut weight_format = None;
        for i in 0..config.n_layers {
            let p = format!("blk.{i}");
            let wq = tensor(&format!("{p}.attn_q.weight"))?;
            weight_format.get_or_insert_with(|| format!("{:?}", wq.dtype()));
            let mut load = |name: &str| tensor(&format!("{p}.{name}.weight")).map(Arc::new);
            let qkv = vec![Arc::new(wq), load("attn_k")?, load("attn_v")?];
            let wo = vec![load("attn_output")?];
            let gate_up = vec![load("ffn_gate")?, load("ffn_up")?];
            let down = vec![load("ffn_down")?];
            let (qkv, wo) = (
                Projections::load(qkv, kernels)?,
                Projections::load(wo, kernels)?,
            );
            let gate_up = Projections::load(gate_up, kernels)?;
            let down = Projections::load(down, kernels)?;
            layers.push(Layer {
                attn_norm: vector(tensor(&format!("{p}.attn_norm.weight"))?, &device)?,
                qkv,
                wo,
                ffn_norm: vector(tensor(&format!("{p}.ffn_norm.weight"))?, &device)?,
                gate_up,
                down,
            });
        }
        // Our kernels' weights on huge pages, in the order the forward reads them (a failure leaves them where
        // they are, which only costs speed).
        let mut matrices: Vec<&mut QuantMatrix> = layers
            .iter_mut()
            .flat_map(|l| [&mut l.qkv, &mut l.wo, &mut l.gate_up, &mut l.down])
            .chain([&mut lm_head])
            .filter_map(Projections::matrix_mut)
            .collect();
        QuantMatrix::pack(&mut matrices);
        let (cos, sin) = rope_tables(config.head_dim, config.rope_base, config.context_length);
        let info = ModelInfo {
            name: ct
                .metadata
                .get("general.name")
                .and_then(|v| v.to_string().ok().cloned())
                .unwrap_or_else(|| file_name(path)),
            file_name: file_name(path),
            sha256,
            architecture: "llama".into(),
            weight_format: weight_format.unwrap_or_else(|| "unknown".into()),
            n_layers: config.n_layers,
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads,
            embedding_length: config.dim,
            vocab_size: config.vocab_size,
            context_length: config.context_length,
            file_bytes,
            prompt_matmul: None,
            matmul: (kernels == Kernels::BlockSums).then(|| kernels.name().to_owned()),
        };
        Ok(Self {
            config,
            info,
            embeddings,
            layers,
            final_norm,
            lm_head,
            cos,
            sin,
            arithmetic: match kernels {
                Kernels::VecDot | Kernels::BlockSums => Arithmetic::LlamaCpp(Flavor::detect()),
                Kernels::Candle => Arithmetic::Exact,
            },
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layers, self.arithmetic.cache_precision())
    }

    /// Feeds `tokens` (b rows of t tokens, row-major) at `positions` (same layout) under `mask`, appending their
    /// keys and values to `cache`.
    #[allow(clippy::too_many_arguments)] // each is an independent input of the forward; a struct would only rename them
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        positions: &[usize],
        batch: usize,
        mask: &Mask,
        logits: Logits,
        capture: &Capture,
    ) -> Result<ForwardOutput> {
        let cfg = &self.config;
        let b = batch.max(1);
        let t = tokens.len() / b;
        if t == 0 || tokens.len() != b * t || positions.len() != tokens.len() {
            return Err(Error::InvalidInput(format!(
                "forward: {} tokens and {} positions do not fill {b} rows",
                tokens.len(),
                positions.len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        if let Some(&bad) = positions.iter().find(|&&p| p >= cfg.context_length) {
            return Err(Error::InvalidInput(format!(
                "position {bad} is beyond the context length ({})",
                cfg.context_length
            )));
        }
        if let Mask::Tree(parents) = mask
            && (parents.len() != t
                || parents
                    .iter()
                    .enumerate()
                    .any(|(i, p)| p.is_some_and(|p| p >= i)))
        {
            return Err(Error::InvalidInput(format!(
                "tree mask: parents must list one earlier node (or none) for each of the {t} tokens"
            )));
        }
        let dev = &self.device;
        let (dim, rows) = (cfg.dim, b * t);
        let eps = cfg.rms_eps as f32;
        let ids = Tensor::from_slice(tokens, rows, dev)?;
        let mut x = self
            .embeddings
            .embedding(&ids)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let as_tensor = |v: &[f32]| Tensor::from_slice(v, (b, t, dim), dev);
        let visible = visibility(mask, t);
        let prompt_like = *mask == Mask::Causal && (logits == Logits::Last || capture.prompt);
        let paths = attention::paths(t, prompt_like);

        let mut out = ForwardOutput {
            logits: Tensor::zeros(1, DType::F32, dev)?,
            attention: vec![],
            attention_maps: vec![],
            hidden_states: vec![],
        };
        let top_k = capture
            .attention_top_k
            .filter(|_| !capture.attention_layers.is_empty());
        if let Some(k) = top_k {
            // A map's rows share one width, so every captured layer must see the same keys.
            if !capture.skip_layers.is_empty() {
                return Err(Error::InvalidInput(
                    "attention maps cannot be captured while layers are skipped".into(),
                ));
            }
            let past = cache.layer_len(0);
            out.attention_maps = (0..rows)
                .map(|r| {
                    let i = r % t;
                    let seen = past + (0..t).filter(|&j| visible[i * t + j]).count();
                    AttentionMap::new(positions[r], cfg.n_heads, k.max(1).min(seen))
                })
                .collect();
        }
        if capture.hidden_states {
            out.hidden_states.push(as_tensor(&x)?);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if capture.skip_layers.contains(&i) {
                if capture.hidden_states {
                    out.hidden_states.push(as_tensor(&x)?);
                }
                continue;
            }
            let past = cache.layer_len(i);
            let h = rms_norm(&x, &layer.attn_norm, eps);
            let qkv = layer.qkv.forward_rows(&h, rows)?;
            let [q, k, v] = qkv.as_slice() else {
                return Err(Error::InvalidInput("q/k/v projection shape".into()));
            };
            let (mut q, mut k) = (q.clone(), k.clone());
            self.rope(&mut q, positions);
            self.rope(&mut k, positions);
            // The cache rounds them to what it stores (f16 in llama.cpp's arithmetic).
            cache.append(i, b, t, &k, v)?;
            let layer_cache = cache
                .layers
                .get(i)
                .ok_or_else(|| Error::InvalidInput(format!("no cache slot for layer {i}")))?;
            let keep = match top_k {
                _ if !capture.attention_layers.contains(&i) => Keep::Nothing,
                Some(_) => Keep::Maps {
                    layer: i,
                    maps: &mut out.attention_maps,
                },
                None => Keep::Dense,
            };
            let (y, probs) = self.attend(layer_cache, &q, &visible, &paths, b, t, past, keep)?;
            if let Some(probs) = probs {
                let s = past + t;
                out.attention
                    .push((i, Tensor::from_vec(probs, (b, cfg.n_heads, t, s), dev)?));
            }
            add_in_place(&mut x, &layer.wo.forward_one_rows(&y, rows)?);
            let h = rms_norm(&x, &layer.ffn_norm, eps);
            let gate_up = layer.gate_up.forward_rows(&h, rows)?;
            let [gate, up] = gate_up.as_slice() else {
                return Err(Error::InvalidInput("gate/up projection shape".into()));
            };
            let act: Vec<f32> = match self.arithmetic {
                Arithmetic::LlamaCpp(flavor) => crate::kernels::vector::swiglu(flavor, gate, up),
                Arithmetic::Exact => gate.iter().zip(up).map(|(&g, &u)| silu(g) * u).collect(),
            };
            add_in_place(&mut x, &layer.down.forward_one_rows(&act, rows)?);
            if capture.hidden_states {
                out.hidden_states.push(as_tensor(&x)?);
            }
        }
        let (x, n) = match logits {
            Logits::Last => (
                x.chunks_exact(t * dim)
                    .flat_map(|row| row.get((t - 1) * dim..).unwrap_or_default())
                    .copied()
                    .collect(),
                1,
            ),
            Logits::All => (x, t),
        };
        let normed = rms_norm(&x, &self.final_norm, eps);
        let logits = self.lm_head.forward_one_rows(&normed, b * n)?;
        out.logits = Tensor::from_vec(logits, (b, n, cfg.vocab_size), dev)?;
        Ok(out)
    }

    /// Final norm and LM head on residual streams of shape (..., dim): the model's output, or the logit lens
    /// when applied to an intermediate layer's hidden state.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = self.final_norm(hidden)?;
        let mut dims = normed.dims().to_vec();
        let rows = normed.elem_count() / self.config.dim.max(1);
        let logits = self
            .lm_head
            .forward_one_rows(&normed.flatten_all()?.to_vec1::<f32>()?, rows)?;
        dims.pop();
        dims.push(self.config.vocab_size);
        Ok(Tensor::from_vec(logits, dims, &self.device)?)
    }

    /// The final RMS norm alone: the last-layer representation Hugging Face reports as `hidden_states[-1]`
    /// (contrastive search compares these).
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = hidden.flatten_all()?.to_vec1::<f32>()?;
        let normed = rms_norm(&x, &self.final_norm, self.config.rms_eps as f32);
        Ok(Tensor::from_vec(normed, hidden.dims(), &self.device)?)
    }

    /// Rotates each head's pairs of values by its token's position (interleaved RoPE, as `rope_i`).
    fn rope(&self, x: &mut [f32], positions: &[usize]) {
        let half = self.config.head_dim / 2;
        let width = x.len() / positions.len().max(1);
        for (row, &pos) in x.chunks_exact_mut(width.max(1)).zip(positions) {
            let (Some(cos), Some(sin)) = (
                self.cos.get(pos * half..(pos + 1) * half),
                self.sin.get(pos * half..(pos + 1) * half),
            ) else {
                continue;
            };
            for head in row.chunks_exact_mut(2 * half) {
                for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                    let (x0, x1) = (pair[0], pair[1]);
                    // ggml's rope, as compiled: the first product of each sum fused into an FMA.
                    pair[0] = x0.mul_add(c, -(x1 * s));
                    pair[1] = x0.mul_add(s, x1 * c);
                }
            }
        }
    }

    /// Attention of the `t` fed tokens of each of `b` rows over the layer's cache (which already holds them).
    /// Returns the (b·t) × (h·d) outputs and, with [`Keep::Dense`], the probabilities as (b, h, t, s).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        cache: &LayerCache,
        q: &[f32],
        visible: &[bool],
        paths: &[AttentionPath],
        b: usize,
        t: usize,
        past: usize,
        mut keep: Keep<'_>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let cfg = &self.config;
        let (heads, kv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        if let (Arithmetic::LlamaCpp(flavor), Keep::Nothing) = (self.arithmetic, &keep) {
            let job = Arc::new(AttentionJob::new(
                flavor,
                cache.keys.iter().take(b).cloned().collect(),
                cache.values.iter().take(b).cloned().collect(),
                q.to_vec(),
                visible.to_vec(),
                paths.to_vec(),
                (t, past),
                (heads, kv, d),
            ));
            crate::kernels::compute_pool().run(job.clone());
            return Ok((job.output(), None));
        }
        let group = heads / kv.max(1);
        let (s, width) = (past + t, kv * d);
        let mut y = vec![0f32; b * t * heads * d];
        let keep_probs = !matches!(keep, Keep::Nothing);
        let mut probs = matches!(keep, Keep::Dense).then(|| vec![0f32; b * heads * t * s]);
        // A token's weights, head by head, while its map is built.
        let mut token_weights: Vec<Vec<f32>> = Vec::new();
        let mut cells_seen = Vec::with_capacity(s);
        let tiled = paths.contains(&AttentionPath::Tiled);
        for (row, (keys, values)) in cache.keys.iter().zip(&cache.values).enumerate().take(b) {
            let tiles = tiled.then(|| KeyTiles::new(keys.as_slice(), kv, d, s));
            for i in 0..t {
                let token = row * t + i;
                cells_seen.clear();
                cells_seen.extend(0..past);
                cells_seen.extend((0..t).filter(|&j| visible[i * t + j]).map(|j| past + j));
                let cells = Cells {
                    keys: keys.as_slice(),
                    values: values.as_slice(),
                    width,
                    visible: &cells_seen,
                    tiles: tiles.as_ref(),
                };
                let path = paths.get(i).copied().unwrap_or(AttentionPath::Online);
                token_weights.clear();
                for head in 0..heads {
                    let at = (token * heads + head) * d;
                    let (Some(query), Some(out)) = (q.get(at..at + d), y.get_mut(at..at + d))
                    else {
                        continue;
                    };
                    let weights = match self.arithmetic {
                        Arithmetic::LlamaCpp(flavor) => {
                            attention::llama_cpp_head(
                                flavor,
                                path,
                                query,
                                &cells,
                                head / group,
                                out,
                            );
                            // The weights are not part of the online softmax: computed apart, for display.
                            keep_probs
                                .then(|| attention::exact_weights(query, &cells, head / group))
                        }
                        Arithmetic::Exact => {
                            Some(attention::exact_head(query, &cells, head / group, out))
                        }
                    };
                    match (probs.as_mut(), weights) {
                        (Some(probs), Some(weights)) => {
                            let at = ((row * heads + head) * t + i) * s;
                            for (&w, &cell) in weights.iter().zip(&cells_seen) {
                                if let Some(slot) = probs.get_mut(at + cell) {
                                    *slot = w;
                                }
                            }
                        }
                        (None, Some(weights)) => token_weights.push(weights),
                        _ => {}
                    }
                }
                if let Keep::Maps { layer, maps } = &mut keep {
                    let map = maps.get_mut(token).ok_or_else(|| {
                        Error::InvalidInput(format!("no attention map for fed token {token}"))
                    })?;
                    crate::inspect::push_layer(map, *layer, &token_weights, &cells_seen)?;
                }
            }
        }
        Ok((y, probs))
    }
}

/// `visible[i * t + j]`: whether fed token i sees fed token j (every token sees the whole past).
fn visibility(mask: &Mask, t: usize) -> Vec<bool> {
    let mut visible = vec![false; t * t];
    for i in 0..t {
        for j in 0..t {
            visible[i * t + j] = match mask {
                Mask::Causal => j <= i,
                Mask::Tree(parents) => is_ancestor_or_self(parents, j, i),
            };
        }
    }
    visible
}

/// RMS norm of each row times the weight, as ggml computes it (sum of squares in f64).
fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len().max(1);
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / dim as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(&v, &w)| (v * scale) * w));
    }
    out
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn is_ancestor_or_self(parents: &[Option<usize>], ancestor: usize, node: usize) -> bool {
    let mut cur = Some(node);
    while let Some(n) = cur {
        if n == ancestor {
            return true;
        }
        cur = parents.get(n).copied().flatten();
    }
    false
}

fn rope_tables(head_dim: usize, base: f32, context: usize) -> (Vec<f32>, Vec<f32>) {
    let theta_scale = base.powf(-2.0 / head_dim as f32);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..context {
        let mut theta = p as f32;
        for _ in 0..head_dim / 2 {
            cos.push(theta.cos());
            sin.push(theta.sin());
            theta *= theta_scale;
        }
    }
    (cos, sin)
}

/// One position's logits as a vector.
pub fn logits_row(logits: &Tensor, batch_row: usize, position: usize) -> Result<Vec<f32>> {
    Ok(logits
        .get(batch_row)?
        .get(position)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}
