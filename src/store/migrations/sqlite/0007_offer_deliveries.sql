-- Deliveries per offer and cell without any device: what an offer's daily budget and the
-- per-cell flood guard count (in the conditional write and at start). Notifications are
-- per device and go with ForgetMe, retention and the per-device log trim; a budget counted
-- from them would be refilled by an erasure. Kept 24 hours (the longest window counted).
CREATE TABLE offer_deliveries (
    offer_id TEXT    NOT NULL,
    cell     INTEGER NOT NULL,
    sent_at  INTEGER NOT NULL
);

CREATE INDEX offer_deliveries_offer ON offer_deliveries (offer_id, sent_at);
CREATE INDEX offer_deliveries_cell ON offer_deliveries (cell, sent_at);
CREATE INDEX offer_deliveries_sent_at ON offer_deliveries (sent_at);

INSERT INTO offer_deliveries (offer_id, cell, sent_at)
    SELECT offer_id, cell, sent_at FROM notifications;
