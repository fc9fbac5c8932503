import { MigrationInterface, QueryRunner } from "typeorm";

export class CreateUserAccount1763900000000 implements MigrationInterface {
  name = "CreateUserAccount1763900000000";

  async up(queryRunner: QueryRunner): Promise<void> {
    // The event store comes with the extension; IF NOT EXISTS makes this a no-op (and needs no
    // privilege) where a DBA has already created it.
    await queryRunner.query(`CREATE EXTENSION IF NOT EXISTS pg_domain_events`);
    await queryRunner.query(`
      CREATE TABLE user_account (
        id         uuid PRIMARY KEY,
        email      text NOT NULL UNIQUE,
        name       text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
      )`);
  }

  async down(queryRunner: QueryRunner): Promise<void> {
    // The extension stays: its events are history, not part of this table's lifecycle.
    await queryRunner.query(`DROP TABLE user_account`);
  }
}
