-- 0020: the bridge's presence mirror (bridge/presence.py) polls the cloud-source presence
-- rows set after a cursor (version, account_id), in that order (store:
-- presence.cloud_presence_changes). Without an index each poll read every presence row of
-- every source; with this one it reads from the cursor on, as many rows as it returns.
-- Built in this migration's transaction: presence writes wait while it builds, unless an
-- operator built it first with CREATE INDEX CONCURRENTLY under this name (as for 0006/0007).
CREATE INDEX IF NOT EXISTS presence_cloud_changes ON presence (version, account_id)
    WHERE source = 'cloud';
