import type { DataSource, EntityManager } from "typeorm";
import { DomainEvents, type RaisedEvent } from "./domain-events";
import { User } from "./user.entity";

/** Payload of `UserCreated`: the user's basic data (seed 000). */
export interface UserCreated {
  email: string;
  name: string;
}

/** More work of the registration's unit of work, run after the event is raised (e.g. quotas, mail outbox). */
export type RegistrationStep = (manager: EntityManager, user: User) => Promise<void>;

export class UserService {
  constructor(
    private readonly dataSource: DataSource,
    private readonly steps: RegistrationStep[] = [],
  ) {}

  /** Saves a new user and raises `UserCreated`: both commit, or neither does. */
  async register(email: string, name: string, actor: string): Promise<{ user: User; event: RaisedEvent }> {
    return this.dataSource.transaction(async (manager) => {
      // Who did it, for every event of this transaction (metadata.actor). set_config(..., true)
      // is SET LOCAL with a bind parameter instead of string-built SQL.
      await manager.query(`SELECT set_config('domain_events.actor', $1, true)`, [actor]);

      const user = await manager.save(User.register(email, name));
      const event = await new DomainEvents(manager).raise<UserCreated>({
        aggregateType: "User",
        aggregateId: user.id,
        eventType: "UserCreated",
        payload: { email: user.email, name: user.name },
        metadata: { source: "typeorm-example" },
        expectedVersion: 0, // a new user: its stream must not exist yet
      });

      for (const step of this.steps) {
        await step(manager, user);
      }
      return { user, event };
    });
  }
}
