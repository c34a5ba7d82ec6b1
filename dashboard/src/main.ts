// The dashboard: one Subscribe stream per panel over grpc-web, on the same
// port and origin as the gRPC API (rtap-server serves this page too).

import "./style.css";
import "uplot/dist/uPlot.min.css";
import { create } from "@bufbuild/protobuf";
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import uPlot from "uplot";
import {
  AnalyticsService,
  CalendarPeriod,
  GetEventCountsRequestSchema,
  GetFunnelRequestSchema,
  GetTopProductsRequestSchema,
  GetUniqueUsersRequestSchema,
  Granularity,
  ProductRanking,
  type SubscribeRequest,
  TimeWindowSchema,
  type TimeWindow,
} from "./gen/rtap/v1/analytics_pb";
import { EventType } from "./gen/rtap/v1/events_pb";
import { follow, type StreamState } from "./live";
import {
  advance,
  type EventCounts,
  eventTotals,
  type Funnel,
  funnelTotal,
  type Held,
  type Progress,
  ranked,
  type TopProducts,
} from "./model";

/** The API key, in this page's memory only. */
let apiKey: string | undefined;

const withKey: Interceptor = (next) => (request) => {
  if (apiKey) {
    request.header.set("authorization", `Bearer ${apiKey}`);
  }
  return next(request);
};
const client = createClient(
  AnalyticsService,
  createGrpcWebTransport({ baseUrl: location.origin, interceptors: [withKey] }),
);

type WindowName = "hour" | "today" | "day";

function timeWindow(name: WindowName): TimeWindow {
  switch (name) {
    case "hour":
      return create(TimeWindowSchema, {
        window: { case: "trailing", value: { seconds: 3600n, nanos: 0 } },
      });
    case "today":
      return create(TimeWindowSchema, { window: { case: "current", value: CalendarPeriod.TODAY } });
    case "day":
      return create(TimeWindowSchema, {
        window: { case: "trailing", value: { seconds: 86400n, nanos: 0 } },
      });
  }
}

const TYPES: [EventType, string, string][] = [
  [EventType.PAGE_VIEW, "page views", "#5b8def"],
  [EventType.PRODUCT_VIEW, "product views", "#4fc28b"],
  [EventType.ADD_TO_CART, "cart adds", "#e0a526"],
  [EventType.REMOVE_FROM_CART, "cart removals", "#b07cd8"],
  [EventType.PURCHASE, "purchases", "#e05555"],
  [EventType.SEARCH, "searches", "#56607a"],
];

const element = <T extends HTMLElement>(selector: string): T => {
  const found = document.querySelector<T>(selector);
  if (!found) {
    throw new Error(`the page has no ${selector}`);
  }
  return found;
};

// Repaints at most once per animation frame, whatever the message rate:
// the latest paint of each panel waits for the next frame (a hidden tab has
// none, and keeps one paint per panel meanwhile).
const dirty = new Map<string, () => void>();
function schedule(panel: string, paint: () => void): void {
  if (dirty.size === 0) {
    requestAnimationFrame(() => {
      const paints = [...dirty.values()];
      dirty.clear();
      for (const p of paints) {
        p();
      }
      markReadyOnce();
    });
  }
  dirty.set(panel, paint);
}

// --- Panels --------------------------------------------------------------

let chart: uPlot | undefined;
function paintEvents(held: EventCounts): void {
  const step = 60;
  const xs: number[] = [];
  for (let t = held.start; t < held.end; t += step) {
    xs.push(t);
  }
  const series = TYPES.map(([type]) => xs.map((t) => held.buckets.get(t)?.get(type) ?? 0));
  const data: uPlot.AlignedData = [xs, ...series];
  const box = element("#chart");
  if (!chart) {
    chart = new uPlot(
      {
        width: Math.max(box.clientWidth, 300),
        height: 260,
        series: [{}, ...TYPES.map(([, label, stroke]) => ({ label, stroke, width: 1.5, points: { show: false } }))],
        legend: { live: false },
        axes: [{}, { size: 50 }],
        scales: { x: { time: true } },
      },
      data,
      box,
    );
  } else {
    chart.setData(data);
  }
  const totals = eventTotals(held);
  const shown: Record<string, number> = {};
  const line = element("#event-totals");
  line.replaceChildren(
    ...TYPES.map(([type, label]) => {
      shown[EventType[type]] = totals.get(type) ?? 0;
      const span = document.createElement("span");
      span.append(`${label} `);
      const b = document.createElement("b");
      b.textContent = (totals.get(type) ?? 0).toLocaleString("en");
      span.append(b);
      return span;
    }),
  );
  line.dataset.value = JSON.stringify(shown);
}

function paintUsers(users: number): void {
  const big = element("#unique-users");
  big.textContent = users.toLocaleString("en");
  big.dataset.value = String(users);
}

function paintFunnel(held: Funnel): void {
  const f = funnelTotal(held);
  const percent = (r: number) => `${(r * 100).toFixed(1)} %`;
  const rows: [string, number, string][] = [
    ["Sessions", f.sessions, ""],
    ["Viewed a product", f.productViewSessions, ""],
    ["Added to cart", f.addToCartSessions, `${percent(f.viewToCartRate)} of viewers`],
    ["Purchased", f.purchaseSessions, `${percent(f.cartToPurchaseRate)} of carts`],
    ["Conversion", NaN, percent(f.conversionRate)],
  ];
  const table = element<HTMLTableElement>("#funnel-table");
  table.tBodies[0].replaceChildren(
    ...rows.map(([label, n, rate]) => {
      const tr = document.createElement("tr");
      for (const [text, cls] of [
        [label, ""],
        [Number.isNaN(n) ? "" : n.toLocaleString("en"), "n"],
        [rate, "rate"],
      ]) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.append(td);
      }
      return tr;
    }),
  );
  table.dataset.value = JSON.stringify(f);
}

function paintRanking(panel: string, held: TopProducts, format: (v: bigint) => string): void {
  const list = element(`${panel} ol`);
  const rows = ranked(held);
  list.replaceChildren(
    ...rows.map((row) => {
      const li = document.createElement("li");
      li.dataset.id = String(row.id);
      const name = document.createElement("span");
      if (row.name) {
        name.textContent = row.name;
      } else {
        name.textContent = `#${row.id}`;
        name.className = "id";
        name.title = "not in the catalog";
      }
      const value = document.createElement("b");
      value.textContent = format(row.value);
      li.append(name, value);
      return li;
    }),
  );
  list.dataset.value = JSON.stringify(
    rows.map((r) => ({ id: String(r.id), value: String(r.value), name: r.name })),
  );
}

const count = (v: bigint) => Number(v).toLocaleString("en");
const money = (micros: bigint) =>
  (Number(micros) / 1e6).toLocaleString("en", { minimumFractionDigits: 2, maximumFractionDigits: 2 });

// --- Pipeline, from every stream's watermark -------------------------------

const progress: Progress = { latestEventTime: 0, offsets: new Map(), lastAdvance: 0 };
function paintPipeline(): void {
  const now = Date.now();
  const ago = (ms: number) => (ms < 1000 ? "just now" : `${Math.round(ms / 1000)} s ago`);
  if (progress.latestEventTime > 0) {
    element("#latest-event").textContent = new Date(progress.latestEventTime * 1000).toLocaleTimeString();
    element("#lag").textContent = `${Math.max(0, Math.round(now / 1000 - progress.latestEventTime))} s`;
  }
  if (progress.lastAdvance > 0) {
    element("#last-commit").textContent = ago(now - progress.lastAdvance);
  }
  const offsets = [...progress.offsets].sort(([a], [b]) => a - b);
  if (offsets.length > 0) {
    element("#offsets").textContent = offsets.map(([p, o]) => `p${p} ${o}`).join(" · ");
  }
}
// The "ago" texts age with the clock, not with messages: a local timer.
setInterval(paintPipeline, 1000);

// --- Streams ---------------------------------------------------------------

interface PanelStream {
  name: string;
  query: (window: TimeWindow) => SubscribeRequest["query"];
  paint: (held: Held) => void;
}

const PANELS: PanelStream[] = [
  {
    name: "events",
    query: (window) => ({
      case: "eventCounts",
      value: create(GetEventCountsRequestSchema, { window, granularity: Granularity.MINUTE }),
    }),
    paint: (held) => held.kind === "eventCounts" && paintEvents(held),
  },
  {
    name: "users",
    query: (window) => ({ case: "uniqueUsers", value: create(GetUniqueUsersRequestSchema, { window }) }),
    paint: (held) => held.kind === "uniqueUsers" && paintUsers(held.users),
  },
  {
    name: "funnel",
    query: (window) => ({ case: "funnel", value: create(GetFunnelRequestSchema, { window }) }),
    paint: (held) => held.kind === "funnel" && paintFunnel(held),
  },
  {
    name: "top-views",
    query: (window) => ({
      case: "topProducts",
      value: create(GetTopProductsRequestSchema, {
        window,
        ranking: ProductRanking.VIEWS,
        limit: 10,
        includeProductNames: true,
      }),
    }),
    paint: (held) => held.kind === "topProducts" && paintRanking("#top-views", held, count),
  },
  {
    name: "top-revenue",
    query: (window) => ({
      case: "topProducts",
      value: create(GetTopProductsRequestSchema, {
        window,
        ranking: ProductRanking.REVENUE,
        limit: 10,
        includeProductNames: true,
      }),
    }),
    paint: (held) => held.kind === "topProducts" && paintRanking("#top-revenue", held, money),
  },
];

const states = new Map<string, StreamState>();
const painted = new Set<string>();
let running: AbortController | undefined;
let windowName: WindowName = "hour";

function paintStatus(detail: string): void {
  const all = [...states.values()];
  const status = element("#status");
  const state: StreamState = all.includes("needs-key")
    ? "needs-key"
    : all.includes("failed")
      ? "failed"
      : all.length === PANELS.length && all.every((s) => s === "live")
        ? "live"
        : all.includes("retrying")
          ? "retrying"
          : "connecting";
  status.dataset.state = state;
  status.textContent = {
    live: "live",
    connecting: "connecting…",
    retrying: "reconnecting…",
    "needs-key": "API key needed",
    failed: `failed: ${detail}`,
  }[state];
  const form = element<HTMLFormElement>("#key-form");
  form.hidden = state !== "needs-key";
  if (state === "needs-key") {
    if (performance.getEntriesByName("rtap-key-asked").length === 0) {
      performance.mark("rtap-key-asked");
    }
    element("#key-error").textContent = apiKey ? detail : "";
    element<HTMLInputElement>("#key").focus();
  }
}

function start(): void {
  running?.abort();
  const controller = new AbortController();
  running = controller;
  states.clear();
  painted.clear();
  delete document.documentElement.dataset.ready;
  const window = timeWindow(windowName);
  for (const panel of PANELS) {
    void follow(
      client,
      panel.query(window),
      {
        onResult: (held) =>
          schedule(panel.name, () => {
            if (!controller.signal.aborted) {
              panel.paint(held);
              painted.add(panel.name);
            }
          }),
        onMessage: (message) => {
          if (advance(progress, message.watermark, Date.now())) {
            schedule("pipeline", paintPipeline);
          }
        },
        onState: (state, detail) => {
          if (!controller.signal.aborted) {
            states.set(panel.name, state);
            paintStatus(detail);
          }
        },
      },
      controller.signal,
    );
  }
}

/** Marks the page ready once every panel has painted its first result. */
function markReadyOnce(): void {
  const root = document.documentElement;
  if (root.dataset.ready !== "true" && PANELS.every((p) => painted.has(p.name))) {
    root.dataset.ready = "true";
    performance.mark("rtap-ready");
  }
}

for (const button of document.querySelectorAll<HTMLButtonElement>("#windows button")) {
  button.addEventListener("click", () => {
    windowName = button.dataset.window as WindowName;
    for (const b of document.querySelectorAll<HTMLButtonElement>("#windows button")) {
      b.setAttribute("aria-pressed", String(b === button));
    }
    chart?.destroy();
    chart = undefined;
    start();
  });
}

element<HTMLFormElement>("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = element<HTMLInputElement>("#key").value.trim();
  performance.mark("rtap-key-given");
  start();
});

window.addEventListener("resize", () => {
  chart?.setSize({ width: Math.max(element("#chart").clientWidth, 300), height: 260 });
});

start();
