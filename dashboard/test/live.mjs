// What the dashboard's browser test and bench share: the platform started
// by scripts/dashboard-check.sh (its environment), an API server of the
// test's own that it can restart, Chromium, and grpc-web calls from Node
// with the stubs the page uses.

import { spawn } from "node:child_process";
import { once } from "node:events";
import { setTimeout as sleep } from "node:timers/promises";
import { create } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { chromium } from "playwright-core";
import { AnalyticsService } from "../src/gen/rtap/v1/analytics_pb.js";
import { IngestService } from "../src/gen/rtap/v1/ingest_pb.js";

export const root = new URL("../..", import.meta.url).pathname;

export function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run scripts/dashboard-check.sh`);
  }
  return value;
}

/** A free loopback port, from the server's own retry: ask the kernel. */
export async function freePort() {
  const net = await import("node:net");
  const server = net.createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  return port;
}

/**
 * An `rtap-server --role api` of the test's own on `port`, with the live
 * platform's configuration (database, Redis namespace, topics, TLS, keys):
 * the page talks to it; the platform's own server keeps ingesting.
 */
export class ApiServer {
  constructor(port) {
    this.port = port;
    this.origin = `https://127.0.0.1:${port}`;
  }

  async start() {
    // RTAP_DASHBOARD_SERVER: another build (the bench runs a release one).
    const binary = process.env.RTAP_DASHBOARD_SERVER ?? `${root}target/debug/rtap-server`;
    this.process = spawn(binary, [], {
      env: {
        ...process.env,
        RTAP_ROLE: "api",
        RTAP_LISTEN_ADDR: `127.0.0.1:${this.port}`,
        RTAP_METRICS_ADDR: "off",
      },
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.log = "";
    this.process.stderr.on("data", (chunk) => {
      this.log = (this.log + chunk).slice(-20000);
    });
    // Ready when a call with a key is answered: the page is served at once,
    // but calls are UNAVAILABLE until the server has loaded the API keys.
    const { analytics } = clients(this.origin, env("RTAP_READER_KEY"));
    const deadline = Date.now() + 60_000;
    for (;;) {
      try {
        const page = await fetch(`${this.origin}/dashboard/`);
        if (page.ok) {
          await analytics.getUniqueUsers({ window: { window: { case: "trailing", value: { seconds: 60n, nanos: 0 } } } });
          return;
        }
      } catch {
        // Not listening yet, or not ready.
      }
      if (this.process.exitCode !== null || Date.now() > deadline) {
        throw new Error(`rtap-server did not start:\n${this.log}`);
      }
      await sleep(200);
    }
  }

  async stop() {
    if (this.process && this.process.exitCode === null) {
      this.process.kill("SIGTERM");
      await once(this.process, "exit");
    }
  }
}

/** grpc-web clients from Node (global fetch; NODE_EXTRA_CA_CERTS trusts the CA). */
export function clients(origin, key) {
  const transport = createGrpcWebTransport({
    baseUrl: origin,
    interceptors: [
      (next) => (request) => {
        request.header.set("authorization", `Bearer ${key}`);
        return next(request);
      },
    ],
  });
  return {
    analytics: createClient(AnalyticsService, transport),
    ingest: createClient(IngestService, transport),
  };
}

/** Runs rtap-simulator with the platform's environment; resolves when it exits. */
export function simulator(args) {
  const child = spawn(`${root}target/debug/rtap-simulator`, [...args, "--progress", "none", "--metrics-addr", "off"], {
    env: process.env,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  child.stderr.on("data", (chunk) => {
    log = (log + chunk).slice(-20000);
  });
  const done = once(child, "exit").then(([code, signal]) => {
    if (code !== 0 && signal !== "SIGINT") {
      throw new Error(`rtap-simulator failed (${code ?? signal}):\n${log}`);
    }
  });
  return { child, done };
}

/** Headless Debian Chromium, flags as this machine's network needs. */
export async function browser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/**
 * Opens the dashboard in a fresh context, gives the key when the page asks
 * for it, and waits until every panel shows its first result. Returns the
 * page, the milliseconds from navigation to that first complete render, to
 * the key prompt, and from the key's submission to the render.
 */
export async function openDashboard(chrome, origin, key, problems = []) {
  const context = await chrome.newContext({
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 960 },
  });
  const page = await context.newPage();
  page.on("console", (message) => {
    if (message.type() === "error") {
      problems.push(`console: ${message.text()}`);
    }
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  await page.goto(`${origin}/dashboard/`);
  await page.locator("#key-form:not([hidden])").waitFor();
  await page.fill("#key", key);
  await page.click("#key-form button");
  await page.waitForSelector("html[data-ready=true]", { timeout: 30_000 });
  const [render, asked, given] = await page.evaluate(() =>
    ["rtap-ready", "rtap-key-asked", "rtap-key-given"].map(
      (name) => performance.getEntriesByName(name)[0]?.startTime ?? NaN,
    ),
  );
  return { context, page, render, asked, keyToRender: render - given };
}

/** Waits until the pipeline has applied every record the broker holds. */
export async function caughtUp(analytics, within = 60_000) {
  const deadline = Date.now() + within;
  for (;;) {
    const status = await analytics.getPipelineStatus({});
    if (status.partitions.length > 0 && status.partitions.every((p) => p.lag === 0n)) {
      return;
    }
    if (Date.now() > deadline) {
      throw new Error(`the pipeline did not catch up: ${JSON.stringify(status.total, (_, v) => (typeof v === "bigint" ? String(v) : v))}`);
    }
    await sleep(200);
  }
}

export { create, sleep };
