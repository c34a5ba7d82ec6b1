//! GetTopProducts: the products with the most views, carts, purchases or
//! revenue over the window.

use std::collections::{HashMap, HashSet};

use crate::store::nodes::Route;
use rtap::v1::{
    CommitDelta, EventType, GetTopProductsRequest, GetTopProductsResponse, ProductRanking,
    ProductScore, TimeWindow, TopProductsDelta, delta, snapshot,
};

use crate::{
    analytics::{
        metric::{Metric, Reads, Touched, Violations, everything_if},
        window::ResolvedWindow,
    },
    error::Error,
    store::Ranking,
};

/// `limit` of GetTopProducts when the request gives none.
pub(crate) const DEFAULT_TOP_LIMIT: i32 = 10;
/// Largest `limit` of GetTopProducts.
pub(crate) const MAX_TOP_LIMIT: i32 = 100;

/// GetTopProducts.
pub(crate) struct TopProducts;

impl Metric for TopProducts {
    type Request = GetTopProductsRequest;
    type Response = GetTopProductsResponse;
    type Ahead = ();
    const NAME: &'static str = "top_products";

    fn validate(request: &Self::Request, violations: &mut Violations) {
        if ranking(request.ranking).is_none() {
            violations.add(
                "ranking",
                format!("unknown or unspecified ranking {}", request.ranking),
            );
        }
        if !(0..=MAX_TOP_LIMIT).contains(&request.limit) {
            violations.add(
                "limit",
                format!("must be between 0 (meaning {DEFAULT_TOP_LIMIT}) and {MAX_TOP_LIMIT}"),
            );
        }
    }

    fn window(request: &Self::Request) -> (Option<&TimeWindow>, i32) {
        (request.window.as_ref(), 0)
    }

    fn canonical(request: &Self::Request) -> Self::Request {
        // Names are filled per subscriber, after the feed: one feed serves
        // those who asked for them and those who did not.
        GetTopProductsRequest {
            limit: limit(request),
            include_product_names: false,
            ..*request
        }
    }

    async fn read<C: Route>(
        request: &Self::Request,
        reads: Reads<'_, C>,
    ) -> Result<Self::Response, Error> {
        let ranking = ranking(request.ranking).unwrap_or(Ranking::Views);
        let cover = reads.cover();
        let scores = reads.reader.ranking(reads.route, &cover, ranking).await?;
        let mut products: Vec<ProductScore> = scores
            .into_iter()
            .filter(|(_, value)| *value != 0)
            .map(|(product_id, value)| ProductScore {
                product_id,
                value,
                product_name: String::new(),
            })
            .collect();
        products
            .sort_unstable_by(|a, b| b.value.cmp(&a.value).then(a.product_id.cmp(&b.product_id)));
        products.truncate(usize::try_from(limit(request)).unwrap_or(0));
        Ok(GetTopProductsResponse {
            granularity: reads.window.proto_granularity(),
            range: Some(reads.window.range()),
            ranking: request.ranking,
            products,
        })
    }

    fn diff(old: &Self::Response, new: &Self::Response) -> Option<delta::Change> {
        let before: HashMap<i64, i64> = old
            .products
            .iter()
            .map(|p| (p.product_id, p.value))
            .collect();
        let upserted: Vec<ProductScore> = new
            .products
            .iter()
            .filter(|p| before.get(&p.product_id) != Some(&p.value))
            .cloned()
            .collect();
        let listed: HashSet<i64> = new.products.iter().map(|p| p.product_id).collect();
        let removed: Vec<i64> = old
            .products
            .iter()
            .map(|p| p.product_id)
            .filter(|id| !listed.contains(id))
            .collect();
        if upserted.is_empty() && removed.is_empty() && old.range == new.range {
            return None;
        }
        Some(delta::Change::TopProducts(TopProductsDelta {
            upserted,
            removed_product_ids: removed,
            range: new.range,
        }))
    }

    /// Re-read whole (a ranking is a union of sorted sets) when a product
    /// had an event of the type it ranks.
    fn touched(request: &Self::Request, window: &ResolvedWindow, delta: &CommitDelta) -> Touched {
        let ranked = match ranking(request.ranking) {
            Some(Ranking::Views) => EventType::ProductView,
            Some(Ranking::AddToCarts) => EventType::AddToCart,
            Some(Ranking::Purchases | Ranking::Revenue) => EventType::Purchase,
            None => return Touched::Nothing,
        } as i32;
        everything_if(window, delta, |minute| {
            minute
                .counts
                .iter()
                .any(|c| c.product_id > 0 && c.r#type == ranked)
        })
    }

    fn snapshot(result: Self::Response) -> snapshot::Result {
        snapshot::Result::TopProducts(result)
    }
}

/// The store's ranking of a `ProductRanking` number; `None` when unknown or
/// unspecified.
fn ranking(value: i32) -> Option<Ranking> {
    match ProductRanking::try_from(value) {
        Ok(ProductRanking::Views) => Some(Ranking::Views),
        Ok(ProductRanking::AddToCarts) => Some(Ranking::AddToCarts),
        Ok(ProductRanking::Purchases) => Some(Ranking::Purchases),
        Ok(ProductRanking::Revenue) => Some(Ranking::Revenue),
        Ok(ProductRanking::Unspecified) | Err(_) => None,
    }
}

/// The number of products listed.
fn limit(request: &GetTopProductsRequest) -> i32 {
    if request.limit == 0 {
        DEFAULT_TOP_LIMIT
    } else {
        request.limit
    }
}
