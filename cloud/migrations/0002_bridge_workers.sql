-- 0002: bridge workers report themselves, so operators (bridgectl status) and the migration
-- gates can see who is mirroring and how far behind it is.
CREATE TABLE bridge_workers (
    worker_id          text PRIMARY KEY,
    started_ms         bigint NOT NULL,
    heartbeat_ms       bigint NOT NULL,
    state              text NOT NULL DEFAULT 'starting'
                       CHECK (state IN ('starting', 'ready', 'degraded', 'stopped')),
    -- p99 of (commit time - event time) over the last reporting window, per direction
    lag_to_cloud_ms    bigint,
    lag_to_legacy_ms   bigint,
    mirrored_to_cloud  bigint NOT NULL DEFAULT 0,
    mirrored_to_legacy bigint NOT NULL DEFAULT 0,
    feeds              integer NOT NULL DEFAULT 0,
    detail             jsonb NOT NULL DEFAULT '{}'::jsonb
);
