-- The polled change feed (IDENTITY_CHANGE_FEED=poll, storage/postgres/poll.rs):
-- every change a replica would announce with NOTIFY is, in that mode, a row
-- written in the changing transaction, which every replica reads.
--
-- change_id orders the rows by insert, not by commit, so a replica does not
-- read "the rows after the last one seen": a row with a lower change_id can
-- become visible after one with a higher. It reads instead the rows whose
-- writer (the writing transaction's id) its previous read's snapshot did
-- not yet see as committed. horizon is the oldest transaction still running
-- when the row was written: every row whose writer is older had committed
-- (or aborted) by then, which is what the retention job's pruning relies on.
-- change_time is by the database's clock, in microseconds since the epoch.
CREATE TABLE changes (
    change_id   BIGINT GENERATED ALWAYS AS IDENTITY,
    writer      xid8   NOT NULL,
    horizon     xid8   NOT NULL,
    change_time BIGINT NOT NULL,
    kind        TEXT   NOT NULL,
    subject_id  TEXT   NOT NULL,
    CONSTRAINT changes_pkey PRIMARY KEY (change_id),
    CONSTRAINT changes_kind_check CHECK (kind IN ('credential', 'account'))
);
-- Each poll reads the rows of the transactions its previous one did not see
-- committed: at or above that snapshot's oldest running transaction.
CREATE INDEX changes_writer_idx ON changes (writer);
-- The pruning finds the newest horizon among the rows old enough to go.
CREATE INDEX changes_time_idx ON changes (change_time);
