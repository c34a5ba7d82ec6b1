//! The ground truth of a run: what was actually produced, summarised the way
//! RTAP's metrics are, so tests can compare the platform against it.
//!
//! Counts per type and source are always kept (for the final summary); the
//! costlier detail only when a truth file is asked for.
//!
//! Only records handed to Kafka count: events still held back (late) when a
//! run stops were never produced, and are not in the truth.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
};

use chrono::{DateTime, Utc};
use rtap::v1::{EventType, Source};
use serde::Serialize;

use uuid::Uuid;

use crate::model::{Emission, EmissionKind, Event};

/// Per-product totals.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct ProductTruth {
    /// Product views.
    pub views: u64,
    /// Total dwell time of those views, in microseconds.
    pub dwell_micros: i64,
    /// Add-to-cart events.
    pub add_to_carts: u64,
    /// Items added to carts.
    pub items_added: u64,
    /// Purchase events.
    pub purchases: u64,
    /// Items purchased.
    pub items_purchased: u64,
    /// Revenue in millionths of the currency unit.
    pub revenue_micros: i64,
    /// Distinct users with any event on the product.
    pub unique_users: u64,
}

/// Sessions reaching each funnel stage.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct FunnelTruth {
    /// Sessions.
    pub sessions: u64,
    /// Sessions with a product view.
    pub product_view_sessions: u64,
    /// Sessions with an add to cart.
    pub add_to_cart_sessions: u64,
    /// Sessions with a purchase.
    pub purchase_sessions: u64,
}

/// Everything a run produced, summarised.
#[derive(Debug, Default, Serialize)]
pub struct GroundTruth {
    /// The seed of the run.
    pub seed: u64,
    /// Records produced (events, duplicates and malformed payloads).
    pub records: u64,
    /// Distinct valid events produced.
    pub events: u64,
    /// Records that repeated an earlier event's `event_id`.
    pub duplicates: u64,
    /// Valid events produced after newer ones.
    pub late_events: u64,
    /// Malformed payloads, per kind.
    pub malformed: BTreeMap<String, u64>,
    /// Events per type (`EVENT_TYPE_*`).
    pub events_by_type: BTreeMap<String, u64>,
    /// Events per source (`SOURCE_*`).
    pub events_by_source: BTreeMap<String, u64>,
    /// Events per `SOURCE_*/EVENT_TYPE_*`.
    pub events_by_source_and_type: BTreeMap<String, u64>,
    /// Events per UTC minute of event time (RFC 3339 minute start).
    pub events_per_minute: BTreeMap<String, u64>,
    /// Distinct users.
    pub unique_users: u64,
    /// Total revenue in millionths of the currency unit.
    pub revenue_micros: i64,
    /// Per-product totals, by product id.
    pub products: BTreeMap<i64, ProductTruth>,
    /// Funnel per source (`SOURCE_*`).
    pub funnel: BTreeMap<String, FunnelTruth>,
    /// Earliest event time produced.
    pub first_event_time: Option<DateTime<Utc>>,
    /// Latest event time produced.
    pub last_event_time: Option<DateTime<Utc>>,

    /// Whether per-user, per-session, per-product and per-minute detail is
    /// kept (costly; only for a truth file).
    #[serde(skip)]
    detailed: bool,
    #[serde(skip)]
    by_source_and_type: [[u64; ENUM_SLOTS]; ENUM_SLOTS],
    #[serde(skip)]
    malformed_by_kind: HashMap<&'static str, u64>,
    #[serde(skip)]
    per_minute: HashMap<i64, u64>,
    #[serde(skip)]
    users: HashSet<i64>,
    #[serde(skip)]
    product_users: HashMap<i64, HashSet<i64>>,
    #[serde(skip)]
    sessions: HashMap<Uuid, (Source, SessionStages)>,
}

/// Enum values counted in arrays (values past the last slot share it).
const ENUM_SLOTS: usize = 8;

#[derive(Debug, Default, Clone, Copy)]
struct SessionStages {
    viewed: bool,
    carted: bool,
    bought: bool,
}

impl GroundTruth {
    /// An empty truth for a run with `seed`; `detailed` also keeps unique
    /// users, sessions, products and minutes.
    pub fn new(seed: u64, detailed: bool) -> Self {
        Self {
            seed,
            detailed,
            ..Self::default()
        }
    }

    /// Counts a produced record.
    pub fn record(&mut self, emission: &Emission) {
        self.records += 1;
        match &emission.kind {
            EmissionKind::Duplicate(_) => self.duplicates += 1,
            EmissionKind::Malformed { kind, .. } => {
                *self.malformed_by_kind.entry(kind.as_str()).or_default() += 1;
            }
            EmissionKind::Event { event, late } => {
                self.events += 1;
                self.late_events += u64::from(*late);
                let slot = |value: i32| usize::try_from(value).unwrap_or(0).min(ENUM_SLOTS - 1);
                self.by_source_and_type[slot(event.source as i32)]
                    [slot(event.event_type as i32)] += 1;
                if self.detailed {
                    self.detail(event, emission.occurred_at);
                }
            }
        }
    }

    fn detail(&mut self, event: &Event, time: DateTime<Utc>) {
        *self
            .per_minute
            .entry(time.timestamp().div_euclid(60))
            .or_default() += 1;
        self.first_event_time = Some(self.first_event_time.map_or(time, |t| t.min(time)));
        self.last_event_time = Some(self.last_event_time.map_or(time, |t| t.max(time)));
        self.users.insert(event.user_id);

        let (_, stages) = self
            .sessions
            .entry(event.session_id)
            .or_insert((event.source, SessionStages::default()));
        match event.event_type {
            EventType::ProductView => stages.viewed = true,
            EventType::AddToCart => stages.carted = true,
            EventType::Purchase => stages.bought = true,
            _ => {}
        }

        if event.product_id == 0 {
            return;
        }
        self.product_users
            .entry(event.product_id)
            .or_default()
            .insert(event.user_id);
        let product = self.products.entry(event.product_id).or_default();
        match event.event_type {
            EventType::ProductView => {
                product.views += 1;
                product.dwell_micros += event.dwell_micros.unwrap_or(0);
            }
            EventType::AddToCart => {
                product.add_to_carts += 1;
                product.items_added += u64::from(event.quantity);
            }
            EventType::Purchase => {
                product.purchases += 1;
                product.items_purchased += u64::from(event.quantity);
                product.revenue_micros += event.amount_micros;
                self.revenue_micros += event.amount_micros;
            }
            _ => {}
        }
    }

    /// Distinct users with an event on `product` (kept only in a detailed
    /// truth).
    pub fn product_user_ids(&self, product: i64) -> impl Iterator<Item = i64> + '_ {
        self.product_users
            .get(&product)
            .into_iter()
            .flatten()
            .copied()
    }

    /// Distinct users (kept only in a detailed truth).
    pub fn user_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.users.iter().copied()
    }

    /// Adds what another generator of the same run produced (its users,
    /// and so its sessions, are its own).
    pub fn merge(&mut self, other: Self) {
        self.records += other.records;
        self.events += other.events;
        self.duplicates += other.duplicates;
        self.late_events += other.late_events;
        self.revenue_micros += other.revenue_micros;
        for (row, other_row) in self
            .by_source_and_type
            .iter_mut()
            .zip(other.by_source_and_type)
        {
            for (count, other_count) in row.iter_mut().zip(other_row) {
                *count += other_count;
            }
        }
        for (kind, count) in other.malformed_by_kind {
            *self.malformed_by_kind.entry(kind).or_default() += count;
        }
        for (minute, count) in other.per_minute {
            *self.per_minute.entry(minute).or_default() += count;
        }
        self.first_event_time = match (self.first_event_time, other.first_event_time) {
            (Some(mine), Some(theirs)) => Some(mine.min(theirs)),
            (mine, theirs) => mine.or(theirs),
        };
        self.last_event_time = self.last_event_time.max(other.last_event_time);
        self.users.extend(other.users);
        for (product, users) in other.product_users {
            self.product_users.entry(product).or_default().extend(users);
        }
        self.sessions.extend(other.sessions);
        for (id, other_product) in other.products {
            let product = self.products.entry(id).or_default();
            product.views += other_product.views;
            product.dwell_micros += other_product.dwell_micros;
            product.add_to_carts += other_product.add_to_carts;
            product.items_added += other_product.items_added;
            product.purchases += other_product.purchases;
            product.items_purchased += other_product.items_purchased;
            product.revenue_micros += other_product.revenue_micros;
        }
    }

    /// Events counted so far, by source and type (their `SOURCE_*` and
    /// `EVENT_TYPE_*` names), leaving out pairs with none.
    pub fn events_by_slot(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        let name = |slot: usize, of: fn(i32) -> Option<&'static str>| {
            of(i32::try_from(slot).unwrap_or(0)).unwrap_or("UNKNOWN")
        };
        let source_name = |v: i32| Source::try_from(v).ok().map(|s| s.as_str_name());
        let type_name = |v: i32| EventType::try_from(v).ok().map(|t| t.as_str_name());
        self.by_source_and_type
            .iter()
            .enumerate()
            .flat_map(move |(source, row)| {
                row.iter().enumerate().filter(|(_, count)| **count > 0).map(
                    move |(event_type, &count)| {
                        (
                            name(source, source_name),
                            name(event_type, type_name),
                            count,
                        )
                    },
                )
            })
    }

    /// Fills the summary fields from the counters.
    pub fn finish(&mut self) {
        self.events_by_type.clear();
        self.events_by_source.clear();
        self.events_by_source_and_type.clear();
        let counted: Vec<_> = self.events_by_slot().collect();
        for (source, event_type, count) in counted {
            *self.events_by_source.entry(source.into()).or_default() += count;
            *self.events_by_type.entry(event_type.into()).or_default() += count;
            self.events_by_source_and_type
                .insert(format!("{source}/{event_type}"), count);
        }
        self.malformed = self
            .malformed_by_kind
            .iter()
            .map(|(kind, count)| ((*kind).to_owned(), *count))
            .collect();
        self.events_per_minute = self
            .per_minute
            .iter()
            .filter_map(|(minute, count)| {
                let start = DateTime::from_timestamp(minute * 60, 0)?;
                Some((
                    start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    *count,
                ))
            })
            .collect();
        self.unique_users = self.users.len() as u64;
        for (id, users) in &self.product_users {
            if let Some(product) = self.products.get_mut(id) {
                product.unique_users = users.len() as u64;
            }
        }
        self.funnel.clear();
        for (source, stages) in self.sessions.values() {
            let funnel = self.funnel.entry(source.as_str_name().into()).or_default();
            funnel.sessions += 1;
            funnel.product_view_sessions += u64::from(stages.viewed);
            funnel.add_to_cart_sessions += u64::from(stages.carted);
            funnel.purchase_sessions += u64::from(stages.bought);
        }
    }

    /// Writes the truth as pretty JSON.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Generator, ModelParams, Population};

    #[test]
    fn merged_truths_equal_the_truth_of_every_record() {
        let params = ModelParams {
            duplicate_share: 0.02,
            malformed_share: 0.02,
            late_share: 0.02,
            ..ModelParams::default()
        };
        let start = "2026-01-05T08:00:00Z".parse().expect("a valid time");
        let mut generator =
            Generator::new(params, Population::synthetic(5_000, 200), 3, start, 200.0)
                .expect("a valid model");
        let mut whole = GroundTruth::new(3, true);
        let mut parts = [GroundTruth::new(3, true), GroundTruth::new(3, true)];
        for _ in 0..20_000 {
            let emission = generator.next_emission();
            whole.record(&emission);
            // Split by user (the last digit of the key), as the generators
            // of a run are.
            let part = emission
                .key()
                .last()
                .map_or(0, |digit| usize::from(digit % 2));
            parts[part].record(&emission);
        }
        assert!(parts.iter().all(|part| part.events > 5_000));
        let [mut merged, other] = parts;
        merged.merge(other);
        merged.finish();
        whole.finish();
        assert_eq!(
            serde_json::to_value(&merged).expect("serialisable"),
            serde_json::to_value(&whole).expect("serialisable")
        );
    }
}
