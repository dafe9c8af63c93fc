//! [`AttentionJob`]: one layer's attention for every fed token and query head, split across the compute pool's
//! threads, each (token, head) computed exactly as on one thread.

use std::sync::{Arc, Mutex, PoisonError};

use super::{AttentionPath, Cells, KeyTiles, llama_cpp_heads, normalise};
use crate::ggml_float::Flavor;
use crate::kernels::f16::round_to_f16;
use crate::kernels::pool::Job;
use crate::kernels::vector::OnlineSoftmax;
use crate::kv_cache::Row;

/// One layer's attention in llama.cpp's arithmetic for every fed token and query head, split across the compute
/// pool's threads (each (token, head) is computed exactly as on one thread).
pub struct AttentionJob {
    pub flavor: Flavor,
    /// Per batch row: the cache's keys and values, and their tiles when some token takes the tiled path.
    pub keys: Vec<Arc<Row>>,
    pub values: Vec<Arc<Row>>,
    pub tiles: Vec<Option<KeyTiles>>,
    /// (b·t) × heads × d queries.
    pub queries: Vec<f32>,
    /// `visible[i * t + j]`: whether fed token i sees fed token j.
    pub visible: Vec<bool>,
    pub paths: Vec<AttentionPath>,
    pub t: usize,
    pub past: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    /// Every token takes the one-token path with 64-wide heads on AVX-512: a unit is then a block of a row's
    /// tokens and one key-value head, and the past cells, which every token sees, are read once for the block.
    batched: bool,
    results: Vec<Mutex<Vec<f32>>>,
}

/// Tokens of a row that share one pass over the past cells in a batched job (12 query heads for a model with
/// three heads per key-value head).
const TOKENS_PER_BLOCK: usize = 4;

/// (token, key-value head) pairs per chunk: each is a few query heads' work, so one per chunk lets two threads
/// share evenly.
const UNITS_PER_CHUNK: usize = 1;

impl AttentionJob {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        flavor: Flavor,
        keys: Vec<Arc<Row>>,
        values: Vec<Arc<Row>>,
        queries: Vec<f32>,
        visible: Vec<bool>,
        paths: Vec<AttentionPath>,
        (t, past): (usize, usize),
        (heads, kv_heads, d): (usize, usize, usize),
    ) -> Self {
        let tiles = keys
            .iter()
            .map(|k| {
                paths
                    .contains(&AttentionPath::Tiled)
                    .then(|| KeyTiles::new(k.as_slice(), kv_heads, d, past + t))
            })
            .collect();
        let batched = flavor == Flavor::Avx512
            && d == 64
            && kv_heads > 0
            && heads % kv_heads == 0
            && paths.iter().all(|&p| p == AttentionPath::Online)
            && crate::kernels::vector::available();
        let per_row = if batched {
            t.div_ceil(TOKENS_PER_BLOCK)
        } else {
            t
        };
        let units = keys.len() * per_row * kv_heads.max(1);
        Self {
            batched,
            flavor,
            keys,
            values,
            tiles,
            queries,
            visible,
            paths,
            t,
            past,
            heads,
            kv_heads,
            d,
            results: (0..units.div_ceil(UNITS_PER_CHUNK))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        }
    }

    /// The (b·t) × heads × d outputs, once the pool has run every chunk.
    pub fn output(&self) -> Vec<f32> {
        if !self.batched {
            let mut y = Vec::with_capacity(self.queries.len());
            for chunk in &self.results {
                y.extend_from_slice(&chunk.lock().unwrap_or_else(PoisonError::into_inner));
            }
            return y;
        }
        let mut y = vec![0f32; self.queries.len()];
        let (d, per_group) = (self.d, self.heads / self.kv_heads.max(1));
        for (unit, chunk) in self.results.iter().enumerate() {
            let chunk = chunk.lock().unwrap_or_else(PoisonError::into_inner);
            let (row, group, tokens) = self.block(unit);
            for (token, values) in tokens.zip(chunk.chunks_exact(per_group * d)) {
                let at = ((row * self.t + token) * self.heads + group * per_group) * d;
                if let Some(slot) = y.get_mut(at..at + per_group * d) {
                    slot.copy_from_slice(values);
                }
            }
        }
        y
    }

    /// A batched unit's batch row, key-value head and tokens.
    fn block(&self, unit: usize) -> (usize, usize, std::ops::Range<usize>) {
        let blocks = self.t.div_ceil(TOKENS_PER_BLOCK);
        let kv = self.kv_heads.max(1);
        let (row, rest) = (unit / (kv * blocks), unit % (kv * blocks));
        let (group, block) = (rest / blocks, rest % blocks);
        let first = block * TOKENS_PER_BLOCK;
        (row, group, first..(first + TOKENS_PER_BLOCK).min(self.t))
    }

    /// A batched unit's output through the one-token path, token by token.
    fn run_block_token_by_token(
        &self,
        row: usize,
        group: usize,
        tokens: std::ops::Range<usize>,
    ) -> Vec<f32> {
        let (t, d, per_group) = (self.t, self.d, self.heads / self.kv_heads.max(1));
        let (Some(keys), Some(values)) = (self.keys.get(row), self.values.get(row)) else {
            return Vec::new();
        };
        let mut out = vec![0f32; tokens.len() * per_group * d];
        for (token, out) in tokens.zip(out.chunks_exact_mut(per_group * d)) {
            let visible: Vec<usize> = (0..self.past)
                .chain(
                    (0..t)
                        .filter(|&j| self.visible.get(token * t + j).copied().unwrap_or(false))
                        .map(|j| self.past + j),
                )
                .collect();
            let cells = Cells {
                keys: keys.as_slice(),
                values: values.as_slice(),
                width: self.kv_heads * d,
                visible: &visible,
                tiles: None,
            };
            let at = ((row * t + token) * self.heads + group * per_group) * d;
            if let Some(queries) = self.queries.get(at..at + per_group * d) {
                llama_cpp_heads(
                    self.flavor,
                    AttentionPath::Online,
                    queries,
                    d,
                    &cells,
                    group,
                    out,
                );
            }
        }
        out
    }

    /// One batched unit: the block's query heads over the past cells together, then each token's own fed cells.
    fn run_block(&self, unit: usize) -> Vec<f32> {
        let (row, group, tokens) = self.block(unit);
        let (t, d, per_group) = (self.t, self.d, self.heads / self.kv_heads.max(1));
        let (Some(keys), Some(values)) = (self.keys.get(row), self.values.get(row)) else {
            return Vec::new();
        };
        let cells = Cells {
            keys: keys.as_slice(),
            values: values.as_slice(),
            width: self.kv_heads * d,
            visible: &[],
            tiles: None,
        };
        let mut q: Vec<f32> = tokens
            .clone()
            .flat_map(|token| {
                let at = ((row * t + token) * self.heads + group * per_group) * d;
                self.queries.get(at..at + per_group * d).unwrap_or_default()
            })
            .copied()
            .collect();
        round_to_f16(&mut q);
        let heads: Vec<&[f32; 64]> = q
            .chunks_exact(64)
            .filter_map(|h| h.try_into().ok())
            .collect();
        let mut states = vec![OnlineSoftmax::start(64); heads.len()];
        let scale = 1.0 / (d as f32).sqrt();
        let mut vector = cells.online_softmax_64(0..self.past, group, &heads, scale, &mut states);
        for (k, token) in tokens.clone().enumerate() {
            let fed = (0..t)
                .filter(|&j| self.visible.get(token * t + j).copied().unwrap_or(false))
                .map(|j| self.past + j);
            let range = k * per_group..(k + 1) * per_group;
            if let (Some(heads), Some(states)) = (heads.get(range.clone()), states.get_mut(range)) {
                vector &= cells.online_softmax_64(fed, group, heads, scale, states);
            }
        }
        if !vector {
            // Cannot happen with the cache's own rows (every cell in range, keys and values alike); if it
            // did, the one-token path gives the same bits.
            return self.run_block_token_by_token(row, group, tokens);
        }
        let mut out = vec![0f32; states.len() * d];
        for (state, out) in states.iter().zip(out.chunks_exact_mut(d)) {
            normalise(&state.acc, state.sum, out);
        }
        out
    }
}

impl Job for AttentionJob {
    fn chunks(&self) -> usize {
        self.results.len()
    }

    fn run_chunk(&self, index: usize) {
        if self.batched {
            let out = self.run_block(index);
            if let Some(slot) = self.results.get(index) {
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = out;
            }
            return;
        }
        let (t, d, kv_heads) = (self.t, self.d, self.kv_heads.max(1));
        // A unit is one token's query heads that share a key-value head: they run side by side.
        let per_group = self.heads / kv_heads;
        let units = self.keys.len() * t * kv_heads;
        let first = index * UNITS_PER_CHUNK;
        let last = (first + UNITS_PER_CHUNK).min(units);
        let mut out = vec![0f32; (last - first) * per_group * d];
        let mut visible = Vec::new();
        let mut visible_for = usize::MAX;
        for (unit, out) in (first..last).zip(out.chunks_exact_mut(per_group * d)) {
            let (token, group) = (unit / kv_heads, unit % kv_heads);
            let (row, i) = (token / t, token % t);
            let (Some(keys), Some(values)) = (self.keys.get(row), self.values.get(row)) else {
                continue;
            };
            if visible_for != token {
                visible.clear();
                visible.extend(0..self.past);
                visible.extend(
                    (0..t)
                        .filter(|&j| self.visible.get(i * t + j).copied().unwrap_or(false))
                        .map(|j| self.past + j),
                );
                visible_for = token;
            }
            let cells = Cells {
                keys: keys.as_slice(),
                values: values.as_slice(),
                width: kv_heads * d,
                visible: &visible,
                tiles: self.tiles.get(row).and_then(Option::as_ref),
            };
            let at = unit * per_group * d;
            let Some(queries) = self.queries.get(at..at + per_group * d) else {
                continue;
            };
            let path = self.paths.get(i).copied().unwrap_or(AttentionPath::Online);
            llama_cpp_heads(self.flavor, path, queries, d, &cells, group, out);
        }
        if let Some(slot) = self.results.get(index) {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = out;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::attention::llama_cpp_head;

    /// A batched job (past cells read once for a block of tokens) must give every (token, head) exactly what the
    /// one-token path gives it alone, for tree masks too, and when its vector path declines a block.
    #[test]
    fn batched_job_equals_the_one_token_path_head_by_head() {
        let mut rng = ChaCha8Rng::seed_from_u64(33);
        let (heads, kv_heads, d) = (9, 3, 64);
        let pool = crate::kernels::pool::ComputePool::new(2);
        for case in 0..12 {
            let (past, t) = (case * 11, 1 + case % 7);
            let mut f16_values = |len: usize, spread: f32| {
                let mut v: Vec<f32> = (0..len)
                    .map(|_| rng.random_range(-spread..spread))
                    .collect();
                round_to_f16(&mut v);
                v
            };
            let cells = past + t;
            // Stored as the f16 cache stores them.
            let mut f16_row = |spread: f32| {
                let values = f16_values(cells * kv_heads * d, spread);
                Arc::new(Row::F16(
                    values.iter().map(|&x| half::f16::from_f32(x)).collect(),
                ))
            };
            let (keys, mut values) = (f16_row(3.0), f16_row(2.0));
            if case % 4 == 3 {
                // Values as f32 beside f16 keys: the vector path declines, and the block is computed token by
                // token through the one-token path instead; the bits must not change.
                if let Row::F16(half) = values.as_ref() {
                    values = Arc::new(Row::F32(half.iter().map(|x| x.to_f32()).collect()));
                }
            }
            let queries: Vec<f32> = (0..t * heads * d)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            // A tree: every token sees itself and a random earlier subset.
            let visible: Vec<bool> = (0..t * t)
                .map(|ij| {
                    let (i, j) = (ij / t, ij % t);
                    j == i || (j < i && rng.random_bool(0.6))
                })
                .collect();
            let job = Arc::new(AttentionJob::new(
                Flavor::Avx512,
                vec![keys.clone()],
                vec![values.clone()],
                queries.clone(),
                visible.clone(),
                vec![AttentionPath::Online; t],
                (t, past),
                (heads, kv_heads, d),
            ));
            assert_eq!(job.batched, crate::kernels::vector::available());
            pool.run(job.clone());
            let got = job.output();
            for i in 0..t {
                let seen: Vec<usize> = (0..past)
                    .chain((0..t).filter(|&j| visible[i * t + j]).map(|j| past + j))
                    .collect();
                let cells = Cells {
                    keys: keys.as_slice(),
                    values: values.as_slice(),
                    width: kv_heads * d,
                    visible: &seen,
                    tiles: None,
                };
                for head in 0..heads {
                    let at = (i * heads + head) * d;
                    let mut want = vec![0f32; d];
                    llama_cpp_head(
                        Flavor::Avx512,
                        AttentionPath::Online,
                        &queries[at..at + d],
                        &cells,
                        head / (heads / kv_heads),
                        &mut want,
                    );
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got[at..at + d]),
                        bits(&want),
                        "case {case}, token {i}, head {head}"
                    );
                }
            }
        }
    }
}
