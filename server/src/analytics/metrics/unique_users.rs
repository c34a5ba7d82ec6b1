//! GetUniqueUsers: distinct users over the window, of every event, a source
//! or a product.

use crate::store::nodes::Route;
use rtap::v1::{
    CommitDelta, GetUniqueUsersRequest, GetUniqueUsersResponse, Source, TimeWindow,
    UniqueUsersDelta, delta, snapshot,
};

use crate::{
    analytics::{
        metric::{Metric, Reads, Touched, Violations, everything_if},
        window::ResolvedWindow,
    },
    error::Error,
    store::UserSet,
};

/// GetUniqueUsers.
pub(crate) struct UniqueUsers;

impl Metric for UniqueUsers {
    type Request = GetUniqueUsersRequest;
    type Response = GetUniqueUsersResponse;
    type Ahead = ();
    const NAME: &'static str = "unique_users";

    fn validate(request: &Self::Request, violations: &mut Violations) {
        violations.check_product(request.product_id);
        if Source::try_from(request.source).is_err() {
            violations.add("source", format!("unknown source {}", request.source));
        }
    }

    fn window(request: &Self::Request) -> (Option<&TimeWindow>, i32) {
        (request.window.as_ref(), 0)
    }

    async fn read<C: Route>(
        request: &Self::Request,
        reads: Reads<'_, C>,
    ) -> Result<Self::Response, Error> {
        // A product and a source together would need per-(product, source)
        // sets; the product filter wins, as documented in the README.
        let set = if request.product_id > 0 {
            UserSet::Product(request.product_id)
        } else if request.source != Source::Unspecified as i32 {
            UserSet::Source(request.source)
        } else {
            UserSet::All
        };
        let window = reads.window;
        let users = reads
            .reader
            .unique_users(reads.route, &window.covering_buckets(), set)
            .await?;
        Ok(GetUniqueUsersResponse {
            granularity: window.proto_granularity(),
            range: Some(window.range()),
            unique_users: i64::try_from(users).unwrap_or(i64::MAX),
        })
    }

    fn diff(old: &Self::Response, new: &Self::Response) -> Option<delta::Change> {
        let change = new.unique_users - old.unique_users;
        if change == 0 && old.range == new.range {
            return None;
        }
        Some(delta::Change::UniqueUsers(UniqueUsersDelta {
            unique_users_change: change,
            range: new.range,
        }))
    }

    fn product_interest(request: &Self::Request) -> Option<i64> {
        (request.product_id > 0).then_some(request.product_id)
    }

    /// A union of HyperLogLogs cannot be re-read in part: any new user of
    /// the set re-reads it.
    fn touched(request: &Self::Request, window: &ResolvedWindow, delta: &CommitDelta) -> Touched {
        let (product, source) = (request.product_id, request.source);
        everything_if(window, delta, |minute| {
            if product > 0 {
                minute.products_with_users.contains(&product)
            } else {
                minute
                    .counts
                    .iter()
                    .any(|c| c.events != 0 && (source == 0 || c.source == source))
            }
        })
    }

    fn snapshot(result: Self::Response) -> snapshot::Result {
        snapshot::Result::UniqueUsers(result)
    }
}
