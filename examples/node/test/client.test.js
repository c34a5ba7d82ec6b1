// The Node.js client against a live rtap-server fed by rtap-simulator
// (RTAP_ADDR, default 127.0.0.1:50051): real results, real errors.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Rtap, badRequestFields, grpc } = require('../client');

const client = new Rtap(process.env.RTAP_ADDR || '127.0.0.1:50051');
test.after(() => client.close());

test('the server is SERVING', async () => {
  assert.equal(await client.serving(), true);
});

test('created users get ids and duplicates are ALREADY_EXISTS', async () => {
  const suffix = crypto.randomUUID().slice(0, 8);
  const user = await client.createUser('Grace', `Hopper-${suffix}`);
  assert.ok(Number(user.id) > 0);
  await assert.rejects(client.createUser('grace', `hopper-${suffix}`), (error) => {
    assert.equal(error.code, grpc.status.ALREADY_EXISTS);
    return true;
  });
  const product = await client.createProduct(`Compiler ${suffix}`, 'software', 9.5);
  assert.ok(Number(product.id) > 0);
});

test('invalid fields come back as google.rpc.BadRequest details', async () => {
  await assert.rejects(client.createProduct('', 'software', -1), (error) => {
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    const fields = badRequestFields(error);
    assert.ok(fields.includes('product.name') && fields.includes('product.price'), `${fields}`);
    return true;
  });
});

test('every query returns the live traffic', async () => {
  const counts = await client.eventCounts();
  assert.ok(counts.buckets.reduce((n, b) => n + Number(b.total), 0) > 0);
  assert.ok(Number((await client.uniqueUsers()).uniqueUsers) > 0);
  const top = await client.topProducts(5);
  assert.ok(top.products.length > 0 && top.products.length <= 5);
  const values = top.products.map((p) => Number(p.value));
  assert.deepEqual(values, [...values].sort((a, b) => b - a));
  const engagement = await client.engagement(top.products[0].productId);
  // Live traffic keeps counting between the two calls: never fewer.
  assert.ok(Number(engagement.productViews) >= Number(top.products[0].value));
  const funnel = await client.funnel();
  assert.ok(Number(funnel.total.sessions) > 0);
});

test('a subscription sends a snapshot, then deltas in sequence', async () => {
  const messages = await client.followEventCounts(6000);
  assert.equal(messages[0].update, 'snapshot');
  assert.deepEqual(
    messages.map((m) => Number(m.sequence)),
    messages.map((_, i) => i + 1),
  );
  assert.ok(
    messages.slice(1).some((m) => m.update === 'delta'),
    `the simulator's traffic arrives as deltas: ${messages.map((m) => m.update)}`,
  );
});

test('a cut subscription resumes where it stopped', async () => {
  const before = await client.followEventCounts(30000, { cutAfter: 3 });
  assert.equal(before.length, 3);
  const after = await client.followEventCounts(3000, { resumeToken: before[2].resumeToken });
  assert.ok(after.length > 0, 'the resumed stream sends messages');
  const sequences = [...before, ...after].map((m) => Number(m.sequence));
  assert.deepEqual(
    sequences,
    sequences.map((_, i) => i + 1),
    'none missed, none repeated',
  );
  assert.ok(
    after.every((m) => m.update !== 'snapshot'),
    `replayed, not resynced: ${after.map((m) => m.update)}`,
  );
});

test('a call with an unknown key is UNAUTHENTICATED', { skip: !process.env.RTAP_API_KEY }, async () => {
  const stranger = new Rtap(process.env.RTAP_ADDR || '127.0.0.1:50051', {
    apiKey: `rtap_0123456789abcdef_${'A'.repeat(43)}`,
  });
  try {
    await assert.rejects(stranger.eventCounts(), (error) => {
      assert.equal(error.code, grpc.status.UNAUTHENTICATED);
      return true;
    });
  } finally {
    stranger.close();
  }
});
