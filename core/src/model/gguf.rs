//! Reading a Llama GGUF: its metadata into a [`Config`], its tensors by name, with errors that name the file.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::{QTensor, gguf_file};

use crate::error::{Error, Result};

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

pub(super) fn read_tensor(
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

/// A 1-D tensor (norm weights) as a vector.
pub(super) fn vector(tensor: QTensor, device: &Device) -> candle_core::Result<Vec<f32>> {
    tensor.dequantize(device)?.flatten_all()?.to_vec1::<f32>()
}

pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
