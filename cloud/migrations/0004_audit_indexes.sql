-- 0004: the audit log is read by action and time (the notifications reconciler looks up
-- phase changes since a moment) and by subject (an account's history); index both.
CREATE INDEX audit_log_by_action ON audit_log (action, at);
CREATE INDEX audit_log_by_subject ON audit_log (subject, at);
