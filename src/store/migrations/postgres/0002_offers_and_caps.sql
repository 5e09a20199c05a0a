-- PostgreSQL twin of sqlite/0002.
ALTER TABLE devices ADD COLUMN purposes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN dwell_anchor BIGINT;

CREATE TABLE merchants (
    merchant_id  TEXT    PRIMARY KEY NOT NULL,
    name         TEXT    NOT NULL,
    -- SHA-256 of the API key; the key itself is shown once and never stored.
    key_hash     BYTEA   NOT NULL,
    created_at   BIGINT  NOT NULL,
    revoked_at   BIGINT
);

CREATE TABLE merchant_cells (
    merchant_id  TEXT    NOT NULL,
    cell         BIGINT  NOT NULL,
    PRIMARY KEY (merchant_id, cell)
);

CREATE TABLE offers (
    offer_id       TEXT    PRIMARY KEY NOT NULL,
    merchant_id    TEXT    NOT NULL,
    title          TEXT    NOT NULL,
    body           TEXT    NOT NULL,
    cell           BIGINT  NOT NULL,
    radius_k       BIGINT  NOT NULL,
    valid_from     BIGINT  NOT NULL,
    valid_until    BIGINT  NOT NULL,
    max_per_day    BIGINT  NOT NULL,
    -- "weekday,open,close;..." in minutes since local midnight; "" means always open.
    opening_hours  TEXT    NOT NULL,
    updated_at     BIGINT  NOT NULL
);

CREATE INDEX offers_merchant ON offers (merchant_id);

CREATE TABLE notifications (
    notification_id  TEXT    PRIMARY KEY NOT NULL,
    device           BYTEA   NOT NULL,
    offer_id         TEXT    NOT NULL,
    merchant_id      TEXT    NOT NULL,
    cell             BIGINT  NOT NULL,
    sent_at          BIGINT  NOT NULL,
    feedback         TEXT
);

CREATE INDEX notifications_device ON notifications (device, sent_at);
CREATE INDEX notifications_sent_at ON notifications (sent_at);
CREATE INDEX notifications_offer ON notifications (offer_id, sent_at);

CREATE TABLE restrictions (
    device         BYTEA   NOT NULL,
    merchant_id    TEXT    NOT NULL,
    muted          BIGINT  NOT NULL,
    dismissals     BIGINT  NOT NULL,
    backoff_until  BIGINT,
    PRIMARY KEY (device, merchant_id)
);
