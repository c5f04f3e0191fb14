-- 0013: operator controls, switches an operator sets for the whole deployment.
--
-- One row per switch that is on, keyed by its name; no row: off. The first is
-- 'migration_freeze': while it exists every promotion is held by the gate 'frozen', whose
-- reason quotes value->>'reason', set_by and set_ms. The table holds a handful of rows
-- whatever the number of users, so it carries no distribution key (a Citus reference table).
-- Every change also writes an audit_log row.
CREATE TABLE operator_controls (
    name    text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    value   jsonb NOT NULL DEFAULT '{}'::jsonb,
    set_by  text NOT NULL,
    set_ms  bigint NOT NULL
);
