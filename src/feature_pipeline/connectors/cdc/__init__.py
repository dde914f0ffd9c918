"""Change data capture: turns every warehouse change (MongoDB, PostgreSQL) into a published event."""
