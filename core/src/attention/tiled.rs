//! ggml's tiled flash attention (prompt batches of 64 tokens or more): the keys transposed tile by tile
//! ([`KeyTiles`]), the scalar definition ([`tiled`]) and its AVX-512 version for the query heads of one key-value
//! head side by side ([`tiled_64`]), tested equal bit for bit.

use super::{Cells, TILE, normalise};
use crate::ggml_float::Flavor;
use crate::kernels::vector::{soft_max_64, tile_dots_64};
use crate::kv_cache::RowSlice;

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
    pub fn new(keys: RowSlice, groups: usize, d: usize, cells: usize) -> Self {
        let tiles_per_group = cells.div_ceil(TILE);
        let mut data = vec![0f32; groups * tiles_per_group * d * TILE];
        let mut converted = Vec::new();
        let keys = keys.f32s(0..(cells * groups * d).min(keys.len()), &mut converted);
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
        if tile >= self.tiles_per_group {
            return None;
        }
        let at = (group * self.tiles_per_group + tile) * self.d * TILE;
        self.data.get(at..at + self.d * TILE)
    }
}

/// The visible cells (in cache order) tile by tile: each tile's first cache index and its visible cells.
fn by_tile(visible: &[usize]) -> impl Iterator<Item = (usize, &[usize])> {
    debug_assert!(
        visible.windows(2).all(|w| w[0] < w[1]),
        "visible cells must be strictly increasing"
    );
    let mut rest = visible;
    std::iter::from_fn(move || {
        let tile_start = rest.first()? / TILE * TILE;
        // At most a tile's worth of cells, in order: a short scan beats a binary search's dependent loads.
        let in_tile = rest
            .iter()
            .take(TILE)
            .take_while(|&&cell| (tile_start..tile_start + TILE).contains(&cell))
            .count();
        let (tile, after) = rest.split_at(in_tile);
        rest = after;
        Some((tile_start, tile))
    })
}

/// `ggml_compute_forward_flash_attn_ext_tiled`: keys in tiles of 64 cells (by cache index), each tile's scores
/// as f32 FMA chains over the head dimension, the tile's softmax with ggml's vector exp, the weighted values
/// accumulated in f32.
pub(super) fn tiled(flavor: Flavor, query: &[f32], cells: &Cells, group: usize, out: &mut [f32]) {
    let d = query.len();
    let scale = 1.0 / (d as f32).sqrt();
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    let mut acc = vec![0f32; d];
    let mut scores = [f32::NEG_INFINITY; TILE];
    let mut members = [usize::MAX; TILE];
    let mut buffer = Vec::new();
    for (tile_start, tile) in by_tile(cells.visible) {
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
                        .key(cell, group, d, &mut buffer)
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
            for (a, &v) in acc.iter_mut().zip(cells.value(cell, group, d, &mut buffer)) {
                *a = v.mul_add(weight, *a);
            }
        }
    }
    normalise(&acc, sum, out);
}

/// [`tiled`] in the AVX-512 flavor for the 64-wide query heads in `queries` that share key-value head `group`,
/// keys in tiles: each head's operations are [`tiled`]'s, but the heads' independent chains of FMAs run side
/// by side (one head's chains alone wait on each other's latency). Returns `false`, writing nothing, where it
/// does not apply: no tiles, a missing tile, a cell out of range, queries not a whole number of 64-wide heads or
/// `out` of another size, a CPU without AVX-512.
pub(super) fn tiled_64(queries: &[f32], cells: &Cells, group: usize, out: &mut [f32]) -> bool {
    let Some(tiles) = cells.tiles else {
        return false;
    };
    let heads: Vec<&[f32; 64]> = queries
        .chunks_exact(64)
        .filter_map(|head| head.try_into().ok())
        .collect();
    let n = heads.len();
    if n * 64 != queries.len() || out.len() != queries.len() {
        return false;
    }
    let scale = 1.0 / (64f32).sqrt();
    let mut max = vec![f32::NEG_INFINITY; n];
    let mut sum = vec![0f32; n];
    let mut acc = vec![[0f32; 64]; n];
    let mut dots = vec![[0f32; TILE]; n];
    let mut weights = vec![[0f32; TILE]; n];
    for (tile_start, tile) in by_tile(cells.visible) {
        let keys = tiles
            .tile(group, tile_start / TILE)
            .and_then(|keys| <&[f32; 64 * TILE]>::try_from(keys).ok());
        let Some(keys) = keys else {
            return false;
        };
        if !tile_dots_64(keys, &heads, &mut dots) {
            return false;
        }
        for h in 0..n {
            let mut scores = [f32::NEG_INFINITY; TILE];
            for &cell in tile {
                scores[cell - tile_start] = dots[h][cell - tile_start] * scale;
            }
            let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            weights[h] = [0.0; TILE];
            if tile_max == f32::NEG_INFINITY {
                continue;
            }
            let new_max = max[h].max(tile_max);
            if new_max > max[h] {
                let ms = (max[h] - new_max).exp();
                for a in &mut acc[h] {
                    *a *= ms;
                }
                sum[h] *= ms;
            }
            max[h] = new_max;
            let Some(tile_sum) = soft_max_64(&mut scores, new_max) else {
                return false;
            };
            sum[h] = (f64::from(sum[h]) + tile_sum) as f32;
            // The weights in the order of the tile's visible cells.
            for (weight, &cell) in weights[h].iter_mut().zip(tile) {
                *weight = scores[cell - tile_start];
            }
        }
        if !cells.weighted_sums_64(tile, group, &weights, &mut acc) {
            return false;
        }
    }
    for ((acc, &sum), out) in acc.iter().zip(&sum).zip(out.chunks_exact_mut(64)) {
        normalise(acc, sum, out);
    }
    true
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::attention::tests::RandomRow;

    /// The tiled path's vector version (query heads side by side) must give each head [`tiled`]'s bits: cells
    /// masked inside and across tiles, several tiles, keys and values stored as f32 or f16.
    #[test]
    fn vector_tiled_path_equals_the_scalar_definition() {
        if !crate::kernels::vector::available() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let (d, kv_heads) = (64, 3);
        for case in 0..24 {
            let n = 1 + case * 23;
            // Wide key spreads make some weights underflow to exactly zero.
            let row = RandomRow::new(&mut rng, n * kv_heads * d, [1.0, 3.0, 12.0][case % 3]);
            let heads = 1 + case % 6;
            let queries: Vec<f32> = (0..heads * d)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let visible: Vec<usize> = (0..n)
                .filter(|i| i % 11 != 4 && (i / 64) % 3 != 2)
                .collect();
            let tiles = KeyTiles::new(RowSlice::F32(&row.keys), kv_heads, d, n);
            let [as_f32, as_f16] = row.cells(kv_heads * d, &visible, Some(&tiles));
            for group in 0..kv_heads {
                let mut want = vec![0f32; heads * d];
                for (query, out) in queries.chunks_exact(d).zip(want.chunks_exact_mut(d)) {
                    tiled(Flavor::Avx512, query, &as_f32, group, out);
                }
                for cells in [&as_f32, &as_f16] {
                    let mut got = vec![0f32; heads * d];
                    assert!(tiled_64(&queries, cells, group, &mut got));
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "case {case}, group {group}");
                }
            }
        }
    }
}
