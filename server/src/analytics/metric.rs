//! What a metric is. Each metric kind (one unary RPC and one Subscribe
//! query) is one module of [`super::metrics`] implementing [`Metric`]: its
//! request's rules, the reads it plans, the assembly of its result and the
//! diff of two results. The unary handlers, [`Query`] and Subscribe's feeds
//! are generic over it, so they behave the same for every kind.

use std::{collections::BTreeSet, future::Future};

use crate::store::nodes::Route;
use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use chrono::{DateTime, Utc};
use prost::Message;
use rtap::v1::{CommitDelta, EventType, MinuteChange, Source, TimeWindow, delta, snapshot};

use super::window::{self, ResolvedWindow, SignedBucket};
use crate::{
    error::{Error, FieldViolation},
    store::{Retention, read::MetricReader},
};

/// One metric kind.
pub(crate) trait Metric: Send + Sync + 'static {
    /// The query (the unary request, and Subscribe's oneof field).
    type Request: Message + Clone + Default + Send + Sync + 'static;
    /// The result (the unary response, and the Snapshot's oneof field).
    type Response: Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static;

    /// What an additive feed keeps of the buckets past its window's end,
    /// which a rolling window takes in as it moves (`()` for metrics that
    /// are not additive).
    type Ahead: Default + Send + Sync + 'static;

    /// The name of the request in Subscribe's `query` oneof; prefixes the
    /// fields of its violations there and its feeds' keys.
    const NAME: &'static str;

    /// Whether the result is a sum of what commits add, so a feed applies
    /// each commit's published change to the result it holds
    /// ([`Self::apply`], [`Self::roll`]) and reads Redis only to start or to
    /// resync. Otherwise feeds re-read what [`Self::touched`] names.
    const ADDITIVE: bool = false;

    /// Adds a violation for every invalid field but the window (which
    /// depends on the time the query runs).
    fn validate(request: &Self::Request, violations: &mut Violations);

    /// The request's window and granularity (raw enum number, 0 when the
    /// metric has none).
    fn window(request: &Self::Request) -> (Option<&TimeWindow>, i32);

    /// The request with every field in one canonical form, so requests that
    /// always give the same result are equal (filters are sets, a default
    /// spelled out or left out is the same).
    fn canonical(request: &Self::Request) -> Self::Request {
        request.clone()
    }

    /// Reads the result from the metric store.
    fn read<C: Route>(
        request: &Self::Request,
        reads: Reads<'_, C>,
    ) -> impl Future<Output = Result<Self::Response, Error>> + Send;

    /// The change from `old` to `new`, `None` when there is none.
    fn diff(old: &Self::Response, new: &Self::Response) -> Option<delta::Change>;

    /// What a commit changed in the result of `request` over `window`. It
    /// may name more than changed, never less: a feed re-reads nothing
    /// else.
    fn touched(request: &Self::Request, window: &ResolvedWindow, delta: &CommitDelta) -> Touched;

    /// The one product whose mention a commit needs to change the result,
    /// if there is one: the hub then wakes the feed only for commits that
    /// mention it (in its counts or its users). `None`: every commit may.
    fn product_interest(request: &Self::Request) -> Option<i64> {
        let _ = request;
        None
    }

    /// Brings `held` (read over `held_window`) up to date for `reads.window`
    /// after `touched` named `buckets` of it (none: only the window may have
    /// moved). The default re-reads everything, unless nothing changed; a
    /// metric whose [`Self::touched`] names buckets re-reads only those, and
    /// the buckets a rolling window gained.
    fn refresh<C: Route>(
        request: &Self::Request,
        reads: Reads<'_, C>,
        held: &mut Self::Response,
        held_window: ResolvedWindow,
        buckets: &BTreeSet<i64>,
    ) -> impl Future<Output = Result<Refreshed, Error>> + Send {
        async move {
            if held_window == reads.window && buckets.is_empty() {
                return Ok(Refreshed {
                    change: None,
                    whole: false,
                });
            }
            reread::<Self, C>(request, reads, held).await
        }
    }

    /// The result as a Subscribe snapshot.
    fn snapshot(result: Self::Response) -> snapshot::Result;

    /// Reads the result and, for an additive metric, the buckets past the
    /// window's end that start before `until` (Unix seconds), with the same
    /// reads (so at the same stored offsets).
    fn read_ahead<C: Route>(
        request: &Self::Request,
        reads: Reads<'_, C>,
        until: i64,
    ) -> impl Future<Output = Result<(Self::Response, Self::Ahead), Error>> + Send {
        let _ = until;
        async move { Ok((Self::read(request, reads).await?, Self::Ahead::default())) }
    }

    /// Adds what `delta` counted to `held` (over `window`) and to `ahead`;
    /// the change of `held`, if any. `Err` when `held` cannot take it (the
    /// feed re-reads). Only additive metrics are asked.
    fn apply(
        request: &Self::Request,
        window: &ResolvedWindow,
        (held, ahead): (&mut Self::Response, &mut Self::Ahead),
        delta: &CommitDelta,
    ) -> Result<Option<delta::Change>, Reread> {
        let _ = (request, window, held, ahead, delta);
        Err(Reread)
    }

    /// Moves an additive `held` from `held_window` to `window`, taking the
    /// buckets it gains from `ahead`; the change, if any. `Err` when it
    /// cannot (the granularity changed).
    fn roll(
        request: &Self::Request,
        (held_window, window): (ResolvedWindow, ResolvedWindow),
        (held, ahead): (&mut Self::Response, &mut Self::Ahead),
    ) -> Result<Option<delta::Change>, Reread> {
        let _ = (request, held_window, window, held, ahead);
        Err(Reread)
    }
}

/// A held result cannot take a change in memory: the feed re-reads it.
#[derive(Debug)]
pub(crate) struct Reread;

/// What a refresh did.
#[derive(Debug)]
pub struct Refreshed {
    /// The change of the result, if any.
    pub change: Option<delta::Change>,
    /// Whether it re-read the whole result.
    pub whole: bool,
}

/// Re-reads all of `held`, and returns the change.
pub async fn reread<M: Metric + ?Sized, C: Route>(
    request: &M::Request,
    reads: Reads<'_, C>,
    held: &mut M::Response,
) -> Result<Refreshed, Error> {
    let fresh = M::read(request, reads).await?;
    let change = M::diff(held, &fresh);
    *held = fresh;
    Ok(Refreshed {
        change,
        whole: true,
    })
}

/// A request of metric `M` whose fields are valid (its window is resolved
/// each time it runs: rolling windows move).
pub(crate) struct Query<M: Metric> {
    request: M::Request,
}

impl<M: Metric> Clone for Query<M> {
    fn clone(&self) -> Self {
        Self {
            request: self.request.clone(),
        }
    }
}

impl<M: Metric> Query<M> {
    /// Checks `request`; field names in violations start with `prefix`.
    pub(crate) fn new(request: M::Request, prefix: &str) -> Result<Self, Error> {
        let mut violations = Violations::new(prefix);
        M::validate(&request, &mut violations);
        violations.into_result()?;
        Ok(Self { request })
    }

    /// The key of the query's feed: queries that always give the same
    /// result share one.
    pub(crate) fn canonical_key(&self) -> String {
        let bytes = M::canonical(&self.request).encode_to_vec();
        format!("{}:{}", M::NAME, STANDARD_NO_PAD.encode(bytes))
    }

    /// Whether the window ends now (and so moves forward with time).
    pub(crate) fn is_rolling(&self) -> bool {
        let (window, _) = M::window(&self.request);
        !matches!(
            window.and_then(|w| w.window.as_ref()),
            Some(rtap::v1::time_window::Window::Range(_))
        )
    }

    /// The window this query covers at `now`; field names in violations
    /// start with `prefix`.
    pub(crate) fn window(
        &self,
        now: DateTime<Utc>,
        retention: &Retention,
        prefix: &str,
    ) -> Result<ResolvedWindow, Error> {
        let (window, granularity) = M::window(&self.request);
        window::resolve(window, granularity, now, retention, prefix).map_err(Error::InvalidArgument)
    }

    /// Runs the query over `window`, reading buckets still kept under
    /// `retention`.
    pub(crate) async fn run<C: Route>(
        &self,
        route: &C,
        reader: &MetricReader,
        window: ResolvedWindow,
        retention: &Retention,
    ) -> Result<M::Response, Error> {
        let reads = Reads {
            route,
            reader,
            window,
            retention,
        };
        M::read(&self.request, reads).await
    }

    /// [`Self::run`], with the buckets ahead of the window until `until`.
    pub(crate) async fn run_ahead<C: Route>(
        &self,
        route: &C,
        reader: &MetricReader,
        (window, until): (ResolvedWindow, i64),
        retention: &Retention,
    ) -> Result<(M::Response, M::Ahead), Error> {
        let reads = Reads {
            route,
            reader,
            window,
            retention,
        };
        M::read_ahead(&self.request, reads, until).await
    }

    /// The request.
    pub(crate) fn request(&self) -> &M::Request {
        &self.request
    }

    /// The product whose commits alone can change the result, if any.
    pub fn product_interest(&self) -> Option<i64> {
        M::product_interest(&self.request)
    }

    /// What `delta` changed in the result over `window`.
    pub fn touched(&self, window: &ResolvedWindow, delta: &CommitDelta) -> Touched {
        M::touched(&self.request, window, delta)
    }

    /// Brings `held`, read over `held_window`, up to date for `window`
    /// after `buckets` of it changed.
    pub async fn refresh<C: Route>(
        &self,
        route: &C,
        reader: &MetricReader,
        (held_window, window, retention): (ResolvedWindow, ResolvedWindow, &Retention),
        held: &mut M::Response,
        buckets: &BTreeSet<i64>,
    ) -> Result<Refreshed, Error> {
        let reads = Reads {
            route,
            reader,
            window,
            retention,
        };
        M::refresh(&self.request, reads, held, held_window, buckets).await
    }
}

/// What a commit changed in a query's result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Touched {
    /// Nothing: no read needed.
    #[default]
    Nothing,
    /// The buckets starting at these times (Unix seconds) only; none: only
    /// a rolling window may have moved (re-read what it gained).
    Buckets(BTreeSet<i64>),
    /// Anything: re-read the whole result.
    Everything,
}

impl Touched {
    /// Both changes.
    pub fn merge(&mut self, other: Self) {
        *self = match (std::mem::take(self), other) {
            (Self::Everything, _) | (_, Self::Everything) => Self::Everything,
            (Self::Nothing, other) | (other, Self::Nothing) => other,
            (Self::Buckets(mut mine), Self::Buckets(theirs)) => {
                mine.extend(theirs);
                Self::Buckets(mine)
            }
        };
    }

    /// The buckets starting at `starts`, `Nothing` if none.
    pub fn buckets(starts: BTreeSet<i64>) -> Self {
        if starts.is_empty() {
            Self::Nothing
        } else {
            Self::Buckets(starts)
        }
    }

    /// Whether nothing changed.
    pub fn is_nothing(&self) -> bool {
        *self == Self::Nothing
    }
}

/// The minutes a commit changed inside `window`, with their start (Unix
/// seconds).
pub fn minutes_in<'a>(
    window: &'a ResolvedWindow,
    delta: &'a CommitDelta,
) -> impl Iterator<Item = (i64, &'a MinuteChange)> + 'a {
    delta.minutes.iter().filter_map(|minute| {
        let start = minute.minute_start?.seconds;
        (window.start..window.end)
            .contains(&start)
            .then_some((start, minute))
    })
}

/// `Everything` if `changed` holds for any minute of the window the commit
/// changed, else `Nothing`: for metrics re-read whole.
pub fn everything_if(
    window: &ResolvedWindow,
    delta: &CommitDelta,
    changed: impl Fn(&MinuteChange) -> bool,
) -> Touched {
    if minutes_in(window, delta).any(|(_, minute)| changed(minute)) {
        Touched::Everything
    } else {
        Touched::Nothing
    }
}

/// Whether `value` passes a filter of values (empty: every value).
pub fn admits(filter: &[i32], value: i32) -> bool {
    filter.is_empty() || filter.contains(&value)
}

/// What a metric reads with: the store, and the window it covers.
pub(crate) struct Reads<'a, C> {
    /// The connections to the partitions' nodes.
    pub(crate) route: &'a C,
    /// The partitions read.
    pub(crate) reader: &'a MetricReader,
    /// The window.
    pub(crate) window: ResolvedWindow,
    retention: &'a Retention,
}

impl<C> Reads<'_, C> {
    /// Buckets whose signed sum is the window, for additive totals. Which
    /// buckets it picks depends on the time (future buckets are free), their
    /// sum never does.
    pub(crate) fn cover(&self) -> Vec<SignedBucket> {
        self.window
            .signed_cover(Utc::now().timestamp(), self.retention)
    }
}

/// The invalid fields of a request, named under a prefix.
pub(crate) struct Violations {
    prefix: String,
    found: Vec<FieldViolation>,
}

impl Violations {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            found: Vec::new(),
        }
    }

    /// `field` is invalid: `description` says why.
    pub(crate) fn add(&mut self, field: &str, description: impl Into<String>) {
        self.found.push(FieldViolation::new(
            format!("{}{field}", self.prefix),
            description,
        ));
    }

    fn into_result(self) -> Result<(), Error> {
        if self.found.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.found))
        }
    }

    /// `product_id` (0 for every product) must not be negative.
    pub(crate) fn check_product(&mut self, product_id: i64) {
        if product_id < 0 {
            self.add("product_id", "must not be negative");
        }
    }

    /// Every entry of `sources` must be a known source.
    pub(crate) fn check_sources(&mut self, sources: &[i32]) {
        for (index, value) in sources.iter().enumerate() {
            if !matches!(Source::try_from(*value), Ok(s) if s != Source::Unspecified) {
                self.add(
                    &format!("sources[{index}]"),
                    format!("unknown source {value}"),
                );
            }
        }
    }
}

/// Every event type a query can ask for.
pub(crate) const EVENT_TYPES: [EventType; 6] = [
    EventType::PageView,
    EventType::ProductView,
    EventType::AddToCart,
    EventType::RemoveFromCart,
    EventType::Purchase,
    EventType::Search,
];
/// Every source a query can ask for.
pub(crate) const SOURCES: [Source; 3] = [Source::Web, Source::MobileApp, Source::Server];

/// A filter's values as a set: sorted, each once.
pub(crate) fn distinct(values: &[i32]) -> Vec<i32> {
    let mut values = values.to_vec();
    values.sort_unstable();
    values.dedup();
    values
}

/// The requested values, or every value when none is requested.
pub(crate) fn selected<T: Copy + Into<i32>>(requested: &[i32], all: &[T]) -> Vec<i32> {
    if requested.is_empty() {
        all.iter().map(|v| (*v).into()).collect()
    } else {
        distinct(requested)
    }
}

/// `numerator / denominator`, 0 when the denominator is 0.
pub(crate) fn ratio(numerator: i64, denominator: i64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

/// `numerator / denominator` rounded toward zero, 0 when the denominator is
/// 0.
pub(crate) fn ratio_i64(numerator: i64, denominator: i64) -> i64 {
    if denominator == 0 {
        0
    } else {
        numerator / denominator
    }
}
