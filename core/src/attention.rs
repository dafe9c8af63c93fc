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

use crate::ggml_float::Flavor;
use crate::kernels::f16::round_to_f16;
use crate::kernels::vector::{OnlineSoftmax, Stored64, online_softmax_64, weighted_sums_64};
use crate::kv_cache::RowSlice;

mod job;
mod tiled;

pub use job::AttentionJob;
pub use tiled::KeyTiles;
use tiled::{tiled, tiled_64};

/// How attention rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arithmetic {
    LlamaCpp(Flavor),
    Exact,
}

impl Arithmetic {
    /// How the key-value cache stores keys and values: as f16 for llama.cpp's arithmetic (its cache's type),
    /// as f32 for the exact one.
    pub fn cache_precision(self) -> crate::kv_cache::Precision {
        match self {
            Arithmetic::LlamaCpp(_) => crate::kv_cache::Precision::F16,
            Arithmetic::Exact => crate::kv_cache::Precision::F32,
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
    pub keys: RowSlice<'a>,
    pub values: RowSlice<'a>,
    /// Values per cell (kv heads × head dim).
    pub width: usize,
    /// Cache index of every visible cell, in cache order (strictly increasing).
    pub visible: &'a [usize],
    /// The keys in tiles, for the tiled path.
    pub tiles: Option<&'a KeyTiles>,
}

impl<'a> Cells<'a> {
    /// A cell's key of head group `group` as f32 (converted into `buffer` from an f16 cache); empty if the cell
    /// is out of range.
    fn key<'b>(&self, cell: usize, group: usize, d: usize, buffer: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        let at = cell * self.width + group * d;
        self.keys.f32s(at..at + d, buffer)
    }

    fn value<'b>(&self, cell: usize, group: usize, d: usize, buffer: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        let at = cell * self.width + group * d;
        self.values.f32s(at..at + d, buffer)
    }

    /// The 64 values of head group `group` at `cell` in a row of `width` values per cell.
    fn cell_64<T>(row: &[T], cell: usize, width: usize, group: usize) -> Option<&[T; 64]> {
        let at = cell * width + group * 64;
        row.get(at..at + 64)?.try_into().ok()
    }

    /// For each query head h of key-value head `group`: `accs[h] ← value · weights[h][i] + accs[h]` for the i-th
    /// of `members` in order (a zero weight skipped), 64-wide values read as the cache stores them. Returns
    /// `false`, touching nothing, where a cell is out of range, there are more than 64 members or a different
    /// number of weights than sums, or the CPU lacks the vector code.
    fn weighted_sums_64(
        &self,
        members: &[usize],
        group: usize,
        weights: &[[f32; 64]],
        accs: &mut [[f32; 64]],
    ) -> bool {
        fn sums<T>(
            values: &[T],
            members: &[usize],
            (width, group): (usize, usize),
            weights: &[[f32; 64]],
            accs: &mut [[f32; 64]],
        ) -> bool
        where
            [T; 64]: Stored64,
        {
            let values: Option<Vec<&[T; 64]>> = members
                .iter()
                .map(|&cell| Cells::cell_64(values, cell, width, group))
                .collect();
            values.is_some_and(|values| weighted_sums_64(accs, &values, weights))
        }
        let at = (self.width, group);
        match self.values {
            RowSlice::F16(values) => sums(values, members, at, weights, accs),
            RowSlice::F32(values) => sums(values, members, at, weights, accs),
        }
    }

    /// Continues the vector online softmax of 64-wide `queries` (sharing key-value head `group`) over `cells`,
    /// reading keys and values as the cache stores them. Returns `false`, touching nothing, where a cell is out
    /// of range, keys and values differ in precision, a state is not 64 wide, or the CPU lacks the vector code:
    /// the caller then takes the scalar path.
    pub(super) fn online_softmax_64(
        &self,
        cells: impl Iterator<Item = usize>,
        group: usize,
        queries: &[&[f32; 64]],
        scale: f32,
        states: &mut [OnlineSoftmax],
    ) -> bool {
        fn pairs<'r, T>(
            keys: &'r [T],
            values: &'r [T],
            cells: impl Iterator<Item = usize>,
            width: usize,
            group: usize,
        ) -> Option<Vec<(&'r [T; 64], &'r [T; 64])>> {
            cells
                .map(|cell| {
                    Some((
                        Cells::cell_64(keys, cell, width, group)?,
                        Cells::cell_64(values, cell, width, group)?,
                    ))
                })
                .collect()
        }
        match (self.keys, self.values) {
            (RowSlice::F16(keys), RowSlice::F16(values)) => {
                pairs(keys, values, cells, self.width, group)
                    .is_some_and(|p| online_softmax_64(queries, scale, &p, states))
            }
            (RowSlice::F32(keys), RowSlice::F32(values)) => {
                pairs(keys, values, cells, self.width, group)
                    .is_some_and(|p| online_softmax_64(queries, scale, &p, states))
            }
            _ => false,
        }
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
            if d == 64 && flavor == Flavor::Avx512 && tiled_64(queries, cells, group, out) {
                return;
            }
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

pub(super) fn normalise(acc: &[f32], sum: f32, out: &mut [f32]) {
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
        let heads: Vec<&[f32; 64]> = q
            .chunks_exact(64)
            .filter_map(|head| head.try_into().ok())
            .collect();
        let mut states = vec![OnlineSoftmax::start(64); heads.len()];
        if cells.online_softmax_64(visible.iter().copied(), group, &heads, scale, &mut states) {
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
    let mut buffer = Vec::new();
    for &cell in visible {
        let s = flavor.dot_f16(cells.key(cell, group, d, &mut buffer), q) * scale;
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
        for (a, &v) in p
            .acc
            .iter_mut()
            .zip(cells.value(cell, group, d, &mut buffer))
        {
            *a = v.mul_add(vs, *a);
        }
        round_to_f16(&mut p.acc);
        // `S = S*ms + vs`, which ggml's build leaves unfused.
        p.sum = p.sum * ms + vs;
    }
    p
}

/// Plain f32 softmax attention of one query head; also returns the weights over `visible` (for capture).
pub fn exact_head(query: &[f32], cells: &Cells, group: usize, out: &mut [f32]) -> Vec<f32> {
    let d = query.len();
    let weights = exact_weights(query, cells, group);
    out.fill(0.0);
    let mut buffer = Vec::new();
    for (&w, &cell) in weights.iter().zip(cells.visible) {
        if w != 0.0 {
            for (o, &v) in out.iter_mut().zip(cells.value(cell, group, d, &mut buffer)) {
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
    let mut buffer = Vec::new();
    let mut weights: Vec<f32> = cells
        .visible
        .iter()
        .map(|&cell| dot(query, cells.key(cell, group, d, &mut buffer)) * scale)
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

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Random keys and values already rounded to f16, held both as an f32 cache row and as an f16 one (what
    /// llama.cpp's arithmetic stores).
    pub(super) struct RandomRow {
        pub(super) keys: Vec<f32>,
        values: Vec<f32>,
        half_keys: Vec<half::f16>,
        half_values: Vec<half::f16>,
    }

    impl RandomRow {
        pub(super) fn new(rng: &mut ChaCha8Rng, len: usize, key_spread: f32) -> Self {
            let mut f16_values = |spread: f32| {
                let mut v: Vec<f32> = (0..len)
                    .map(|_| rng.random_range(-spread..spread))
                    .collect();
                round_to_f16(&mut v);
                v
            };
            let (keys, values) = (f16_values(key_spread), f16_values(2.0));
            let half = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x)).collect();
            Self {
                half_keys: half(&keys),
                half_values: half(&values),
                keys,
                values,
            }
        }

        /// The row as an f32 cache's cells and as an f16 cache's.
        pub(super) fn cells<'a>(
            &'a self,
            width: usize,
            visible: &'a [usize],
            tiles: Option<&'a KeyTiles>,
        ) -> [Cells<'a>; 2] {
            let as_f32 = Cells {
                keys: RowSlice::F32(&self.keys),
                values: RowSlice::F32(&self.values),
                width,
                visible,
                tiles,
            };
            let as_f16 = Cells {
                keys: RowSlice::F16(&self.half_keys),
                values: RowSlice::F16(&self.half_values),
                width,
                visible,
                tiles,
            };
            [as_f32, as_f16]
        }
    }

    /// The vector online softmax must do the scalar definition's roundings exactly: scores that rise (rescaling
    /// the running sum) and fall, several key-value heads, masked cells, keys and values stored as f32 or f16.
    #[test]
    fn vector_online_softmax_equals_the_scalar_definition() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (d, kv_heads) = (64, 3);
        for case in 0..40 {
            let n = 1 + case * 7;
            let row = RandomRow::new(&mut rng, n * kv_heads * d, 3.0);
            // Up to five query heads sharing a key-value head (more than one pass of the vector code holds).
            let heads = 1 + case % 5;
            let queries: Vec<f32> = (0..heads * d)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let visible: Vec<usize> = (0..n).filter(|i| i % 5 != 3).collect();
            let [as_f32, as_f16] = row.cells(kv_heads * d, &visible, None);
            for group in 0..kv_heads {
                for cells in [&as_f32, &as_f16] {
                    let got = online(Flavor::Avx512, &queries, d, cells, &visible, group);
                    assert_eq!(got.len(), heads);
                    for (head, got) in got.iter().enumerate() {
                        let mut q = queries[head * d..(head + 1) * d].to_vec();
                        round_to_f16(&mut q);
                        let scale = 1.0 / (d as f32).sqrt();
                        let want =
                            online_scalar(Flavor::Avx512, &q, scale, &as_f32, &visible, group);
                        assert_eq!(got.max.to_bits(), want.max.to_bits(), "max, case {case}");
                        assert_eq!(got.sum.to_bits(), want.sum.to_bits(), "sum, case {case}");
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got.acc), bits(&want.acc), "values, case {case}");
                    }
                }
            }
        }
    }
}
