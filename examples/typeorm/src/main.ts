// A runnable check that TypeORM and pg_domain_events share one transaction:
//   1. registering a user commits the row and its UserCreated event together;
//   2. a registration that fails after raising the event leaves neither behind.
// Exits non-zero when an expectation fails.
import "reflect-metadata";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import type { DataSource } from "typeorm";
import { createDataSource } from "./data-source";
import { User } from "./user.entity";
import { UserService } from "./user.service";

interface StoredEvent {
  event_type: string;
  aggregate_version: string;
  payload: Record<string, unknown>;
  metadata: Record<string, unknown>;
}

async function eventsOf(dataSource: DataSource, userId: string): Promise<StoredEvent[]> {
  return dataSource.query(
    `SELECT event_type, aggregate_version, payload, metadata
       FROM domain_events.aggregate_events('User', $1)`,
    [userId],
  );
}

async function commitsUserWithEvent(dataSource: DataSource, run: string): Promise<void> {
  const email = `ada+${run}@example.com`;
  const service = new UserService(dataSource);
  const { user, event } = await service.register(email, "Ada Lovelace", "signup-form");
  console.log(
    `registered ${email} as User/${user.id}: ` +
      `UserCreated at position ${event.position}, version ${event.aggregateVersion}`,
  );
  assert.equal(event.aggregateVersion, 1);

  // Read back after the commit, outside the transaction.
  const events = await eventsOf(dataSource, user.id);
  assert.equal(events.length, 1, "exactly one event for the new user");
  const [stored] = events;
  assert.equal(stored.event_type, "UserCreated");
  assert.equal(Number(stored.aggregate_version), 1);
  assert.deepEqual(stored.payload, { email, name: "Ada Lovelace" });
  assert.deepEqual(stored.metadata, { actor: "signup-form", source: "typeorm-example" });
  assert.ok(await dataSource.getRepository(User).findOneBy({ id: user.id }), "the user row is committed");
  console.log(`  ok: the row and its event are committed; metadata ${JSON.stringify(stored.metadata)}`);
}

async function rollsBackUserAndEvent(dataSource: DataSource, run: string): Promise<void> {
  const email = `grace+${run}@example.com`;
  let attempted: User | undefined;
  let versionInsideTransaction: number | undefined;
  const service = new UserService(dataSource, [
    async (manager, user) => {
      attempted = user;
      // Proof that the event really was raised before the failure, not merely skipped.
      const [row] = await manager.query(`SELECT domain_events.aggregate_version('User', $1) AS v`, [user.id]);
      versionInsideTransaction = Number(row.v);
      throw new Error("welcome mail rejected the address");
    },
  ]);

  await assert.rejects(service.register(email, "Grace Hopper", "signup-form"), /welcome mail rejected/);
  assert.ok(attempted, "the failing step ran");
  assert.equal(versionInsideTransaction, 1, "inside the transaction the event existed");
  console.log(
    `registration of ${email} as User/${attempted.id} raised UserCreated, then failed and rolled back`,
  );

  assert.equal((await eventsOf(dataSource, attempted.id)).length, 0, "no event after the rollback");
  assert.equal(await dataSource.getRepository(User).countBy({ email }), 0, "no user row after the rollback");
  const [{ v }] = await dataSource.query(
    `SELECT domain_events.aggregate_version('User', $1) AS v`,
    [attempted.id],
  );
  assert.equal(Number(v), 0, "the aggregate's stream does not exist");
  console.log("  ok: neither the row nor the event exists");
}

async function main(): Promise<void> {
  const url = process.env.DATABASE_URL;
  if (!url) {
    throw new Error("set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:54329/mydb");
  }
  const dataSource = await createDataSource(url).initialize();
  try {
    await dataSource.runMigrations();
    // Distinct e-mail addresses per run, so the example can run again on the same database.
    const run = randomUUID().slice(0, 8);
    await commitsUserWithEvent(dataSource, run);
    await rollsBackUserAndEvent(dataSource, run);
    console.log("typeorm example: all checks passed");
  } finally {
    await dataSource.destroy();
  }
}

main().catch((err: unknown) => {
  console.error("typeorm example FAILED:", err);
  process.exitCode = 1;
});
