"""A ticketing domain whose entities collect domain events and raise them with pg_domain_events."""
