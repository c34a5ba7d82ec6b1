// A small RTAP client for Node.js: @grpc/grpc-js, with the service stubs
// loaded from the repository's proto/ by @grpc/proto-loader.
//
//   node client.js 127.0.0.1:50051
//
// (with RTAP_API_KEY=<key> when the server requires keys, and
// RTAP_TLS_CA=<CA file> when it serves TLS) creates a user and a product, runs each kind of analytics query over the
// last hour and follows a subscription for a few messages, resuming it with
// its last token if the connection drops. It shows the health service,
// deadlines on every call, and how to read the google.rpc.BadRequest
// details of an INVALID_ARGUMENT.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const health = require('grpc-health-check');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const GOOGLE_PROTOS = path.dirname(require.resolve('google-proto-files/package.json'));
/** Deadline of unary calls, in milliseconds. */
const DEADLINE_MS = 5000;

const loaded = grpc.loadPackageDefinition(
  protoLoader.loadSync(
    ['rtap/v1/catalog.proto', 'rtap/v1/analytics.proto', 'rtap/v1/ingest.proto'],
    { includeDirs: [PROTO_ROOT], longs: String, enums: String, defaults: true, oneofs: true },
  ),
);
const healthPackage = grpc.loadPackageDefinition(
  protoLoader.loadSync(health.protoPath, { defaults: true, enums: String }),
);
const rtap = loaded.rtap.v1;
/** Codes after which a subscription is worth resuming. */
const RESUMABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.INTERNAL, grpc.status.UNKNOWN]);

// google.rpc.Status and its details, to decode `grpc-status-details-bin`.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (_origin, target) =>
  target.startsWith('google/rpc') ? path.join(GOOGLE_PROTOS, target) : target;
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const Status = rpcTypes.lookupType('google.rpc.Status');
const BadRequest = rpcTypes.lookupType('google.rpc.BadRequest');

function deadline(ms = DEADLINE_MS) {
  return { deadline: new Date(Date.now() + ms) };
}

/** Calls a unary method and resolves with its reply. */
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(), (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

/** The fields named by the google.rpc.BadRequest detail of an error. */
function badRequestFields(error) {
  const [details] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!details) return [];
  const status = Status.decode(details);
  return status.details
    .filter((any) => any.type_url.endsWith('/google.rpc.BadRequest'))
    .flatMap((any) => BadRequest.decode(any.value).fieldViolations.map((v) => v.field));
}

const lastHour = () => ({ trailing: { seconds: 3600, nanos: 0 } });

/** An interceptor sending `authorization: Bearer <key>` with every call. */
function bearerKey(key) {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set('authorization', `Bearer ${key}`);
        next(metadata, listener);
      },
    });
}

class Rtap {
  /** `apiKey` and `tlsCa` (a PEM file) default to RTAP_API_KEY and RTAP_TLS_CA. */
  constructor(address, { apiKey = process.env.RTAP_API_KEY, tlsCa = process.env.RTAP_TLS_CA } = {}) {
    const credentials = tlsCa
      ? grpc.credentials.createSsl(fs.readFileSync(tlsCa))
      : grpc.credentials.createInsecure();
    const options = apiKey ? { interceptors: [bearerKey(apiKey)] } : {};
    this.health = new healthPackage.grpc.health.v1.Health(address, credentials, options);
    this.users = new rtap.UserService(address, credentials, options);
    this.products = new rtap.ProductService(address, credentials, options);
    this.analytics = new rtap.AnalyticsService(address, credentials, options);
  }

  async serving() {
    const reply = await call(this.health, 'check', { service: '' });
    return reply.status === 'SERVING';
  }

  async createUser(firstName, lastName) {
    return (await call(this.users, 'createUser', { user: { firstName, lastName } })).user;
  }

  async createProduct(name, category, price) {
    return (await call(this.products, 'createProduct', { product: { name, category, price } }))
      .product;
  }

  eventCounts() {
    return call(this.analytics, 'getEventCounts', { window: lastHour() });
  }

  uniqueUsers() {
    return call(this.analytics, 'getUniqueUsers', { window: lastHour() });
  }

  engagement(productId) {
    return call(this.analytics, 'getEngagement', { window: lastHour(), productId });
  }

  topProducts(limit = 10) {
    return call(this.analytics, 'getTopProducts', {
      window: lastHour(),
      ranking: 'PRODUCT_RANKING_VIEWS',
      limit,
    });
  }

  funnel() {
    return call(this.analytics, 'getFunnel', { window: lastHour() });
  }

  /**
   * Collects a subscription's messages for `ms` milliseconds (or until
   * `cutAfter` messages), then cancels it. When the connection drops it
   * subscribes again with the last message's `resumeToken` (waiting 200 ms,
   * doubling up to 5 s), so the stream goes on with the messages missed:
   * none lost, none repeated (or a snapshot marked `resync`, with its
   * reason, when the server cannot replay them).
   */
  followEventCounts(ms, { resumeToken = Buffer.alloc(0), cutAfter = Infinity } = {}) {
    const deadline = Date.now() + ms;
    const messages = [];
    let token = resumeToken;
    let delay = 200;
    const attempt = () =>
      new Promise((resolve, reject) => {
        const stream = this.analytics.subscribe({
          eventCounts: { window: lastHour() },
          heartbeatInterval: { seconds: 1, nanos: 0 },
          resumeToken: token,
        });
        const timer = setTimeout(() => stream.cancel(), Math.max(deadline - Date.now(), 0));
        stream.on('data', (message) => {
          messages.push(message);
          token = message.resumeToken;
          delay = 200;
          if (messages.length >= cutAfter) stream.cancel();
        });
        stream.on('error', (error) => {
          clearTimeout(timer);
          // Our own cancel ends it; a refused token starts afresh; a drop resumes.
          if (error.code === grpc.status.CANCELLED) resolve(true);
          else if (error.code === grpc.status.INVALID_ARGUMENT && token.length > 0) {
            token = Buffer.alloc(0);
            resolve(false);
          } else if (RESUMABLE.has(error.code)) resolve(false);
          else reject(error);
        });
        stream.on('end', () => {
          clearTimeout(timer);
          resolve(true);
        });
      });
    return (async () => {
      while (Date.now() < deadline && !(await attempt())) {
        await new Promise((wake) => setTimeout(wake, Math.min(delay, deadline - Date.now())));
        delay = Math.min(delay * 2, 5000);
      }
      return messages;
    })();
  }

  close() {
    for (const client of [this.health, this.users, this.products, this.analytics]) client.close();
  }
}

async function main(address) {
  const client = new Rtap(address);
  console.log('serving:', await client.serving());
  const suffix = crypto.randomUUID().slice(0, 8);
  const user = await client.createUser('Ada', `Lovelace-${suffix}`);
  const product = await client.createProduct(`Analytical Engine ${suffix}`, 'machines', 1843);
  console.log('created user', user.id, 'and product', product.id);
  try {
    await client.createProduct('', 'machines', -1);
  } catch (error) {
    console.log(grpc.status[error.code], 'on fields', badRequestFields(error));
  }
  const counts = await client.eventCounts();
  console.log('events in the last hour:', counts.buckets.reduce((n, b) => n + Number(b.total), 0));
  console.log('unique users:', (await client.uniqueUsers()).uniqueUsers);
  const top = await client.topProducts(3);
  console.log('top products:', top.products.map((p) => [p.productId, p.value]));
  console.log('conversion:', (await client.funnel()).total.conversionRate);
  for (const message of await client.followEventCounts(3500)) {
    console.log('message', message.sequence, message.update);
  }
  client.close();
}

module.exports = { Rtap, badRequestFields, grpc };

if (require.main === module) {
  main(process.argv[2] || '127.0.0.1:50051').catch((error) => {
    console.error(error);
    process.exit(1);
  });
}
