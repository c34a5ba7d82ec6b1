// What each panel holds: a subscription's snapshot with every delta applied
// in sequence, exactly as the examples in examples/ do. Pure functions, no
// DOM, so the end-to-end test can compare what they produce with the unary
// queries.

import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type {
  Delta,
  GetEventCountsResponse,
  GetFunnelResponse,
  GetTopProductsResponse,
  GetUniqueUsersResponse,
  Snapshot,
  Watermark,
} from "./gen/rtap/v1/analytics_pb";

/** Seconds since the epoch of a protobuf timestamp (0 when absent). */
export function seconds(time: Timestamp | undefined): number {
  return time ? Number(time.seconds) : 0;
}

/** Event counts: bucket start (s) → event type → count (sources summed). */
export interface EventCounts {
  kind: "eventCounts";
  start: number;
  end: number;
  buckets: Map<number, Map<number, number>>;
}

export interface UniqueUsers {
  kind: "uniqueUsers";
  users: number;
}

export interface ProductRow {
  id: bigint;
  value: bigint;
  /** Empty when the product is not in the catalog (deleted since). */
  name: string;
}

export interface TopProducts {
  kind: "topProducts";
  products: Map<bigint, ProductRow>;
}

export interface FunnelCounts {
  sessions: number;
  productViewSessions: number;
  addToCartSessions: number;
  purchaseSessions: number;
}

/** Funnel counts per source; the total is their sum. */
export interface Funnel {
  kind: "funnel";
  bySource: Map<number, FunnelCounts>;
}

export type Held = EventCounts | UniqueUsers | TopProducts | Funnel;

function eventCounts(response: GetEventCountsResponse): EventCounts {
  const held: EventCounts = {
    kind: "eventCounts",
    start: seconds(response.range?.startTime),
    end: seconds(response.range?.endTime),
    buckets: new Map(),
  };
  for (const bucket of response.buckets) {
    const byType = new Map<number, number>();
    for (const count of bucket.counts) {
      byType.set(count.eventType, (byType.get(count.eventType) ?? 0) + Number(count.count));
    }
    held.buckets.set(seconds(bucket.startTime), byType);
  }
  return held;
}

function uniqueUsers(response: GetUniqueUsersResponse): UniqueUsers {
  return { kind: "uniqueUsers", users: Number(response.uniqueUsers) };
}

function topProducts(response: GetTopProductsResponse): TopProducts {
  const products = new Map<bigint, ProductRow>();
  for (const p of response.products) {
    products.set(p.productId, { id: p.productId, value: p.value, name: p.productName });
  }
  return { kind: "topProducts", products };
}

function funnel(response: GetFunnelResponse): Funnel {
  const bySource = new Map<number, FunnelCounts>();
  for (const f of response.funnels) {
    bySource.set(f.source, {
      sessions: Number(f.sessions),
      productViewSessions: Number(f.productViewSessions),
      addToCartSessions: Number(f.addToCartSessions),
      purchaseSessions: Number(f.purchaseSessions),
    });
  }
  return { kind: "funnel", bySource };
}

/** The result a snapshot carries. */
export function fromSnapshot(snapshot: Snapshot): Held | undefined {
  const result = snapshot.result;
  switch (result.case) {
    case "eventCounts":
      return eventCounts(result.value);
    case "uniqueUsers":
      return uniqueUsers(result.value);
    case "topProducts":
      return topProducts(result.value);
    case "funnel":
      return funnel(result.value);
    default:
      return undefined;
  }
}

/**
 * Applies `delta` to `held` in place. Throws when the delta is of another
 * query kind (the stream is then restarted afresh).
 */
export function applyDelta(held: Held, delta: Delta): void {
  const change = delta.change;
  if (change.case === "eventCounts" && held.kind === "eventCounts") {
    for (const bucket of change.value.buckets) {
      const start = seconds(bucket.startTime);
      const byType = held.buckets.get(start) ?? new Map<number, number>();
      for (const count of bucket.counts) {
        byType.set(count.eventType, (byType.get(count.eventType) ?? 0) + Number(count.count));
      }
      held.buckets.set(start, byType);
    }
    for (const removed of change.value.removedBucketStartTimes) {
      held.buckets.delete(seconds(removed));
    }
    if (change.value.range) {
      held.start = seconds(change.value.range.startTime);
      held.end = seconds(change.value.range.endTime);
    }
  } else if (change.case === "uniqueUsers" && held.kind === "uniqueUsers") {
    held.users += Number(change.value.uniqueUsersChange);
  } else if (change.case === "topProducts" && held.kind === "topProducts") {
    for (const id of change.value.removedProductIds) {
      held.products.delete(id);
    }
    for (const p of change.value.upserted) {
      // A delta carries the name again only with a new value; keep the
      // name held when the delta has none.
      const name = p.productName || held.products.get(p.productId)?.name || "";
      held.products.set(p.productId, { id: p.productId, value: p.value, name });
    }
  } else if (change.case === "funnel" && held.kind === "funnel") {
    for (const c of change.value.changes) {
      const counts = held.bySource.get(c.source) ?? {
        sessions: 0,
        productViewSessions: 0,
        addToCartSessions: 0,
        purchaseSessions: 0,
      };
      counts.sessions += Number(c.sessionsChange);
      counts.productViewSessions += Number(c.productViewSessionsChange);
      counts.addToCartSessions += Number(c.addToCartSessionsChange);
      counts.purchaseSessions += Number(c.purchaseSessionsChange);
      held.bySource.set(c.source, counts);
    }
  } else {
    throw new Error(`a ${change.case ?? "empty"} delta for a ${held.kind} result`);
  }
}

/** Total events held per event type. */
export function eventTotals(held: EventCounts): Map<number, number> {
  const totals = new Map<number, number>();
  for (const byType of held.buckets.values()) {
    for (const [type, count] of byType) {
      totals.set(type, (totals.get(type) ?? 0) + count);
    }
  }
  return totals;
}

/** Products by value, highest first, ties by ascending id (as the server ranks). */
export function ranked(held: TopProducts): ProductRow[] {
  return [...held.products.values()].sort((a, b) =>
    a.value === b.value ? (a.id < b.id ? -1 : 1) : a.value > b.value ? -1 : 1,
  );
}

/** The funnel summed over sources, with its rates (0 when a denominator is). */
export function funnelTotal(held: Funnel): FunnelCounts & {
  viewToCartRate: number;
  cartToPurchaseRate: number;
  conversionRate: number;
} {
  const total: FunnelCounts = {
    sessions: 0,
    productViewSessions: 0,
    addToCartSessions: 0,
    purchaseSessions: 0,
  };
  for (const c of held.bySource.values()) {
    total.sessions += c.sessions;
    total.productViewSessions += c.productViewSessions;
    total.addToCartSessions += c.addToCartSessions;
    total.purchaseSessions += c.purchaseSessions;
  }
  const rate = (a: number, b: number) => (b === 0 ? 0 : a / b);
  return {
    ...total,
    viewToCartRate: rate(total.addToCartSessions, total.productViewSessions),
    cartToPurchaseRate: rate(total.purchaseSessions, total.addToCartSessions),
    conversionRate: rate(total.purchaseSessions, total.sessions),
  };
}

/** How far ingestion had got, merged over every stream's watermarks. */
export interface Progress {
  latestEventTime: number;
  offsets: Map<number, bigint>;
  /** When (client clock, ms) an offset last moved. */
  lastAdvance: number;
}

/** Merges `watermark` into `progress`; true when an offset moved forward. */
export function advance(progress: Progress, watermark: Watermark | undefined, now: number): boolean {
  if (!watermark) {
    return false;
  }
  progress.latestEventTime = Math.max(progress.latestEventTime, seconds(watermark.latestEventTime));
  let moved = false;
  for (const o of watermark.offsets) {
    const held = progress.offsets.get(o.partition);
    if (held === undefined || o.nextOffset > held) {
      progress.offsets.set(o.partition, o.nextOffset);
      moved = true;
    }
  }
  if (moved) {
    progress.lastAdvance = now;
  }
  return moved;
}
