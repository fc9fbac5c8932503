import { DataSource } from "typeorm";
import { CreateUserAccount1763900000000 } from "./migrations/1763900000000-CreateUserAccount";
import { User } from "./user.entity";

/** The application's DataSource; the database comes from DATABASE_URL (postgres://...). */
export function createDataSource(url: string): DataSource {
  return new DataSource({
    type: "postgres",
    url,
    entities: [User],
    migrations: [CreateUserAccount1763900000000],
    // Schema changes go through migrations: synchronize would diff the whole schema on every start.
    synchronize: false,
    logging: ["error"],
  });
}
