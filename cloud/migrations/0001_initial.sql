-- 0001: the cloud store's first schema.
--
-- Sharding rule (Citus-ready): every table that grows with users or messages carries its
-- distribution key (conversation_id or account_id) in every unique constraint. Lookups by a
-- different key (handle -> account, legacy chat id -> conversation) live in their own small
-- tables whose primary key *is* their distribution key.
-- Times that the code compares (expiry, retry schedules, message timestamps) are integer
-- milliseconds from the injected clock; *_at timestamptz columns are for people reading rows.

-- IMMUTABLE wrappers so the digest hash can be a stored generated column. convert_to is only
-- STABLE because it depends on the server encoding; the store requires UTF8 (checked at
-- upgrade time), which makes these truly immutable here.
CREATE FUNCTION legacy_message_hash(guid text, sender text, ts_ms bigint, body text)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURNS NULL ON NULL INPUT AS $$
  SELECT ('x' || substr(encode(sha256(convert_to(
      guid || chr(31) || sender || chr(31) || ts_ms::text || chr(31) || body,
      'UTF8')), 'hex'), 1, 16))::bit(64)::bigint
$$;

CREATE FUNCTION legacy_guid_bucket(guid text)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURNS NULL ON NULL INPUT AS $$
  SELECT ('x' || substr(encode(sha256(convert_to(guid, 'UTF8')), 'hex'), 1, 8))::bit(32)::bigint
$$;

CREATE TABLE accounts (
    account_id       uuid PRIMARY KEY,
    handle           text NOT NULL,
    legacy_handle    text,
    display_name     text NOT NULL DEFAULT '',
    password_hash    text,
    phase            text NOT NULL DEFAULT 'legacy'
                     CHECK (phase IN ('legacy', 'dual', 'cloud', 'cloud-only')),
    phase_changed_at timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- handle -> account (login by handle, the bridge's handle translation); distributed by handle.
CREATE TABLE account_handles (
    handle     text PRIMARY KEY,
    account_id uuid NOT NULL
);

CREATE TABLE conversations (
    conversation_id uuid PRIMARY KEY,
    legacy_chat_id  text,
    title           text NOT NULL DEFAULT '',
    next_seq        bigint NOT NULL DEFAULT 1 CHECK (next_seq >= 1),
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- legacy chat id -> conversation; distributed by legacy_chat_id.
CREATE TABLE conversation_legacy_ids (
    legacy_chat_id  text PRIMARY KEY,
    conversation_id uuid NOT NULL
);

CREATE TABLE members (
    conversation_id uuid NOT NULL REFERENCES conversations,
    account_id      uuid NOT NULL,
    joined_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, account_id)
);
CREATE INDEX members_by_account ON members (account_id);

CREATE TABLE messages (
    conversation_id   uuid NOT NULL,
    seq               bigint NOT NULL CHECK (seq >= 1),
    message_id        uuid NOT NULL,
    legacy_guid       text,
    sender_account_id uuid NOT NULL,
    sender_handle     text NOT NULL,
    sent_ms           bigint NOT NULL,
    body              text NOT NULL,
    origin            text NOT NULL CHECK (origin IN ('cloud', 'legacy')),
    client_message_id text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    digest_hash       bigint GENERATED ALWAYS AS
                      (legacy_message_hash(legacy_guid, sender_handle, sent_ms, body)) STORED,
    digest_bucket     bigint GENERATED ALWAYS AS (legacy_guid_bucket(legacy_guid)) STORED,
    PRIMARY KEY (conversation_id, seq),
    UNIQUE (conversation_id, message_id),
    UNIQUE (conversation_id, legacy_guid),
    UNIQUE (conversation_id, sender_account_id, client_message_id)
);
CREATE INDEX messages_by_time ON messages (conversation_id, sent_ms);

CREATE TABLE presence (
    account_id uuid NOT NULL,
    source     text NOT NULL,
    status     text NOT NULL CHECK (status IN ('online', 'away', 'busy', 'offline')),
    version    bigint NOT NULL,
    expires_ms bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, source)
);

-- Transactional outbox of push notifications: written in the message's transaction.
CREATE TABLE notifications (
    account_id      uuid NOT NULL,
    notification_id uuid NOT NULL,
    conversation_id uuid NOT NULL,
    message_id      uuid NOT NULL,
    seq             bigint NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'sent', 'acked', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_ms bigint NOT NULL,
    created_ms      bigint NOT NULL,
    sent_ms         bigint,
    acked_ms        bigint,
    last_error      text,
    PRIMARY KEY (account_id, notification_id),
    UNIQUE (account_id, conversation_id, message_id)
);
CREATE INDEX notifications_due ON notifications (next_attempt_ms)
    WHERE state IN ('pending', 'sent');

-- Cloud-originated messages the bridge still has to inject into the legacy network.
CREATE TABLE outbox_to_legacy (
    conversation_id uuid NOT NULL,
    seq             bigint NOT NULL,
    message_id      uuid NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done')),
    attempts        integer NOT NULL DEFAULT 0,
    created_ms      bigint NOT NULL,
    done_ms         bigint,
    PRIMARY KEY (conversation_id, seq)
);
CREATE INDEX outbox_to_legacy_pending ON outbox_to_legacy (created_ms) WHERE state = 'pending';

-- Where the bridge is in each legacy feed; committed with the data it covers.
CREATE TABLE bridge_checkpoints (
    source      text PRIMARY KEY,
    epoch       text NOT NULL,
    "offset"    bigint NOT NULL CHECK ("offset" >= 0),
    fence       bigint NOT NULL DEFAULT 0,
    updated_ms  bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE leases (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    fence      bigint NOT NULL,
    expires_ms bigint NOT NULL
);

CREATE TABLE reconcile_runs (
    run_id      bigserial PRIMARY KEY,
    kind        text NOT NULL,
    state       text NOT NULL DEFAULT 'running'
                CHECK (state IN ('running', 'finished', 'interrupted', 'failed')),
    started_ms  bigint NOT NULL,
    finished_ms bigint,
    progress    jsonb NOT NULL DEFAULT '{}'::jsonb,
    report      jsonb
);

CREATE TABLE reconcile_findings (
    finding_id      bigserial PRIMARY KEY,
    run_id          bigint,
    kind            text NOT NULL,
    state           text NOT NULL DEFAULT 'open'
                    CHECK (state IN ('open', 'repaired', 'failed', 'dismissed')),
    conversation_id uuid,
    account_id      uuid,
    detail          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_ms      bigint NOT NULL,
    resolved_ms     bigint
);
CREATE INDEX reconcile_findings_open ON reconcile_findings (kind) WHERE state = 'open';
CREATE INDEX reconcile_findings_by_conversation ON reconcile_findings (conversation_id);

CREATE TABLE audit_log (
    audit_id bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    action   text NOT NULL,
    subject  text NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}'::jsonb
);
