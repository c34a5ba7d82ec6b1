//! Reads of the metric store, merged across partitions: counters and
//! rankings are summed, unique users are counted per partition (a union of
//! the partition's buckets) and summed, which is exact to HyperLogLog error
//! because a user lives on one partition.

use std::collections::HashMap;

use redis::aio::ConnectionLike;

use super::{Bucket, Counter, Ranking, StoreError, UserSet, keys::PartitionKeys};

/// Reads metrics of a namespace over a set of partitions.
#[derive(Debug, Clone)]
pub struct MetricReader {
    partitions: Vec<PartitionKeys>,
}

impl MetricReader {
    /// A reader of `partitions` of `namespace`.
    pub fn new(namespace: &str, partitions: impl IntoIterator<Item = i32>) -> Self {
        Self {
            partitions: partitions
                .into_iter()
                .map(|p| PartitionKeys::new(namespace, p))
                .collect(),
        }
    }

    /// Every counter field of `buckets`, summed over buckets and partitions
    /// (look fields up with [`Counter::field`]).
    pub async fn counters(
        &self,
        connection: &mut impl ConnectionLike,
        buckets: &[Bucket],
    ) -> Result<HashMap<String, i64>, StoreError> {
        let mut pipe = redis::pipe();
        for keys in &self.partitions {
            for bucket in buckets {
                pipe.cmd("HGETALL").arg(keys.counters(*bucket));
            }
        }
        let replies: Vec<HashMap<String, i64>> = pipe.query_async(connection).await?;
        let mut totals = HashMap::new();
        for reply in replies {
            for (field, value) in reply {
                *totals.entry(field).or_default() += value;
            }
        }
        Ok(totals)
    }

    /// One counter, summed over `buckets` and partitions.
    pub async fn counter(
        &self,
        connection: &mut impl ConnectionLike,
        buckets: &[Bucket],
        counter: Counter,
    ) -> Result<i64, StoreError> {
        let field = counter.field();
        let mut pipe = redis::pipe();
        for keys in &self.partitions {
            for bucket in buckets {
                pipe.cmd("HGET").arg(keys.counters(*bucket)).arg(&field);
            }
        }
        let replies: Vec<Option<i64>> = pipe.query_async(connection).await?;
        Ok(replies.into_iter().flatten().sum())
    }

    /// Distinct users of `set` over `buckets`.
    pub async fn unique_users(
        &self,
        connection: &mut impl ConnectionLike,
        buckets: &[Bucket],
        set: UserSet,
    ) -> Result<u64, StoreError> {
        if buckets.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for keys in &self.partitions {
            let hlls: Vec<String> = buckets.iter().map(|b| keys.users(*b, set)).collect();
            pipe.cmd("PFCOUNT").arg(hlls);
        }
        let replies: Vec<u64> = pipe.query_async(connection).await?;
        Ok(replies.into_iter().sum())
    }

    /// Scores of every product in `ranking` over `buckets`.
    pub async fn ranking(
        &self,
        connection: &mut impl ConnectionLike,
        buckets: &[Bucket],
        ranking: Ranking,
    ) -> Result<HashMap<i64, i64>, StoreError> {
        let mut pipe = redis::pipe();
        for keys in &self.partitions {
            for bucket in buckets {
                pipe.cmd("ZRANGE")
                    .arg(keys.ranking(*bucket, ranking))
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES");
            }
        }
        let replies: Vec<Vec<(i64, i64)>> = pipe.query_async(connection).await?;
        let mut totals = HashMap::new();
        for (product, score) in replies.into_iter().flatten() {
            *totals.entry(product).or_default() += score;
        }
        Ok(totals)
    }
}
