// One resumable Subscribe stream: snapshot, then deltas applied in order;
// when the stream is cut (a server restart, a network blip) it resumes with
// the last message's token, backing off from 0.2 s to 5 s. A token the
// server refuses starts the stream afresh. Never polls.

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import {
  type AnalyticsService,
  type SubscribeRequest,
  SubscribeRequestSchema,
  type SubscribeResponse,
  ResyncReason,
} from "./gen/rtap/v1/analytics_pb";
import { applyDelta, fromSnapshot, type Held } from "./model";

const FIRST_BACKOFF_MS = 200;
const MAX_BACKOFF_MS = 5000;

export type StreamState = "connecting" | "live" | "retrying" | "needs-key" | "failed";

export interface Follower {
  /** The held result changed (snapshot or delta). */
  onResult(held: Held, resync: ResyncReason | undefined): void;
  /** Every message, heartbeats included (for the watermark). */
  onMessage(message: SubscribeResponse): void;
  onState(state: StreamState, detail: string): void;
}

/** Follows `query` until `signal` aborts. */
export async function follow(
  client: Client<typeof AnalyticsService>,
  query: SubscribeRequest["query"],
  follower: Follower,
  signal: AbortSignal,
): Promise<void> {
  let token: Uint8Array = new Uint8Array();
  let held: Held | undefined;
  let backoff = FIRST_BACKOFF_MS;
  while (!signal.aborted) {
    follower.onState(held ? "retrying" : "connecting", "");
    try {
      const request = create(SubscribeRequestSchema, { query, resumeToken: token });
      for await (const message of client.subscribe(request, { signal })) {
        backoff = FIRST_BACKOFF_MS;
        follower.onState("live", "");
        const update = message.update;
        if (update.case === "snapshot") {
          held = fromSnapshot(update.value);
          if (held) {
            follower.onResult(held, update.value.resync ? update.value.resyncReason : undefined);
          }
        } else if (update.case === "delta") {
          if (!held) {
            throw new Error("a delta before any snapshot");
          }
          applyDelta(held, update.value);
          follower.onResult(held, undefined);
        }
        follower.onMessage(message);
        token = message.resumeToken;
      }
      // The server ended the stream (shutting down): resume.
    } catch (error) {
      if (signal.aborted) {
        return;
      }
      const cause = ConnectError.from(error);
      if (cause.code === Code.Unauthenticated || cause.code === Code.PermissionDenied) {
        follower.onState("needs-key", cause.rawMessage);
        return;
      }
      if (cause.code === Code.InvalidArgument) {
        // A token this server cannot use: start afresh (a snapshot).
        if (token.length > 0) {
          token = new Uint8Array();
          continue;
        }
        follower.onState("failed", cause.rawMessage);
        return;
      }
      follower.onState("retrying", cause.rawMessage);
    }
    await sleep(backoff, signal);
    backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        resolve();
      },
      { once: true },
    );
  });
}
