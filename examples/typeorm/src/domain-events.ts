import type { EntityManager } from "typeorm";

/** Anything `JSON.stringify` turns into the same JSON the database stores. */
export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

/** Metadata keys with a documented meaning (docs/sql-api.md); other keys are kept as given. */
export interface EventMetadata {
  actor?: string | number;
  correlation_id?: string | number;
  causation_id?: string | number;
  tenant_id?: string | number;
  source?: string | number;
  [key: string]: JsonValue | undefined;
}

/** One event to append to an aggregate's stream. */
export interface DomainEvent<P extends object = JsonObject> {
  aggregateType: string;
  aggregateId: string;
  eventType: string;
  payload: P;
  metadata?: EventMetadata;
  /** The aggregate's version before this event; 0 = the aggregate must not exist yet. */
  expectedVersion?: number;
}

/** What `domain_events.raise_event` reports about the appended event. */
export interface RaisedEvent {
  id: string;
  /** Global position. `bigint` because positions outgrow JavaScript's safe integers. */
  position: bigint;
  aggregateVersion: number;
  recordedAt: Date;
}

interface RaiseEventRow {
  id: string;
  position: string; // node-postgres returns int8 as a string
  aggregate_version: string;
  recorded_at: Date;
}

/**
 * Raises domain events through a TypeORM transaction's EntityManager, so each event is written by
 * the same transaction as the aggregate: it commits or rolls back with it.
 */
export class DomainEvents {
  constructor(private readonly manager: EntityManager) {}

  async raise<P extends object>(event: DomainEvent<P>): Promise<RaisedEvent> {
    // The default EntityManager runs every query in its own autocommit transaction; an event
    // raised there would survive a rollback of the business change. Refuse it loudly.
    if (!this.manager.queryRunner?.isTransactionActive) {
      throw new Error(
        "DomainEvents.raise needs the EntityManager of a transaction: dataSource.transaction(async (manager) => ...)",
      );
    }
    // Named arguments for the optional tail: a positional NULL for metadata would be refused
    // (22004); expected_version is the one argument where NULL means "no check".
    // JSON.stringify explicitly: node-postgres would turn a JS array into a Postgres array literal.
    const rows: RaiseEventRow[] = await this.manager.query(
      `SELECT * FROM domain_events.raise_event($1, $2, $3, $4::jsonb,
                                               metadata => $5::jsonb,
                                               expected_version => $6::bigint)`,
      [
        event.aggregateType,
        event.aggregateId,
        event.eventType,
        JSON.stringify(event.payload),
        JSON.stringify(event.metadata ?? {}),
        event.expectedVersion ?? null,
      ],
    );
    const row = rows[0];
    if (row === undefined) {
      // domain_events.enabled = off: raising is a no-op by design (dark launch).
      throw new Error(`event ${event.eventType} was not recorded: domain_events.enabled is off`);
    }
    return {
      id: row.id,
      position: BigInt(row.position),
      aggregateVersion: Number(row.aggregate_version),
      recordedAt: row.recorded_at,
    };
  }
}
