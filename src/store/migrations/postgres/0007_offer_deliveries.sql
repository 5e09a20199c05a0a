-- PostgreSQL twin of sqlite/0007: deliveries per offer and cell without any device, what an
-- offer's daily budget and the per-cell flood guard count. Kept 24 hours.
CREATE TABLE offer_deliveries (
    offer_id TEXT    NOT NULL,
    cell     BIGINT  NOT NULL,
    sent_at  BIGINT  NOT NULL
);

CREATE INDEX offer_deliveries_offer ON offer_deliveries (offer_id, sent_at);
CREATE INDEX offer_deliveries_cell ON offer_deliveries (cell, sent_at);
CREATE INDEX offer_deliveries_sent_at ON offer_deliveries (sent_at);

INSERT INTO offer_deliveries (offer_id, cell, sent_at)
    SELECT offer_id, cell, sent_at FROM notifications;
