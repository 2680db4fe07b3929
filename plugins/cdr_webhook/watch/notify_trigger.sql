-- Optional: wake the CDR commit watcher the moment CDRs are committed, instead of at its next poll.
--
-- Installed by `python -m cdr_webhook source install-notify TABLE` (removed by `remove-notify`),
-- which runs this file and then creates the trigger on TABLE, the table your dialer inserts CDRs
-- into (for the reference schema: dialer.cdr; for a view over another schema, the table behind the
-- view's created_at):
--
--   CREATE TRIGGER cdr_webhook_notify AFTER INSERT ON dialer.cdr
--       FOR EACH STATEMENT EXECUTE FUNCTION cdr_webhook.notify_commit();
--
-- A statement-level trigger: one notification per INSERT statement however many rows it writes, and
-- PostgreSQL folds identical notifications of one transaction into one, delivered at its commit. The
-- payload (the table's name) is a hint: the watcher probes the source for what is new, and polls as a
-- fallback, because a notification sent while no watcher listens is lost.
CREATE SCHEMA IF NOT EXISTS cdr_webhook;

CREATE OR REPLACE FUNCTION cdr_webhook.notify_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cdr_webhook_commits', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
    RETURN NULL;
END
$$;
