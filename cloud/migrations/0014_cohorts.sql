-- 0014: named cohorts (bridgectl cohort ...): a stored set of accounts an operator moves
-- forward together, through the gates, and can move back to where each member was.
--
-- cohorts: one row per cohort (a handful: no distribution key, a Citus reference table).
-- A name is never reused, whatever the cohort's state. 'active' until it is completed
-- (final: no more advance or reverse) or cancelled (its advances reversed).
CREATE TABLE cohorts (
    cohort_id   bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    state       text NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'completed', 'cancelled')),
    -- how the members were chosen: {"percent": P}, {"file": PATH} or {"handles": [...]}
    selection   jsonb NOT NULL,
    created_by  text NOT NULL,
    created_ms  bigint NOT NULL,
    ended_by    text,
    ended_ms    bigint
);

-- cohort_members: the stored membership, fixed when the cohort is created. An account is a
-- member of at most one active cohort (the partial unique index), so a reverse of one
-- cohort never undoes another active cohort's move of the same account. Grows with users:
-- account_id is in every unique constraint.
CREATE TABLE cohort_members (
    account_id  uuid NOT NULL REFERENCES accounts (account_id),
    cohort_id   bigint NOT NULL REFERENCES cohorts (cohort_id),
    active      boolean NOT NULL DEFAULT true,
    PRIMARY KEY (account_id, cohort_id)
);
CREATE UNIQUE INDEX cohort_members_one_active ON cohort_members (account_id) WHERE active;
CREATE INDEX cohort_members_by_cohort ON cohort_members (cohort_id);

-- cohort_advances: each `cohort advance` that planned a move or held someone, numbered
-- from 1 per cohort. moved is NULL until the command finished (a crash leaves it NULL:
-- some members may have moved); reversed_ms is set when `cohort reverse` or `cancel`
-- undid it. A reverse undoes the newest advance not reversed yet that moved someone.
CREATE TABLE cohort_advances (
    cohort_id   bigint NOT NULL REFERENCES cohorts (cohort_id),
    advance_no  integer NOT NULL CHECK (advance_no > 0),
    to_phase    text NOT NULL CHECK (to_phase IN ('dual', 'cloud', 'cloud-only')),
    forced      boolean NOT NULL,
    actor       text NOT NULL,
    at_ms       bigint NOT NULL,
    moved       integer,
    held        integer,
    failed      integer,
    reversed_ms bigint,
    PRIMARY KEY (cohort_id, advance_no)
);

-- cohort_advance_members: per member and advance, the phase it had when the advance was
-- planned (what a reverse moves it back to) and, when a gate held it, the gates that
-- failed (as GateResult.to_json(), with when: 'plan' or 'apply'). Recorded in the same
-- transaction that read the phases for the plan, before any member moves.
CREATE TABLE cohort_advance_members (
    account_id   uuid NOT NULL,
    cohort_id    bigint NOT NULL,
    advance_no   integer NOT NULL,
    before_phase text NOT NULL CHECK (before_phase IN ('legacy', 'dual', 'cloud', 'cloud-only')),
    held         jsonb,
    PRIMARY KEY (account_id, cohort_id, advance_no),
    FOREIGN KEY (account_id, cohort_id) REFERENCES cohort_members (account_id, cohort_id),
    FOREIGN KEY (cohort_id, advance_no) REFERENCES cohort_advances (cohort_id, advance_no)
);
CREATE INDEX cohort_advance_members_by_advance
    ON cohort_advance_members (cohort_id, advance_no);
