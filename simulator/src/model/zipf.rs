//! Zipf-weighted draws of positions: which products are popular and which
//! users are heavy.

use rand_distr::{Distribution, Zipf};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::{ModelError, alias::AliasTable};

/// Draws positions `0..n` with Zipf weights `1 / (position + 1)^exponent`.
pub(super) enum ZipfRank {
    /// Alias method: one look-up per draw, in a table of 8 bytes per
    /// position.
    Table(AliasTable),
    /// Rejection-inversion: a few `powf` per draw and no table, faster than
    /// a table far too big for the cache (a million users: 8 MB). The
    /// second field is the last position.
    Formula(Zipf<f64>, usize),
}

impl ZipfRank {
    /// Largest population drawn from a table (2 MB): covers a shard of the
    /// default million users over four partitions, where the table was
    /// faster than the formula's `powf` calls end to end.
    const MAX_TABLE: usize = 1 << 18;

    pub(super) fn new(n: usize, exponent: f64) -> Result<Self, ModelError> {
        if n <= Self::MAX_TABLE {
            Self::table(n, exponent)
        } else {
            Self::formula(n, exponent)
        }
    }

    fn table(n: usize, exponent: f64) -> Result<Self, ModelError> {
        let weights: Vec<f64> = (1..=n).map(|rank| (rank as f64).powf(-exponent)).collect();
        AliasTable::new(&weights)
            .map(Self::Table)
            .map_err(|e| ModelError::Params(format!("Zipf ranks: {e}")))
    }

    fn formula(n: usize, exponent: f64) -> Result<Self, ModelError> {
        Zipf::new(n as f64, exponent)
            .map(|zipf| Self::Formula(zipf, n.saturating_sub(1)))
            .map_err(|e| ModelError::Params(format!("Zipf ranks: {e}")))
    }

    pub(super) fn sample(&self, rng: &mut Xoshiro256PlusPlus) -> usize {
        let [position] = self.sample_array(rng);
        position
    }

    /// `N` independent draws (see [`AliasTable::sample_array`]).
    pub(super) fn sample_array<const N: usize>(&self, rng: &mut Xoshiro256PlusPlus) -> [usize; N] {
        match self {
            Self::Table(table) => table.sample_array(rng),
            // Ranks 1..=n, as whole numbers in an f64.
            Self::Formula(zipf, last) => {
                std::array::from_fn(|_| (zipf.sample(rng) as usize).saturating_sub(1).min(*last))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn zipf_ranks_from_the_table_and_the_formula_agree() {
        let (n, exponent, draws) = (50_000, 0.8, 400_000);
        let harmonic = |n: u32| (1..=n).map(|k| f64::from(k).powf(-exponent)).sum::<f64>();
        let expected_top_100 = harmonic(100) / harmonic(50_000);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        for ranks in [
            ZipfRank::table(n, exponent).expect("a table"),
            ZipfRank::formula(n, exponent).expect("a formula"),
        ] {
            let mut first = 0_u32;
            let mut top_100 = 0_u32;
            for _ in 0..draws {
                let rank = ranks.sample(&mut rng);
                assert!(rank < n);
                first += u32::from(rank == 0);
                top_100 += u32::from(rank < 100);
            }
            let share = f64::from(top_100) / f64::from(draws);
            assert!(
                (share - expected_top_100).abs() < 0.005,
                "top-100 share {share:.4}, Zipf {expected_top_100:.4}"
            );
            let first_share = f64::from(first) / f64::from(draws);
            let expected_first = 1.0 / harmonic(50_000);
            assert!(
                (first_share - expected_first).abs() < 0.0015,
                "rank-1 share {first_share:.4}, Zipf {expected_first:.4}"
            );
        }
    }
}
