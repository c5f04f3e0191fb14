-- 0007: the accounts in a phase with cloud devices (dual, cloud, cloud-only), the ones owed a
-- notification for each new message, in an index of their own. The notification rule
-- checks each member of a conversation against it: an index-only probe into an index that
-- holds only those accounts (few, early in a migration), instead of the account's row.
-- The phases must match cloud.model.CLOUD_CLIENT_PHASES, as the rule writes them (tested).
-- Account writes wait while it builds, unless an operator built it first CONCURRENTLY.
CREATE INDEX IF NOT EXISTS accounts_cloud_capable ON accounts (account_id)
    WHERE phase IN ('dual', 'cloud', 'cloud-only');
