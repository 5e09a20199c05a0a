-- PostgreSQL twin of sqlite/0001: the same tables, keys and meaning. Device pseudonyms are
-- BYTEA, cells and millisecond timestamps BIGINT (a cell is stored as SQLite stores it: its
-- 64-bit index reinterpreted as a signed integer).
CREATE TABLE devices (
    device          BYTEA   PRIMARY KEY NOT NULL,
    created_at      BIGINT  NOT NULL,
    last_activity   BIGINT  NOT NULL,
    cell            BIGINT,
    cell_since      BIGINT,
    cell_last_seen  BIGINT
);

CREATE INDEX devices_last_activity ON devices (last_activity);

CREATE TABLE consent_receipts (
    seq             BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    receipt_id      TEXT    NOT NULL UNIQUE,
    device          BYTEA   NOT NULL,
    purposes        BIGINT  NOT NULL,
    granted_at      BIGINT  NOT NULL,
    policy_version  TEXT    NOT NULL,
    controller      TEXT    NOT NULL
);

CREATE INDEX consent_receipts_device ON consent_receipts (device, seq);
