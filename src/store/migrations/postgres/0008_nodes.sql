-- Nodes sharing this store (several hexveil processes behind a load balancer): each renews
-- its row every second (`beats` counts up); a node whose counter stands still for the
-- timeout is deleted by another (conditionally on the counter it saw). `seq` orders joins
-- and is never reused; `seen` is the highest `seq` the node had applied to its share of the
-- per-device rate limit when it last wrote.
CREATE TABLE nodes (
    seq     BIGSERIAL PRIMARY KEY,
    node_id TEXT      NOT NULL UNIQUE,
    beats   BIGINT    NOT NULL DEFAULT 0,
    seen    BIGINT    NOT NULL DEFAULT 0
);
