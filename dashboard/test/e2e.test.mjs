// The dashboard in headless Chromium against a live platform fed by the
// simulator (scripts/dashboard-check.sh starts it): the page asks for a key
// and loads without console errors, every panel equals the unary queries,
// an event tracked through Track appears, a server restart is survived,
// the time-window selector switches every panel. Saves a screenshot to
// .run/dashboard.png.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { randomUUID } from "node:crypto";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { CalendarPeriod, Granularity, ProductRanking } from "../src/gen/rtap/v1/analytics_pb.js";
import { EventType, Source } from "../src/gen/rtap/v1/events_pb.js";
import {
  ApiServer,
  browser,
  caughtUp,
  clients,
  env,
  freePort,
  openDashboard,
  root,
  simulator,
  sleep,
} from "./live.mjs";

const HOUR = { window: { case: "trailing", value: { seconds: 3600n, nanos: 0 } } };
const TODAY = { window: { case: "current", value: CalendarPeriod.TODAY } };

let server;
let chrome;
let api;
let problems;
let page;

before(async () => {
  server = new ApiServer(await freePort());
  await server.start();
  api = clients(server.origin, env("RTAP_API_KEY"));
  chrome = await browser();
});

after(async () => {
  await chrome?.close();
  await server?.stop();
});

/** What the page shows, from its panels' data-value attributes. */
async function shown() {
  return page.evaluate(() => {
    const value = (selector) => JSON.parse(document.querySelector(selector).dataset.value || "null");
    return {
      events: value("#event-totals"),
      users: value("#unique-users"),
      funnel: value("#funnel-table"),
      views: value("#top-views ol"),
      revenue: value("#top-revenue ol"),
    };
  });
}

/** The same figures from the unary queries. */
async function expected(window) {
  const { analytics } = api;
  const counts = await analytics.getEventCounts({ window, granularity: Granularity.MINUTE });
  const events = {};
  for (const type of [1, 2, 3, 4, 5, 6]) {
    events[EventType[type]] = 0;
  }
  for (const bucket of counts.buckets) {
    for (const c of bucket.counts) {
      events[EventType[c.eventType]] += Number(c.count);
    }
  }
  const users = Number((await analytics.getUniqueUsers({ window })).uniqueUsers);
  const total = (await analytics.getFunnel({ window })).total;
  const rate = (a, b) => (b === 0 ? 0 : a / b);
  const sessions = Number(total.sessions);
  const viewed = Number(total.productViewSessions);
  const carted = Number(total.addToCartSessions);
  const bought = Number(total.purchaseSessions);
  const funnel = {
    sessions,
    productViewSessions: viewed,
    addToCartSessions: carted,
    purchaseSessions: bought,
    viewToCartRate: rate(carted, viewed),
    cartToPurchaseRate: rate(bought, carted),
    conversionRate: rate(bought, sessions),
  };
  const ranking = async (ranking) =>
    (await analytics.getTopProducts({ window, ranking, limit: 10, includeProductNames: true })).products.map(
      (p) => ({ id: String(p.productId), value: String(p.value), name: p.productName }),
    );
  return {
    events,
    users,
    funnel,
    views: await ranking(ProductRanking.VIEWS),
    revenue: await ranking(ProductRanking.REVENUE),
  };
}

/** Waits until the page shows what the unary queries answer. */
async function showsTheUnaryAnswers(window, label) {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const want = await expected(window);
    const have = await shown();
    try {
      assert.deepEqual(have, want, `${label}: the page differs from the unary queries`);
      return want;
    } catch (error) {
      if (Date.now() > deadline) {
        throw error;
      }
    }
    await sleep(250);
  }
}

/** Tracks one product view by a new user; resolves with the time it was sent. */
async function trackView(productId) {
  const sent = Date.now();
  await api.ingest.track({
    event: {
      eventId: randomUUID(),
      occurredAt: timestampFromMs(sent),
      userId: BigInt(900_000_000 + Math.floor(Math.random() * 1_000_000)),
      productId: BigInt(productId),
      source: Source.WEB,
      type: EventType.PRODUCT_VIEW,
      sessionId: `e2e-${randomUUID()}`,
    },
  });
  return sent;
}

/** Waits until the page counts `views` product views; the ms it took from `since`. */
async function pageCountsViews(views, since) {
  await page.waitForFunction(
    (want) => JSON.parse(document.querySelector("#event-totals").dataset.value).PRODUCT_VIEW >= want,
    views,
    { timeout: 10_000, polling: "raf" },
  );
  return Date.now() - since;
}

test("the dashboard follows the live platform in a real browser", async (t) => {
  problems = [];
  let render;
  ({ page, render } = await openDashboard(chrome, server.origin, env("RTAP_READER_KEY"), problems));
  console.log(`dashboard: navigation to first complete render ${render.toFixed(0)} ms`);

  await t.test("it loads without console errors and keeps the key in memory only", async () => {
    assert.deepEqual(problems, []);
    const stored = await page.evaluate(() => [localStorage.length, sessionStorage.length, document.cookie]);
    assert.deepEqual(stored, [0, 0, ""]);
    assert.equal(await page.getAttribute("#status", "data-state"), "live");
  });

  await t.test("it moves while the simulator sends traffic", async () => {
    const before = (await shown()).events;
    const traffic = simulator([
      ...["--server-addr", `https://${env("RTAP_ADDR")}`],
      ...["--rate", "200", "--users", "20000", "--session-gap", "5m"],
    ]);
    try {
      await page.waitForFunction(
        (was) => {
          const now = JSON.parse(document.querySelector("#event-totals").dataset.value);
          return Object.keys(now).some((type) => now[type] > was[type]);
        },
        before,
        { timeout: 20_000 },
      );
    } finally {
      traffic.child.kill("SIGINT");
      await traffic.done;
    }
  });

  await t.test("every panel equals the unary queries once ingest has caught up", async () => {
    await caughtUp(api.analytics);
    const want = await showsTheUnaryAnswers(HOUR, "last hour");
    assert.ok(want.users > 0 && want.views.length > 0, "the simulator's traffic shows");
    assert.ok(
      want.views.some((p) => p.name !== ""),
      "products show by name (the simulator seeded the catalog)",
    );
    const names = await page.locator("#top-views li span").allTextContents();
    assert.deepEqual(
      names,
      want.views.map((p) => p.name || `#${p.id}`),
    );
  });

  await t.test("an event tracked through Track appears on the page", async () => {
    const { events, views } = await shown();
    const sent = await trackView(views[0].id);
    const took = await pageCountsViews(events.PRODUCT_VIEW + 1, sent);
    console.log(`dashboard: Track to the page ${took} ms`);
    await showsTheUnaryAnswers(HOUR, "after Track");
  });

  await t.test("a server restart is survived", async () => {
    await server.stop();
    await page.waitForSelector("#status:not([data-state=live])", { timeout: 10_000 });
    await server.start();
    await page.waitForSelector("#status[data-state=live]", { timeout: 30_000 });
    const { events, views } = await shown();
    const sent = await trackView(views[0].id);
    await pageCountsViews(events.PRODUCT_VIEW + 1, sent);
    await showsTheUnaryAnswers(HOUR, "after the restart");
    const thrown = problems.filter((p) => p.startsWith("page error"));
    assert.deepEqual(thrown, [], "no script error through the restart");
  });

  await t.test("the window selector switches every panel", async () => {
    await page.click("button[data-window=today]");
    await page.waitForSelector("html[data-ready=true]", { timeout: 30_000 });
    await showsTheUnaryAnswers(TODAY, "today");
    await page.click("button[data-window=hour]");
    await page.waitForSelector("html[data-ready=true]", { timeout: 30_000 });
    await showsTheUnaryAnswers(HOUR, "back to the last hour");
  });

  await page.screenshot({ path: `${root}.run/dashboard.png`, fullPage: true });
});
