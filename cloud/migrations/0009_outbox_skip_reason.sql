-- 0009: why an outbox row was skipped. 'no_legacy_clients': nobody in the conversation had
-- legacy clients when the row was drained; a move out of cloud-only puts these rows back to
-- pending (cloud.store.outbox.backfill_outbox), because legacy never got them. 'refused': the
-- legacy network will never accept the message (an inject_refused finding says why); a
-- back-fill leaves these alone. Rows skipped before this migration are told apart by their
-- inject_refused finding. A skipped row always has a reason, and only a skipped row has one.
ALTER TABLE outbox_to_legacy ADD COLUMN skip_reason text;
UPDATE outbox_to_legacy o SET skip_reason = CASE WHEN EXISTS (
        SELECT 1 FROM reconcile_findings f
        WHERE f.kind = 'inject_refused' AND f.conversation_id = o.conversation_id
          AND f.detail->>'message_id' = o.message_id::text)
    THEN 'refused' ELSE 'no_legacy_clients' END
WHERE o.state = 'skipped';
ALTER TABLE outbox_to_legacy ADD CONSTRAINT outbox_to_legacy_skip_reason_check
    CHECK ((state = 'skipped') = (skip_reason IS NOT NULL)
           AND (skip_reason IS NULL OR skip_reason IN ('no_legacy_clients', 'refused')));
