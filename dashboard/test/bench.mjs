// Figures of the dashboard against a local server (run by
// scripts/dashboard-check.sh bench): navigation to first complete render
// (every panel showing its first result; includes the key prompt's round
// trip), over fresh browser contexts, and Track to the page.

import { randomUUID } from "node:crypto";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { EventType, Source } from "../src/gen/rtap/v1/events_pb.js";
import { ApiServer, browser, clients, env, freePort, openDashboard } from "./live.mjs";

const LOADS = Number(process.env.RTAP_BENCH_LOADS ?? 20);
const TRACKS = Number(process.env.RTAP_BENCH_TRACKS ?? 20);

const quantile = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
const summary = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  return `p50 ${quantile(sorted, 0.5).toFixed(0)} ms, p90 ${quantile(sorted, 0.9).toFixed(0)} ms, max ${sorted.at(-1).toFixed(0)} ms (n=${sorted.length})`;
};

const server = new ApiServer(await freePort());
await server.start();
const chrome = await browser();
try {
  const renders = [];
  const prompts = [];
  const keyed = [];
  for (let i = 0; i < LOADS; i++) {
    const { context, render, asked, keyToRender } = await openDashboard(
      chrome,
      server.origin,
      env("RTAP_READER_KEY"),
    );
    renders.push(render);
    prompts.push(asked);
    keyed.push(keyToRender);
    await context.close();
  }
  console.log(`dashboard bench: navigation to first complete render: ${summary(renders)}`);
  console.log(`dashboard bench:   of which navigation to the key prompt: ${summary(prompts)}`);
  console.log(`dashboard bench:   and the key given to the render: ${summary(keyed)}`);

  const { page } = await openDashboard(chrome, server.origin, env("RTAP_READER_KEY"));
  const { ingest } = clients(server.origin, env("RTAP_API_KEY"));
  const latencies = [];
  for (let i = 0; i < TRACKS; i++) {
    const views = await page.evaluate(
      () => JSON.parse(document.querySelector("#event-totals").dataset.value).PRODUCT_VIEW,
    );
    const sent = Date.now();
    await ingest.track({
      event: {
        eventId: randomUUID(),
        occurredAt: timestampFromMs(sent),
        userId: BigInt(800_000_000 + i),
        productId: 1n,
        source: Source.WEB,
        type: EventType.PRODUCT_VIEW,
        sessionId: `bench-${randomUUID()}`,
      },
    });
    await page.waitForFunction(
      (want) => JSON.parse(document.querySelector("#event-totals").dataset.value).PRODUCT_VIEW >= want,
      views + 1,
      { timeout: 10_000, polling: "raf" },
    );
    latencies.push(Date.now() - sent);
  }
  console.log(`dashboard bench: Track to the page: ${summary(latencies)}`);
} finally {
  await chrome.close();
  await server.stop();
}
