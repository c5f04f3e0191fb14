-- 0018: account recovery (issue 21): one-time recovery codes, the new credential on its way
-- to the legacy login server, and the recovery attempts' own failure budgets.
--
-- recovery_codes: at most one code per account (issuing a new one replaces the old, so an
-- earlier unused code stops working). Only a salted hash of the code is kept (the password
-- hash form of cloud/passwords.py); expires_ms and used_ms are the issuer's and the API's
-- clocks in milliseconds, passed in, never now(). account_id, the distribution key, is the
-- primary key.
CREATE TABLE recovery_codes (
    account_id  uuid PRIMARY KEY REFERENCES accounts (account_id) ON DELETE CASCADE,
    code_hash   text NOT NULL,
    issued_ms   bigint NOT NULL,
    expires_ms  bigint NOT NULL CHECK (expires_ms > issued_ms),
    issued_by   text NOT NULL,
    used_ms     bigint
);

-- credential_changes: a password set on the cloud (a recovery) that the bridge still owes,
-- or has given, the legacy login server. One row per linked account, the newest change:
-- state 'pending' until the login server acknowledged the hash ('delivered') or has no such
-- handle ('skipped'). While a row is pending, or was delivered after an account import
-- began, the import keeps the cloud hash (cloud/admin.py), so the legacy copy of the old
-- password never overwrites the new one. Durable: a worker that dies delivers nothing
-- twice in effect (setting a hash is idempotent) and loses nothing (the row stays pending).
CREATE TABLE credential_changes (
    account_id     uuid PRIMARY KEY REFERENCES accounts (account_id) ON DELETE CASCADE,
    legacy_handle  text NOT NULL,
    password_hash  text NOT NULL,
    changed_ms     bigint NOT NULL,
    state          text NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'delivered', 'skipped')),
    attempts       integer NOT NULL DEFAULT 0,
    next_try_ms    bigint NOT NULL,
    last_error     text,
    done_ms        bigint
);
CREATE INDEX credential_changes_pending ON credential_changes (next_try_ms)
    WHERE state = 'pending';

-- the recovery route's failure budgets, kept apart from the logins' (cloud/ratelimit.py)
ALTER TABLE login_buckets DROP CONSTRAINT login_buckets_scope_check;
ALTER TABLE login_buckets ADD CONSTRAINT login_buckets_scope_check
    CHECK (scope IN ('account', 'address', 'recover_account', 'recover_address'));
