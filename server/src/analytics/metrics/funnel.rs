//! GetFunnel: sessions that reached each stage of the purchase funnel, per
//! source and in total, with conversion rates.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::store::nodes::Route;
use rtap::v1::{
    CommitDelta, Funnel as FunnelResult, FunnelChange, FunnelDelta, GetFunnelRequest,
    GetFunnelResponse, Source, TimeWindow, delta, snapshot,
};

use crate::{
    analytics::{
        metric::{
            Metric, Reads, SOURCES, Touched, Violations, admits, distinct, everything_if, ratio,
            selected,
        },
        window::ResolvedWindow,
    },
    error::Error,
    store::{Counter, FunnelStage},
};

/// GetFunnel.
pub(crate) struct Funnel;

/// Sessions started, and those of them that reached each stage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Stages {
    sessions: i64,
    viewed: i64,
    carted: i64,
    bought: i64,
}

impl Stages {
    fn of(funnel: &FunnelResult) -> Self {
        Self {
            sessions: funnel.sessions,
            viewed: funnel.product_view_sessions,
            carted: funnel.add_to_cart_sessions,
            bought: funnel.purchase_sessions,
        }
    }

    /// The count of sessions that reached `stage` (all sessions for
    /// `None`).
    fn count(&mut self, stage: Option<FunnelStage>) -> &mut i64 {
        match stage {
            None => &mut self.sessions,
            Some(FunnelStage::ProductView) => &mut self.viewed,
            Some(FunnelStage::AddToCart) => &mut self.carted,
            Some(FunnelStage::Purchase) => &mut self.bought,
        }
    }

    fn add(&mut self, other: Self) {
        self.sessions += other.sessions;
        self.viewed += other.viewed;
        self.carted += other.carted;
        self.bought += other.bought;
    }

    /// The funnel of `source` with its rates.
    fn funnel(self, source: i32) -> FunnelResult {
        FunnelResult {
            source,
            sessions: self.sessions,
            product_view_sessions: self.viewed,
            add_to_cart_sessions: self.carted,
            purchase_sessions: self.bought,
            view_to_cart_rate: ratio(self.carted, self.viewed),
            cart_to_purchase_rate: ratio(self.bought, self.carted),
            conversion_rate: ratio(self.bought, self.sessions),
        }
    }

    /// `self - before`, as a change of `source`.
    fn change_from(self, before: Self, source: i32) -> FunnelChange {
        FunnelChange {
            source,
            sessions_change: self.sessions - before.sessions,
            product_view_sessions_change: self.viewed - before.viewed,
            add_to_cart_sessions_change: self.carted - before.carted,
            purchase_sessions_change: self.bought - before.bought,
        }
    }
}

impl Metric for Funnel {
    type Request = GetFunnelRequest;
    type Response = GetFunnelResponse;
    type Ahead = ();
    const NAME: &'static str = "funnel";

    fn validate(request: &Self::Request, violations: &mut Violations) {
        violations.check_sources(&request.sources);
    }

    fn window(request: &Self::Request) -> (Option<&TimeWindow>, i32) {
        (request.window.as_ref(), 0)
    }

    fn canonical(request: &Self::Request) -> Self::Request {
        GetFunnelRequest {
            sources: distinct(&request.sources),
            ..request.clone()
        }
    }

    async fn read<C: Route>(
        request: &Self::Request,
        reads: Reads<'_, C>,
    ) -> Result<Self::Response, Error> {
        let sources = selected(&request.sources, &SOURCES);
        let counters: Vec<Counter> = sources
            .iter()
            .flat_map(|&source| {
                let stages = FunnelStage::ALL.map(|stage| Counter::Funnel { stage, source });
                std::iter::once(Counter::Sessions { source }).chain(stages)
            })
            .collect();
        let cover = reads.cover();
        let mut by_source: BTreeMap<i32, Stages> =
            sources.iter().map(|s| (*s, Stages::default())).collect();
        for (counter, value) in reads
            .reader
            .counter_totals(reads.route, &cover, &counters)
            .await?
        {
            let (source, stage) = match counter {
                Counter::Sessions { source } => (source, None),
                Counter::Funnel { stage, source } => (source, Some(stage)),
                _ => continue,
            };
            *by_source.entry(source).or_default().count(stage) += value;
        }
        // Without a filter, sources with no session are left out.
        let explicit = !request.sources.is_empty();
        let mut total = Stages::default();
        let funnels: Vec<FunnelResult> = by_source
            .into_iter()
            .filter(|(_, stages)| explicit || stages.sessions != 0)
            .map(|(source, stages)| {
                total.add(stages);
                stages.funnel(source)
            })
            .collect();
        Ok(GetFunnelResponse {
            granularity: reads.window.proto_granularity(),
            range: Some(reads.window.range()),
            funnels,
            total: Some(total.funnel(Source::Unspecified as i32)),
        })
    }

    fn diff(old: &Self::Response, new: &Self::Response) -> Option<delta::Change> {
        let before: HashMap<i32, Stages> = old
            .funnels
            .iter()
            .map(|f| (f.source, Stages::of(f)))
            .collect();
        let listed: HashSet<i32> = new.funnels.iter().map(|f| f.source).collect();
        // Sources no longer listed go to zero.
        let mut changes: Vec<FunnelChange> = before
            .iter()
            .filter(|(source, _)| !listed.contains(source))
            .map(|(source, stages)| Stages::default().change_from(*stages, *source))
            .collect();
        for funnel in &new.funnels {
            let previous = before.get(&funnel.source).copied().unwrap_or_default();
            let current = Stages::of(funnel);
            if previous != current {
                changes.push(current.change_from(previous, funnel.source));
            }
        }
        if changes.is_empty() && old.range == new.range {
            return None;
        }
        Some(delta::Change::Funnel(FunnelDelta {
            changes,
            range: new.range,
        }))
    }

    /// Re-read whole (a few counters of the window's cover) when a selected
    /// source's sessions started or reached a stage.
    fn touched(request: &Self::Request, window: &ResolvedWindow, delta: &CommitDelta) -> Touched {
        everything_if(window, delta, |minute| {
            minute.sessions.iter().any(|s| {
                admits(&request.sources, s.source)
                    && (s.sessions != 0
                        || s.reached_product_view != 0
                        || s.reached_add_to_cart != 0
                        || s.reached_purchase != 0)
            })
        })
    }

    fn snapshot(result: Self::Response) -> snapshot::Result {
        snapshot::Result::Funnel(result)
    }
}
