-- Current consent and dwell anchor, denormalized onto the device row so that in-memory
-- state can be rebuilt with one scan at start.
ALTER TABLE devices ADD COLUMN purposes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN dwell_anchor INTEGER;

CREATE TABLE merchants (
    merchant_id  TEXT    PRIMARY KEY NOT NULL,
    name         TEXT    NOT NULL,
    -- SHA-256 of the API key; the key itself is shown once and never stored.
    key_hash     BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);

CREATE TABLE merchant_cells (
    merchant_id  TEXT    NOT NULL,
    cell         INTEGER NOT NULL,
    PRIMARY KEY (merchant_id, cell)
) WITHOUT ROWID;

CREATE TABLE offers (
    offer_id       TEXT    PRIMARY KEY NOT NULL,
    merchant_id    TEXT    NOT NULL,
    title          TEXT    NOT NULL,
    body           TEXT    NOT NULL,
    cell           INTEGER NOT NULL,
    radius_k       INTEGER NOT NULL,
    valid_from     INTEGER NOT NULL,
    valid_until    INTEGER NOT NULL,
    max_per_day    INTEGER NOT NULL,
    -- "weekday,open,close;..." in minutes since local midnight; "" means always open.
    opening_hours  TEXT    NOT NULL,
    updated_at     INTEGER NOT NULL
);

CREATE INDEX offers_merchant ON offers (merchant_id);

-- The bounded notification log: what was sent to whom, when, and the feedback on it.
CREATE TABLE notifications (
    notification_id  TEXT    PRIMARY KEY NOT NULL,
    device           BLOB    NOT NULL,
    offer_id         TEXT    NOT NULL,
    merchant_id      TEXT    NOT NULL,
    cell             INTEGER NOT NULL,
    sent_at          INTEGER NOT NULL,
    feedback         TEXT
);

CREATE INDEX notifications_device ON notifications (device, sent_at);
CREATE INDEX notifications_sent_at ON notifications (sent_at);
CREATE INDEX notifications_offer ON notifications (offer_id, sent_at);

-- Mutes and dismissal back-offs, per device and merchant.
CREATE TABLE restrictions (
    device         BLOB    NOT NULL,
    merchant_id    TEXT    NOT NULL,
    muted          INTEGER NOT NULL,
    dismissals     INTEGER NOT NULL,
    backoff_until  INTEGER,
    PRIMARY KEY (device, merchant_id)
) WITHOUT ROWID;
