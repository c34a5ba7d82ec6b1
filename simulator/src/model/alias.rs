//! Weighted draws by the alias method (Vose), with each position's odds and
//! alias side by side.
//!
//! `rand_distr`'s `WeightedAliasIndex` keeps odds and aliases in two
//! arrays. A draw reads one entry at a uniformly random position, so in a
//! table larger than the cache (the users of a shard: a quarter of a
//! million) each array costs a cache miss, and those two misses were most
//! of what a user draw cost. One array of 8-byte entries is one miss.

use rand::Rng;

/// Draws positions `0..n` in proportion to their weights.
pub(super) struct AliasTable {
    entries: Vec<Entry>,
}

/// Position `i` keeps a draw with probability `odds`, else gives it to
/// `alias`. `f32` odds: an error of 1e-7 in a weight is far below what a
/// simulated shop can show, and the entry stays 8 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    odds: f32,
    alias: u32,
}

impl AliasTable {
    /// A table of `weights`, which must be finite, non-negative, at most
    /// `u32::MAX` of them, with a positive sum.
    pub(super) fn new(weights: &[f64]) -> Result<Self, String> {
        let n = weights.len();
        if n == 0 || u32::try_from(n).is_err() {
            return Err(format!("{n} weights: needs 1 to 4,294,967,295"));
        }
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err("weights must be finite and non-negative".into());
        }
        let total: f64 = weights.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return Err("the weights must have a positive, finite sum".into());
        }
        // Each weight as a multiple of the mean: a position keeps what is
        // below 1 and takes the rest of its slot from one above 1.
        let mut scaled: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        // `n` fits a u32 (checked above).
        let (mut small, mut large): (Vec<u32>, Vec<u32>) =
            (0..n as u32).partition(|&i| scaled[i as usize] < 1.0);
        let mut entries: Vec<Entry> = (0..n as u32)
            .map(|i| Entry {
                odds: 1.0,
                alias: i,
            })
            .collect();
        while let (Some(&under), Some(&over)) = (small.last(), large.last()) {
            small.pop();
            entries[under as usize] = Entry {
                odds: scaled[under as usize] as f32,
                alias: over,
            };
            scaled[over as usize] -= 1.0 - scaled[under as usize];
            if scaled[over as usize] < 1.0 {
                large.pop();
                small.push(over);
            }
        }
        // Whatever is left is 1 up to rounding: it keeps its whole slot.
        Ok(Self { entries })
    }

    /// `N` independent draws. Every position is drawn before any entry is
    /// read, so that the reads, each likely a cache miss in a large table,
    /// overlap instead of waiting for one another.
    pub(super) fn sample_array<R: Rng, const N: usize>(&self, rng: &mut R) -> [usize; N] {
        let draws: [(usize, f32); N] =
            std::array::from_fn(|_| (rng.random_range(0..self.entries.len()), rng.random::<f32>()));
        draws.map(|(position, coin)| {
            let entry = self.entries[position];
            if coin < entry.odds {
                position
            } else {
                entry.alias as usize
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn draws_follow_the_weights() {
        let weights = [1.0, 0.0, 2.0, 3.0, 10.0, 0.5, 0.5];
        let table = AliasTable::new(&weights).unwrap_or_else(|e| panic!("{e}"));
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let draws = 1_000_000;
        let mut counts = [0u32; 7];
        // Half one at a time, half four at a time.
        for _ in 0..draws / 2 {
            let [position] = table.sample_array(&mut rng);
            counts[position] += 1;
        }
        for _ in 0..draws / 8 {
            for position in table.sample_array::<_, 4>(&mut rng) {
                counts[position] += 1;
            }
        }
        let total: f64 = weights.iter().sum();
        for (position, (&count, weight)) in counts.iter().zip(weights).enumerate() {
            let expected = weight / total;
            let observed = f64::from(count) / f64::from(draws);
            // Five standard deviations of a binomial share.
            let tolerance = 5.0 * (expected * (1.0 - expected) / f64::from(draws)).sqrt();
            assert!(
                (observed - expected).abs() <= tolerance,
                "position {position}: observed {observed:.5}, expected {expected:.5}"
            );
        }
        assert_eq!(counts[1], 0, "a weight of zero is never drawn");
    }

    #[test]
    fn unusable_weights_are_refused() {
        assert!(AliasTable::new(&[]).is_err());
        assert!(AliasTable::new(&[0.0, 0.0]).is_err());
        assert!(AliasTable::new(&[1.0, -1.0]).is_err());
        assert!(AliasTable::new(&[1.0, f64::NAN]).is_err());
        assert!(AliasTable::new(&[f64::INFINITY]).is_err());
        let single = AliasTable::new(&[3.0]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(single.sample_array(&mut ChaCha8Rng::seed_from_u64(1)), [0]);
    }
}
