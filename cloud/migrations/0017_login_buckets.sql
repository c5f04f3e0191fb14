-- 0017: the cloud API's failed-login budgets live in the store, so that every `cloud run` of
-- a deployment spends and checks the same ones (cloud/ratelimit.py, cloud/store/login_limits.py).
--
-- One row per budget that is not full: scope 'account' (key 'account:<uuid>', or
-- 'name:<login name>' for a name no account has) or 'address' (the client's address). A
-- budget is a token bucket of `capacity` failures that refills at `capacity` per window; the
-- row keeps only full_at_ms, when the bucket is full again (the generic cell rate
-- algorithm's "theoretical arrival time"): a failure moves it window/capacity later (from
-- now, if it lay in the past), a right password moves it back, and the bucket is empty when
-- full_at_ms is more than a window ahead. A row whose full_at_ms has passed holds nothing
-- and is deleted. Times are the API's clock in milliseconds, passed in, never now().
-- Grows with failing clients, not with users; key, the distribution key if this is ever
-- sharded, is in the primary key.
CREATE TABLE login_buckets (
    scope       text NOT NULL CHECK (scope IN ('account', 'address')),
    key         text NOT NULL,
    full_at_ms  double precision NOT NULL,
    PRIMARY KEY (scope, key)
);
-- pruning deletes the rows that are full again: a range of this index
CREATE INDEX login_buckets_by_full_at ON login_buckets (full_at_ms);
