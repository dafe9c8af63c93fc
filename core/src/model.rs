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
use std::io::{Read, Seek};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::trace::ModelInfo;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub dim: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
}

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

/// The weights. Loaded once and shared (`Arc<Llama>`) by every run; all per-run state lives in [`KvCache`].
pub struct Llama {
    pub config: Config,
    pub info: ModelInfo,
    embeddings: Arc<QTensor>,
    layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: QMatMul,
    /// RoPE tables, one row per position up to the context length: (context, d/2).
    cos: Tensor,
    sin: Tensor,
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
    /// Return the residual stream after the embeddings and after every layer.
    pub hidden_states: bool,
    /// Layers to skip (self-speculative drafting). Skipped layers add nothing to the KV cache.
    pub skip_layers: BTreeSet<usize>,
}

pub struct ForwardOutput {
    /// (b, n, vocab), n = 1 for [`Logits::Last`], t for [`Logits::All`].
    pub logits: Tensor,
    /// (layer, probabilities of shape (b, h, t, s)) for each captured layer.
    pub attention: Vec<(usize, Tensor)>,
    /// (b, t, dim) residual streams: index 0 after the embeddings, index i+1 after layer i (skipped layers repeat
    /// their input). Empty unless captured.
    pub hidden_states: Vec<Tensor>,
}

/// Per-layer keys and values, shape (b, kv, len, d). Cloning is cheap (candle tensors are reference counted and
/// never mutated in place), which is what makes forking runs and beams cheap.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }

    /// Cached positions in a layer. Layers differ only on a draft copy that skipped some layers.
    pub fn layer_len(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(Some((k, _))) => k.dims().get(2).copied().unwrap_or(0),
            _ => 0,
        }
    }

    /// Cached positions of the full model (the longest layer).
    pub fn len(&self) -> usize {
        (0..self.layers.len())
            .map(|i| self.layer_len(i))
            .max()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch rows (beams) held.
    pub fn batch(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.dims()[0])
            .unwrap_or(1)
    }

    /// Forgets every position from `len` on (rolling back rejected drafts).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let cur = k.dim(2)?;
            if len < cur {
                *k = k.narrow(2, 0, len)?;
                *v = v.narrow(2, 0, len)?;
            }
        }
        Ok(())
    }

    /// Keeps only the given positions, in the given order (the accepted path of a verified draft tree).
    pub fn keep(&mut self, positions: &[usize]) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let len = k.dim(2)?;
            if let Some(bad) = positions.iter().find(|&&p| p >= len) {
                return Err(Error::InvalidInput(format!(
                    "cannot keep position {bad} of a cache holding {len}"
                )));
            }
            let idx = Tensor::from_iter(positions.iter().map(|&p| p as u32), k.device())?;
            *k = k.index_select(&idx, 2)?;
            *v = v.index_select(&idx, 2)?;
        }
        Ok(())
    }

    /// Rebuilds the batch from the given rows, repeating or reordering them (beam search).
    pub fn select_batch(&mut self, rows: &[usize]) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let b = k.dim(0)?;
            if let Some(bad) = rows.iter().find(|&&r| r >= b) {
                return Err(Error::InvalidInput(format!(
                    "cannot select batch row {bad} of a cache holding {b}"
                )));
            }
            let idx = Tensor::from_iter(rows.iter().map(|&r| r as u32), k.device())?;
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("no cache slot for layer {layer}")))?;
        let kv = match slot.take() {
            None => (k, v),
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
        };
        *slot = Some(kv.clone());
        Ok(kv)
    }
}

/// Reads a metadata value, naming the key in the error.
fn meta<'a>(ct: &'a gguf_file::Content, path: &Path, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata.get(key).ok_or_else(|| Error::MissingMetadata {
        path: path.to_owned(),
        key: key.to_owned(),
    })
}

fn meta_usize(ct: &gguf_file::Content, path: &Path, key: &str) -> Result<usize> {
    let v = meta(ct, path, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| Error::ModelFile {
            path: path.to_owned(),
            message: format!("metadata `{key}`: {e}"),
        })
}

fn meta_f32(ct: &gguf_file::Content, path: &Path, key: &str) -> Result<f32> {
    meta(ct, path, key)?.to_f32().map_err(|e| Error::ModelFile {
        path: path.to_owned(),
        message: format!("metadata `{key}`: {e}"),
    })
}

/// Opens a GGUF and parses its header (metadata and tensor table), with errors that name the file.
pub fn read_gguf_header(path: &Path) -> Result<(File, gguf_file::Content)> {
    let mut file = File::open(path).map_err(|e| Error::ModelFile {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| Error::ModelFile {
        path: path.to_owned(),
        message: format!("not a readable GGUF file ({e})"),
    })?;
    Ok((file, content))
}

impl Config {
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let arch = meta(ct, path, "general.architecture")?
            .to_string()
            .map_err(|e| Error::ModelFile {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        if arch != "llama" {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_owned(),
                architecture: arch.clone(),
            });
        }
        let n_heads = meta_usize(ct, path, "llama.attention.head_count")?;
        let n_kv_heads = meta_usize(ct, path, "llama.attention.head_count_kv").unwrap_or(n_heads);
        let dim = meta_usize(ct, path, "llama.embedding_length")?;
        let n_layers = meta_usize(ct, path, "llama.block_count")?;
        let rms_eps = f64::from(meta_f32(
            ct,
            path,
            "llama.attention.layer_norm_rms_epsilon",
        )?);
        let rope_base = meta_f32(ct, path, "llama.rope.freq_base").unwrap_or(10_000.0);
        let context_length = meta_usize(ct, path, "llama.context_length").unwrap_or(4096);
        let bad = |message: String| Error::ModelFile {
            path: path.to_owned(),
            message,
        };
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || dim % n_heads != 0 {
            return Err(bad(format!(
                "inconsistent attention shape: {n_heads} heads, {n_kv_heads} kv heads, dim {dim}"
            )));
        }
        let head_dim = dim / n_heads;
        if let Ok(rope_dim) = meta_usize(ct, path, "llama.rope.dimension_count")
            && rope_dim != head_dim
        {
            return Err(bad(format!(
                "partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
            )));
        }
        let vocab_size = match ct.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims().first().copied().unwrap_or(0),
            None => {
                return Err(Error::MissingTensor {
                    path: path.to_owned(),
                    name: "token_embd.weight".into(),
                });
            }
        };
        Ok(Self {
            n_layers,
            n_heads,
            n_kv_heads,
            dim,
            head_dim,
            vocab_size,
            context_length,
            rms_eps,
            rope_base,
        })
    }
}

impl Llama {
    /// Loads the weights of a Llama-architecture GGUF, keeping the file's own quantized blocks.
    /// `file` and `ct` come from [`read_gguf_header`]; `sha256` is recorded in traces.
    pub fn load(
        path: &Path,
        file: &mut File,
        ct: &gguf_file::Content,
        sha256: String,
    ) -> Result<Self> {
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
        let final_norm = tensor("output_norm.weight")?.dequantize(&device)?;
        // Tied embeddings: files without `output.weight` (SmolLM2) reuse the embedding matrix as the LM head.
        let lm_head = if ct.tensor_infos.contains_key("output.weight") {
            QMatMul::from_qtensor(tensor("output.weight")?)?
        } else {
            QMatMul::from_arc(embeddings.clone())?
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        let mut weight_format = None;
        for i in 0..config.n_layers {
            let p = format!("blk.{i}");
            let wq = tensor(&format!("{p}.attn_q.weight"))?;
            weight_format.get_or_insert_with(|| format!("{:?}", wq.dtype()));
            layers.push(Layer {
                attn_norm: tensor(&format!("{p}.attn_norm.weight"))?.dequantize(&device)?,
                wq: QMatMul::from_qtensor(wq)?,
                wk: QMatMul::from_qtensor(tensor(&format!("{p}.attn_k.weight"))?)?,
                wv: QMatMul::from_qtensor(tensor(&format!("{p}.attn_v.weight"))?)?,
                wo: QMatMul::from_qtensor(tensor(&format!("{p}.attn_output.weight"))?)?,
                ffn_norm: tensor(&format!("{p}.ffn_norm.weight"))?.dequantize(&device)?,
                w_gate: QMatMul::from_qtensor(tensor(&format!("{p}.ffn_gate.weight"))?)?,
                w_up: QMatMul::from_qtensor(tensor(&format!("{p}.ffn_up.weight"))?)?,
                w_down: QMatMul::from_qtensor(tensor(&format!("{p}.ffn_down.weight"))?)?,
            });
        }
        let (cos, sin) = rope_tables(
            config.head_dim,
            config.rope_base,
            config.context_length,
            &device,
        )?;
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
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layers)
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
        let ids = Tensor::from_slice(tokens, (b, t), dev)?;
        let mut x = self.embeddings.embedding(&ids)?;
        let pos = Tensor::from_iter(positions.iter().map(|&p| p as u32), dev)?;
        let half = cfg.head_dim / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, t, half))?;

        let mut out = ForwardOutput {
            logits: Tensor::zeros(1, DType::F32, dev)?,
            attention: vec![],
            hidden_states: vec![],
        };
        if capture.hidden_states {
            out.hidden_states.push(x.clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if capture.skip_layers.contains(&i) {
                if capture.hidden_states {
                    out.hidden_states.push(x.clone());
                }
                continue;
            }
            let past = cache.layer_len(i);
            let mask = attention_mask(mask, t, past, dev)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps as f32)?;
            let (attn, probs) =
                self.attention(layer, i, cache, &h, &cos, &sin, mask.as_ref(), b, t)?;
            if capture.attention_layers.contains(&i) {
                out.attention.push((i, probs));
            }
            x = (attn + &x)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps as f32)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let mlp = layer.w_down.forward(&(gate * layer.w_up.forward(&h)?)?)?;
            x = (mlp + &x)?;
            if capture.hidden_states {
                out.hidden_states.push(x.clone());
            }
        }
        let x = match logits {
            Logits::Last => x.narrow(1, t - 1, 1)?,
            Logits::All => x,
        };
        out.logits = self.head(&x)?;
        Ok(out)
    }

    /// Final norm and LM head on residual streams of shape (..., dim): the model's output, or the logit lens
    /// when applied to an intermediate layer's hidden state.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.final_norm(hidden)?)?)
    }

    /// The final RMS norm alone: the last-layer representation Hugging Face reports as `hidden_states[-1]`
    /// (contrastive search compares these).
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            hidden,
            &self.final_norm,
            self.config.rms_eps as f32,
        )?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        cache: &mut KvCache,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        b: usize,
        t: usize,
    ) -> Result<(Tensor, Tensor)> {
        let cfg = &self.config;
        let (h, kv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let q = layer
            .wq
            .forward(x)?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = layer
            .wk
            .forward(x)?
            .reshape((b, t, kv, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = layer
            .wv
            .forward(x)?
            .reshape((b, t, kv, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = candle_nn::rotary_emb::rope_i(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, cos, sin)?;
        let (k, v) = cache.append(index, k, v)?;
        let s = k.dim(2)?;
        // Grouped-query attention: each kv head serves h/kv query heads. Repeating K/V (as candle's stock
        // quantized_llama does) costs a small copy; multiplying grouped queries against the shared heads instead
        // changes the gemm's blocking, and through the 8-bit activation quantization downstream that rounding
        // grows to ~0.6 in the logits. Bit-parity with the reference is worth the copy.
        let rep = h / kv;
        let k = Tensor::cat(&vec![&k; rep], 2)?.reshape((b, h, s, d))?;
        let v = Tensor::cat(&vec![&v; rep], 2)?.reshape((b, h, s, d))?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v.contiguous()?)?;
        let y = y.transpose(1, 2)?.reshape((b, t, h * d))?;
        Ok((layer.wo.forward(&y)?, probs))
    }
}

/// Additive mask (0 = visible, -inf = hidden) of shape (t, past + t), or `None` when nothing is hidden.
fn attention_mask(mask: &Mask, t: usize, past: usize, dev: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let s = past + t;
    let mut data = vec![0f32; t * s];
    for i in 0..t {
        for j in 0..t {
            let visible = match mask {
                Mask::Causal => j <= i,
                Mask::Tree(parents) => is_ancestor_or_self(parents, j, i),
            };
            if !visible {
                data[i * s + past + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(data, (t, s), dev)?))
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

fn read_tensor(
    ct: &gguf_file::Content,
    file: &mut File,
    name: &str,
    device: &Device,
) -> candle_core::Result<QTensor> {
    // candle reads the tensor with `read_exact`; a truncated file surfaces as an io error here.
    let mut reader = ReadSeek(file);
    ct.tensor(&mut reader, name, device)
}

struct ReadSeek<'a>(&'a mut File);

impl Read for ReadSeek<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Seek for ReadSeek<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

fn rope_tables(
    head_dim: usize,
    base: f32,
    context: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    // Same arithmetic as candle-transformers' quantized_llama, so the logits match it bit for bit.
    let theta: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), dev)?;
    let idx = Tensor::arange(0, context as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((context, 1))?;
    let freqs = idx.matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One position's logits as a vector.
pub fn logits_row(logits: &Tensor, batch_row: usize, position: usize) -> Result<Vec<f32>> {
    Ok(logits
        .get(batch_row)?
        .get(position)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}
