-- Devices are keyed by their pseudonym (a keyed hash of the token, never the token).
-- No location history: at most one current cell per device, overwritten in place.
CREATE TABLE devices (
    device          BLOB    PRIMARY KEY NOT NULL,
    created_at      INTEGER NOT NULL,
    last_activity   INTEGER NOT NULL,
    cell            INTEGER,
    cell_since      INTEGER,
    cell_last_seen  INTEGER
) WITHOUT ROWID;

CREATE INDEX devices_last_activity ON devices (last_activity);

-- Consent receipts, a short history per device (the newest few are kept).
CREATE TABLE consent_receipts (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    receipt_id      TEXT    NOT NULL UNIQUE,
    device          BLOB    NOT NULL,
    purposes        INTEGER NOT NULL,
    granted_at      INTEGER NOT NULL,
    policy_version  TEXT    NOT NULL,
    controller      TEXT    NOT NULL
);

CREATE INDEX consent_receipts_device ON consent_receipts (device, seq);
