//! Softmax attention of the fed tokens over a layer's key/value cache, in one of two arithmetics:
//!
//! - [`Arithmetic::LlamaCpp`]: llama.cpp's CPU flash attention (its default), reproduced rounding for rounding
//!   so that our logits are llama.cpp's to the last bit. Keys and values are stored as f16, and ggml takes one
//!   of two paths, each with its own order of operations:
//!   - decoding one token, or a batch of 2 to 63 tokens: an online softmax over the cells in order, with the
//!     query rounded to f16 and the weighted sum of values accumulated *in f16* ([`online`]);
//!   - a batch of 64 or more (prompt processing, in 512-token batches): tiles of 64 keys with an f32 query, f32
//!     sums and ggml's vector exp ([`tiled`]).
//!
//!   Verification forwards (several tokens, logits for each) take the one-token path for every token, so a
//!   verified draft gives exactly the logits that decoding it token by token gives: greedy speculation stays
//!   token-identical to greedy decoding.
//!
//!   We follow llama.cpp on one thread, as our reference fixtures were made and as our engine runs by default.
//!   With more threads, a one-token step over more than 256 cells splits the cells between the threads and
//!   merges the halves, which rounds differently.
//! - [`Arithmetic::Exact`]: plain f32 attention, for the parity test against candle's f32 `quantized_llama`.

use std::sync::{Arc, Mutex, PoisonError};

use crate::ggml_float::Flavor;
use crate::kernels::f16::round_to_f16;
use crate::kernels::pool::Job;
use crate::kernels::vector::{OnlineSoftmax, online_softmax_64};

/// How attention rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arithmetic {
    LlamaCpp(Flavor),
    Exact,
}

impl Arithmetic {
    /// Rounds keys or values to what the cache stores.
    pub fn store(self, values: &mut [f32]) {
        if let Arithmetic::LlamaCpp(_) = self {
            round_to_f16(values);
        }
    }
}

/// Tokens per batch when llama.cpp processes a prompt (our reference runs it with `batchSize: 512`).
const PROMPT_BATCH: usize = 512;
/// Batches of at least this many tokens take ggml's tiled path (`GGML_FA_TILE_Q`); keys come in tiles of the
/// same size (`GGML_FA_TILE_KV`).
const TILE: usize = 64;

/// Which of ggml's paths computes a fed token's attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    /// A token decoded alone, verified with drafts, or in a prompt batch under 64 tokens.
    Online,
    /// A token of a batch of 64 or more.
    Tiled,
}

/// The path of each of `t` fed tokens: a causal prompt chunk is processed as llama.cpp processes a prompt
/// (512-token batches); anything else (a decoding step, drafts to verify) token by token.
pub fn paths(t: usize, prompt_like: bool) -> Vec<AttentionPath> {
    (0..t)
        .map(|i| {
            let batch = if prompt_like {
                (t - i / PROMPT_BATCH * PROMPT_BATCH).min(PROMPT_BATCH)
            } else {
                1
            };
            if batch >= TILE {
                AttentionPath::Tiled
            } else {
                AttentionPath::Online
            }
        })
        .collect()
}

/// One fed token's view of the cache: the cells it sees, in cache order.
pub struct Cells<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    /// Values per cell (kv heads × head dim).
    pub width: usize,
    /// Cache index of every visible cell, in cache order.
    pub visible: &'a [usize],
    /// The keys in tiles, for the tiled path.
    pub tiles: Option<&'a KeyTiles>,
}

/// Keys transposed tile by tile (tile, then head dimension, then the tile's 64 cells), as ggml packs them for its
/// tiled path: one query's 64 scores in a tile are then 64 independent FMA chains, run side by side in vector
/// lanes instead of one after another.
pub struct KeyTiles {
    d: usize,
    tiles_per_group: usize,
    data: Vec<f32>,
}

impl KeyTiles {
    /// Tiles of the first `cells` keys of a cache row holding `groups` kv heads of `d` values per cell.
    pub fn new(keys: &[f32], groups: usize, d: usize, cells: usize) -> Self {
        let tiles_per_group = cells.div_ceil(TILE);
        let mut data = vec![0f32; groups * tiles_per_group * d * TILE];
        for (cell, key) in keys.chunks_exact(groups * d).take(cells).enumerate() {
            let (tile, lane) = (cell / TILE, cell % TILE);
            for (group, key) in key.chunks_exact(d).enumerate() {
                let base = (group * tiles_per_group + tile) * d * TILE;
                for (dk, &k) in key.iter().enumerate() {
                    data[base + dk * TILE + lane] = k;
                }
            }
        }
        Self {
            d,
            tiles_per_group,
            data,
        }
    }

    fn tile(&self, group: usize, tile: usize) -> Option<&[f32]> {
        let at = (group * self.tiles_per_group + tile) * self.d * TILE;
        self.data.get(at..at + self.d * TILE)
    }
}

impl Cells<'_> {
    fn key(&self, cell: usize, group: usize, d: usize) -> &[f32] {
        let at = cell * self.width + group * d;
        self.keys.get(at..at + d).unwrap_or_default()
    }

    fn value(&self, cell: usize, group: usize, d: usize) -> &[f32] {
        let at = cell * self.width + group * d;
        self.values.get(at..at + d).unwrap_or_default()
    }

    /// The given cells' keys and values of a 64-wide head group, for the vector online softmax; `None` if one
    /// is not 64 wide (a cell out of range), which sends the caller to the scalar path.
    fn pairs_64(
        &self,
        cells: impl Iterator<Item = usize>,
        group: usize,
    ) -> Option<Vec<(&[f32; 64], &[f32; 64])>> {
        cells
            .map(|cell| {
                let key = <&[f32; 64]>::try_from(self.key(cell, group, 64)).ok()?;
                Some((
                    key,
                    <&[f32; 64]>::try_from(self.value(cell, group, 64)).ok()?,
                ))
            })
            .collect()
    }
}

impl From<OnlineSoftmax> for Partial {
    fn from(state: OnlineSoftmax) -> Self {
        Self {
            max: state.max,
            sum: state.sum,
            acc: state.acc,
        }
    }
}

/// The running state of an online softmax: max score, sum of weights, unnormalised weighted sum of values.
struct Partial {
    max: f32,
    sum: f32,
    acc: Vec<f32>,
}

/// Attention output of one query head of one fed token, in llama.cpp's arithmetic.
pub fn llama_cpp_head(
    flavor: Flavor,
    path: AttentionPath,
    query: &[f32],
    cells: &Cells,
    group: usize,
    out: &mut [f32],
) {
    llama_cpp_heads(flavor, path, query, query.len(), cells, group, out);
}

/// [`llama_cpp_head`] for several `d`-wide query heads (`queries` and `out` hold one head after another) that
/// share the key-value head `group`: each is computed exactly as alone, but the one-token path runs them side by side.
pub fn llama_cpp_heads(
    flavor: Flavor,
    path: AttentionPath,
    queries: &[f32],
    d: usize,
    cells: &Cells,
    group: usize,
    out: &mut [f32],
) {
    let d = d.max(1);
    match path {
        AttentionPath::Tiled => {
            for (query, out) in queries.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                tiled(flavor, query, cells, group, out);
            }
        }
        AttentionPath::Online => {
            let partials = online(flavor, queries, d, cells, cells.visible, group);
            for (p, out) in partials.iter().zip(out.chunks_exact_mut(d)) {
                normalise(&p.acc, p.sum, out);
            }
        }
    }
}

fn normalise(acc: &[f32], sum: f32, out: &mut [f32]) {
    let inverse = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = a * inverse;
    }
}

/// `ggml_compute_forward_flash_attn_ext_f16_one_chunk` with f16 keys and values, for each `d`-wide query head in
/// `queries`: the query rounded to f16, an online softmax over the cells in order, the weighted values summed in
/// f16.
fn online(
    flavor: Flavor,
    queries: &[f32],
    d: usize,
    cells: &Cells,
    visible: &[usize],
    group: usize,
) -> Vec<Partial> {
    let scale = 1.0 / (d as f32).sqrt();
    let mut q = queries.to_vec();
    round_to_f16(&mut q);
    if flavor == Flavor::Avx512 && d == 64 {
        // A cell whose key or value is not 64 wide (none is, with 64-wide heads) sends it to the scalar path.
        let pairs = cells.pairs_64(visible.iter().copied(), group);
        let heads: Vec<&[f32; 64]> = q
            .chunks_exact(64)
            .filter_map(|head| head.try_into().ok())
            .collect();
        let mut states = vec![OnlineSoftmax::start(64); heads.len()];
        if let Some(pairs) = pairs
            && online_softmax_64(&heads, scale, &pairs, &mut states)
        {
            return states.into_iter().map(Partial::from).collect();
        }
    }
    q.chunks_exact(d.max(1))
        .map(|head| online_scalar(flavor, head, scale, cells, visible, group))
        .collect()
}

/// [`online`] in portable scalar code: the definition, and the path for head sizes other than 64.
fn online_scalar(
    flavor: Flavor,
    q: &[f32],
    scale: f32,
    cells: &Cells,
    visible: &[usize],
    group: usize,
) -> Partial {
    let d = q.len();
    let mut p = Partial {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        acc: vec![0f32; d],
    };
    for &cell in visible {
        let s = flavor.dot_f16(cells.key(cell, group, d), q) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > p.max {
            ms = (p.max - s).exp();
            p.max = s;
            for a in &mut p.acc {
                *a *= ms;
            }
            round_to_f16(&mut p.acc);
        } else {
            vs = (s - p.max).exp();
        }
        for (a, &v) in p.acc.iter_mut().zip(cells.value(cell, group, d)) {
            *a = v.mul_add(vs, *a);
        }
        round_to_f16(&mut p.acc);
        // `S = S*ms + vs`, which ggml's build leaves unfused.
        p.sum = p.sum * ms + vs;
    }
    p
}

/// `ggml_compute_forward_flash_attn_ext_tiled`: keys in tiles of 64 cells (by cache index), each tile's scores
/// as f32 FMA chains over the head dimension, the tile's softmax with ggml's vector exp, the weighted values
/// accumulated in f32.
fn tiled(flavor: Flavor, query: &[f32], cells: &Cells, group: usize, out: &mut [f32]) {
    let d = query.len();
    let scale = 1.0 / (d as f32).sqrt();
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    let mut acc = vec![0f32; d];
    let mut scores = [f32::NEG_INFINITY; TILE];
    let mut members = [usize::MAX; TILE];
    let mut rest = cells.visible;
    while let Some(&first) = rest.first() {
        let tile_start = first / TILE * TILE;
        let in_tile = rest.partition_point(|&cell| cell < tile_start + TILE);
        let (tile, after) = rest.split_at(in_tile);
        rest = after;
        scores.fill(f32::NEG_INFINITY);
        members.fill(usize::MAX);
        let mut dots = [0f32; TILE];
        match cells.tiles.and_then(|t| t.tile(group, tile_start / TILE)) {
            Some(keys) => {
                for (row, &q) in keys.chunks_exact(TILE).zip(query) {
                    for (dot, &k) in dots.iter_mut().zip(row) {
                        *dot = k.mul_add(q, *dot);
                    }
                }
            }
            None => {
                for &cell in tile {
                    dots[cell - tile_start] = cells
                        .key(cell, group, d)
                        .iter()
                        .zip(query)
                        .fold(0f32, |acc, (&k, &q)| k.mul_add(q, acc));
                }
            }
        }
        for &cell in tile {
            scores[cell - tile_start] = dots[cell - tile_start] * scale;
            members[cell - tile_start] = cell;
        }
        let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if tile_max == f32::NEG_INFINITY {
            continue;
        }
        let new_max = max.max(tile_max);
        if new_max > max {
            let ms = (max - new_max).exp();
            for a in &mut acc {
                *a *= ms;
            }
            sum *= ms;
        }
        max = new_max;
        sum = (f64::from(sum) + flavor.soft_max(&mut scores, max)) as f32;
        for (&weight, &cell) in scores.iter().zip(&members) {
            if cell == usize::MAX || weight == 0.0 {
                continue;
            }
            for (a, &v) in acc.iter_mut().zip(cells.value(cell, group, d)) {
                *a = v.mul_add(weight, *a);
            }
        }
    }
    normalise(&acc, sum, out);
}

/// Plain f32 softmax attention of one query head; also returns the weights over `visible` (for capture).
pub fn exact_head(query: &[f32], cells: &Cells, group: usize, out: &mut [f32]) -> Vec<f32> {
    let d = query.len();
    let weights = exact_weights(query, cells, group);
    out.fill(0.0);
    for (&w, &cell) in weights.iter().zip(cells.visible) {
        if w != 0.0 {
            for (o, &v) in out.iter_mut().zip(cells.value(cell, group, d)) {
                *o = w.mul_add(v, *o);
            }
        }
    }
    weights
}

/// The plain f32 softmax weights of one query head over `visible`, without the weighted sum of values: what
/// capture shows beside llama.cpp's arithmetic, whose online softmax never holds them.
pub fn exact_weights(query: &[f32], cells: &Cells, group: usize) -> Vec<f32> {
    let d = query.len();
    let scale = 1.0 / (d as f32).sqrt();
    let mut weights: Vec<f32> = cells
        .visible
        .iter()
        .map(|&cell| dot(query, cells.key(cell, group, d)) * scale)
        .collect();
    softmax_in_place(&mut weights);
    weights
}

/// Dot product with eight independent partial sums, so the compiler can keep them in one vector register.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inverse = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inverse;
    }
}

/// One layer's attention in llama.cpp's arithmetic for every fed token and query head, split across the compute
/// pool's threads (each (token, head) is computed exactly as on one thread).
pub struct AttentionJob {
    pub flavor: Flavor,
    /// Per batch row: the cache's keys and values, and their tiles when some token takes the tiled path.
    pub keys: Vec<Arc<Vec<f32>>>,
    pub values: Vec<Arc<Vec<f32>>>,
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
        keys: Vec<Arc<Vec<f32>>>,
        values: Vec<Arc<Vec<f32>>>,
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
                    .then(|| KeyTiles::new(k, kv_heads, d, past + t))
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

    /// One batched unit: the block's query heads over the past cells together, then each token's own fed cells.
    fn run_block(&self, unit: usize) -> Vec<f32> {
        let (row, group, tokens) = self.block(unit);
        let (t, d, per_group) = (self.t, self.d, self.heads / self.kv_heads.max(1));
        let (Some(keys), Some(values)) = (self.keys.get(row), self.values.get(row)) else {
            return Vec::new();
        };
        let cells = Cells {
            keys,
            values,
            width: self.kv_heads * d,
            visible: &[],
            tiles: None,
        };
        let pairs =
            |seen: &mut dyn Iterator<Item = usize>| cells.pairs_64(seen, group).unwrap_or_default();
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
        online_softmax_64(&heads, scale, &pairs(&mut (0..self.past)), &mut states);
        for (k, token) in tokens.enumerate() {
            let mut fed = (0..t)
                .filter(|&j| self.visible.get(token * t + j).copied().unwrap_or(false))
                .map(|j| self.past + j);
            let range = k * per_group..(k + 1) * per_group;
            if let (Some(heads), Some(states)) = (heads.get(range.clone()), states.get_mut(range)) {
                online_softmax_64(heads, scale, &pairs(&mut fed), states);
            }
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
                keys,
                values,
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

    /// The vector online softmax must do the scalar definition's roundings exactly: scores that rise (rescaling
    /// the running sum) and fall, several key-value heads, masked cells.
    #[test]
    fn vector_online_softmax_equals_the_scalar_definition() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (d, kv_heads) = (64, 3);
        for case in 0..40 {
            let n = 1 + case * 7;
            let mut f16_values = |len: usize, spread: f32| {
                let mut v: Vec<f32> = (0..len)
                    .map(|_| rng.random_range(-spread..spread))
                    .collect();
                round_to_f16(&mut v);
                v
            };
            let keys = f16_values(n * kv_heads * d, 3.0);
            let values = f16_values(n * kv_heads * d, 2.0);
            // Up to five query heads sharing a key-value head (more than one pass of the vector code holds).
            let heads = 1 + case % 5;
            let queries: Vec<f32> = (0..heads * d)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let visible: Vec<usize> = (0..n).filter(|i| i % 5 != 3).collect();
            let cells = Cells {
                keys: &keys,
                values: &values,
                width: kv_heads * d,
                visible: &visible,
                tiles: None,
            };
            for group in 0..kv_heads {
                let got = online(Flavor::Avx512, &queries, d, &cells, &visible, group);
                assert_eq!(got.len(), heads);
                for (head, got) in got.iter().enumerate() {
                    let mut q = queries[head * d..(head + 1) * d].to_vec();
                    round_to_f16(&mut q);
                    let scale = 1.0 / (d as f32).sqrt();
                    let want = online_scalar(Flavor::Avx512, &q, scale, &cells, &visible, group);
                    assert_eq!(got.max.to_bits(), want.max.to_bits(), "max, case {case}");
                    assert_eq!(got.sum.to_bits(), want.sum.to_bits(), "sum, case {case}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got.acc), bits(&want.acc), "values, case {case}");
                }
            }
        }
    }

    /// A batched job (past cells read once for a block of tokens) must give every (token, head) exactly what the
    /// one-token path gives it alone, for tree masks too.
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
            let keys = Arc::new(f16_values(cells * kv_heads * d, 3.0));
            let values = Arc::new(f16_values(cells * kv_heads * d, 2.0));
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
                    keys: &keys,
                    values: &values,
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
