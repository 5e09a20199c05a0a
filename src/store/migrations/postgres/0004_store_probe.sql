-- PostgreSQL twin of sqlite/0004: the writer's probe inserts a row and deletes it again in
-- one transaction (a real write round trip). Each probe uses a random id, so the probes of
-- several nodes never wait for one another.
CREATE TABLE store_probe (
    id      BIGINT PRIMARY KEY,
    filler  BYTEA  NOT NULL
);
